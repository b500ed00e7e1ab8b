"""Overload degrades gracefully (issue 17), on the injected clock.

- a warm timeout that fires while the worker is behind is checked again, not failed; a
  completion that comes while its retry is only armed is credited;
- timers fall due no faster than the pipeline has room for: the rest wait in the
  schedule, due times kept, oldest first; and none while the broker holds a backlog of
  lifecycle messages for the worker;
- commands are taken before everything else;
- failed warms are summed into one warning line every so often.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.unit.conftest import T0, Shell
from warmer.bus.memory import MemoryChannel
from warmer.clock import ManualClock
from warmer.core import Arm, WarmFailed
from warmer.inputs import (
    BATCH_MAX,
    BATCH_NEAR_COMMANDS,
    COMMANDS_RECENT_MS,
    Fired,
    Inputs,
    Received,
)
from warmer.observe.failures import FailureLog
from warmer.scheduler import Scheduler
from warmer.worker import BEHIND_MIN_MS

C = "conv-1"
TIMEOUT = 60_000  # the default warm timeout, under the default 240 s interval


def failures_of(outcome: Any) -> list[WarmFailed]:
    return [e for e in outcome.effects if isinstance(e, WarmFailed)]


def clocked(shell: Shell) -> Inputs:
    """Give the shell's worker inputs stamped on its clock (as the app's are)."""
    inputs = Inputs(shell.clock)
    shell.inputs = shell.worker.inputs = inputs
    return inputs


# -- the rule: a timeout while the worker is behind ----------------------------------------


def test_a_timeout_while_the_worker_is_behind_is_checked_again_not_failed(shell: Shell) -> None:
    warm = shell.warming(C)
    deadline, token = shell.timers[C]
    assert token == warm.token
    out = shell.warmer.on_timer(deadline, C, token, 500)
    assert out.verdict == "extended"
    # Again half a timeout later (more than how far behind): no change, no surface.
    assert out.effects == [Arm(C, deadline + TIMEOUT // 2, token)]
    conv = shell.conv(C)
    assert (shell.status(C), conv.failures, conv.last_error) == ("warming", 0, None)


def test_a_worker_far_behind_is_waited_for_as_long_as_it_is_behind(shell: Shell) -> None:
    shell.warming(C)
    deadline, token = shell.timers[C]
    out = shell.warmer.on_timer(deadline, C, token, 45_000)
    assert out.effects == [Arm(C, deadline + 45_000, token)]


def test_the_wait_is_bounded_by_one_more_warm_timeout(shell: Shell) -> None:
    shell.warming(C)
    deadline, token = shell.timers[C]
    out = shell.warmer.on_timer(deadline + TIMEOUT - 100, C, token, 500)
    assert out.effects == [Arm(C, deadline + TIMEOUT, token)]  # never past the bound
    out = shell.warmer.on_timer(deadline + TIMEOUT, C, token, 500)
    assert [(f.cause, f.failures) for f in failures_of(out)] == [("timeout", 1)]


def test_a_timeout_while_the_worker_keeps_up_fails_the_warm(shell: Shell) -> None:
    shell.warming(C)
    deadline, token = shell.timers[C]
    out = shell.warmer.on_timer(deadline, C, token, 0)
    assert [f.cause for f in failures_of(out)] == ["timeout"]
    assert shell.status(C) == "retrying"


def test_only_a_warm_timeout_waits_a_regular_fire_warms(shell: Shell) -> None:
    shell.enabled_and_armed(C)
    due, token = shell.timers[C]
    out = shell.warmer.on_timer(due, C, token, 5_000)
    assert out.verdict == "applied" and shell.status(C) == "warming"


def test_the_worker_tells_the_core_how_long_the_timeout_waited(shell: Shell) -> None:
    inputs = clocked(shell)
    warm = shell.warming(C)
    deadline, token = shell.timers[C]
    shell.scheduler.cancel(C)  # fired: handed to the inputs, where it waits
    shell.now = deadline
    inputs.put(Fired(C, token))
    shell.advance(BEHIND_MIN_MS + 200)  # the pipeline was busy meanwhile
    extended = shell.metrics.value("warmer_warm_timeouts_extended_total")
    items = shell._run(inputs.take())
    assert items is not None
    shell._run(shell.worker.run_batch(items))
    assert shell.status(C) == "warming"
    assert shell.scheduler.pending(C) == (shell.now + TIMEOUT // 2, token)
    assert shell.metrics.value("warmer_warm_timeouts_extended_total") == extended + 1
    # The completion then answers it as ever.
    out = shell.completed(C, token=warm.token)
    assert out.verdict == "applied" and shell.status(C) == "armed"


def test_an_input_that_did_not_wait_lets_the_timeout_fail(shell: Shell) -> None:
    inputs = clocked(shell)
    shell.warming(C)
    deadline, token = shell.timers[C]
    shell.scheduler.cancel(C)
    shell.now = deadline
    inputs.put(Fired(C, token))
    items = shell._run(inputs.take())
    assert items is not None
    shell._run(shell.worker.run_batch(items))
    assert shell.status(C) == "retrying"
    assert shell.conv(C).failures == 1


# -- a late answer while the retry is only armed --------------------------------------------


def test_a_completion_after_its_timeout_is_credited_while_no_newer_request_went_out(
    shell: Shell,
) -> None:
    warm = shell.warming(C)
    assert failures_of(shell.fire(C))  # the worker kept up: the orchestrator was late
    assert shell.status(C) == "retrying"
    retry_token = shell.conv(C).token
    out = shell.completed(C, token=warm.token)
    assert out.verdict == "applied"
    conv = shell.conv(C)
    assert (shell.status(C), conv.failures, conv.last_error) == ("armed", 0, None)
    assert conv.token > retry_token  # the retry is replaced by the next regular warm
    assert conv.answered_token == warm.token
    assert shell.completed(C, token=warm.token).verdict == "stale"  # a duplicate


def test_a_late_error_is_recorded_and_the_retry_stands(shell: Shell) -> None:
    warm = shell.warming(C)
    shell.fire(C)
    pending = shell.timers[C]
    out = shell.completed(C, token=warm.token, error="boom")
    assert out.verdict == "applied"
    assert (shell.status(C), shell.conv(C).last_error) == ("retrying", "boom")
    assert shell.timers[C] == pending


# -- spreading: room in the pipeline ------------------------------------------------------


class Fires:
    """An on_fire that records, and a room of ``allowed`` minus what fired."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.allowed = 0
        self.late: list[float] = []

    def __call__(self, key: str, token: int) -> None:
        self.keys.append(key)

    def room(self) -> int:
        return self.allowed - len(self.keys)


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_timers_wait_for_room_oldest_first_their_due_times_kept() -> None:
    clock = ManualClock(T0)
    fires = Fires()
    scheduler = Scheduler(clock, fires, lateness=fires.late.append, room=fires.room)
    for n, key in enumerate(["e", "d", "c", "b", "a"]):  # armed newest first
        scheduler.arm(key, T0 + 50 - 10 * n, n)
    fires.allowed = 2
    scheduler.start()
    try:
        clock.advance(100)
        await turns()
        assert fires.keys == ["a", "b"]
        assert scheduler.pending("c") == (T0 + 30, 2)  # held, its due time kept
        assert scheduler.behind_ms(clock.now_ms()) == 70  # the oldest held
        fires.allowed = 4
        scheduler.nudge()  # room again
        await turns()
        assert fires.keys == ["a", "b", "c", "d"]
        fires.allowed = 5  # room, but nobody says so: looked at again shortly anyway
        clock.advance(50)
        await turns()
        assert fires.keys == ["a", "b", "c", "d", "e"]
        assert scheduler.behind_ms(clock.now_ms()) == 0
        assert fires.late == [0.09, 0.08, 0.07, 0.06, 0.1]  # as late as they were held
    finally:
        await scheduler.stop()


