"""The clock: a steady time line that wall-clock steps do not move, and the steps told.

``SystemClock`` is given its wall and monotonic sources, so a test steps the wall at will:
the time it tells (what the core is given) stays on the line the wall had at start plus
the time elapsed; alarms ring after their delay on that line; ``StepWatch`` tells a step
from the offset between the two clocks.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.unit import test_pipeline
from tests.unit.test_pipeline import Rig, enable, settled
from warmer.clock import (
    MAX_RESUME_MS,
    SLEW_DIVISOR,
    STEP_THRESHOLD_MS,
    ManualClock,
    StepWatch,
    SystemClock,
    sleep,
)
from warmer.contract import Status
from warmer.scheduler import Scheduler

T0 = 1_760_000_000_000
MS = 1_000_000  # nanoseconds
TEN_MINUTES = 600_000
EIGHT_DAYS = 8 * 86_400_000


class Sources:
    """A wall clock and a monotonic clock a test moves by hand (nanoseconds)."""

    def __init__(self) -> None:
        self.wall = T0 * MS
        self.monotonic = 5_000 * MS

    def elapse(self, ms: int) -> None:
        """Time passes: both clocks move."""
        self.wall += ms * MS
        self.monotonic += ms * MS

    def step_wall(self, ms: int) -> None:
        """The wall clock alone jumps, as ``date -s`` or an NTP step does."""
        self.wall += ms * MS

    def clock(self) -> SystemClock:
        return SystemClock(wall_ns=lambda: self.wall, monotonic_ns=lambda: self.monotonic)


class Stepped:
    """The real clocks, with the wall moved by ``offset_ms`` (a step under a live loop)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def wall_ns(self) -> int:
        return time.time_ns() + self.offset_ms * MS


# -- the steady time line ---------------------------------------------------------------


def test_the_time_starts_at_the_wall_clock_and_goes_on_by_the_time_elapsed() -> None:
    sources = Sources()
    clock = sources.clock()
    assert clock.now_ms() == clock.wall_ms() == T0
    sources.elapse(1_234)
    assert clock.now_ms() == clock.wall_ms() == T0 + 1_234


@pytest.mark.parametrize("step", [-TEN_MINUTES, EIGHT_DAYS])
def test_a_wall_clock_step_does_not_move_the_time_which_slews_towards_it_at_one_percent(
    step: int,
) -> None:
    sources = Sources()
    clock = sources.clock()
    sources.elapse(1_000)
    assert clock.now_ms() == T0 + 1_000
    sources.step_wall(step)
    assert clock.wall_ms() == T0 + 1_000 + step
    assert clock.now_ms() == T0 + 1_000
    direction = 1 if step > 0 else -1
    sources.elapse(60_000)  # a minute runs 0.6 s faster (forward) or slower (back)
    assert clock.now_ms() == T0 + 61_000 + direction * 600
    sources.elapse(abs(step) * SLEW_DIVISOR)  # long enough to have slewed all of it
    assert clock.now_ms() == clock.wall_ms()
    sources.elapse(1_000)
    assert clock.now_ms() == clock.wall_ms()  # and from then on, the wall's time


def test_the_time_never_goes_back() -> None:
    sources = Sources()
    clock = sources.clock()
    seen = [clock.now_ms()]
    for step in (-TEN_MINUTES, -1_000, EIGHT_DAYS, -EIGHT_DAYS, -TEN_MINUTES):
        sources.step_wall(step)
        for _ in range(50):
            sources.elapse(7)
            seen.append(clock.now_ms())
    assert seen == sorted(seen)
    assert seen[-1] - seen[0] == pytest.approx(5 * 50 * 7, rel=0.011)


@pytest.mark.parametrize("step", [-TEN_MINUTES, EIGHT_DAYS])
def test_a_time_from_outside_on_the_stepped_wall_is_put_on_the_steady_line(step: int) -> None:
    """A producer's ``lastRequestAt`` 5 s ago on the (stepped) wall is 5 s ago for the core."""
    sources = Sources()
    clock = sources.clock()
    sources.elapse(60_000)
    sources.step_wall(step)
    assert clock.from_wall(clock.wall_ms() - 5_000) == clock.now_ms() - 5_000


