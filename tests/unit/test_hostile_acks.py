"""Hostile: confirms that come late but come, resets in a row, acknowledgements in any order.

Over the in-memory rig, with a "broker" played by the test: on a reset it closes the
channels, counts a delivery attempt for every message not acknowledged (a quorum queue's
``x-delivery-count``), and delivers them again on new channels, dead-lettering one whose
count passes the delivery limit (``x-delivery-limit`` 20), as RabbitMQ does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.unit import test_pipeline
from tests.unit.fake_amqp import Robust, Sent, Underlay
from tests.unit.test_pipeline import CONFIRM_MS, T0, Rig, settled
from warmer.bus.memory import MemoryChannel, MemoryDelivery, MemoryOutbound
from warmer.bus.port import ConfirmOverdue, DeadLetterRefused, PublishFailed
from warmer.bus.publisher import Publisher
from warmer.bus.topology import DELIVERY_LIMIT, Names, Topology
from warmer.clock import ManualClock, sleep
from warmer.contract import SurfaceChanged, WarmRequested
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


# -- acknowledgements in any order --------------------------------------------------------

KINDS = ("good", "invalid", "nack", "bug", "refused", "close", "dlnack", "cmd", "badcmd")
"""What a message is and what happens to its output: ``good`` (its surface confirmed),
``invalid`` (dead-lettered), ``nack`` (its surface refused twice, then confirmed), ``bug``
(its surface raises a bug: given back), ``refused`` (invalid, its dead letter refused:
rejected), ``close`` (good, and the channel closes as its surface goes out), ``dlnack``
(invalid, its dead letter refused once by a negative confirm), ``cmd`` / ``badcmd`` (a
command, valid or not, on the commands channel)."""


class Scenario:
    """Messages of every kind through the worker's own loop, batches overlapping."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.sent: list[tuple[str, MemoryDelivery]] = []
        self.kinds: dict[int, str] = {}
        """id(delivery) -> kind."""
        self.channels: list[MemoryChannel] = [rig.lifecycle, rig.commands]
        outbound = rig.outbound
        surface, dead_letter = outbound.surface, outbound.dead_letter
        nacked: dict[str, int] = {}

        async def surface_of(update: SurfaceChanged) -> None:
            kind = update.conversation_id.split("-")[0]
            if kind == "nack" and nacked.setdefault(update.conversation_id, 0) < 2:
                nacked[update.conversation_id] += 1
                raise PublishFailed("negative confirm")
            if kind == "bug":
                raise TypeError("a bug in the publisher")
            if kind == "close" and not rig.lifecycle.is_closed:
                rig.lifecycle.close()
            await surface(update)

        async def dead_letter_of(incoming: Any, rejection: Any) -> None:
            kind = self.kinds[id(incoming)]
            if kind == "refused":
                raise DeadLetterRefused("too large")
            if kind == "dlnack" and nacked.setdefault(str(id(incoming)), 0) < 1:
                nacked[str(id(incoming))] += 1
                raise PublishFailed("negative confirm")
            await dead_letter(incoming, rejection)

        outbound.surface = surface_of  # type: ignore[method-assign]
        outbound.dead_letter = dead_letter_of  # type: ignore[method-assign]

    def send(self, kind: str) -> Received:
        rig = self.rig
        if rig.lifecycle.is_closed:  # the broker's new channel after the old one closed
            rig.lifecycle = MemoryChannel(f"lifecycle {len(self.channels)}")
            self.channels.append(rig.lifecycle)
        cid = f"{kind}-{len(self.sent)}"
        if kind == "cmd":
            item = rig.command(test_pipeline.enable(cid), reply_to="replies")
        elif kind == "badcmd":
            item = rig.command(b"{not json", reply_to="replies")
        elif kind in ("invalid", "refused", "dlnack"):
            item = rig.event(b"{not json")
        else:
            item = rig.event(test_pipeline.started(cid, seq=1))
        delivery = item.delivery
        assert isinstance(delivery, MemoryDelivery)
        self.sent.append((kind, delivery))
        self.kinds[id(delivery)] = kind
        return item

    def unsettled_on_open_channels(self) -> list[tuple[str, int]]:
        return [
            (kind, d.delivery_tag)
            for kind, d in self.sent
            if not d._channel.is_closed and d._channel.outcome(d) is None
        ]

    async def quiesce(self) -> None:
        """Run until nothing moves any more, the clock included."""
        rig = self.rig
        for _ in range(400):
            await rig.settle_down()
            alarm = rig.clock.next_alarm_ms()
            if alarm is None:
                return
            rig.clock.set(alarm)

    def check(self) -> None:
        """What was acknowledged was done; nothing settled twice; nothing held."""
        rig, confirmed = self.rig, {u.conversation_id for u in self.rig.outbound.surfaces}
        dead = {id(incoming) for incoming, _ in rig.outbound.dead_letters}
        for index, (kind, delivery) in enumerate(self.sent):
            cid = f"{kind}-{index}"
            got = delivery._channel.outcome(delivery)
            if got == "ack" and kind in ("good", "nack", "close"):
                assert cid in confirmed and rig.committed(cid) is not None, (kind, cid)
            elif got == "ack" and kind in ("invalid", "dlnack"):
                assert id(delivery) in dead, (kind, cid)
            elif got is not None:
                expected = {"bug": "requeue", "refused": "reject"}.get(kind, "ack")
                assert got == expected, (kind, cid, got)
        for channel in self.channels:
            settled: set[int] = set()
            for method, tag, flag in channel.frames:
                assert tag not in settled, f"{channel.name}: tag {tag} settled twice"
                multiple = method == "ack" and flag
                settled.update(range(1, tag + 1) if multiple else (tag,))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    groups=st.lists(st.lists(st.sampled_from(KINDS), min_size=1, max_size=6), max_size=8),
    store_fails=st.lists(st.integers(0, 3), max_size=8),
    stop_at=st.none() | st.integers(0, 7),
    refuse=st.booleans(),
)
def test_acknowledgements_in_any_order_cover_only_what_was_done(
    groups: list[list[str]], store_fails: list[int], stop_at: int | None, refuse: bool
) -> None:
    """Whatever the kinds, their order and batches, a store failing now and then, the
    worker stopping midway (retries given up) and reject frames that cannot be sent."""
    asyncio.run(_acknowledgements(groups, store_fails, stop_at, refuse))


