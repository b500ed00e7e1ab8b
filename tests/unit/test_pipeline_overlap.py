"""No acknowledgement covers a delivery that was left, whatever the overlap of batches.

The worker's own loop runs two batches at once (one publishing and acknowledging, the next
applied and committed). A delivery one batch leaves unsettled on a channel that stays open
(a dead letter or an output that fails while stopping, a commit abandoned, a requeue that
could not be sent) must not be acknowledged by the ``multiple`` of a later batch on that
channel: it is left for the broker to deliver again, never lost. A batch rolled back
because a channel went gives back (requeue) what it took on the channels still open.
"""

from __future__ import annotations

from tests.unit import test_pipeline
from tests.unit.test_pipeline import Rig, closed, enable, outcome, settled
from warmer.bus.memory import MemoryChannel
from warmer.bus.port import PublishFailed
from warmer.contract import SurfaceChanged
from warmer.inputs import Received

rig = test_pipeline.rig  # the pipeline's fixture: a worker on the in-memory bus


def nacks(count: int) -> list[BaseException]:
    return [PublishFailed("broker refused the publish") for _ in range(count)]


def surface_fails_for(rig: Rig, cid: str, failure: type[Exception]) -> None:
    """Every surface update of ``cid`` raises ``failure``; the others go out."""
    surface = rig.outbound.surface

    async def failing(update: SurfaceChanged) -> None:
        if update.conversation_id == cid:
            raise failure("refused")
        await surface(update)

    rig.outbound.surface = failing  # type: ignore[method-assign]


async def stop_while_retrying(rig: Rig, behind: object) -> None:
    """The first batch retries a publish; ``behind`` is staged; then the worker stops."""
    await rig.drive(lambda: rig.metric("warmer_retries_total") >= 1)
    rig.put(behind)  # type: ignore[arg-type]
    await rig.drive(lambda: rig.metric("warmer_surface_updates_total") >= 1)
    rig.outbound.closing = True  # stopping: the retry is given up, the delivery left


async def test_a_dead_letter_failing_while_stopping_is_not_acked_by_the_next_batch(
    rig: Rig,
) -> None:
    bad = rig.event(b"{not json")
    good = rig.event(settled("c"))
    rig.outbound.fail["dead_letter"] = nacks(100)
    rig.run()
    rig.put(bad)
    await stop_while_retrying(rig, good)
    await rig.drive(lambda: outcome(good) is not None)
    assert outcome(good) == "ack"
    assert outcome(bad) is None  # left: delivered again, dead-lettered then
    assert rig.outbound.dead_letters == []
    assert rig.lifecycle.frames == [("ack", 2, False)]


async def test_an_output_failing_while_stopping_is_not_acked_by_the_next_batch(
    rig: Rig,
) -> None:
    first = rig.event(settled("a"))
    second = rig.event(settled("b"))
    surface_fails_for(rig, "a", PublishFailed)
    rig.run()
    rig.put(first)
    await stop_while_retrying(rig, second)
    await rig.drive(lambda: outcome(second) is not None)
    assert outcome(second) == "ack"
    assert outcome(first) is None
    assert rig.lifecycle.frames == [("ack", 2, False)]


async def commit_abandoned_then_a_command_behind(rig: Rig) -> tuple[Received, Received]:
    """The lifecycle channel goes while the store does not answer (the outcome unknown, so
    the command is not refused): the batch is rolled back, and its command, on the
    commands channel that stays open, is to come again; then a command on that channel
    is acknowledged.

    The loop's inputs no longer put a command in a batch with lifecycle events (commands
    are taken first, in batches of their own: issue 17), so the mixed batch is started by
    hand; what a rollback gives back is the same for any batch with a delivery on a
    channel that stays open."""
    event = rig.event(closed("e", seq=1))
    command = rig.command(enable("c"), reply_to="replies")
    rig.store.unknown_next, rig.store.unknown_lands = 10_000, False
    first = rig.start(event, command)
    await rig.drive(lambda: rig.metric("warmer_store_errors_total") >= 2)
    rig.lifecycle.close()
    await rig.drive(lambda: rig.metric("warmer_redeliveries_total") >= 2)
    await first
    rig.store.unknown_next = 0
    rig.run()
    later = rig.command(enable("d"), reply_to="replies")
    rig.put(later)
    await rig.drive(lambda: outcome(later) is not None)
    assert outcome(later) == "ack"
    assert rig.committed("c") is None  # rolled back: applied when it comes again
    return command, later


