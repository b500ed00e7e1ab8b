"""Every delivery settles: whatever effect raises, each one ends acknowledged, rejected to
the queue's dead-lettering, or given back (reject with requeue) to be delivered again, and
no task fails unseen.

The worker runs with its real core, scheduler, inboxes and a memory store on a manual
clock; only the publisher is a stand-in that records and raises on demand (the broker
paths are covered over a real broker in tests/integration/test_poison.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from warmer.bus.publisher import DeadLetterRefused, PublishFailed
from warmer.clock import ManualClock
from warmer.core import Policy, Settings, Warmer
from warmer.scheduler import Scheduler
from warmer.store import MemoryStore
from warmer.worker import RETRY_MAX_MS, Inbox, Worker

T0 = 1_760_000_000_000
ON = {"c": Settings(enabled=True, interval_ms=60_000)}


class Delivery:
    """What the worker reads of a delivery, and how it was settled."""

    def __init__(self, body: dict[str, Any] | bytes, reply_to: str | None = None) -> None:
        self.body = body if isinstance(body, bytes) else msgspec.json.encode(body)
        self.content_type: str | None = "application/json"
        self.content_encoding: str | None = None
        self.headers: dict[str, Any] = {}
        self.routing_key = "k"
        self.message_id = None
        self.reply_to = reply_to
        self.correlation_id = "corr" if reply_to else None
        self.settled: list[str] = []
        self.ack_raises = False

    async def ack(self) -> None:
        if self.ack_raises:
            raise RuntimeError("channel closed")
        self.settled.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("requeue" if requeue else "reject")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append("nack")  # never: it would not count on RabbitMQ 4.3


class Publisher:
    """The publisher's interface; ``fail[name]`` holds what its next calls raise."""

    def __init__(self) -> None:
        self.fail: dict[str, list[BaseException]] = {}
        self.calls: Counter[str] = Counter()
        self.closing = False

    def _next(self, name: str) -> None:
        self.calls[name] += 1
        queued = self.fail.get(name)
        if queued:
            raise queued.pop(0)

    async def surface(self, update: Any) -> None:
        self._next("surface")

    async def reply(self, reply_to: str, correlation_id: str | None, reply: Any) -> None:
        self._next("reply")

    async def dead_letter(self, incoming: Any, rejection: Any) -> None:
        self._next("dead_letter")

    async def warm(self, request: Any, timeout_ms: int, still_wanted: Any) -> bool:
        self._next("warm")
        return True


class Rig:
    def __init__(self) -> None:
        self.clock = ManualClock(T0)
        self.store = MemoryStore({"c": {"enabled": True, "intervalMs": 60_000}})
        core = Warmer(Policy(), dict(ON), token_start=1)
        self.scheduler = Scheduler(self.clock, lambda key, token: self.worker.on_fire(key, token))
        self.worker = Worker(core, self.scheduler, self.store, self.clock)
        self.publisher = Publisher()
        self.worker.publisher = self.publisher  # type: ignore[assignment]
        self.lifecycle = Inbox("lifecycle", self.worker.on_lifecycle, self.worker.lifecycle_gate)
        self.commands = Inbox("commands", self.worker.on_command, self.worker.commands_gate)
        self.unretrieved: list[dict[str, Any]] = []

    async def run(self, inbox: Inbox, *deliveries: Delivery) -> None:
        """Deliver, then drive the clock until every delivery's effects are settled."""
        for delivery in deliveries:
            await inbox.deliver(delivery)  # type: ignore[arg-type]
        await self.settle(*deliveries)

    async def settle(self, *deliveries: Delivery) -> None:
        """Drive the clock until every delivery's effects are settled."""
        for _ in range(200):
            await asyncio.sleep(0)
            if all(d.settled for d in deliveries) and not self.worker._settling:
                return
            if self.clock.next_alarm_ms() is not None:
                self.clock.advance(RETRY_MAX_MS)
        raise AssertionError(f"not settled: {[d.settled for d in deliveries]}")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: rig.unretrieved.append(context))
    rig.lifecycle.start()
    rig.commands.start()
    yield rig
    await rig.lifecycle.drain()
    await rig.commands.drain()
    rig.worker.abandon()
    await rig.worker.settled()
    assert rig.unretrieved == [], "a task failed unseen"


def settled(cid: str = "c") -> dict[str, Any]:
    return {"type": "turn.settled", "conversationId": cid}


def closed(cid: str = "c") -> dict[str, Any]:
    return {"type": "conversation.closed", "conversationId": cid}


def enable(cid: str = "c") -> dict[str, Any]:
    return {"type": "set_enabled", "conversationId": cid, "enabled": True}


# -- lifecycle events ------------------------------------------------------------------

Fault = Callable[[], BaseException]
TRANSIENT: list[tuple[str, Fault]] = [
    ("negative confirm", lambda: PublishFailed("broker refused the publish")),
    ("confirm timeout", lambda: PublishFailed("no confirm from the broker in time")),
]


@pytest.mark.parametrize(("case", "fault"), TRANSIENT)
async def test_a_surface_publish_that_fails_is_retried_in_place_then_acked(
    rig: Rig, case: str, fault: Fault
) -> None:
    rig.publisher.fail["surface"] = [fault() for _ in range(3)]
    delivery = Delivery(settled())
    await rig.run(rig.lifecycle, delivery)
    assert delivery.settled == ["ack"]
    assert rig.publisher.calls["surface"] == 4
    assert rig.worker.counts["effect_retries"] == 3
    assert rig.worker.lifecycle_gate.is_open


