"""The pipeline through the in-memory bus: batches, commit then acknowledge, rollback.

Every test runs the real worker (core, scheduler, inputs, memory store) on a manual
clock; only the broker is the in-memory one of ``warmer.bus.memory``. After each batch,
every delivery must have ended acknowledged, dead-lettered (acknowledged after its dead
letter was confirmed), rejected, or left for redelivery, and what is committed must be
what was acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from warmer.bus.memory import MemoryChannel, MemoryDelivery, MemoryOutbound
from warmer.bus.port import DeadLetterRefused, PublishFailed
from warmer.clock import ManualClock
from warmer.core import Policy, Warmer
from warmer.core.records import decode_record
from warmer.inputs import Fired, Input, Inputs, Received
from warmer.observe.health import Health
from warmer.observe.metrics import Metrics
from warmer.scheduler import Scheduler
from warmer.store import MemoryStore
from warmer.worker import Worker

T0 = 1_760_000_000_000
RETRY_MS = (10, 40)
CONFIRM_MS = 1_000


class Rig:
    """A worker wired to in-memory parts; ``batch`` runs one batch to its end, ``run`` the
    worker's own loop (batches overlapping) over what ``put`` hands it."""

    def __init__(self) -> None:
        self.clock = ManualClock(T0)
        self.health = Health()
        self.store = MemoryStore()
        self.core = Warmer(Policy(), token_start=1_000)
        self.inputs = Inputs()
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            self.clock, self.inputs.fired, lateness=self.metrics.timer_lateness.observe
        )
        self.outbound = MemoryOutbound()
        self.worker = Worker(
            self.core,
            self.scheduler,
            self.store,
            self.clock,
            self.outbound,
            self.inputs,
            self.metrics,
            retry_ms=RETRY_MS,
            health=self.health,
            confirm_ms=CONFIRM_MS,
        )
        self.lifecycle = MemoryChannel("lifecycle")
        self.commands = MemoryChannel("commands")
        self.unretrieved: list[dict[str, Any]] = []
        self.running: asyncio.Task[None] | None = None

    def event(self, body: dict[str, Any] | bytes, **properties: Any) -> Received:
        return Received("lifecycle", self.lifecycle.deliver(body, **properties))

    def command(self, body: dict[str, Any] | bytes, **properties: Any) -> Received:
        return Received("commands", self.commands.deliver(body, **properties))

    def start(self, *items: Input) -> asyncio.Task[None]:
        """Start one batch."""
        return asyncio.get_running_loop().create_task(self.worker.run_batch(list(items)))

    def run(self) -> asyncio.Task[None]:
        """Start the worker's own loop: batches taken from ``inputs`` as they come."""
        self.running = asyncio.get_running_loop().create_task(self.worker.run())
        return self.running

    def put(self, *items: Input) -> None:
        """Hand ``items`` to the running loop (one batch if taken together)."""
        for item in items:
            self.inputs.put(item)

    async def drive(self, until: Callable[[], bool], *, exact: bool = False) -> None:
        """Let the batch run, moving the manual clock whenever it waits, until ``until()``:
        by the longest retry pause, or (``exact``) to the next alarm and no further."""
        for _ in range(2_000):
            await asyncio.sleep(0)
            if exact:  # only once everything that can move without the clock has
                await self.settle_down()
            if until():
                return
            next_alarm = self.clock.next_alarm_ms()
            if next_alarm is not None:
                self.clock.set(next_alarm if exact else self.clock.now_ms() + RETRY_MS[1])
        raise AssertionError("the batch did not get there")

    async def settle_down(self) -> None:
        """Let every task that can move without the clock do so."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def batch(self, *items: Input) -> None:
        """Run one batch to its end."""
        task = self.start(*items)
        await self.drive(task.done)
        await task

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one of the worker's metrics (0 when it has none yet)."""
        return self.metrics.value(name, **labels)

    def committed(self, cid: str) -> Any:
        """The state the store holds for ``cid`` (None when it holds nothing)."""
        raw = self.store.records.get(cid)
        return None if raw is None else decode_record(raw)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()
    asyncio.get_running_loop().set_exception_handler(
        lambda _, context: rig.unretrieved.append(context)
    )
    yield rig
    rig.worker.abandon()
    if rig.running is not None:
        await rig.drive(rig.running.done)
        await rig.running
    await rig.worker.settled()
    assert rig.unretrieved == [], "a task failed unseen"


