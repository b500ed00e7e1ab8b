"""Hostile: confirms that come late but come, resets in a row, acknowledgements in any order.

Over the in-memory rig, with a "broker" played by the test: on a reset it closes the
channels, counts a delivery attempt for every message not acknowledged (a quorum queue's
``x-delivery-count``), and delivers them again on new channels, dead-lettering one whose
count passes the delivery limit (``x-delivery-limit`` 20), as RabbitMQ does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from structlog.testing import capture_logs

from tests.unit import test_pipeline
from tests.unit.test_pipeline import CONFIRM_MS, Rig, settled
from warmer.bus.memory import MemoryChannel, MemoryDelivery, MemoryOutbound
from warmer.bus.port import ConfirmOverdue
from warmer.bus.topology import DELIVERY_LIMIT
from warmer.clock import sleep
from warmer.contract import SurfaceChanged
from warmer.inputs import Fired, Received

rig = test_pipeline.rig  # the pipeline's fixture: a worker on the in-memory bus


class Broker:
    """What the broker does with the rig's lifecycle messages across resets."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.counts: dict[bytes, int] = {}
        """Message body -> deliveries so far."""
        self.out: dict[bytes, MemoryDelivery] = {}
        """Message body -> its delivery on the open channel."""
        self.limited: list[bytes] = []
        """Dead-lettered with reason ``delivery_limit``: good messages lost."""
        rig.outbound.on_reset = self.reset

    def publish(self, body: dict[str, Any]) -> None:
        self._deliver(settled_body(body))

    def _deliver(self, raw: bytes) -> None:
        delivery = self.rig.lifecycle.deliver(raw)
        self.counts[raw] = self.counts.get(raw, 0) + 1
        self.out[raw] = delivery
        self.rig.put(Received("lifecycle", delivery))

    def acked(self) -> list[bytes]:
        return [raw for raw, d in self.out.items() if d._channel.outcome(d) == "ack"]

    def reset(self) -> None:
        """The connection is dropped: what was not acknowledged comes again."""
        unsettled = [raw for raw, d in self.out.items() if d._channel.outcome(d) is None]
        self.rig.lifecycle.close()
        self.rig.lifecycle = MemoryChannel(f"lifecycle {len(self.rig.outbound.resets)}")
        for raw in unsettled:
            if self.counts[raw] > DELIVERY_LIMIT:
                self.limited.append(raw)
                del self.out[raw]
            else:
                self._deliver(raw)


def settled_body(body: dict[str, Any]) -> bytes:
    return msgspec.json.encode(body)


def slow_confirms(rig: Rig, confirm_ms: Callable[[int], int]) -> None:
    """The n-th surface publish (from 1) is confirmed ``confirm_ms(n)`` after it was sent."""
    surface = rig.outbound.surface
    sent = 0

    async def slow(update: SurfaceChanged) -> None:
        nonlocal sent
        sent += 1
        await sleep(rig.clock, confirm_ms(sent))
        await surface(update)

    rig.outbound.surface = slow  # type: ignore[method-assign]


# -- reset storms -------------------------------------------------------------------------


async def burst(rig: Rig, count: int, confirm_ms: Callable[[int], int]) -> Broker:
    """``count`` events through the running worker, the n-th confirmed ``confirm_ms(n)``
    late; returns once each is acknowledged or dead-lettered, none of them at the limit."""
    broker = Broker(rig)
    slow_confirms(rig, confirm_ms)
    rig.run()
    for i in range(count):
        broker.publish(settled(f"c{i}", seq=1))
    await rig.drive(lambda: len(broker.acked()) + len(broker.limited) == count, exact=True)
    assert broker.limited == []
    return broker


async def test_confirms_late_but_coming_do_not_reset_the_connection_again_and_again(
    rig: Rig,
) -> None:
    # A broker slow but alive: every confirm takes 1.5 deadlines. Reset at every deadline,
    # the event came again 20 times and was dead-lettered as delivery_limit, never applied
    # to its end: a good message lost to a connection that was alive all along.
    broker = await burst(rig, 1, lambda _: CONFIRM_MS * 3 // 2)
    assert len(rig.outbound.resets) == 1
    assert rig.health.reason("confirms") is None  # confirms came: ready again
    for cid in ("a", "b"):  # still slow: the deadline stays doubled, no reset again
        broker.publish(settled(cid, seq=1))
    await rig.drive(lambda: len(broker.acked()) == 3, exact=True)
    assert len(rig.outbound.resets) == 1


async def test_a_burst_confirmed_slowly_costs_each_message_at_most_a_few_deliveries(
    rig: Rig,
) -> None:
    # 200 events, confirms 2.5 deadlines late: every one is acknowledged, each delivered
    # at most 3 times (a reset costs every unacknowledged message one delivery).
    broker = await burst(rig, 200, lambda _: CONFIRM_MS * 5 // 2)
    assert max(broker.counts.values()) <= 3


async def test_a_burst_whose_confirms_trickle_in_is_never_reset(rig: Rig) -> None:
    # 40 events, confirmed one every 0.2 deadline (8 deadlines for the batch): answers
    # keep coming, so the connection is alive; no reset, no redelivery, one ack.
    broker = await burst(rig, 40, lambda n: n * CONFIRM_MS // 5)
    assert rig.outbound.resets == []
    assert set(broker.counts.values()) == {1}
    assert rig.health.reason("confirms") is None


async def test_the_deadline_comes_back_to_the_setting_once_confirms_are_in_time(
    rig: Rig,
) -> None:
    broker = await burst(rig, 1, lambda _: CONFIRM_MS * 3 // 2)
    resets = len(rig.outbound.resets)
    rig.outbound.surface = MemoryOutbound.surface.__get__(rig.outbound)  # type: ignore[method-assign]
    broker.publish(settled("b", seq=1))
    await rig.drive(lambda: len(broker.acked()) == 2, exact=True)
    rig.outbound.hold["surface"] = 1  # now a confirm that never comes: overdue at the setting
    started = rig.clock.now_ms()
    broker.publish(settled("c", seq=1))
    await rig.drive(lambda: len(rig.outbound.resets) > resets, exact=True)
    assert rig.clock.now_ms() - started == CONFIRM_MS


async def test_overdue_warm_requests_together_reset_the_connection_once(rig: Rig) -> None:
    # Five warm requests overdue at the same moment (the publisher's own deadline): one
    # reset, not five (each after the first would drop the connection aio-pika is making).
    await rig.batch(*[rig.command(test_pipeline.enable(f"c{i}")) for i in range(5)])
    await rig.batch(*[rig.event(settled(f"c{i}")) for i in range(5)])
    rig.outbound.fail["warm"] = [ConfirmOverdue("no confirm within 1000 ms") for _ in range(5)]
    tokens = {f"c{i}": rig.core.get(f"c{i}").token for i in range(5)}  # type: ignore[union-attr]
    with capture_logs():
        await rig.batch(*[Fired(cid, token) for cid, token in tokens.items()])
        await rig.worker.settled()
    assert len(rig.outbound.resets) == 1