async def test_a_store_that_fails_30_times_is_retried_in_place_then_acked(rig: Rig) -> None:
    rig.store.fail_next = 30
    delivery = Delivery(closed())
    await rig.run(rig.lifecycle, delivery)
    assert delivery.settled == ["ack"]
    assert rig.store.settings["c"] == {"enabled": False, "intervalMs": 60_000}
    assert rig.worker.counts["store_errors"] == 30


async def test_while_an_effect_is_retried_the_inbox_takes_no_more(rig: Rig) -> None:
    rig.store.fail_next = 2
    first, second = Delivery(closed()), Delivery(settled("d"))
    await rig.lifecycle.deliver(first)  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not rig.worker.lifecycle_gate.is_open
    await rig.lifecycle.deliver(second)  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    assert rig.publisher.calls["surface"] == 1  # the close's only: the settle waits
    await rig.settle(first, second)
    assert first.settled == second.settled == ["ack"]
    assert rig.publisher.calls["surface"] == 2


async def test_a_bug_in_an_effect_gives_the_delivery_back(rig: Rig) -> None:
    rig.publisher.fail["surface"] = [TypeError("a bug")]
    delivery = Delivery(settled())
    await rig.run(rig.lifecycle, delivery)
    assert delivery.settled == ["requeue"]


async def test_a_bug_while_applying_gives_the_delivery_back(rig: Rig) -> None:
    def crash(*_: Any) -> None:
        raise RuntimeError("a bug in the scheduler")

    rig.scheduler.arm = crash  # type: ignore[method-assign]
    broken, fine = Delivery(settled()), Delivery(closed("d"))
    await rig.run(rig.lifecycle, broken, fine)
    assert broken.settled == ["requeue"]
    assert fine.settled == ["ack"]  # the pump goes on


async def test_an_ack_that_fails_is_logged_not_raised(rig: Rig) -> None:
    delivery = Delivery(settled())
    delivery.ack_raises = True
    await rig.lifecycle.deliver(delivery)  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    assert delivery.settled == []  # the broker delivers it again
    assert not rig.worker._settling


# -- dead letters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "outcome"),
    [
        ([PublishFailed("nack"), PublishFailed("nack")], "ack"),  # retried in place
        ([DeadLetterRefused("PRECONDITION_FAILED")], "reject"),  # the queue dead-letters it
        ([TypeError("a bug")], "requeue"),  # given back
    ],
)
async def test_an_invalid_event_is_dead_lettered_rejected_or_given_back(
    rig: Rig, faults: list[BaseException], outcome: str
) -> None:
    rig.publisher.fail["dead_letter"] = list(faults)
    delivery = Delivery(b"{oops")
    await rig.run(rig.lifecycle, delivery)
    assert delivery.settled == [outcome]
    assert rig.publisher.calls["dead_letter"] == len(faults) + (outcome == "ack")
    assert rig.worker.counts["dead_letters_refused"] == (outcome == "reject")


# -- commands --------------------------------------------------------------------------


async def test_a_command_whose_reply_fails_is_retried_then_acked(rig: Rig) -> None:
    rig.publisher.fail["reply"] = [PublishFailed("nack")]
    delivery = Delivery(enable("d"), reply_to="replies")
    await rig.run(rig.commands, delivery)
    assert delivery.settled == ["ack"]
    assert rig.publisher.calls["reply"] == 2


async def test_a_command_store_error_is_answered_and_acked(rig: Rig) -> None:
    rig.store.failing = True
    delivery = Delivery(enable("d"), reply_to="replies")
    await rig.run(rig.commands, delivery)
    assert delivery.settled == ["ack"]
    assert rig.worker.counts["rejected_store_error"] == 1


async def test_a_non_json_command_is_answered_and_dead_lettered(rig: Rig) -> None:
    rig.publisher.fail["reply"] = [PublishFailed("nack")]
    rig.publisher.fail["dead_letter"] = [DeadLetterRefused("too big")]
    delivery = Delivery(b"[1]", reply_to="replies")
    await rig.run(rig.commands, delivery)
    assert delivery.settled == ["reject"]
    assert rig.publisher.calls["reply"] == 2


async def test_a_bug_in_a_command_reply_gives_it_back(rig: Rig) -> None:
    rig.publisher.fail["reply"] = [RuntimeError("a bug")]
    delivery = Delivery(enable("d"), reply_to="replies")
    await rig.run(rig.commands, delivery)
    assert delivery.settled == ["requeue"]


# -- timers and stopping ---------------------------------------------------------------


async def test_a_failing_warm_publish_is_logged_and_never_unretrieved(rig: Rig) -> None:
    rig.scheduler.start()
    rig.publisher.fail["warm"] = [RuntimeError("a bug"), PublishFailed("nack")]
    await rig.run(rig.lifecycle, Delivery(settled()))
    rig.clock.advance(60_000)
    for _ in range(20):
        await asyncio.sleep(0)
    assert rig.publisher.calls["warm"] == 1
    await rig.scheduler.stop()


async def test_stopping_while_retrying_leaves_the_delivery_for_the_broker(rig: Rig) -> None:
    rig.store.failing = True
    delivery = Delivery(closed())
    await rig.lifecycle.deliver(delivery)  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    assert rig.worker.counts["store_errors"] >= 1
    rig.worker.abandon()
    await rig.worker.settled()
    assert delivery.settled == []  # neither acked nor given back: redelivered on close
