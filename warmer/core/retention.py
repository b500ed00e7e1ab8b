"""Retention: which conversations had no input for too long, without a full scan a minute.

A full scan of a million conversations takes about 0.1 s. It is done about once an
hour and keeps, as candidates, every conversation whose last input falls before a
horizon an hour ahead; the checks in between look at those only. A conversation
created after a scan has its last input after that horizon, and an input only moves
a last input later, so no candidate is missed; a rollback can bring older inputs
back, so it calls for a new scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from warmer.core.state import Conversation

RETENTION_PAUSE_MS: Final = 3_600_000
"""A store whose newest input is older than this at start-up lay still: the time since is
not counted against retention (``Warmer.recover`` moves every loaded last input on by it).
It may be a step of the wall clock that the previous run's times kept (its time line went
on by the time elapsed: decision 65), which no restart can tell from downtime; either way
it delays pruning only, while nothing new comes in. Shorter pauses count, as idleness does:
at most an hour of the retention time, once per restart."""
PRUNE_LIMIT: Final = 10_000
"""Conversations forgotten at most by one check (a minute): their deletions are one store
commit, which Redis runs as one script, and a mass expiry of a million would outlast the
store's timeout and be sent again and again. A backlog drains at this many a minute."""
_HORIZON_MS: Final = 3_600_000
_NEVER: Final = -(2**63)


class Retention:
    """The conversations past the retention time, found cheaply every minute."""

    def __init__(self, retention_ms: int) -> None:
        self.retention_ms = retention_ms
        self._horizon = _NEVER
        self._candidates: list[str] = []

    def due(
        self, conversations: Mapping[str, Conversation], now: int, limit: int = PRUNE_LIMIT
    ) -> list[str]:
        """The conversations whose last input is known (not 0) and before now - retention,
        at most ``limit`` of them: the others stay candidates for the next check."""
        cutoff = now - self.retention_ms
        if cutoff >= self._horizon:
            # Never beyond one retention ahead: what is created now must be after it.
            horizon = cutoff + min(_HORIZON_MS, self.retention_ms)
            self._candidates = [
                cid for cid, conv in conversations.items() if 0 < conv.last_input_at < horizon
            ]
            self._horizon = horizon
        due: list[str] = []
        later: list[str] = []
        for cid in self._candidates:
            conv = conversations.get(cid)
            if conv is None:
                continue
            if 0 < conv.last_input_at < cutoff and len(due) < limit:
                due.append(cid)
            elif conv.last_input_at < self._horizon:
                later.append(cid)
        self._candidates = later
        return due

    def rescan(self) -> None:
        """Scan everything at the next check: older last inputs may have come back."""
        self._horizon = _NEVER
