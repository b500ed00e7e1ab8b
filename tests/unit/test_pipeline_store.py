"""The pipeline when the store lies or fails: lost data, unknown outcomes, outages.

The real worker on the in-memory bus and store (``tests/unit/test_pipeline.py``'s rig).
A reply always matches what the store holds: an outcome that is not known is never answered
as a failure, a store that lost its data is given everything again, and no command waits
behind a batch whose commit is being retried.
"""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from tests.unit.test_pipeline import Rig, closed, enable, outcome, rig, settled
from warmer.bus.publisher import PublishFailed
from warmer.contract import ErrorReply, SettingsReply

__all__ = ["rig"]  # the fixture, shared


def reply_of(rig: Rig, correlation_id: str) -> object:
    for _, key, reply in rig.outbound.replies:
        if key == correlation_id:
            return reply
    return None


def store_enabled(rig: Rig, cid: str) -> bool | None:
    record = rig.committed(cid)
    return None if record is None else bool(record.settings.enabled)


# -- an outcome not known ---------------------------------------------------------------


async def test_an_unknown_outcome_is_re_written_until_known_then_answered_ok(rig: Rig) -> None:
    for lands in (False, True):
        rig.store.unknown_next, rig.store.unknown_lands = 3, lands
        item = rig.command(enable(f"c-{lands}"), reply_to="r", correlation_id=f"k-{lands}")
        await rig.batch(item)
        assert outcome(item) == "ack"
        assert isinstance(reply_of(rig, f"k-{lands}"), SettingsReply)
        assert store_enabled(rig, f"c-{lands}") is True
        assert rig.core.get(f"c-{lands}").enabled is True  # type: ignore[union-attr]
    assert rig.metric("warmer_store_errors_total") == 6


async def test_after_an_unknown_outcome_a_known_failure_does_not_refuse_the_command(
    rig: Rig,
) -> None:
    # The first write may land later: refusing now could leave the store holding what
    # the reply said failed.
    rig.store.unknown_next, rig.store.unknown_lands = 1, True
    item = rig.command(enable("c"), reply_to="r", correlation_id="k")
    task = rig.start(item)
    await rig.drive(lambda: rig.metric("warmer_store_errors_total") >= 1)
    rig.store.fail_next = 2
    await rig.drive(task.done)
    await task
    assert isinstance(reply_of(rig, "k"), SettingsReply)
    assert store_enabled(rig, "c") is True


# -- a store that lost its data ---------------------------------------------------------


async def test_a_store_that_lost_its_data_is_given_everything_again(rig: Rig) -> None:
    await rig.batch(*[rig.command(enable(f"c{i}")) for i in range(3)])
    await rig.batch(rig.event(settled("c0", seq=1)))
    held = dict(rig.store.records)
    rig.store.lose()
    command = rig.command(enable("new"), reply_to="r", correlation_id="k")
    with capture_logs() as logs:
        await rig.batch(rig.event(closed("c1", seq=2)), command)
    lost = [log for log in logs if log["event"] == "store_data_lost"]
    assert len(lost) == 1 and lost[0]["log_level"] == "error"
    restored = [log for log in logs if log["event"] == "store_restored"]
    assert len(restored) == 1 and restored[0]["conversations"] == 3  # as committed
    assert rig.metric("warmer_store_data_lost_total") == 1
    assert isinstance(reply_of(rig, "k"), SettingsReply)
    assert store_enabled(rig, "new") is True
    assert store_enabled(rig, "c1") is False  # the batch itself, after the restore
    assert rig.store.records["c0"] == held["c0"] and rig.store.records["c2"] == held["c2"]
    assert "\x7fwarmer:gap-model" in rig.store.records
    assert rig.store.token >= rig.core.last_token
    assert rig.worker.health.reasons() == []


async def test_the_store_check_notices_lost_data_while_idle_and_says_so_until_restored(
    rig: Rig,
) -> None:
    await rig.batch(*[rig.command(enable(f"c{i}")) for i in range(3)])
    held = dict(rig.store.records)
    checking = asyncio.get_running_loop().create_task(rig.worker.watch_store(5_000))
    try:
        rig.store.lose()
        with capture_logs() as logs:
            rig.clock.advance(5_000)
            await rig.drive(lambda: rig.metric("warmer_store_data_lost_total") == 1)
            await rig.drive(lambda: "c0" in rig.store.records)
        said = [(log["event"], log.get("part")) for log in logs]
        assert said.index(("not_ready", "store_lost")) < said.index(("store_restored", None))
        assert said.index(("store_restored", None)) < said.index(("ready_again", "store_lost"))
        model = rig.store.records.pop("\x7fwarmer:gap-model")
        assert model and rig.store.records == held
        assert rig.worker.health.reasons() == []
    finally:
        checking.cancel()


async def test_the_store_check_reports_a_failing_store_until_it_answers(rig: Rig) -> None:
    await rig.batch(rig.command(enable("c")))
    checking = asyncio.get_running_loop().create_task(rig.worker.watch_store(5_000))
    try:
        rig.store.failing = True
        rig.clock.advance(5_000)
        await rig.drive(lambda: rig.worker.health.reason("store") is not None)
        assert "failing" in (rig.worker.health.reason("store") or "")
        rig.store.failing = False
        rig.clock.advance(5_000)
        await rig.drive(lambda: rig.worker.health.reason("store") is None)
    finally:
        checking.cancel()


# -- commands during an outage ----------------------------------------------------------