async def _acknowledgements(
    groups: list[list[str]], store_fails: list[int], stop_at: int | None, refuse: bool
) -> None:
    rig = Rig()
    asyncio.get_running_loop().set_exception_handler(
        lambda _, context: rig.unretrieved.append(context)
    )
    scenario = Scenario(rig)
    if refuse:
        rig.lifecycle.refuse = rig.commands.refuse = {"reject"}
    rig.run()
    with capture_logs() as logs:
        for index, group in enumerate(groups):
            if index < len(store_fails):
                rig.store.fail_next = store_fails[index]
            if index == stop_at:
                rig.outbound.closing = True  # stopping: what fails now is left
            rig.put(*[scenario.send(kind) for kind in group])
            await rig.settle_down()
        await scenario.quiesce()
        scenario.check()
        if stop_at is None and not refuse:
            assert scenario.unsettled_on_open_channels() == []  # none held, taking prefetch
        rig.worker.abandon()
        await scenario.quiesce()
        assert rig.running is not None and rig.running.done()
        await rig.running
    assert rig.unretrieved == []
    lost = [e for e in logs if e["event"] in ("ack_lost", "batch_failed")]
    assert all("is closed" in str(e.get("error")) for e in lost), lost


# -- a publish cut by a reset -------------------------------------------------------------


class CutBroker:
    """The first publish fails as aiormq fails a frame a closing connection cut: with a
    bare ``Exception`` (what its ``reject_all`` sets)."""

    def __init__(self) -> None:
        self.attempts = 0
        self.underlay = Underlay(self.broker)

    async def broker(self, message: Sent) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise Exception


async def warm_after_a_cut(channel_closed: bool) -> CutBroker:
    """A warm request whose first publish is cut, on a channel closed or not."""
    names = Names.of("ns")
    cut = CutBroker()
    exchanges: dict[str, Any] = {name: None for name, _ in names.exchanges()}
    channel: Any = Robust(cut.underlay, closed=channel_closed)
    topology = Topology(names=names, exchanges=exchanges, queues={})
    publisher = Publisher(channel, topology, channel, None, ManualClock(T0))  # type: ignore[arg-type]
    request = WarmRequested(conversation_id="c", token=7, requested_at=T0)
    assert await publisher.warm(request, 30_000, lambda: True) is True
    return cut


