"""Failed warms, summed: one warning line every so often, not one a warm.

A warm that fails is counted (``warmer_warms_failed_total{cause}``) and logged at info
with its conversation; the warning is a summary: at most one ``warms_failed`` line every
``FAILURE_SUMMARY_EVERY_MS`` per worker process, with the counts by cause since the last
one, how many conversations were paused by them, and one example. Under a flood of
failures (tens of thousands a minute) that is 6 warning lines a minute, not a line a warm.
The counts are written when a batch is committed after the interval has passed (and at
stop): a burst is told at once, its tail at the next batch after the interval, or by
``run()`` once the interval has passed when no batch comes (a burst that paused every
conversation it hit leaves nothing to commit: its pauses must still be told).
"""

from __future__ import annotations

import collections
from typing import Final

from warmer.clock import Clock, sleep
from warmer.observe.log import get_logger

__all__ = ["FAILURE_SUMMARY_EVERY_MS", "FailureLog"]

log = get_logger(__name__)

FAILURE_SUMMARY_EVERY_MS: Final = 10_000
"""At most one ``warms_failed`` warning line this often (6 a minute)."""


class FailureLog:
    """Counts failed warms (and warm requests that could not be published) by cause."""

    def __init__(self, clock: Clock, every_ms: int = FAILURE_SUMMARY_EVERY_MS) -> None:
        self._clock = clock
        self.every_ms = every_ms
        self._counts: collections.Counter[str] = collections.Counter()
        self._paused = 0
        self._example: tuple[str, str] | None = None
        self._since: int | None = None
        self._last: int | None = None
        self.lines = 0
        """How many summary lines were written (for tests and tools)."""

    def failed(self, cause: str, conversation_id: str, error: str, *, paused: bool) -> None:
        """A warm failed (committed): ``cause`` as the metric's label."""
        self._note(cause)
        self._paused += paused
        if self._example is None:
            self._example = (conversation_id, error)

    def publish_failed(self, error: str) -> None:
        """A warm request could not be published (its warm timeout follows)."""
        self._note("publish")
        if self._example is None:
            self._example = ("", error)

    def _note(self, cause: str) -> None:
        if self._since is None:
            self._since = self._clock.now_ms()
        self._counts[cause] += 1

    async def run(self) -> None:
        """Forever: write what is left once the interval has passed, batch or no batch."""
        while True:
            await sleep(self._clock, self.every_ms)
            self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Write the summary when there is one and the interval has passed (or ``force``)."""
        if not self._counts:
            return
        now = self._clock.now_ms()
        if not force and self._last is not None and now - self._last < self.every_ms:
            return
        since = self._since if self._since is not None else now
        conversation_id, error = self._example or ("", "")
        log.warning(
            "warms_failed",
            count=sum(self._counts.values()),
            by_cause=dict(sorted(self._counts.items())),
            paused=self._paused,
            over_s=round((now - since) / 1000, 1),
            example_conversation_id=conversation_id,
            example_error=error[:300],
            note=f"a summary at most every {self.every_ms // 1000} s; each is logged at info",
        )
        self.lines += 1
        self._counts.clear()
        self._paused = 0
        self._example = None
        self._since = None
        self._last = now