async def test_a_commit_abandoned_gives_back_what_a_later_ack_would_cover(rig: Rig) -> None:
    command, _ = await commit_abandoned_then_a_command_behind(rig)
    assert outcome(command) == "requeue"
    assert rig.commands.frames == [("reject", 1, True), ("ack", 2, True)]


async def test_a_commit_abandoned_that_cannot_give_back_leaves_it_to_no_later_ack(
    rig: Rig,
) -> None:
    rig.commands.refuse = {"reject"}
    command, _ = await commit_abandoned_then_a_command_behind(rig)
    assert outcome(command) is None
    assert rig.commands.frames == [("reject", 1, True), ("ack", 2, False)]


async def test_a_commit_abandoned_while_stopping_is_left_to_no_later_ack(rig: Rig) -> None:
    # Stopping with the connection gone at first: the publisher gives up, the store
    # fails, the batch is rolled back and left; what is still delivered is drained after.
    first = rig.event(closed("a", seq=1))
    rig.outbound.closing = True
    rig.store.failing = True
    rig.run()
    rig.put(first)
    await rig.drive(lambda: rig.metric("warmer_redeliveries_total") >= 1)
    rig.store.failing = False
    second = rig.event(closed("b", seq=1))
    rig.put(second)
    await rig.drive(lambda: outcome(second) is not None)
    assert (outcome(first), outcome(second)) == (None, "ack")
    assert rig.lifecycle.frames == [("ack", 2, False)]


async def test_a_requeue_that_could_not_be_sent_is_not_acked_by_the_next_batch(
    rig: Rig,
) -> None:
    first = rig.event(settled("a"))
    second = rig.event(settled("b"))
    surface_fails_for(rig, "a", TypeError)  # a bug: the delivery is given back
    rig.lifecycle.refuse = {"reject"}  # the requeue frame cannot be sent
    await rig.batch(first)
    await rig.batch(second)
    assert outcome(first) is None
    assert outcome(second) == "ack"
    assert rig.lifecycle.frames == [("reject", 1, True), ("ack", 2, False)]


async def test_a_requeue_on_a_bug_with_a_batch_behind_stays_a_requeue(rig: Rig) -> None:
    first = rig.event(settled("a"))
    second = rig.event(settled("b"))
    begin = rig.core.begin
    calls = 0

    def buggy_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug before applying")
        begin()

    rig.core.begin = buggy_once  # type: ignore[method-assign]
    rig.run()
    rig.put(first)
    await rig.drive(lambda: outcome(first) is not None)
    rig.put(second)
    await rig.drive(lambda: outcome(second) is not None)
    assert (outcome(first), outcome(second)) == ("requeue", "ack")
    assert rig.lifecycle.frames == [("reject", 1, True), ("ack", 2, True)]


async def test_below_the_lowest_delivery_left_one_multiple_ack_still_covers_a_batch(
    rig: Rig,
) -> None:
    # Left at tag 3: a batch with tags 1, 2 before it and 4, 5 after it.
    items = [rig.event(settled(f"c{i}")) for i in range(5)]
    surface_fails_for(rig, "c2", PublishFailed)
    rig.outbound.closing = True  # stopping: not retried
    await rig.batch(*items)
    assert [outcome(i) for i in items] == ["ack", "ack", None, "ack", "ack"]
    assert rig.lifecycle.frames == [("ack", 2, True), ("ack", 4, False), ("ack", 5, False)]


async def test_a_channel_that_closed_is_forgotten_and_the_next_acks_together_again(
    rig: Rig,
) -> None:
    left = rig.event(b"{not json")
    rig.outbound.closing = True
    rig.outbound.fail["dead_letter"] = nacks(1)
    await rig.batch(left)
    assert outcome(left) is None
    rig.outbound.closing = False
    rig.lifecycle.close()  # the broker delivers it again, on a new channel
    rig.lifecycle = MemoryChannel("lifecycle again")
    again = [rig.event(b"{not json"), rig.event(settled("c"))]
    await rig.batch(*again)
    assert [outcome(i) for i in again] == ["ack", "ack"]
    assert rig.lifecycle.frames == [("ack", 2, True)]
    assert rig.worker._holes == {}  # bounded: what it remembered went with the channel