async def test_a_warm_request_cut_by_a_reset_goes_out_again_instead_of_failing() -> None:
    # Over the real broker, a reset while a warm request was being written failed it with
    # a bare Exception about once in six tries: the worker's warm task failed (task_failed)
    # and the warm waited for its timeout; a surface or dead letter cut so was given up.
    cut = await warm_after_a_cut(channel_closed=True)
    assert cut.attempts == 2 and len(cut.underlay.published) == 1


async def test_a_bare_exception_on_an_open_channel_is_not_retried() -> None:
    with pytest.raises(Exception) as raised:
        await warm_after_a_cut(channel_closed=False)
    assert type(raised.value) is Exception


# -- memory bound -------------------------------------------------------------------------


async def test_the_holes_remembered_do_not_grow_with_the_channels_that_come_and_go(
    rig: Rig,
) -> None:
    # 300 channels, one after the other, each with a delivery left on it (its requeue
    # cannot be sent) and one acknowledged: at most the open channel's hole is held.
    surface_of = rig.outbound.surface

    async def bug_for_left(update: SurfaceChanged) -> None:
        if update.conversation_id.startswith("left"):
            raise TypeError("a bug: given back")
        await surface_of(update)

    rig.outbound.surface = bug_for_left  # type: ignore[method-assign]
    sizes = []
    with capture_logs():  # a traceback logged per round: not rendered
        for round_ in range(300):
            rig.lifecycle = MemoryChannel(f"lifecycle {round_}")
            rig.lifecycle.refuse = {"reject"}
            left = rig.event(settled(f"left{round_}"))
            kept = rig.event(settled(f"kept{round_}"))
            await rig.batch(left, kept)
            assert (test_pipeline.outcome(left), test_pipeline.outcome(kept)) == (None, "ack")
            sizes.append(len(rig.worker._holes))
            rig.lifecycle.close()
    assert max(sizes) == 1


class SlowBroker:
    """Confirms every publish ``confirm_ms`` after it was sent, on the clock."""

    def __init__(self, clock: ManualClock, confirm_ms: int) -> None:
        self.clock = clock
        self.confirm_ms = confirm_ms
        self.underlay = Underlay(self.broker)

    async def broker(self, message: Sent) -> None:
        await sleep(self.clock, self.confirm_ms)


async def test_warm_requests_on_a_broker_slow_but_alive_go_out_after_one_reset() -> None:
    # Warm requests wait for their confirm on the publisher's own deadline: with every
    # confirm 1.5 deadlines late, each warm was overdue, left to its warm timeout, and
    # reset the connection again; now the deadline doubles with the reset, as the
    # pipeline's does, and comes back to the setting once a confirm is in time.
    clock = ManualClock(T0)
    names = Names.of("ns")
    exchange = SlowBroker(clock, 1_500)
    exchanges: dict[str, Any] = {name: None for name, _ in names.exchanges()}
    channel: Any = Robust(exchange.underlay)
    topology = Topology(names=names, exchanges=exchanges, queues={})
    publisher = Publisher(channel, topology, channel, None, clock, 1_000)  # type: ignore[arg-type]

    async def warm(token: int) -> bool | str:
        request = WarmRequested(conversation_id="c", token=token, requested_at=clock.now_ms())
        sending = asyncio.ensure_future(publisher.warm(request, 60_000, lambda: True))
        while not sending.done():
            for _ in range(20):  # all that can move without the clock
                await asyncio.sleep(0)
            alarm = clock.next_alarm_ms()
            if alarm is not None:
                clock.set(alarm)
        try:
            return sending.result()
        except ConfirmOverdue:
            await publisher.reset("overdue")  # what the worker does
            return "overdue"

    assert [await warm(token) for token in range(4)] == ["overdue", True, True, True]
    exchange.confirm_ms = 100
    assert await warm(4) is True  # in time: the deadline is the setting again
    exchange.confirm_ms = 1_500
    assert await warm(5) == "overdue"
    await asyncio.sleep(0)
    assert exchange.underlay.closes == 2
