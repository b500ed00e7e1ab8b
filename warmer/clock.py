"""The one clock of warmer: epoch milliseconds, and alarms a fake clock can drive.

Everything that needs the time asks a `Clock`. The scheduler sleeps by asking the clock
for an alarm at its earliest due time, so `ManualClock` can move time in tests and ring
the alarm at once, with no real waiting.

The time a `Clock` tells is steady: `SystemClock` reads the wall clock once, at start,
and adds the time elapsed since on a clock that never steps. The wall clock can step (an
operator's `date -s`, NTP correcting a clock that was far off, a restored VM snapshot);
a step must neither stall the timers (back) nor make every idle budget and cache look
spent (forward): the core judges elapsed time, so it is given a time line without steps.
Times from outside (a producer's ``lastRequestAt``) are on the wall clock: `from_wall`
puts them on the steady line. `StepWatch` compares the two lines and tells when the wall
stepped (``clock_stepped``, ``warmer_clock_steps_total``, ``warmer_clock_offset_seconds``).
Published and stored times are on the steady line, which slews back towards the wall
clock at 1 % (`SystemClock`), so they meet it again without a step of their own.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeVar

__all__ = [
    "MAX_RESUME_MS",
    "SLEW_DIVISOR",
    "STEP_CHECK_EVERY_MS",
    "STEP_THRESHOLD_MS",
    "Alarm",
    "Clock",
    "ManualClock",
    "StepWatch",
    "SystemClock",
    "sleep",
    "within",
]

_T = TypeVar("_T")

# Alarms sleep on the event loop's timer (time.monotonic), which stops while the machine is
# suspended while the steady clock's source does not, and which an injected source need
# not follow: sleeping at most this long in one go re-reads the clock at least this often.
_MAX_SLEEP_S = 1.0

SLEW_DIVISOR: Final = 100
"""After a step the time moves towards the wall clock by at most this part of the time
elapsed (1 %: the margin of every duration the core measures)."""
_ALIGNED_NS: Final = 1_000_000
"""Within a millisecond of the wall clock, the time is left as it is (no slew to work out)."""
STEP_THRESHOLD_MS: Final = 2_000
"""A change of the wall clock against the steady one larger than this between two checks
is a step. NTP slews the clock by at most 0.5 ms a second; anything this fast is a jump."""
MAX_RESUME_MS: Final = 3_600_000
"""How far ahead of the wall clock a stored time may be for `SystemClock.resume` to go on
from it: an hour, which the slew gives back in 100 hours."""
STEP_CHECK_EVERY_MS: Final = 1_000
"""How often the worker compares the wall clock with the steady one (``StepWatch``)."""


class Alarm(Protocol):
    """A pending callback from `Clock.call_at`."""

    def cancel(self) -> None:
        """Make sure the callback is not called; no-op once it ran."""


class Clock(Protocol):
    """The source of time: the current epoch milliseconds and alarms on that time line."""

    def now_ms(self) -> int:
        """Return the current time in epoch milliseconds, on a line that never steps."""

    def wall_ms(self) -> int:
        """Return what the wall clock says now (it may have stepped): to detect steps."""

    def from_wall(self, wall_ms: int) -> int:
        """Return a wall-clock time from outside on this clock's time line (`now_ms`)."""

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Alarm:
        """Call `callback` once, from the event loop, when `now_ms()` reaches `when_ms`.

        Never calls it synchronously, even when `when_ms` has already passed.
        """


# CLOCK_BOOTTIME goes on while the machine is suspended, as a provider's cache lifetime does;
# CLOCK_MONOTONIC (time.monotonic) stops. Neither steps.
_ELAPSED_NS: Final[Callable[[], int]] = (
    functools.partial(time.clock_gettime_ns, time.CLOCK_BOOTTIME)
    if hasattr(time, "CLOCK_BOOTTIME")
    else time.monotonic_ns
)


