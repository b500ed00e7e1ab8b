"""What the orchestrator's record of warms says about schedules: pure functions, no I/O.

A *schedule* is one armed timer of one conversation: it fires once, with a token of its own.
It was *warmed twice* when, for one conversation, two ``warm.requested`` (taken in the order
of their ``requestedAt``) either

- are less than half an interval apart: every regular arm is one interval after the
  completion that made it, and every retry at least a second after the failure, so two
  requests that close together are one schedule fired by two replicas; or
- carry a token not above the one before: tokens only grow within a namespace, across
  replicas and restarts too, so a repeated or smaller token is a warm an old owner (or a
  fenced one) sent for a schedule that was no longer its own.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

import msgspec

from tests.replicas.orchestrator import Warm


class Double(msgspec.Struct, frozen=True):
    """Two warms of one conversation that are one schedule warmed twice."""

    first: Warm
    second: Warm

    def __str__(self) -> str:
        gap = self.second.requested_at - self.first.requested_at
        return (
            f"{self.first.conversation}: token {self.first.token} by {self.first.replica}, "
            f"then token {self.second.token} by {self.second.replica} {gap} ms later"
        )


def by_conversation(warms: Iterable[Warm]) -> dict[str, list[Warm]]:
    """Each conversation's warms, in the order of their ``requestedAt``."""
    grouped: dict[str, list[Warm]] = defaultdict(list)
    for warm in warms:
        grouped[warm.conversation].append(warm)
    for each in grouped.values():
        each.sort(key=lambda w: (w.requested_at, w.token))
    return dict(grouped)


def doubles(warms: Iterable[Warm], interval_ms: int) -> list[Double]:
    """Every pair of consecutive warms that is one schedule warmed twice (module doc)."""
    found = []
    for each in by_conversation(warms).values():
        for first, second in itertools.pairwise(each):
            if second.token == first.token and second.replica == first.replica:
                continue  # one request its publisher sent again: at least once
            too_close = second.requested_at - first.requested_at < interval_ms / 2
            if too_close or second.token <= first.token:
                found.append(Double(first, second))
    return found


def owners(warms: Iterable[Warm]) -> dict[str, set[str | None]]:
    """Conversation -> every replica that warmed it in ``warms``."""
    found: dict[str, set[str | None]] = defaultdict(set)
    for warm in warms:
        found[warm.conversation].add(warm.replica)
    return dict(found)


def between(warms: Iterable[Warm], start_ms: float, end_ms: float) -> list[Warm]:
    """The warms received in [start_ms, end_ms)."""
    return [w for w in warms if start_ms <= w.received_ms < end_ms]


def first_warms_after(
    warms: Iterable[Warm], conversations: Iterable[str], after_ms: float
) -> dict[str, Warm]:
    """Each conversation's first warm published after ``after_ms`` (absent: none was).

    Published, by its ``requestedAt``: a request a killed replica sent just before it died
    may arrive after its death, and is not a warm of the replica that took over.
    """
    wanted = set(conversations)
    first: dict[str, Warm] = {}
    for warm in sorted(warms, key=lambda w: w.requested_at):
        if warm.requested_at > after_ms and warm.conversation in wanted:
            first.setdefault(warm.conversation, warm)
    return first


class Tenure(msgspec.Struct, frozen=True):
    """A time one replica held one shard: from ``start_ms`` to ``end_ms`` (wall clock)."""

    replica: str
    shard: int
    start_ms: float
    end_ms: float


def outside_tenures(
    warms: Iterable[Warm], tenures: Iterable[Tenure], shard_of: dict[str, int], slack_ms: float
) -> list[Warm]:
    """The warms published by a replica that did not hold the conversation's shard then.

    ``slack_ms`` either side of a tenure: a replica logs ``shard_gained`` once the shard's
    timers are armed and ``shard_lost`` once they are dropped, so its warms fall inside, up
    to the time two log lines and a publish take. A warm without a replica header, or of a
    conversation ``shard_of`` does not place, is not judged.
    """
    held: dict[tuple[str, int], list[Tenure]] = defaultdict(list)
    for tenure in tenures:
        held[tenure.replica, tenure.shard].append(tenure)
    outside = []
    for warm in warms:
        shard = shard_of.get(warm.conversation)
        if warm.replica is None or shard is None:
            continue
        if not any(
            t.start_ms - slack_ms <= warm.requested_at <= t.end_ms + slack_ms
            for t in held[warm.replica, shard]
        ):
            outside.append(warm)
    return outside


def overlaps(tenures: Iterable[Tenure], slack_ms: float) -> list[tuple[Tenure, Tenure]]:
    """Pairs of tenures of one shard by two replicas that overlap by more than ``slack_ms``:
    two owners at once, by their own lines (a fence makes that safe, not right)."""
    by_shard: dict[int, list[Tenure]] = defaultdict(list)
    for tenure in tenures:
        by_shard[tenure.shard].append(tenure)
    found = []
    for each in by_shard.values():
        for a, b in itertools.combinations(sorted(each, key=lambda t: t.start_ms), 2):
            if min(a.end_ms, b.end_ms) - b.start_ms > slack_ms:
                found.append((a, b))
    return found
