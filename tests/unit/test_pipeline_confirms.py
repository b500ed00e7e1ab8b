"""Confirms on the injected clock: the deadline, the retries' backoff, a silent connection.

A publish whose confirm does not come within the deadline is cancelled and sent again;
its delivery is acknowledged only once a confirm came. An overdue confirm means the
connection may be dead without a word: the pipeline reports ``confirms`` (``/readyz``),
asks the port to drop the connection, and clears the report once confirms come again;
not while the broker has blocked the connection, when late confirms are expected.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from structlog.testing import capture_logs

from tests.unit import test_pipeline
from tests.unit.test_pipeline import CONFIRM_MS, RETRY_MS, T0, Rig, enable, outcome, settled
from warmer.bus.memory import MemoryChannel
from warmer.bus.port import ConfirmOverdue, PublishFailed
from warmer.contract import SurfaceChanged
from warmer.inputs import Fired

rig = test_pipeline.rig  # the pipeline's fixture: a worker on the in-memory bus


def surface_times(rig: Rig) -> list[int]:
    """When each surface publish was attempted, on the rig's clock."""
    times: list[int] = []
    surface = rig.outbound.surface

    async def timed(update: SurfaceChanged) -> None:
        times.append(rig.clock.now_ms())
        await surface(update)

    rig.outbound.surface = timed  # type: ignore[method-assign]
    return times


async def test_a_confirm_that_never_comes_is_sent_again_after_exactly_the_deadline(
    rig: Rig,
) -> None:
    times = surface_times(rig)
    rig.outbound.hold["surface"] = 1
    item = rig.event(settled("c"))
    task = rig.start(item)
    await rig.settle_down()
    rig.clock.set(T0 + CONFIRM_MS - 1)
    await rig.settle_down()
    assert (times, rig.outbound.resets, outcome(item)) == ([T0], [], None)
    rig.clock.set(T0 + CONFIRM_MS)  # the deadline: cancelled, then a first pause
    await rig.settle_down()
    assert len(rig.outbound.resets) == 1
    assert rig.worker.metrics.registry.get_sample_value("warmer_connection_resets_total") == 1
    await rig.drive(task.done, exact=True)
    assert times == [T0, T0 + CONFIRM_MS + RETRY_MS[0]]
    assert outcome(item) == "ack"
    assert len(rig.outbound.surfaces) == 1


async def test_an_unconfirmed_publish_is_never_acknowledged(rig: Rig) -> None:
    times = surface_times(rig)
    rig.outbound.hold["surface"] = 2  # two attempts cancelled at their deadlines
    item = rig.event(settled("c"))
    task = rig.start(item)
    await rig.drive(lambda: len(times) == 2, exact=True)
    assert outcome(item) is None  # the first attempt cancelled, the second unconfirmed
    rig.clock.advance(CONFIRM_MS)
    await rig.settle_down()
    assert outcome(item) is None  # the second cancelled too
    assert rig.outbound.surfaces == []
    await rig.drive(task.done, exact=True)
    assert outcome(item) == "ack"
    assert len(rig.outbound.surfaces) == 1
    assert rig.lifecycle.frames == [("ack", 1, True)]


async def test_retries_pause_the_first_pause_then_double_up_to_the_longest(rig: Rig) -> None:
    times = surface_times(rig)
    rig.outbound.fail["surface"] = [PublishFailed("nack") for _ in range(5)]
    item = rig.event(settled("c"))
    task = rig.start(item)
    await rig.drive(task.done, exact=True)
    pauses = [after - before for before, after in itertools.pairwise(times)]
    first, longest = RETRY_MS
    assert pauses == [first, 2 * first, longest, longest, longest]
    assert outcome(item) == "ack"


