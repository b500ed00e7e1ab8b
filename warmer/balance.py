"""Which replica should own which shard: the same answer in every replica, from the live set.

Every replica computes ``assign(shards, live)`` from the replicas alive in the shared store
(``Shared.beat``); since they all see the same set within a beat, they agree without
talking to each other, and each only takes what is assigned to it and gives back what is
not. Rendezvous hashing ranks the replicas for each shard by a hash of (replica, shard);
shards stay with a live replica holding them while it has room, and the others go to
their best-ranked replica that still has room, room being ``S // N`` shards, or one more
for as many replicas as ``S % N``: counts differ by one at most. When a
replica joins or leaves, most shards keep their owner (those of the leaver move; the
joiner takes about ``S / N``), so a rebalance hands over few shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence


def score(replica: str, shard: int) -> int:
    """The rank of ``replica`` for ``shard``: a stable hash, the same in every process."""
    digest = hashlib.blake2b(f"{shard}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(
    shards: int, replicas: Sequence[str], current: Mapping[int, str] | None = None
) -> dict[str, frozenset[int]]:
    """Each replica's shards (every one of ``range(shards)`` to exactly one replica).

    ``current``: who holds each shard now (the store's owners). A shard stays with a live
    holder that has room for it, so a replica that joins takes only what balance needs
    (none of a lone shard's: the other replica stays its hot standby); the rest go by rank.
    """
    live = sorted(set(replicas))
    if not live:
        return {}
    base, extra = divmod(shards, len(live))
    taken: dict[str, set[int]] = {replica: set() for replica in live}
    owner: dict[int, str] = {}
    fuller = 0  # replicas holding base + 1

    def give(shard: int, replica: str) -> None:
        nonlocal fuller
        held = len(taken[replica])
        if shard in owner or not (held < base or (held == base and fuller < extra)):
            return
        fuller += held == base
        taken[replica].add(shard)
        owner[shard] = replica

    holding: dict[str, list[int]] = {}
    for shard, replica in sorted((current or {}).items()):
        if replica in taken and 0 <= shard < shards:
            holding.setdefault(replica, []).append(shard)
    # Those holding most keep theirs first (the extra slots go to them), each keeping its
    # best-ranked shards.
    for replica in sorted(holding, key=lambda r: (-len(holding[r]), r)):
        for shard in sorted(holding[replica], key=lambda k: -score(replica, k)):
            give(shard, replica)
    ranked = sorted(
        ((score(replica, shard), shard, replica) for shard in range(shards) for replica in live),
        reverse=True,
    )
    for _, shard, replica in ranked:
        give(shard, replica)
    return {replica: frozenset(held) for replica, held in taken.items()}


__all__ = ["assign", "score"]