async def test_without_room_given_every_due_timer_fires() -> None:
    clock = ManualClock(T0)
    fires = Fires()
    scheduler = Scheduler(clock, fires)
    for n in range(5):
        scheduler.arm(f"k{n}", T0 + n, n)
    scheduler.start()
    try:
        clock.advance(10)
        await turns()
        assert len(fires.keys) == 5
    finally:
        await scheduler.stop()


def test_a_stopped_scheduler_is_not_behind() -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler(clock, Fires())
    scheduler.arm("a", T0, 1)
    assert scheduler.behind_ms(T0 + 5_000) == 0


def test_the_room_counts_fires_waiting_and_warms_unconfirmed_and_the_broker_backlog() -> None:
    shell = Shell()
    inputs = clocked(shell)
    worker = shell.worker
    worker._in_flight = 3
    assert worker._room() == 3
    inputs.fired("a", 1)
    inputs.fired("b", 2)
    assert worker._room() == 1
    worker.inbound(worker.hold_above + 1, 100, 250)  # completions wait at the broker
    assert worker._room() == 0
    worker.inbound(worker.hold_above, 100, 250)
    assert worker._room() == 1
    inputs.fires_through(2)
    assert worker._room() == 3


def test_how_far_behind_the_worker_is(shell: Shell) -> None:
    inputs = clocked(shell)
    worker = shell.worker
    assert worker.behind_ms() == 0
    inputs.fired("a", 1)
    shell.advance(BEHIND_MIN_MS - 1)
    assert worker.behind_ms() == 0  # under the threshold: it keeps up
    shell.advance(1)
    assert worker.behind_ms() == BEHIND_MIN_MS  # an input waited that long
    # 400 lifecycle messages at the broker, 100 taken in the last 250 ms: a second's wait.
    worker.inbound(400, 100, 250)
    assert worker.behind_ms() == 1_000
    worker.inbound(0, 100, 250)
    assert worker.behind_ms() == BEHIND_MIN_MS


