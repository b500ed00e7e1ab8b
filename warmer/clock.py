"""The one clock of warmer: epoch milliseconds, and alarms a fake clock can drive.

Everything that needs the time asks a `Clock`. The scheduler sleeps by asking the clock
for an alarm at its earliest due time, so `ManualClock` can move time in tests and ring
the alarm at once, with no real waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

__all__ = ["Alarm", "Clock", "ManualClock", "SystemClock", "sleep", "within"]

_T = TypeVar("_T")

# The wall clock can step (NTP, a suspended VM). Sleeping at most this long in one go
# means an alarm notices a forward step within this many seconds.
_MAX_SLEEP_S = 1.0


class Alarm(Protocol):
    """A pending callback from `Clock.call_at`."""

    def cancel(self) -> None:
        """Make sure the callback is not called; no-op once it ran."""


class Clock(Protocol):
    """The source of time: the current epoch milliseconds and alarms on that time line."""

    def now_ms(self) -> int:
        """Return the current time in epoch milliseconds."""

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Alarm:
        """Call `callback` once, from the event loop, when `now_ms()` reaches `when_ms`.

        Never calls it synchronously, even when `when_ms` has already passed.
        """


class SystemClock:
    """The real clock: `time.time_ns` for the time, the running event loop for alarms."""

    def now_ms(self) -> int:
        """Return the current wall-clock time in epoch milliseconds."""
        return time.time_ns() // 1_000_000

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Alarm:
        """Call `callback` from the running loop once the wall clock reaches `when_ms`."""
        return _WallAlarm(self, when_ms, callback)


class _WallAlarm:
    """An alarm on the wall clock, slept in slices on the event loop's monotonic timer."""

    __slots__ = ("_callback", "_clock", "_handle", "_loop", "_when_ms")

    def __init__(self, clock: SystemClock, when_ms: int, callback: Callable[[], None]) -> None:
        self._clock = clock
        self._when_ms = when_ms
        self._callback = callback
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self._delay_s(), self._tick)

    def _delay_s(self) -> float:
        remaining_s = (self._when_ms - self._clock.now_ms()) / 1000
        return min(max(remaining_s, 0.0), _MAX_SLEEP_S)

    def _tick(self) -> None:
        # The loop's timer is monotonic and may also fire a hair early: re-check the wall.
        if self._clock.now_ms() >= self._when_ms:
            self._callback()
        else:
            self._handle = self._loop.call_later(self._delay_s(), self._tick)

    def cancel(self) -> None:
        """Make sure the callback is not called."""
        self._handle.cancel()


class ManualClock:
    """A clock for tests: time moves only on `advance` or `set`, ringing due alarms."""

    def __init__(self, start_ms: int = 0) -> None:
        self._now_ms = start_ms
        self._alarms: list[_ManualAlarm] = []
        self._seq = 0

    def now_ms(self) -> int:
        """Return the current fake time in epoch milliseconds."""
        return self._now_ms

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Alarm:
        """Call `callback` when time is moved to `when_ms` or later."""
        self._seq += 1
        alarm = _ManualAlarm(self, when_ms, self._seq, callback)
        if when_ms <= self._now_ms:
            # Already due: ring on the next loop turn, as asyncio's call_at would.
            asyncio.get_running_loop().call_soon(alarm.ring)
        else:
            self._alarms.append(alarm)
        return alarm

    def advance(self, ms: int) -> None:
        """Move time forward by `ms` and ring every alarm that fell due, in time order."""
        if ms < 0:
            raise ValueError(f"cannot advance by a negative duration: {ms}")
        self.set(self._now_ms + ms)

    def set(self, now_ms: int) -> None:
        """Move time to `now_ms` (backwards too) and ring every alarm that fell due."""
        self._now_ms = now_ms
        while True:
            due = [alarm for alarm in self._alarms if alarm.when_ms <= self._now_ms]
            if not due:
                return
            first = min(due, key=lambda alarm: (alarm.when_ms, alarm.seq))
            self._alarms.remove(first)
            first.ring()

    def next_alarm_ms(self) -> int | None:
        """Return when the earliest pending alarm is due, or None when none is pending."""
        return min((alarm.when_ms for alarm in self._alarms), default=None)

    def _forget(self, alarm: _ManualAlarm) -> None:
        if alarm in self._alarms:
            self._alarms.remove(alarm)


class _ManualAlarm:
    """An alarm of a `ManualClock`."""

    __slots__ = ("_callback", "_cancelled", "_clock", "seq", "when_ms")

    def __init__(
        self, clock: ManualClock, when_ms: int, seq: int, callback: Callable[[], None]
    ) -> None:
        self._clock = clock
        self.when_ms = when_ms
        self.seq = seq
        self._callback = callback
        self._cancelled = False

    def ring(self) -> None:
        """Call the callback unless cancelled."""
        if not self._cancelled:
            self._cancelled = True
            self._callback()

    def cancel(self) -> None:
        """Make sure the callback is not called."""
        self._cancelled = True
        self._clock._forget(self)


async def sleep(clock: Clock, ms: int) -> None:
    """Wait ``ms`` milliseconds on ``clock``: a `ManualClock` ends it when advanced."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ring() -> None:
        if not future.done():
            future.set_result(None)

    alarm = clock.call_at(clock.now_ms() + ms, ring)
    try:
        await future
    finally:
        alarm.cancel()


async def within(clock: Clock, ms: int, awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` for at most ``ms`` on ``clock``; past that, cancel it and raise
    TimeoutError (``asyncio.wait_for`` on the injected clock, so ManualClock drives it)."""
    task = asyncio.ensure_future(awaitable)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    alarm = clock.call_at(clock.now_ms() + ms, expire)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if expired and task.cancelled() and not (current and current.cancelling()):
            raise TimeoutError(f"not done within {ms} ms") from None
        raise
    finally:
        alarm.cancel()