def settled(cid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "turn.settled", "conversationId": cid, **fields}


def started(cid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "turn.started", "conversationId": cid, **fields}


def closed(cid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "conversation.closed", "conversationId": cid, **fields}


def enable(cid: str, enabled: bool = True) -> dict[str, Any]:
    return {"type": "set_enabled", "conversationId": cid, "enabled": enabled}


def outcome(item: Input) -> str | None:
    assert isinstance(item, Received)
    delivery = item.delivery
    assert isinstance(delivery, MemoryDelivery)
    return delivery._channel.outcome(delivery)


# -- the happy path ---------------------------------------------------------------------


async def test_a_batch_is_committed_once_then_published_then_acked_with_one_frame(
    rig: Rig,
) -> None:
    items = [rig.event(settled(f"c{i}", seq=1)) for i in range(10)]
    await rig.batch(*items)
    assert [outcome(i) for i in items] == ["ack"] * 10
    assert rig.lifecycle.frames == [("ack", 10, True)]  # one basic.ack, multiple
    assert len(rig.outbound.surfaces) == 10
    assert sorted(rig.store.records) == [f"c{i}" for i in range(10)]
    assert all(rig.committed(f"c{i}").state.last_seq == 1 for i in range(10))


async def test_commands_are_answered_after_the_commit(rig: Rig) -> None:
    item = rig.command(enable("c"), reply_to="replies", correlation_id="k")
    await rig.batch(item)
    assert outcome(item) == "ack"
    (reply_to, correlation_id, reply) = rig.outbound.replies[0]
    assert (reply_to, correlation_id) == ("replies", "k")
    assert reply.settings.enabled is True  # type: ignore[union-attr]
    assert rig.committed("c").settings.enabled is True
    assert rig.core.last_token <= rig.store.token


async def test_a_timer_fire_commits_the_outstanding_warm_before_publishing_it(
    rig: Rig,
) -> None:
    await rig.batch(rig.command(enable("c")), rig.event(settled("c")))
    token = rig.core.get("c").token  # type: ignore[union-attr]
    seen: list[Any] = []

    async def warm(request: Any, timeout_ms: int, still_wanted: Any) -> bool:
        seen.append(rig.committed("c").state.phase.value)
        return True

    rig.outbound.warm = warm  # type: ignore[method-assign]
    await rig.batch(Fired("c", token))
    await rig.worker.settled()
    assert seen == ["warming"]


# -- faults, at the first, a middle and the last delivery of a batch -------------------

POSITIONS = [0, 2, 4]


@pytest.mark.parametrize("position", POSITIONS)
async def test_a_negative_confirm_is_retried_in_place_then_all_acked(
    rig: Rig, position: int
) -> None:
    items = [rig.event(settled(f"c{i}")) for i in range(5)]
    calls = 0
    surface = rig.outbound.surface

    async def flaky(update: Any) -> None:
        nonlocal calls
        calls += 1
        if update.conversation_id == f"c{position}" and calls < 12:
            raise PublishFailed("broker refused the publish")
        await surface(update)

    rig.outbound.surface = flaky  # type: ignore[method-assign]
    await rig.batch(*items)
    assert [outcome(i) for i in items] == ["ack"] * 5
    assert rig.metric("warmer_retries_total") >= 1
    assert len(rig.outbound.surfaces) == 5


