"""The scheduler's timers, driven by a ManualClock: no real waiting anywhere."""

from __future__ import annotations

import asyncio
import random
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs

from warmer.clock import Alarm, ManualClock, SystemClock
from warmer.scheduler import Scheduler

T0 = 1_760_000_000_000


class Recorder:
    """An on_fire that records what fired, optionally doing more while firing."""

    def __init__(self) -> None:
        self.fired: list[tuple[str, int]] = []

    def __call__(self, key: str, token: int) -> None:
        self.fired.append((key, token))

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.fired]


async def turns(n: int = 3) -> None:
    """Let the event loop run a few turns, so the scheduler task can react."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def fired() -> Recorder:
    return Recorder()


@pytest.fixture
def scheduler(clock: ManualClock, fired: Recorder) -> Scheduler:
    return Scheduler(clock, fired)


@pytest.fixture
async def running(scheduler: Scheduler) -> AsyncIterator[Scheduler]:
    scheduler.start()
    await turns()
    yield scheduler
    await scheduler.stop()


# --- fire_due: the synchronous step ---------------------------------------------------


def test_fires_in_due_order_and_only_when_due(scheduler: Scheduler, fired: Recorder) -> None:
    scheduler.arm("c", T0 + 300, 3)
    scheduler.arm("a", T0 + 100, 1)
    scheduler.arm("b", T0 + 200, 2)

    assert scheduler.fire_due(T0 + 99) == 0
    assert scheduler.fire_due(T0 + 200) == 2
    assert fired.fired == [("a", 1), ("b", 2)]
    assert len(scheduler) == 1
    assert scheduler.pending("c") == (T0 + 300, 3)
    assert scheduler.pending("a") is None


def test_same_due_time_fires_in_arm_order(scheduler: Scheduler, fired: Recorder) -> None:
    for key in ["m", "z", "a", "q"]:
        scheduler.arm(key, T0 + 50, 1)

    assert scheduler.fire_due(T0 + 50) == 4
    assert fired.keys == ["m", "z", "a", "q"]


def test_cancel_disarms_and_is_a_no_op_when_nothing_is_armed(
    scheduler: Scheduler, fired: Recorder
) -> None:
    scheduler.arm("a", T0 + 10, 1)
    scheduler.arm("b", T0 + 20, 2)
    scheduler.cancel("a")
    scheduler.cancel("a")
    scheduler.cancel("never-armed")

    assert len(scheduler) == 1
    assert scheduler.pending("a") is None
    assert scheduler.fire_due(T0 + 1000) == 1
    assert fired.fired == [("b", 2)]


def test_rearm_later_replaces_the_pending_timer(scheduler: Scheduler, fired: Recorder) -> None:
    scheduler.arm("a", T0 + 10, 1)
    scheduler.arm("a", T0 + 500, 2)

    assert len(scheduler) == 1
    assert scheduler.pending("a") == (T0 + 500, 2)
    assert scheduler.fire_due(T0 + 10) == 0
    assert scheduler.fire_due(T0 + 500) == 1
    assert fired.fired == [("a", 2)]


def test_rearm_earlier_fires_once_at_the_new_time(scheduler: Scheduler, fired: Recorder) -> None:
    scheduler.arm("a", T0 + 500, 1)
    scheduler.arm("a", T0 + 10, 2)

    assert scheduler.fire_due(T0 + 10) == 1
    assert scheduler.fire_due(T0 + 10_000) == 0
    assert fired.fired == [("a", 2)]


def test_rearm_with_the_same_token_and_a_new_due(scheduler: Scheduler, fired: Recorder) -> None:
    # A warm timeout reuses the arm's token: the old entry must still count as dead.
    scheduler.arm("later", T0 + 100, 7)
    scheduler.arm("later", T0 + 200, 7)
    scheduler.arm("sooner", T0 + 200, 8)
    scheduler.arm("sooner", T0 + 100, 8)

    assert scheduler.fire_due(T0 + 150) == 1
    assert fired.fired == [("sooner", 8)]
    assert scheduler.fire_due(T0 + 250) == 1
    assert fired.fired == [("sooner", 8), ("later", 7)]


def test_rearm_with_the_same_token_and_the_same_due_fires_once(
    scheduler: Scheduler, fired: Recorder
) -> None:
    scheduler.arm("a", T0 + 100, 7)
    scheduler.arm("a", T0 + 100, 7)

    assert len(scheduler) == 1
    assert scheduler.fire_due(T0 + 100) == 1
    assert fired.fired == [("a", 7)]


def test_a_timer_armed_in_the_past_fires_on_the_next_step(
    scheduler: Scheduler, fired: Recorder
) -> None:
    scheduler.arm("late", T0 - 5_000, 1)

    assert scheduler.fire_due(T0) == 1
    assert fired.fired == [("late", 1)]


def test_rearm_and_cancel_from_inside_on_fire(clock: ManualClock) -> None:
    fired = Recorder()

    def on_fire(key: str, token: int) -> None:
        fired(key, token)
        if key == "a":
            timers.arm("a", T0 + 1_000, token + 1)
            timers.cancel("b")

    timers = Scheduler(clock, on_fire)
    timers.arm("a", T0 + 10, 1)
    timers.arm("b", T0 + 20, 2)
    timers.arm("c", T0 + 30, 3)

    assert timers.fire_due(T0 + 100) == 2
    assert fired.fired == [("a", 1), ("c", 3)]
    assert timers.pending("a") == (T0 + 1_000, 2)
    assert timers.pending("b") is None
    assert timers.fire_due(T0 + 1_000) == 1
    assert fired.fired[-1] == ("a", 2)


def test_a_timer_rearmed_already_due_from_on_fire_waits_for_the_next_step(
    clock: ManualClock,
) -> None:
    fired = Recorder()

    def on_fire(key: str, token: int) -> None:
        fired(key, token)
        if key == "a":
            timers.arm(key, T0, token + 1)  # due already: must not spin within one step

    timers = Scheduler(clock, on_fire)
    timers.arm("a", T0, 1)
    timers.arm("b", T0 + 5, 1)

    assert timers.fire_due(T0 + 5) == 2
    assert fired.fired == [("a", 1), ("b", 1)]  # "a" re-armed, "b" not starved
    assert timers.pending("a") == (T0, 2)
    assert timers.fire_due(T0 + 5) == 1
    assert fired.fired == [("a", 1), ("b", 1), ("a", 2)]
    assert timers.pending("a") == (T0, 3)


def test_an_on_fire_exception_is_logged_and_the_rest_still_fire(clock: ManualClock) -> None:
    fired = Recorder()

    def on_fire(key: str, token: int) -> None:
        if key == "bad":
            raise RuntimeError("boom")
        fired(key, token)

    timers = Scheduler(clock, on_fire)
    timers.arm("bad", T0 + 1, 1)
    timers.arm("good", T0 + 2, 2)

    with capture_logs() as logs:
        assert timers.fire_due(T0 + 2) == 2

    assert fired.fired == [("good", 2)]
    assert timers.pending("bad") is None
    failures = [entry for entry in logs if entry["event"] == "timer_fire_failed"]
    assert len(failures) == 1
    assert failures[0]["key"] == "bad"
    assert failures[0]["log_level"] == "error"


def test_100k_timers_fire_in_due_then_arm_order(scheduler: Scheduler, fired: Recorder) -> None:
    rng = random.Random(20240611)
    n = 100_000
    dues = [T0 + rng.randrange(0, 5_000) for _ in range(n)]  # plenty of ties
    for i, due in enumerate(dues):
        scheduler.arm(f"c{i}", due, i)

    halfway = T0 + 2_500
    first = scheduler.fire_due(halfway)
    rest = scheduler.fire_due(T0 + 5_000)

    expected = sorted(range(n), key=lambda i: (dues[i], i))
    assert first == sum(1 for due in dues if due <= halfway)
    assert first + rest == n
    assert [token for _, token in fired.fired] == expected
    assert len(scheduler) == 0


def test_churn_keeps_memory_bounded(scheduler: Scheduler) -> None:
    n = 10_000
    keys = [f"conv-{i}" for i in range(n)]
    rng = random.Random(7)
    tracemalloc.start()
    try:
        for i, key in enumerate(keys):
            scheduler.arm(key, T0 + rng.randrange(1, 600_000), i)
        armed_once, _ = tracemalloc.get_traced_memory()

        for round_ in range(5):
            for i, key in enumerate(keys):
                scheduler.arm(key, T0 + rng.randrange(1, 600_000), round_ * n + i)
        after_churn, _ = tracemalloc.get_traced_memory()

        for key in keys:
            scheduler.cancel(key)
        after_cancel, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert len(scheduler) == 0
    # Without compaction five re-arms per key would keep about 6x the entries.
    assert after_churn < 2 * armed_once
    # What stays: under _COMPACT_MIN_DEAD dead entries and the dict's table (dicts never
    # shrink on delete); without compaction it would be all 60,000 entries.
    assert after_cancel < armed_once / 2


# --- run(): the sleeping task ---------------------------------------------------------


async def test_run_fires_when_the_clock_reaches_the_due_time(
    running: Scheduler, clock: ManualClock, fired: Recorder
) -> None:
    running.arm("a", T0 + 1_000, 1)
    running.arm("b", T0 + 2_000, 2)
    await turns()
    assert clock.next_alarm_ms() == T0 + 1_000

    clock.advance(999)
    await turns()
    assert fired.fired == []

    clock.advance(1)
    await turns()
    assert fired.fired == [("a", 1)]
    assert clock.next_alarm_ms() == T0 + 2_000

    clock.set(T0 + 10_000)
    await turns()
    assert fired.fired == [("a", 1), ("b", 2)]
    assert clock.next_alarm_ms() is None


async def test_arming_an_earlier_timer_wakes_the_sleeping_task(
    running: Scheduler, clock: ManualClock, fired: Recorder
) -> None:
    running.arm("late", T0 + 60_000, 1)
    await turns()
    assert clock.next_alarm_ms() == T0 + 60_000

    running.arm("soon", T0 + 10, 2)
    await turns()
    assert clock.next_alarm_ms() == T0 + 10

    clock.advance(10)
    await turns()
    assert fired.fired == [("soon", 2)]


class CountingClock(ManualClock):
    """A ManualClock that counts the alarms asked of it."""

    def __init__(self, start_ms: int) -> None:
        super().__init__(start_ms)
        self.alarms_asked = 0

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Alarm:
        self.alarms_asked += 1
        return super().call_at(when_ms, callback)


async def test_arming_a_later_timer_does_not_wake_the_task(fired: Recorder) -> None:
    clock = CountingClock(T0)
    scheduler = Scheduler(clock, fired)
    scheduler.start()
    try:
        scheduler.arm("soon", T0 + 10, 1)
        await turns()
        asked = clock.alarms_asked
        for i in range(100):
            scheduler.arm(f"late-{i}", T0 + 60_000 + i, 2)
        scheduler.arm("soon", T0 + 10, 3)  # same due: not earlier, no wake either
        await turns()
        assert clock.alarms_asked == asked
        assert clock.next_alarm_ms() == T0 + 10
    finally:
        await scheduler.stop()


async def test_run_skips_a_cancelled_head(
    running: Scheduler, clock: ManualClock, fired: Recorder
) -> None:
    running.arm("a", T0 + 10, 1)
    running.arm("b", T0 + 20, 2)
    await turns()
    running.cancel("a")

    clock.advance(10)
    await turns()
    assert fired.fired == []
    assert clock.next_alarm_ms() == T0 + 20

    clock.advance(10)
    await turns()
    assert fired.fired == [("b", 2)]


async def test_stop_fires_nothing_and_leaves_the_timers(
    scheduler: Scheduler, clock: ManualClock, fired: Recorder
) -> None:
    scheduler.start()
    scheduler.arm("a", T0 + 10, 1)
    await turns()
    assert clock.next_alarm_ms() == T0 + 10

    await scheduler.stop()
    assert clock.next_alarm_ms() is None
    clock.advance(1_000)
    await turns()

    assert fired.fired == []
    assert len(scheduler) == 1
    assert scheduler.pending("a") == (T0 + 10, 1)

    scheduler.start()
    await turns()
    assert fired.fired == [("a", 1)]
    await scheduler.stop()


async def test_stop_without_start_is_a_no_op(scheduler: Scheduler) -> None:
    await scheduler.stop()
    assert len(scheduler) == 0


async def test_start_twice_is_an_error(running: Scheduler) -> None:
    with pytest.raises(RuntimeError):
        running.start()


async def test_an_on_fire_exception_does_not_kill_the_task(clock: ManualClock) -> None:
    fired = Recorder()

    def on_fire(key: str, token: int) -> None:
        if key == "bad":
            raise ValueError("boom")
        fired(key, token)

    timers = Scheduler(clock, on_fire)
    timers.start()
    try:
        timers.arm("bad", T0 + 10, 1)
        with capture_logs() as logs:
            clock.advance(10)
            await turns()
        assert [entry["event"] for entry in logs] == ["timer_fire_failed"]

        timers.arm("good", T0 + 20, 2)
        clock.advance(10)
        await turns()
        assert fired.fired == [("good", 2)]
    finally:
        await timers.stop()


async def test_run_fires_a_timer_rearmed_already_due_without_blocking(
    clock: ManualClock,
) -> None:
    fired = Recorder()

    def on_fire(key: str, token: int) -> None:
        fired(key, token)
        if token < 3:
            timers.arm(key, clock.now_ms(), token + 1)

    timers = Scheduler(clock, on_fire)
    timers.start()
    try:
        timers.arm("a", T0 + 10, 1)
        clock.advance(10)
        await turns(10)
        assert fired.fired == [("a", 1), ("a", 2), ("a", 3)]
        assert len(timers) == 0
    finally:
        await timers.stop()


# --- the clocks -----------------------------------------------------------------------


def test_manual_clock_moves_only_when_told(clock: ManualClock) -> None:
    assert clock.now_ms() == T0
    clock.advance(250)
    assert clock.now_ms() == T0 + 250
    clock.set(T0 - 1)
    assert clock.now_ms() == T0 - 1
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_manual_clock_rings_alarms_in_time_order_and_honours_cancel(
    clock: ManualClock,
) -> None:
    rang: list[str] = []
    clock.call_at(T0 + 20, lambda: rang.append("20"))
    clock.call_at(T0 + 10, lambda: rang.append("10"))
    cancelled = clock.call_at(T0 + 15, lambda: rang.append("15"))
    cancelled.cancel()

    clock.advance(30)
    assert rang == ["10", "20"]

    clock.call_at(T0, lambda: rang.append("past"))
    assert rang == ["10", "20"]  # never synchronously
    await turns(1)
    assert rang == ["10", "20", "past"]


def test_system_clock_reads_epoch_milliseconds() -> None:
    before = time.time() * 1000
    now = SystemClock().now_ms()
    after = time.time() * 1000
    assert isinstance(now, int)
    assert before - 1 <= now <= after + 1


async def test_system_clock_alarm_in_the_past_rings_on_the_next_turns() -> None:
    clock = SystemClock()
    rang: list[str] = []
    clock.call_at(clock.now_ms() - 1, lambda: rang.append("kept"))
    clock.call_at(clock.now_ms() - 1, lambda: rang.append("cancelled")).cancel()
    assert rang == []
    await turns()
    assert rang == ["kept"]


def test_a_rearm_keeps_the_key_object_the_timer_holds() -> None:
    recorder = Recorder()
    scheduler = Scheduler(ManualClock(T0), recorder)
    held = "".join(["conv-", "1"])
    scheduler.arm(held, T0 + 10, 1)
    scheduler.arm("".join(["conv-", "1"]), T0 + 20, 2)  # an equal copy, as a new message's
    assert scheduler.pending("conv-1") == (T0 + 20, 2)
    scheduler.fire_due(T0 + 20)
    assert recorder.fired == [("conv-1", 2)]
    assert recorder.fired[0][0] is held


def test_arm_many_is_many_arms_in_turn() -> None:
    rng = random.Random(17)
    timers = [
        (f"conv-{rng.randrange(300)}", T0 + rng.randrange(0, 50), token) for token in range(2_000)
    ]
    one, many = Recorder(), Recorder()
    by_arm, in_bulk = Scheduler(ManualClock(T0), one), Scheduler(ManualClock(T0), many)
    by_arm.arm("conv-held", T0 + 5, 1)
    in_bulk.arm("conv-held", T0 + 5, 1)
    for key, due, token in timers:
        by_arm.arm(key, due, token)
    in_bulk.arm_many(timers)
    assert len(in_bulk) == len(by_arm)
    assert all(in_bulk.pending(key) == by_arm.pending(key) for key, _, _ in timers)
    assert in_bulk.fire_due(T0 + 25) == by_arm.fire_due(T0 + 25)
    in_bulk.arm_many([])
    in_bulk.fire_due(T0 + 50)
    by_arm.fire_due(T0 + 50)
    assert many.fired == one.fired
    assert len(in_bulk) == 0


def test_arm_many_keeps_the_key_object_the_timer_holds() -> None:
    recorder = Recorder()
    scheduler = Scheduler(ManualClock(T0), recorder)
    held = "".join(["conv-", "1"])
    scheduler.arm(held, T0 + 10, 1)
    scheduler.arm_many([("".join(["conv-", "1"]), T0 + 20, 2)])
    scheduler.fire_due(T0 + 20)
    assert recorder.fired == [("conv-1", 2)]
    assert recorder.fired[0][0] is held


async def test_arm_many_wakes_the_running_task(clock: ManualClock, fired: Recorder) -> None:
    scheduler = Scheduler(clock, fired)
    scheduler.arm("late", T0 + 1_000, 1)
    scheduler.start()
    await turns()
    scheduler.arm_many([("early", T0 + 10, 2)])
    await turns()
    clock.advance(10)
    await turns()
    assert fired.fired == [("early", 2)]
    await scheduler.stop()


# -- checks: a warm's timeout is never held back (decision 109) -----------------------------


def test_checks_fire_first_and_outside_the_limit(clock: ManualClock, fired: Recorder) -> None:
    scheduler = Scheduler(clock, fired)
    scheduler.arm("warm", T0 + 1, 1)
    scheduler.arm("check", T0 + 2, 2, check=True)
    assert scheduler.fire_due(T0 + 5, limit=0) == 1
    assert fired.keys == ["check"]
    assert scheduler.pending("warm") == (T0 + 1, 1)  # held: the limit was 0
    assert scheduler.fire_due(T0 + 5, limit=1) == 1
    assert fired.keys == ["check", "warm"]


def test_a_key_moves_between_the_lanes_with_one_timer_pending(
    clock: ManualClock, fired: Recorder
) -> None:
    scheduler = Scheduler(clock, fired)
    scheduler.arm("c", T0 + 1, 1, check=True)
    scheduler.arm("c", T0 + 2, 2)  # the warm came back: the next warm replaces the check
    assert len(scheduler) == 1
    assert scheduler.fire_due(T0 + 5, limit=0) == 0  # the check is dead, the warm held
    scheduler.arm("c", T0 + 3, 3, check=True)  # a warm went out again
    assert scheduler.fire_due(T0 + 5, limit=0) == 1
    assert fired.fired == [("c", 3)]
    assert len(scheduler) == 0


def test_compaction_keeps_each_timer_in_its_lane(clock: ManualClock, fired: Recorder) -> None:
    scheduler = Scheduler(clock, fired)
    for n in range(3_000):  # enough dead entries to rebuild the heaps
        scheduler.arm(f"k{n % 10}", T0 + n, n, check=n % 2 == 0)
    assert len(scheduler) == 10
    assert scheduler.fire_due(T0 + 10_000, limit=0) == 5  # the even tokens: checks
    assert sorted(token % 2 for _, token in fired.fired) == [0] * 5


async def test_a_check_fires_while_the_room_holds_the_others(clock: ManualClock) -> None:
    fired = Recorder()
    scheduler = Scheduler(clock, fired, room=lambda: 0)
    scheduler.arm("warm", T0 + 10, 1)
    scheduler.arm("check", T0 + 20, 2, check=True)
    scheduler.start()
    try:
        clock.set(T0 + 30)
        await turns()
        assert fired.keys == ["check"]
        assert scheduler.behind_ms(T0 + 30) == 20  # the held warm is what it is behind on
    finally:
        await scheduler.stop()


def test_arm_many_arms_checks_in_their_own_lane(clock: ManualClock, fired: Recorder) -> None:
    scheduler = Scheduler(clock, fired)
    scheduler.arm_many([("warm", T0 + 1, 1)])
    scheduler.arm_many([("check", T0 + 2, 2)], check=True)
    assert scheduler.fire_due(T0 + 5, limit=0) == 1
    assert fired.keys == ["check"]
