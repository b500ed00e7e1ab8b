"""The publisher's warm request after a lost connection: real publish time, time left;
its confirm deadline, on the injected clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from aio_pika import DeliveryMode, Message
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from tests.unit.fake_amqp import Robust, Sent, Underlay
from tests.unit.test_contract import _state
from warmer.bus.port import ConfirmOverdue, PublishWithdrawn
from warmer.bus.publisher import Publisher
from warmer.bus.topology import Names, Topology
from warmer.clock import ManualClock
from warmer.contract import ErrorReply, SurfaceChanged, WarmRequested, encode
from warmer.core import build_panel

T0 = 1_760_000_000_000


class Exchange:
    """Fails the first ``cuts`` publishes as a lost connection would, moving the clock."""

    def __init__(self, clock: ManualClock, cuts: int, outage_ms: int) -> None:
        self.clock = clock
        self.cuts = cuts
        self.outage_ms = outage_ms
        self.silent = False
        """No confirm ever comes (a connection that stopped forwarding)."""
        self.underlay = Underlay(self.broker)

    def outage(self) -> None:
        self.clock.advance(self.outage_ms)

    @property
    def published(self) -> list[Sent]:
        return self.underlay.published

    async def broker(self, message: Sent) -> None:
        if self.cuts:
            self.cuts -= 1
            raise ConnectionError("connection lost")  # back after outage_ms (outage())
        if self.silent:
            await asyncio.get_running_loop().create_future()


def publisher(
    clock: ManualClock, exchange: Exchange, confirm_ms: int = 10_000, replica: str = ""
) -> Publisher:
    names = Names.of("ns")
    exchanges: dict[str, Any] = {name: None for name, _ in names.exchanges()}
    topology = Topology(names=names, exchanges=exchanges, queues={})
    channel: Any = Robust(exchange.underlay, on_ready=exchange.outage)
    return Publisher(channel, topology, channel, None, clock, confirm_ms, replica)  # type: ignore[arg-type]


def request(at: int) -> WarmRequested:
    return WarmRequested(conversation_id="c", token=7, requested_at=at, cwd="/srv")


async def test_a_warm_request_published_at_once_keeps_its_whole_timeout() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    assert await publisher(clock, exchange).warm(request(T0), 60_000, lambda: True)
    (message,) = exchange.published
    assert message.expiration == "60000"
    assert msgspec.json.decode(message.body)["requestedAt"] == T0
    assert message.message_id == "c:7"


async def test_republished_after_a_reconnection_it_carries_its_real_time_whole_timeout() -> None:
    # Issue 17: the warm timeout waits for a worker (or broker) that sent it late, so the
    # request is good for its whole timeout from when it really goes out.
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=2, outage_ms=10_000)
    await publisher(clock, exchange).warm(request(T0), 60_000, lambda: True)
    (message,) = exchange.published
    assert msgspec.json.decode(message.body)["requestedAt"] == T0 + 20_000
    assert message.expiration == "60000"


async def test_sent_late_but_still_wanted_it_goes_out_with_its_whole_timeout() -> None:
    # Issue 17: a worker behind on its own work sends a request late; it still has its
    # whole timeout at the orchestrator (the warm timeout waits for the worker too).
    clock = ManualClock(T0 + 61_000)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    await publisher(clock, exchange).warm(request(T0), 60_000, lambda: True)
    (message,) = exchange.published
    assert msgspec.json.decode(message.body)["requestedAt"] == T0 + 61_000
    assert message.expiration == "60000"


async def test_cut_by_an_outage_longer_than_its_timeout_it_is_withdrawn() -> None:
    # After such an outage another replica may own the shard and have warmed it: going out
    # now would double that warm (seen in the fencing test: a woken replica's late warms).
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=1, outage_ms=61_000)
    with pytest.raises(PublishWithdrawn):
        await publisher(clock, exchange).warm(request(T0), 60_000, lambda: True)
    assert exchange.published == []


async def test_withdrawn_when_no_longer_wanted() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=1, outage_ms=1_000)
    with pytest.raises(PublishWithdrawn):
        await publisher(clock, exchange).warm(request(T0), 60_000, lambda: False)
    assert exchange.published == []


async def test_a_confirm_that_does_not_come_is_overdue_at_the_deadline_on_the_clock() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    exchange.silent = True
    warm = asyncio.ensure_future(
        publisher(clock, exchange, confirm_ms=2_000).warm(request(T0), 60_000, lambda: True)
    )
    await asyncio.sleep(0)
    clock.advance(1_999)
    await asyncio.sleep(0)
    assert not warm.done()
    clock.advance(1)
    with pytest.raises(ConfirmOverdue, match="2000 ms"):
        await warm


# -- the fast path: the bytes on the wire, one write per loop turn ------------------------


def surface_of(cid: str) -> SurfaceChanged:
    state = _state()
    return SurfaceChanged(conversation_id=cid, state=state, spec=build_panel(state), at=T0)


def old_bytes(number: int, exchange: str, key: str, mandatory: bool, message: Any) -> bytes:
    """What ``Exchange.publish`` / ``basic_publish`` wrote for the same message before."""
    properties = message.properties if isinstance(message, Message) else message[0]
    body = message.body if isinstance(message, Message) else message[1]
    frames: list[Any] = [
        spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=mandatory),
        ContentHeader(body_size=len(body), properties=properties),
        ContentBody(body),
    ]
    return ChannelFrame.marshall(channel_number=number, frames=frames).payload


@pytest.mark.parametrize("replica", ["", "replica-ü-1"])
@pytest.mark.parametrize("cid", ["c", "conv-€-" + "é" * 90])
async def test_the_three_kinds_are_the_bytes_aio_pika_and_aiormq_wrote(
    replica: str, cid: str
) -> None:
    clock = ManualClock(T0 + 999)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    exchange.underlay.number = 5
    sender = publisher(clock, exchange, replica=replica)
    headers: dict[str, Any] = {"conversation-id": cid}
    if replica:
        headers["x-warmer-replica"] = replica
    warm = WarmRequested(conversation_id=cid, token=12, requested_at=T0, cwd="/srv/ü")
    assert await sender.warm(warm, 60_000, lambda: True)
    update = surface_of(cid)
    await sender.surface(update)
    reply = ErrorReply(error=f"no {cid}", code="invalid_field")
    await sender.reply("amq.gen-ü", "corr-1", reply)
    await sender.reply("amq.gen-2", None, reply)
    sent_warm = msgspec.structs.replace(warm, requested_at=T0 + 999)
    expected = [
        old_bytes(
            5,
            "ns.warm",
            "warm.requested",
            True,
            Message(
                encode(sent_warm),
                content_type="application/json",
                delivery_mode=DeliveryMode.PERSISTENT,
                message_id=f"{cid}:12",
                headers=headers,
                timestamp=(T0 + 999) / 1000,
                expiration=timedelta(milliseconds=60_000),  # the whole timeout (issue 17)
            ),
        ),
        old_bytes(
            5,
            "ns.surface",
            "surface.changed",
            False,
            (
                spec.Basic.Properties(
                    content_type="application/json",
                    delivery_mode=1,
                    headers=headers,
                    message_id="warmer-1",
                ),
                encode(update),
            ),
        ),
    ]
    for n, (key, corr) in enumerate([("amq.gen-ü", "corr-1"), ("amq.gen-2", None)], 2):
        properties = spec.Basic.Properties(
            content_type="application/json",
            correlation_id=corr,
            delivery_mode=1,
            message_id=f"warmer-{n}",
            headers={"x-warmer-replica": replica} if replica else None,
        )
        expected.append(old_bytes(5, "", key, False, (properties, encode(reply))))
    assert exchange.underlay.connection.write_queue.payloads == expected
    (warm_sent, *_) = exchange.published
    assert warm_sent.expiration == "60000"  # the whole timeout, from when it goes out (issue 17)
    assert warm_sent.properties.timestamp == datetime.fromtimestamp((T0 + 999) // 1000, tz=UTC)


async def test_a_loop_turns_publishes_leave_in_one_write_each_confirmed_by_its_tag() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    sender = publisher(clock, exchange)
    updates = [surface_of(f"c{i}") for i in range(50)]
    warms = [WarmRequested(conversation_id=f"w{i}", token=i, requested_at=T0) for i in range(5)]
    await asyncio.gather(
        *(sender.surface(u) for u in updates),
        *(sender.warm(w, 60_000, lambda: True) for w in warms),
    )
    queue = exchange.underlay.connection.write_queue
    assert queue.entries == 1 and sender.wire.writes == 1
    assert exchange.underlay.delivery_tag == 55
    assert [m.headers["conversation-id"] for m in exchange.published if m.headers] == [
        *(f"c{i}" for i in range(50)),
        *(f"w{i}" for i in range(5)),
    ]
    assert exchange.underlay.confirmations == {}
    assert exchange.underlay.message_id_delivery_tag == {}  # forgotten once confirmed
    await sender.surface(updates[0])
    assert queue.entries == 2  # the next turn: the next write


async def test_a_mandatory_warm_the_broker_returned_is_unroutable() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    seen: dict[str, int] = {}

    nowhere: Any = None

    async def returned(message: Sent) -> object:
        assert message.mandatory and message.message_id is not None
        seen.update(exchange.underlay.message_id_delivery_tag)  # how aiormq finds it
        return DeliveredMessage(
            delivery=spec.Basic.Return(), header=ContentHeader(), body=b"", channel=nowhere
        )

    exchange.underlay.broker = returned
    assert await publisher(clock, exchange).warm(request(T0), 60_000, lambda: True) is False
    assert seen == {"c:7": 1}


async def test_a_publish_withdrawn_before_the_write_takes_no_delivery_tag() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    sender = publisher(clock, exchange)
    update = surface_of("gone")
    kept = surface_of("kept")
    withdrawn = asyncio.ensure_future(sender.surface(update))
    await asyncio.sleep(0)  # framed and waiting for the turn's write
    withdrawn.cancel()
    await sender.surface(kept)
    assert withdrawn.cancelled()
    assert [m.headers["conversation-id"] for m in exchange.published if m.headers] == ["kept"]
    assert exchange.underlay.delivery_tag == 1


async def test_a_channel_closed_before_the_write_is_waited_for_and_published_again() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    sender = publisher(clock, exchange)
    underlay = exchange.underlay
    update = surface_of("c")
    underlay.is_closed = True

    def reopened() -> None:
        underlay.is_closed = False

    robust: Any = sender._channel
    robust.on_ready = reopened
    await sender.surface(update)
    assert [m.headers["conversation-id"] for m in exchange.published if m.headers] == ["c"]


@pytest.mark.parametrize("left", [1, 999, 1001, 1003, 59_999, 86_400_001])
async def test_the_expiration_is_what_aio_pika_made_of_the_time_left(left: int) -> None:
    # aio-pika wrote int(timedelta.total_seconds() * 1000): 1000 for 1001 ms; kept as is.
    from aio_pika.message import encode_expiration

    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    await publisher(clock, exchange).warm(request(T0), left, lambda: True)
    (message,) = exchange.published
    assert message.expiration == encode_expiration(timedelta(milliseconds=left))