@pytest.mark.parametrize("position", POSITIONS)
async def test_an_unexpected_exception_in_a_publish_gives_that_delivery_back(
    rig: Rig, position: int
) -> None:
    items = [rig.event(settled(f"c{i}")) for i in range(5)]
    surface = rig.outbound.surface

    async def buggy(update: Any) -> None:
        if update.conversation_id == f"c{position}":
            raise TypeError("a bug")
        await surface(update)

    rig.outbound.surface = buggy  # type: ignore[method-assign]
    await rig.batch(*items)
    expected = ["ack"] * 5
    expected[position] = "requeue"
    assert [outcome(i) for i in items] == expected
    # Never covered by a multiple ack: rejected first, then the ack.
    assert rig.lifecycle.frames[0] == ("reject", position + 1, True)


@pytest.mark.parametrize("position", POSITIONS)
async def test_a_bug_while_applying_gives_that_delivery_back_and_commits_the_rest(
    rig: Rig, position: int
) -> None:
    items = [rig.event(settled(f"c{i}")) for i in range(5)]
    apply_event = rig.core.apply_event

    def buggy(now: int, event: Any) -> Any:
        if event.conversation_id == f"c{position}":
            raise RuntimeError("a bug in the core")
        return apply_event(now, event)

    rig.core.apply_event = buggy  # type: ignore[method-assign]
    await rig.batch(*items)
    expected = ["ack"] * 5
    expected[position] = "requeue"
    assert [outcome(i) for i in items] == expected
    assert f"c{position}" not in rig.store.records


@pytest.mark.parametrize("position", POSITIONS)
async def test_a_dead_letter_refused_rejects_that_delivery_only(rig: Rig, position: int) -> None:
    items = [rig.event(settled(f"c{i}")) for i in range(5)]
    items[position] = rig.event(b"{not json")
    rig.outbound.fail["dead_letter"] = [DeadLetterRefused("PRECONDITION_FAILED")]
    await rig.batch(*items)
    assert [outcome(i) for i in items].count("ack") == 4
    assert outcome(items[position]) == "reject"
    assert rig.metric("warmer_dead_letters_refused_total") == 1


async def test_an_invalid_event_is_acked_only_after_its_dead_letter_is_confirmed(
    rig: Rig,
) -> None:
    bad = rig.event(b"{not json")
    rig.outbound.fail["dead_letter"] = [PublishFailed("nack"), PublishFailed("nack")]
    await rig.batch(bad)
    assert outcome(bad) == "ack"
    assert rig.outbound.calls["dead_letter"] == 3
    assert rig.store.records == {}


@pytest.mark.parametrize("position", POSITIONS)
async def test_a_store_error_is_retried_in_place_then_committed_and_acked(
    rig: Rig, position: int
) -> None:
    items = [rig.event(closed(f"c{i}", seq=7)) for i in range(5)]
    rig.store.fail_next = 3
    await rig.batch(*items)
    assert [outcome(i) for i in items] == ["ack"] * 5
    assert rig.metric("warmer_store_errors_total") == 3
    assert all(rig.committed(f"c{i}").settings.enabled is False for i in range(5))


async def test_a_store_error_answers_commands_store_error_and_retries_the_events(
    rig: Rig,
) -> None:
    event = rig.event(settled("e"))
    command = rig.command(enable("c"), reply_to="replies")
    rig.store.fail_next = 2
    await rig.batch(event, command)
    assert outcome(event) == outcome(command) == "ack"
    (_, _, reply) = rig.outbound.replies[0]
    assert reply.code == "store_error"  # type: ignore[union-attr]
    assert "c" not in rig.store.records or rig.committed("c").settings.enabled is False
    assert rig.committed("e") is not None
    assert rig.core.get("c") is None or rig.core.get("c").enabled is False  # type: ignore[union-attr]


