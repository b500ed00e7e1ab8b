"""The stall watchdog: the pipeline holds its work and takes no more, so ``/readyz`` says so.

The parts that know why they are stuck say so themselves (``store``, ``confirms``,
``broker_blocked``); this is the catch-all that judges by outcome: the pipeline has not
come back for input (deliveries, timers that fell due, returns) for ``after_ms``. An idle
worker is never stalled: its pipeline waits for input. The pipeline asks for the next batch
only once the previous one is committed and the one before it acknowledged, so whatever
holds a batch (a store that fails, a confirm that does not come, a broker that blocks
publishing, a path that stopped forwarding) shows here within ``after_ms`` plus one check.

It looks every ``after_ms / 4`` (at most a second) on the injected clock, so a test with a
``ManualClock`` drives it without waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from warmer.clock import Clock, sleep
from warmer.observe.health import Health

__all__ = ["Queue", "Watchdog"]

_CHECK_MAX_MS: Final = 1000


class Queue(Protocol):
    """What the watchdog reads of the pipeline's inputs (``warmer.inputs.Inputs``)."""

    def __len__(self) -> int:
        """Inputs waiting to be taken."""

    @property
    def taken(self) -> int:
        """Batches taken so far."""

    @property
    def idle(self) -> bool:
        """True while the pipeline waits for input."""


class Watchdog:
    """Reports Health part ``stall`` while the pipeline, busy, takes no input for ``after_ms``."""

    def __init__(
        self,
        clock: Clock,
        health: Health,
        queue: Queue,
        after_ms: int,
        counted: Callable[[], object] = lambda: None,
    ) -> None:
        """``counted`` is called once at the start of each stall (a metric's ``inc``)."""
        self._clock = clock
        self._health = health
        self._queue = queue
        self.after_ms = after_ms
        self.check_ms = max(1, min(_CHECK_MAX_MS, after_ms // 4))
        self._taken = queue.taken
        self._moved_at = clock.now_ms()
        self._counted = counted

    def check(self) -> None:
        """Look once: mark progress, or report the stall (cleared once inputs move)."""
        now = self._clock.now_ms()
        waiting = len(self._queue)
        taken = self._queue.taken
        if taken != self._taken or self._queue.idle:
            self._taken = taken
            self._moved_at = now
            self._health.cleared("stall")
            return
        still_s = (now - self._moved_at) / 1000
        if now - self._moved_at >= self.after_ms:
            if self._health.reason("stall") is None:
                self._counted()
            self._health.trouble(
                "stall", f"the pipeline took no input for {still_s:.0f} s ({waiting} waiting)"
            )

    async def run(self) -> None:
        """Check forever, every ``check_ms``."""
        while True:
            await sleep(self._clock, self.check_ms)
            self.check()
