"""Which replica should own which shard: the same answer in every replica, from the live set.

Every replica computes ``assign(shards, live)`` from the replicas alive in the shared store
(``Shared.beat``); since they all see the same set within a beat, they agree without
talking to each other, and each only takes what is assigned to it and gives back what is
not. Rendezvous hashing ranks the replicas for each shard by a hash of (replica, shard);
shards go to their best-ranked replica that still has room, room being ``S // N`` shards,
or one more for as many replicas as ``S % N``: counts differ by one at most. When a
replica joins or leaves, most shards keep their owner (those of the leaver move; the
joiner takes about ``S / N``), so a rebalance hands over few shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def score(replica: str, shard: int) -> int:
    """The rank of ``replica`` for ``shard``: a stable hash, the same in every process."""
    digest = hashlib.blake2b(f"{shard}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(shards: int, replicas: Sequence[str]) -> dict[str, frozenset[int]]:
    """Each replica's shards (every one of ``range(shards)`` to exactly one replica)."""
    live = sorted(set(replicas))
    if not live:
        return {}
    base, extra = divmod(shards, len(live))
    taken: dict[str, set[int]] = {replica: set() for replica in live}
    owner: dict[int, str] = {}
    fuller = 0  # replicas holding base + 1
    ranked = sorted(
        ((score(replica, shard), shard, replica) for shard in range(shards) for replica in live),
        reverse=True,
    )
    for _, shard, replica in ranked:
        if shard in owner:
            continue
        held = len(taken[replica])
        if held < base or (held == base and fuller < extra):
            fuller += held == base
            taken[replica].add(shard)
            owner[shard] = replica
    return {replica: frozenset(held) for replica, held in taken.items()}


__all__ = ["assign", "score"]