def test_a_restart_goes_on_from_a_stored_time_up_to_an_hour_ahead_then_slews_back() -> None:
    sources = Sources()
    clock = sources.clock()
    assert clock.resume(T0 - 1) == 0  # behind: nothing to do
    assert clock.resume(T0 + MAX_RESUME_MS + 1) == 0  # too far: a wrong clock's
    assert clock.now_ms() == T0
    assert clock.resume(T0 + TEN_MINUTES) == TEN_MINUTES
    assert clock.now_ms() == T0 + TEN_MINUTES
    sources.elapse(60_000)
    assert clock.now_ms() == T0 + TEN_MINUTES + 60_000 - 600
    sources.elapse(TEN_MINUTES * SLEW_DIVISOR)
    assert clock.now_ms() == clock.wall_ms()


def test_the_default_monotonic_source_goes_on_through_a_suspend() -> None:
    """CLOCK_BOOTTIME counts a suspended machine's sleep, as a cache's lifetime does."""
    clock = SystemClock()
    assert abs(clock.now_ms() - time.time_ns() // MS) <= 2
    assert abs(clock.from_wall(clock.wall_ms()) - clock.now_ms()) <= 2


def test_a_manual_clock_steps_its_wall_alone() -> None:
    clock = ManualClock(T0)
    clock.step_wall(-TEN_MINUTES)
    assert (clock.now_ms(), clock.wall_ms()) == (T0, T0 - TEN_MINUTES)
    assert clock.from_wall(T0 - TEN_MINUTES - 5_000) == T0 - 5_000
    clock.advance(1_000)
    assert clock.wall_ms() == T0 - TEN_MINUTES + 1_000


# -- steps told -------------------------------------------------------------------------


@pytest.mark.parametrize("step", [-TEN_MINUTES, EIGHT_DAYS, -(STEP_THRESHOLD_MS + 20)])
def test_a_step_is_told_once_with_its_size(step: int) -> None:
    sources = Sources()
    watch = StepWatch(sources.clock())
    sources.elapse(1_000)
    assert watch.check() is None
    sources.step_wall(step)
    sources.elapse(1_000)  # the next check: 10 ms of it slewed already
    slewed = 10 if step > 0 else -10
    assert watch.check() == step - slewed
    assert watch.offset_ms == step - slewed
    sources.elapse(1_000)
    assert watch.check() is None  # the slew is no step
    assert watch.offset_ms == step - 2 * slewed


def test_small_corrections_and_elapsed_time_are_not_steps() -> None:
    sources = Sources()
    clock = sources.clock()
    watch = StepWatch(clock)
    sources.step_wall(STEP_THRESHOLD_MS)
    assert watch.check() is None
    assert watch.offset_ms == STEP_THRESHOLD_MS
    sources.elapse(EIGHT_DAYS)  # a suspended machine: both clocks moved
    assert watch.check() is None
    assert watch.offset_ms == 0  # slewed away meanwhile


@pytest.mark.parametrize("per_second", [STEP_THRESHOLD_MS - 100, -(STEP_THRESHOLD_MS - 100)])
def test_steps_under_the_threshold_are_told_once_they_add_up_to_more(per_second: int) -> None:
    """A wall gaining (or losing) 1.9 s a second: no check sees a step, but each time the
    offset moved more than the threshold since it was last told, the move is told; what is
    told adds up to the drift, less what the slew took back."""
    sources = Sources()
    clock = sources.clock()
    watch = StepWatch(clock)
    told: list[tuple[int, int]] = []
    for second in range(1, 101):
        sources.elapse(1_000)
        sources.step_wall(per_second)
        step = watch.check()
        if step is not None:
            told.append((second, step))
    assert [second for second, _ in told] == list(range(2, 101, 2))
    assert all(abs(step) > STEP_THRESHOLD_MS for _, step in told)
    total = sum(step for _, step in told)
    assert total == watch.offset_ms
    assert abs(total - 100 * per_second) <= 100 * 1_000 // SLEW_DIVISOR + 100


@pytest.mark.parametrize("step", [-TEN_MINUTES, TEN_MINUTES])
def test_the_slew_back_after_a_step_is_never_told(step: int) -> None:
    """Told once; then the offset comes back to zero by the slew alone over ~17 hours of
    checks a second (and a stalled loop's checks a minute apart): never told again."""
    sources = Sources()
    watch = StepWatch(sources.clock())
    sources.step_wall(step)
    sources.elapse(1_000)
    assert watch.check() is not None
    told = []
    for second in range(17 * 3_600):
        sources.elapse(60_000 if second % 1_000 == 999 else 1_000)
        if (moved := watch.check()) is not None:
            told.append(moved)
    assert told == []
    assert watch.offset_ms == 0


def test_a_wall_coming_back_faster_than_the_slew_is_told() -> None:
    """After a step forward, a wall losing 1.9 s a second moves the offset towards zero
    far faster than the slew could (10 ms a second): that is told too."""
    sources = Sources()
    watch = StepWatch(sources.clock())
    sources.step_wall(EIGHT_DAYS)
    sources.elapse(1_000)
    assert watch.check() == EIGHT_DAYS - 10
    told = []
    for _ in range(10):
        sources.elapse(1_000)
        sources.step_wall(-(STEP_THRESHOLD_MS - 100))
        if (moved := watch.check()) is not None:
            told.append(moved)
    assert len(told) == 5
    assert all(-2 * STEP_THRESHOLD_MS < moved < -STEP_THRESHOLD_MS for moved in told)


def test_a_drift_the_slew_keeps_up_with_is_not_told() -> None:
    """A wall gaining 5 ms a second (a bad oscillator): the slew (up to 10 ms a second)
    follows it, the offset stays within a few milliseconds, nothing is told in a day."""
    sources = Sources()
    watch = StepWatch(sources.clock())
    for _ in range(86_400):
        sources.elapse(1_000)
        sources.step_wall(5)
        assert watch.check() is None
    assert 0 <= watch.offset_ms <= 10


def test_a_step_of_a_manual_clock_is_told() -> None:
    clock = ManualClock(T0)
    watch = StepWatch(clock)
    clock.step_wall(EIGHT_DAYS)
    assert watch.check() == EIGHT_DAYS


# -- alarms on the steady line, under a real event loop ---------------------------------


@pytest.mark.parametrize("step", [-TEN_MINUTES, EIGHT_DAYS])
async def test_an_alarm_rings_after_its_delay_whatever_the_wall_does(step: int) -> None:
    """Back 10 minutes: no stall; forward 8 days: not at once."""
    wall = Stepped()
    clock = SystemClock(wall_ns=wall.wall_ns)
    started = time.monotonic()
    rang = asyncio.Event()
    clock.call_at(clock.now_ms() + 200, rang.set)
    await asyncio.sleep(0.05)
    wall.offset_ms = step
    await asyncio.wait_for(rang.wait(), 2)
    assert 0.19 <= time.monotonic() - started < 1.0


async def test_an_alarm_notices_a_jump_of_its_monotonic_source_within_a_second() -> None:
    """A source the loop's timer does not follow (CLOCK_BOOTTIME after a suspend)."""
    jumped = [0]
    clock = SystemClock(monotonic_ns=lambda: time.monotonic_ns() + jumped[0])
    rang = asyncio.Event()
    clock.call_at(clock.now_ms() + 60_000, rang.set)
    jumped[0] = 61_000 * MS
    started = time.monotonic()
    await asyncio.wait_for(rang.wait(), 2)
    assert time.monotonic() - started <= 1.1


async def test_the_scheduler_keeps_its_cadence_through_steps_of_the_wall() -> None:
    wall = Stepped()
    clock = SystemClock(wall_ns=wall.wall_ns)
    fired: list[tuple[str, float]] = []
    scheduler = Scheduler(clock, lambda key, _: fired.append((key, time.monotonic())))
    scheduler.start()
    try:
        start = clock.now_ms()
        started = time.monotonic()
        for i in range(6):
            scheduler.arm(f"c{i}", start + 50 * (i + 1), i)
        await asyncio.sleep(0.06)
        wall.offset_ms = -TEN_MINUTES
        await asyncio.sleep(0.1)
        wall.offset_ms = EIGHT_DAYS
        await sleep(clock, 200)
    finally:
        await scheduler.stop()
    assert [key for key, _ in fired] == [f"c{i}" for i in range(6)]
    for i, (_, at) in enumerate(fired):
        assert 0.05 * (i + 1) - 0.005 <= at - started < 0.05 * (i + 1) + 0.5


# -- the worker puts the producer's times on the steady line ---------------------------

rig = test_pipeline.rig  # the fixture: a worker on the in-memory bus and a ManualClock


@pytest.mark.parametrize("step", [-TEN_MINUTES, EIGHT_DAYS])
async def test_a_settle_stamped_on_the_stepped_wall_arms_from_its_last_request(
    rig: Rig, step: int
) -> None:
    """Back: the request 5 s ago is not taken for 10 min ago (its cache dead: ``expired``);
    forward: not taken for 8 days ahead (ignored: the warm a stream's length late)."""
    rig.clock.step_wall(step)
    body = settled("c", lastRequestAt=rig.clock.wall_ms() - 5_000, cacheTtlS=300)
    await rig.batch(rig.command(enable("c")), rig.event(body))
    conv = rig.core.get("c")
    assert conv is not None and conv.status is Status.ARMED
    assert conv.next_warm_at == T0 - 5_000 + 240_000