async def test_a_batch_retried_in_place_reports_the_store_until_its_commit_succeeds(
    rig: Rig,
) -> None:
    rig.store.failing = True
    item = rig.event(settled("e"))
    task = rig.start(item)
    await rig.drive(lambda: rig.metric("warmer_store_errors_total") >= 2)
    assert "memory store failing" in (rig.worker.health.reason("store") or "")
    rig.store.failing = False
    await rig.drive(task.done)
    await task
    assert outcome(item) == "ack"
    assert rig.worker.health.reason("store") is None


async def test_the_batch_s_commands_are_answered_at_once_while_its_events_are_retried(
    rig: Rig,
) -> None:
    rig.store.failing = True
    event = rig.event(settled("e"))
    command = rig.command(enable("c"), reply_to="r", correlation_id="k")
    task = rig.start(event, command)
    await rig.drive(lambda: outcome(command) is not None)
    assert outcome(command) == "ack"
    assert rig.commands.frames == [("ack", command.delivery.delivery_tag, False)]
    reply = reply_of(rig, "k")
    assert isinstance(reply, ErrorReply) and reply.code == "store_error"
    assert outcome(event) is None and not task.done()
    rig.store.failing = False
    await rig.drive(task.done)
    await task
    assert outcome(event) == "ack"
    assert rig.committed("c") is None and rig.committed("e") is not None


async def test_commands_arriving_during_a_retry_are_answered_store_error_at_once(
    rig: Rig,
) -> None:
    rig.store.failing = True
    event = rig.event(settled("e"))
    task = rig.start(event)
    await rig.drive(lambda: rig.metric("warmer_store_errors_total") >= 1)
    later = [rig.command(enable(f"c{i}"), reply_to="r", correlation_id=f"k{i}") for i in range(3)]
    timer_like = rig.event(settled("left-in-line"))
    for item in (later[0], timer_like, *later[1:]):
        rig.inputs.put(item)
    await rig.drive(lambda: all(outcome(i) is not None for i in later))
    assert [outcome(i) for i in later] == ["ack"] * 3
    for i in range(3):
        reply = reply_of(rig, f"k{i}")
        assert isinstance(reply, ErrorReply) and reply.code == "store_error"
        assert rig.core.get(f"c{i}") is None
    assert len(rig.inputs) == 1  # the event waits for its own batch
    rig.store.failing = False
    await rig.drive(task.done)
    await task
    assert all(rig.committed(f"c{i}") is None for i in range(3))


async def test_a_command_of_unknown_outcome_waits_while_later_ones_are_answered(
    rig: Rig,
) -> None:
    rig.store.unknown_next, rig.store.unknown_lands = 10_000, False
    first = rig.command(enable("first"), reply_to="r", correlation_id="first")
    task = rig.start(first)
    await rig.drive(lambda: rig.metric("warmer_store_errors_total") >= 2)
    later = rig.command(enable("later"), reply_to="r", correlation_id="later")
    rig.inputs.put(later)
    await rig.drive(lambda: outcome(later) is not None)
    reply = reply_of(rig, "later")
    assert isinstance(reply, ErrorReply) and reply.code == "store_error"
    assert outcome(first) is None and reply_of(rig, "first") is None
    rig.store.unknown_next = 0
    await rig.drive(task.done)
    await task
    assert isinstance(reply_of(rig, "first"), SettingsReply)
    assert store_enabled(rig, "first") is True and rig.committed("later") is None


async def test_a_refused_command_whose_reply_fails_is_requeued_never_left(rig: Rig) -> None:
    # Left unsettled, the next batch's multiple acknowledgement would cover it, unanswered.
    rig.store.failing = True
    rig.outbound.fail["reply"] = [PublishFailed("nack")]
    command = rig.command(enable("c"), reply_to="r", correlation_id="k")
    task = rig.start(rig.event(settled("e")), command)
    await rig.drive(lambda: outcome(command) is not None)
    assert outcome(command) == "requeue"
    assert rig.commands.frames == [("reject", command.delivery.delivery_tag, True)]
    rig.store.failing = False
    await rig.drive(task.done)
    await task


async def test_a_command_answered_at_once_is_not_given_back_with_its_abandoned_batch(
    rig: Rig,
) -> None:
    event = rig.event(closed("e", seq=1))
    command = rig.command(enable("c"), reply_to="r", correlation_id="k")
    rig.store.failing = True
    rig.run()
    rig.put(event, command)
    await rig.drive(lambda: outcome(command) is not None)
    rig.lifecycle.close()  # the event's batch is rolled back and given back
    await rig.drive(lambda: rig.metric("warmer_redeliveries_total") >= 1)
    rig.store.failing = False
    later = rig.command(enable("d"), reply_to="r", correlation_id="later")
    rig.put(later)
    await rig.drive(lambda: outcome(later) is not None)
    # Settled once each: a second settlement would close the channel.
    assert rig.commands.frames == [("ack", 1, False), ("ack", 2, True)]
    assert rig.committed("c") is None and store_enabled(rig, "d") is True


async def test_a_refused_batch_with_nothing_left_to_commit_does_not_say_the_store_is_back(
    rig: Rig,
) -> None:
    rig.store.failing = True
    await rig.batch(rig.command(enable("c"), reply_to="r", correlation_id="k"))
    assert rig.worker.health.reason("store") is not None
    rig.store.failing = False
    await rig.batch(rig.command(enable("c"), reply_to="r", correlation_id="again"))
    assert rig.worker.health.reason("store") is None