@pytest.mark.parametrize("position", POSITIONS)
async def test_a_lost_connection_during_a_store_outage_rolls_back_and_redelivers(
    rig: Rig, position: int
) -> None:
    await rig.batch(rig.event(settled("c0", seq=1)))
    before = rig.store.records.copy()
    items = [rig.event(closed(f"c{i}", seq=2)) for i in range(5)]
    rig.store.failing = True
    task = rig.start(*items)
    await rig.drive(lambda: rig.metric("warmer_store_errors_total") >= 2)
    rig.lifecycle.close()  # the broker takes every unacknowledged delivery back
    await rig.drive(task.done)
    await task
    assert [outcome(i) for i in items] == [None] * 5
    assert rig.store.records == before
    # The redelivery (on a new channel) is applied again, not dropped as stale by seq.
    rig.store.failing = False
    rig.lifecycle = MemoryChannel("lifecycle again")
    again = [rig.event(closed(f"c{i}", seq=2)) for i in range(5)]
    surfaces = rig.metric("warmer_surface_updates_total")
    await rig.batch(*again)
    assert [outcome(i) for i in again] == ["ack"] * 5
    assert all(rig.committed(f"c{i}").settings.enabled is False for i in range(5))
    # Each applied (not stale) event published its surface.
    assert rig.metric("warmer_surface_updates_total") == surfaces + 5


async def test_stopping_during_a_store_outage_acknowledges_nothing(rig: Rig) -> None:
    items = [rig.event(settled(f"c{i}")) for i in range(3)]
    rig.store.failing = True
    task = rig.start(*items)
    await rig.drive(lambda: rig.metric("warmer_store_errors_total") >= 1)
    rig.worker.abandon()
    await rig.drive(task.done)
    await task
    assert [outcome(i) for i in items] == [None] * 3
    assert rig.store.records == {}
    assert rig.core.get("c0") is None  # rolled back
    # Counted once it is committed: nothing of it counted, all three left for the broker.
    assert rig.metric("warmer_redeliveries_total") == 3
    assert rig.metric("warmer_events_consumed_total", type="turn.settled") == 0
    assert rig.metric("warmer_batch_size_count") == 0


async def test_a_rolled_back_timer_fire_is_put_back(rig: Rig) -> None:
    await rig.batch(rig.command(enable("c")), rig.event(settled("c")))
    token = rig.core.get("c").token  # type: ignore[union-attr]
    rig.store.failing = True
    fire = Fired("c", token)
    task = rig.start(fire)
    await rig.drive(lambda: rig.metric("warmer_store_errors_total") >= 1)
    rig.worker.abandon()
    await rig.drive(task.done)
    await task
    assert rig.core.get("c").phase.value == "armed"  # type: ignore[union-attr]
    assert rig.outbound.warms == []
    assert await rig.inputs.take() == [fire]


# -- deliveries settled outside the pipeline (rerouted to their shard) --------------------


async def test_a_reroute_settled_on_one_channel_leaves_the_same_tag_of_another_covered(
    rig: Rig,
) -> None:
    # Tags count per channel: lifecycle tag 1 and commands tag 1 are two deliveries.
    rerouting = rig.lifecycle.deliver(settled("c0", seq=1))
    command = rig.commands.deliver(enable("c1"))
    rig.worker.settling_outside(rerouting)
    rig.worker.settling_outside(command)
    rig.worker.settled_outside(command)
    items = [rig.event(settled(f"c{i}", seq=1)) for i in range(2, 5)]
    await rig.batch(*items)
    assert rig.lifecycle.outcome(rerouting) is None, rig.lifecycle.frames
    assert [outcome(i) for i in items] == ["ack"] * 3
    rig.worker.settled_outside(rerouting)


async def test_settled_waits_for_the_reroutes_under_way(rig: Rig) -> None:
    rerouting = rig.commands.deliver(enable("c1"))
    rig.worker.settling_outside(rerouting)
    waiting = asyncio.get_running_loop().create_task(rig.worker.settled())
    await rig.settle_down()
    assert not waiting.done(), "a shard handed over while its reroute is under way"
    rig.worker.settled_outside(rerouting)
    await asyncio.wait_for(waiting, 1)