# -- commands first -------------------------------------------------------------------------


async def test_commands_are_taken_before_what_came_earlier() -> None:
    clock = ManualClock(T0)
    inputs = Inputs(clock)
    lifecycle, commands = MemoryChannel("lifecycle"), MemoryChannel("commands")
    await inputs.lifecycle(lifecycle.deliver(b"{}"))
    inputs.fired("a", 1)
    clock.advance(300)
    await inputs.command(commands.deliver(b"{}"))
    first = await inputs.take()
    assert first is not None and [type(i).__name__ for i in first] == ["Received"]
    assert isinstance(first[0], Received) and first[0].queue == "commands"
    assert inputs.oldest_ms(clock.now_ms()) == 300  # the others still wait
    second = await inputs.take()
    assert second is not None and len(second) == 2
    assert inputs.waited_ms == 300
    assert inputs.oldest_ms(clock.now_ms()) == 0
    assert (inputs.delivered, inputs.fired_waiting) == (1, 1)


# -- failure warnings summed ---------------------------------------------------------------


def test_failed_warms_make_one_warning_line_per_interval() -> None:
    clock = ManualClock(T0)
    log = FailureLog(clock, every_ms=10_000)
    with capture_logs() as logs:
        for n in range(1_000):
            log.failed("timeout", f"c{n}", "no completion within 1 s", paused=n % 10 == 0)
            log.flush()
        log.publish_failed("broker refused")
        clock.advance(9_999)
        log.flush()
        assert len(logs) == 1  # the first at once, then nothing within the interval
        clock.advance(1)
        log.flush()
    assert [entry["event"] for entry in logs] == ["warms_failed", "warms_failed"]
    assert all(entry["log_level"] == "warning" for entry in logs)
    first, second = logs
    assert (first["count"], first["by_cause"], first["paused"]) == (1, {"timeout": 1}, 1)
    assert first["example_conversation_id"] == "c0"
    assert second["count"] == 1_000
    assert second["by_cause"] == {"publish": 1, "timeout": 999}
    assert second["paused"] == 99


def test_nothing_is_written_without_failures_and_the_rest_at_stop() -> None:
    clock = ManualClock(T0)
    log = FailureLog(clock)
    with capture_logs() as logs:
        log.flush(force=True)
        log.failed("error", "c", "boom", paused=False)
        log.flush()
        log.failed("error", "c", "boom", paused=False)
        log.flush()
        log.flush(force=True)
    assert [entry["count"] for entry in logs] == [1, 1]


@pytest.mark.parametrize("count", [3])
def test_a_failed_warm_is_no_warning_line_of_its_own(count: int) -> None:
    shell = Shell()
    ids = [f"c{n}" for n in range(count)]
    with capture_logs() as logs:
        for cid in ids:
            shell.enabled_and_armed(cid)
        for cid in ids:
            shell.fire(cid)  # the warm goes out
        for cid in ids:
            shell.fire(cid)  # and times out, the worker keeping up
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in warnings] == ["warms_failed"]
    assert warnings[0]["count"] == 1  # the rest within the interval: told later
    per_warm = [entry for entry in logs if entry["event"] == "warm_failed"]
    assert len(per_warm) == count and all(e["log_level"] == "info" for e in per_warm)


async def test_while_commands_come_the_other_batches_are_smaller() -> None:
    clock = ManualClock(T0)
    inputs = Inputs(clock)
    commands = MemoryChannel("commands")
    for n in range(BATCH_MAX + 10):
        inputs.fired(f"c{n}", n)
    first = await inputs.take()
    assert first is not None and len(first) == BATCH_MAX  # no command seen yet
    await inputs.command(commands.deliver(b"{}"))
    assert len(await inputs.take() or []) == 1  # the command, alone
    for n in range(2 * BATCH_MAX):
        inputs.fired(f"d{n}", n)
    assert len(await inputs.take() or []) == BATCH_NEAR_COMMANDS
    clock.advance(COMMANDS_RECENT_MS)  # no command for a second
    assert len(await inputs.take() or []) == BATCH_MAX