async def test_a_store_error_is_retried_after_the_same_pauses(rig: Rig) -> None:
    times: list[int] = []
    commit = rig.store.commit

    async def timed(changes: Mapping[str, bytes | None], token: int) -> None:
        times.append(rig.clock.now_ms())
        await commit(changes, token)

    rig.store.commit = timed  # type: ignore[method-assign]
    rig.store.fail_next = 3
    task = rig.start(rig.event(settled("c")))
    await rig.drive(task.done, exact=True)
    pauses = [after - before for before, after in itertools.pairwise(times)]
    assert pauses == [RETRY_MS[0], 2 * RETRY_MS[0], RETRY_MS[1]]


async def test_overdue_confirms_are_reported_once_the_connection_reset_and_cleared(
    rig: Rig,
) -> None:
    rig.outbound.hold["surface"] = 2
    item = rig.event(settled("c"))
    with capture_logs() as logs:
        task = rig.start(item)
        await rig.drive(lambda: len(rig.outbound.resets) == 2, exact=True)
        assert rig.health.reason("confirms") is not None
        await rig.drive(task.done, exact=True)
    assert rig.health.reason("confirms") is None  # confirms came again
    events = [entry["event"] for entry in logs]
    assert events.count("confirms_overdue") == 1  # once per occurrence, not per deadline
    assert events.count("not_ready") == events.count("ready_again") == 1
    assert outcome(item) == "ack"


async def test_while_the_broker_blocks_the_connection_late_confirms_are_awaited(
    rig: Rig,
) -> None:
    times = surface_times(rig)
    rig.health.trouble("broker_blocked", "memory alarm")
    rig.outbound.hold["surface"] = 1
    item = rig.event(settled("c"))
    task = rig.start(item)
    await rig.settle_down()
    rig.clock.advance(3 * CONFIRM_MS)
    await rig.settle_down()
    assert (times, rig.outbound.resets, outcome(item)) == ([T0], [], None)
    assert rig.health.reason("confirms") is None
    rig.health.cleared("broker_blocked")  # unblocked, and still no confirm: now it is overdue
    await rig.drive(task.done, exact=True)
    assert len(rig.outbound.resets) == 1
    assert len(times) == 2 and outcome(item) == "ack"


async def test_a_reset_connection_redelivers_and_the_retry_goes_out_on_the_new_one(
    rig: Rig,
) -> None:
    rig.outbound.hold["surface"] = 1
    rig.outbound.on_reset = rig.lifecycle.close  # the broker takes the delivery back
    item = rig.event(settled("c", seq=1))
    await rig.batch(item)
    assert outcome(item) is None  # never acknowledged on the dead connection
    assert len(rig.outbound.surfaces) == 1  # the state is committed: its output went out
    assert rig.metric("warmer_redeliveries_total") == 1
    rig.lifecycle = MemoryChannel("lifecycle again")
    again = rig.event(settled("c", seq=1))
    await rig.batch(again)
    assert outcome(again) == "ack"  # applied once: stale by seq, acknowledged


async def test_a_warm_request_confirm_overdue_resets_the_connection(rig: Rig) -> None:
    await rig.batch(rig.command(enable("c")), rig.event(settled("c")))
    rig.outbound.fail["warm"] = [ConfirmOverdue("no confirm within 1000 ms")]
    with capture_logs() as logs:
        await rig.batch(Fired("c", rig.core.get("c").token))  # type: ignore[union-attr]
        await rig.worker.settled()
    assert rig.outbound.resets == ["no confirm within 1000 ms"]
    assert [e["part"] for e in logs if e["event"] == "not_ready"] == ["confirms"]
    assert rig.outbound.warms == []  # left to the warm timeout, which retries it


async def test_stopping_while_blocked_stops_waiting_at_the_next_deadline(rig: Rig) -> None:
    rig.health.trouble("broker_blocked", "memory alarm")
    rig.outbound.hold["surface"] = 1
    item = rig.event(settled("c"))
    task = rig.start(item)
    await rig.settle_down()
    rig.worker.abandon()
    await rig.drive(task.done, exact=True)
    assert rig.clock.now_ms() == T0 + CONFIRM_MS
    assert (outcome(item), rig.outbound.resets, rig.outbound.surfaces) == (None, [], [])