class SystemClock:
    """The real clock: the time elapsed on a clock that never steps, kept near the wall
    clock by a slew of at most 1 %; alarms on the running event loop.

    Without steps the time is the wall clock's. After a step the time goes on by the time
    elapsed and moves towards the wall by at most `SLEW_DIVISOR`-th of the time elapsed
    (36 s an hour): every duration the core measures (an interval, a cache lifetime, an
    idle budget) is off by at most 1 %, and the times it publishes meet the wall clock
    again (10 minutes: in 17 hours; 8 days: in practice only at restart).

    ``wall_ns``: the wall clock (`time.time_ns`); ``monotonic_ns``: a clock that never
    steps, for the time elapsed (``CLOCK_BOOTTIME`` where there is one, else
    `time.monotonic_ns`). Tests give their own to step the wall under a real worker.
    """

    def __init__(
        self,
        wall_ns: Callable[[], int] = time.time_ns,
        monotonic_ns: Callable[[], int] | None = None,
    ) -> None:
        """Anchor the steady time line on the wall clock as it reads now."""
        if monotonic_ns is None:
            monotonic_ns = _ELAPSED_NS
        self._wall_ns = wall_ns
        self._monotonic_ns = monotonic_ns
        self._read_at_ns = monotonic_ns()
        self._epoch_ns = wall_ns() - self._read_at_ns
        """The time is ``_epoch_ns + monotonic``: the wall clock at start, plus the slews."""

    def now_ms(self) -> int:
        """Return the steady time in epoch milliseconds (the wall's, unless it stepped)."""
        monotonic = self._monotonic_ns()
        if monotonic < self._read_at_ns:
            # The source went back (a checkpoint restored on another machine, a broken
            # source): go on from the time last told at the source's pace, neither back
            # nor standing still until the source is past its last read.
            self._epoch_ns += self._read_at_ns - monotonic
            self._read_at_ns = monotonic
        gap = self._wall_ns() - self._epoch_ns - monotonic
        if not -_ALIGNED_NS < gap < _ALIGNED_NS:  # the two clocks' reads differ by far less
            most = (monotonic - self._read_at_ns) // SLEW_DIVISOR
            self._epoch_ns += most if gap > most else -most if gap < -most else gap
        self._read_at_ns = monotonic
        return (self._epoch_ns + monotonic) // 1_000_000

    def wall_ms(self) -> int:
        """Return the wall-clock time in epoch milliseconds, as it reads now."""
        return self._wall_ns() // 1_000_000

    def resume(self, latest_ms: int) -> int:
        """Go on from ``latest_ms``, the latest time a previous run stored, when it is ahead
        of the wall clock by at most `MAX_RESUME_MS`; returns by how much the time moved.

        That run's time line was ahead of the wall (the wall stepped back under it, or
        during the restart): its schedules stay due when they were, instead of each waiting
        out the step, and the slew brings the time back to the wall. Further ahead, the
        stored time is taken for a wrong clock's and the wall clock is kept.
        """
        ahead_ms = latest_ms - self.now_ms()
        if not 0 < ahead_ms <= MAX_RESUME_MS:
            return 0
        self._epoch_ns += ahead_ms * 1_000_000
        return ahead_ms

    def from_wall(self, wall_ms: int) -> int:
        """Return a wall-clock time on the steady line: moved by the offset not yet slewed."""
        return wall_ms + self.now_ms() - self.wall_ms()

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Alarm:
        """Call `callback` from the running loop once `now_ms()` reaches `when_ms`."""
        return _SteadyAlarm(self, when_ms, callback)


class _SteadyAlarm:
    """An alarm on the steady clock, slept in slices on the event loop's monotonic timer."""

    __slots__ = ("_callback", "_clock", "_handle", "_loop", "_when_ms")

    def __init__(self, clock: Clock, when_ms: int, callback: Callable[[], None]) -> None:
        self._clock = clock
        self._when_ms = when_ms
        self._callback = callback
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self._delay_s(), self._tick)

    def _delay_s(self) -> float:
        remaining_s = (self._when_ms - self._clock.now_ms()) / 1000
        return min(max(remaining_s, 0.0), _MAX_SLEEP_S)

    def _tick(self) -> None:
        # The loop's timer may fire a hair early, and is not the steady clock: re-check.
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
        self._wall_offset_ms = 0
        self._alarms: list[_ManualAlarm] = []
        self._seq = 0

    def now_ms(self) -> int:
        """Return the current fake time in epoch milliseconds."""
        return self._now_ms

    def wall_ms(self) -> int:
        """Return the fake wall clock: the time, moved by every `step_wall`."""
        return self._now_ms + self._wall_offset_ms

    def from_wall(self, wall_ms: int) -> int:
        """Return a time read on the fake wall clock on the time line of `now_ms`."""
        return wall_ms - self._wall_offset_ms

    def step_wall(self, ms: int) -> None:
        """Step the wall clock alone by `ms` (either way): `now_ms` and alarms are unmoved."""
        self._wall_offset_ms += ms

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


class StepWatch:
    """Tells when the wall clock stepped, from the offset between it and the steady clock.

    Between two checks the offset moves by far less than `STEP_THRESHOLD_MS` unless the wall
    clock jumped; a suspended machine moves both clocks alike (``CLOCK_BOOTTIME``). Steps
    under the threshold adding up (a wall gaining 1.9 s a second) are told too, once the
    offset moved more than the threshold since it was last told: moves the slew can make
    (towards the wall, at most 1 % of the time elapsed) only carry that mark along.
    """

    def __init__(self, clock: Clock, threshold_ms: int = STEP_THRESHOLD_MS) -> None:
        """Start from the offset as it is now."""
        self._clock = clock
        self._threshold_ms = threshold_ms
        self._checked_at = clock.now_ms()
        self.offset_ms = clock.wall_ms() - self._checked_at
        """The wall clock minus the steady one at the last check (+: the wall is ahead)."""
        self._told_ms = self.offset_ms
        """The offset last told (or at start), moved on by the slew since."""

    def check(self) -> int | None:
        """The step since the last check in ms (+: forward), or since the offset was last
        told when smaller steps added up to more than the threshold; None when neither."""
        now = self._clock.now_ms()
        offset = self._clock.wall_ms() - now
        step = offset - self.offset_ms
        # What the slew may have taken back since the last check (the time read is slewed
        # too: divided by one less), and a millisecond of rounding on each read.
        slew = (now - self._checked_at) // (SLEW_DIVISOR - 1) + 2
        self.offset_ms = offset
        self._checked_at = now
        told = self._told_ms
        if abs(step) > self._threshold_ms:
            self._told_ms = offset
            return step
        # The offset the slew alone could have reached from the one told: nearest to now's.
        reach = max(told - slew, 0) if told > 0 else min(told + slew, 0)
        slewed = min(max(offset, min(told, reach)), max(told, reach))
        drift = offset - slewed
        if abs(drift) > self._threshold_ms:
            self._told_ms = offset
            return drift
        self._told_ms = slewed
        return None


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
