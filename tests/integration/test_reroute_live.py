"""Reroute on the real broker with S = 4: whatever a publisher put in (or left out of) the
``conversation-id`` header, the message ends on the shard of its body's conversation."""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import msgspec
import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.integration.raw_amqp import Raw, RawPublisher, props, table
from warmer.bus import lenient
from warmer.bus.consumer import AmqpDelivery, ShardConsumer
from warmer.bus.deadletter import ORIGINAL_USER_ID
from warmer.bus.port import Delivery
from warmer.bus.reroute import needs_reroute, reroute
from warmer.bus.topology import COMMAND_ROUTING_KEY, Names, declare, delete
from warmer.clock import SystemClock

pytestmark = pytest.mark.broker

SHARDS = 4
WAIT_S = 10.0
CONFIRM_MS = 10_000
JSON = "application/json"


def _long_string(tag: bytes, data: bytes) -> Raw:
    return table((b"conversation-id", tag, struct.pack(">I", len(data)) + data))


class Shards:
    """Every shard queue consumed as an owner would: rerouted, or arrived on its shard."""

    def __init__(self, names: Names, connection: AbstractRobustConnection) -> None:
        self.names = names
        self.connection = connection
        self.arrived: list[tuple[str, int, Delivery]] = []
        self.rerouted: list[str | None] = []
        self.changed = asyncio.Event()
        self.consumers: list[ShardConsumer] = []

    async def start(self) -> None:
        channel = await self.connection.channel(publisher_confirms=True)
        self.confirms = await channel.get_underlay_channel()
        streams = (
            ("lifecycle", self.names.lifecycle_shards),
            ("commands", self.names.commands_shards),
        )
        for shard in range(SHARDS):
            queues = self.names.shard_queues(shard)
            for (stream, exchange), queue in zip(streams, queues, strict=True):
                deliver = self._deliver(stream, shard, exchange)
                consumer = ShardConsumer(self.connection, queue, deliver, _lost, 10)
                await consumer.start()
                self.consumers.append(consumer)

    def _deliver(self, stream: str, shard: int, exchange: str) -> Any:
        async def deliver(delivery: Delivery) -> None:
            conversation = needs_reroute(delivery)
            if conversation is None:
                self.arrived.append((stream, shard, delivery))
                await delivery.ack()
            else:
                # Noted first: the rerouted copy may arrive before reroute() returns.
                self.rerouted.append(delivery.message_id)
                assert await reroute(
                    delivery,  # type: ignore[arg-type]
                    self.confirms,
                    exchange,
                    conversation,
                    SystemClock(),
                    CONFIRM_MS,
                )
            self.changed.set()

        return deliver

    async def until(self, arrived: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.arrived) < arrived:
                self.changed.clear()
                await self.changed.wait()

    def of(self, message_id: str) -> tuple[str, int, Delivery]:
        (found,) = [entry for entry in self.arrived if entry[2].message_id == message_id]
        return found

    async def close(self) -> None:
        for consumer in self.consumers:
            await consumer.close()


def _lost(why: str) -> None:
    raise AssertionError(f"a shard consumer was lost: {why}")


@pytest.fixture
async def shards(amqp_url: str, namespace: str) -> AsyncIterator[Shards]:
    lenient.install()
    names = Names.of(namespace, SHARDS)
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        await declare(await connection.channel(), names)
        shards = Shards(names, connection)
        await shards.start()
        yield shards
        await shards.close()
        await delete(await connection.channel(), names)


@pytest.fixture
async def publisher(amqp_url: str) -> AsyncIterator[RawPublisher]:
    publisher = await RawPublisher.connect(amqp_url)
    yield publisher
    await publisher.close()


async def test_every_hostile_header_ends_on_the_shard_of_the_body_id(
    shards: Shards, publisher: RawPublisher, amqp_url: str
) -> None:
    conversation = f"c-{uuid.uuid4().hex}"
    body = msgspec.json.encode({"type": "turn.settled", "conversationId": conversation})
    user = unquote(urlsplit(amqp_url).username or "guest")
    cases: dict[str, dict[str, Any]] = {
        "reference": {"headers": {"conversation-id": conversation}},
        "missing": {},
        "other": {"headers": {"conversation-id": "c-someone-else"}},
        "int": {"headers": {"conversation-id": 7}},
        "byte-array": {"headers": _long_string(b"x", conversation.encode())},
        "huge": {"headers": {"conversation-id": "h" * 45_000}},
        "user-id": {"user_id": user},
    }
    lifecycle = shards.names.lifecycle
    for message_id, extra in cases.items():
        flags, properties = props(
            content_type=JSON, delivery_mode=2, message_id=message_id, **extra
        )
        await publisher.publish(lifecycle, "turn.settled", body, properties, flags=flags)
    await shards.until(len(cases))

    _, home, _ = shards.of("reference")
    assert sorted(shards.rerouted, key=str) == sorted(set(cases) - {"reference"})
    for message_id in cases:
        stream, shard, delivery = shards.of(message_id)
        assert (stream, shard) == ("lifecycle", home), message_id
        assert delivery.headers["conversation-id"] == conversation
        assert delivery.body == body
        assert delivery.routing_key == "turn.settled"
        assert delivery.content_type == JSON
    assert shards.of("user-id")[2].headers[ORIGINAL_USER_ID] == user
    assert shards.of("reference")[2].headers.get(ORIGINAL_USER_ID) is None


async def test_a_command_without_the_header_reaches_the_shard_of_its_events(
    shards: Shards, publisher: RawPublisher
) -> None:
    conversation = f"c-{uuid.uuid4().hex}"
    event = msgspec.json.encode({"type": "turn.started", "conversationId": conversation})
    command = msgspec.json.encode({"type": "get_state", "conversationId": conversation})
    flags, properties = props(
        content_type=JSON, message_id="event", headers={"conversation-id": conversation}
    )
    await publisher.publish(shards.names.lifecycle, "turn.started", event, properties, flags=flags)
    flags, properties = props(content_type=JSON, message_id="command", reply_to="nobody")
    await publisher.publish(
        shards.names.commands, COMMAND_ROUTING_KEY, command, properties, flags=flags
    )
    await shards.until(2)
    assert shards.rerouted == ["command"]
    stream, shard, delivery = shards.of("command")
    assert (stream, shard) == ("commands", shards.of("event")[1])
    assert delivery.reply_to == "nobody"
    assert delivery.routing_key == COMMAND_ROUTING_KEY


async def test_what_has_no_readable_id_is_left_to_the_pipeline(
    shards: Shards, publisher: RawPublisher
) -> None:
    good = msgspec.json.encode({"type": "turn.settled", "conversationId": "c-1"})
    cases = {
        "not-json": (b"{not json", {}),
        "no-id": (b'{"type": "turn.settled"}', {}),
        # Unreadable properties decide first: dead-lettered as invalid_properties.
        "not-utf-8-header": (good, {"headers": _long_string(b"S", b"\xff\xfe")}),
    }
    for message_id, (body, extra) in cases.items():
        flags, properties = props(content_type=JSON, message_id=message_id, **extra)
        await publisher.publish(
            shards.names.lifecycle, "turn.settled", body, properties, flags=flags
        )
    await shards.until(len(cases))
    assert shards.rerouted == []
    assert {entry[2].message_id for entry in shards.arrived} == set(cases)
    assert lenient.unreadable(shards.of("not-utf-8-header")[2].headers) is not None


async def test_a_reroute_returned_unroutable_gives_the_original_back(
    amqp_url: str, namespace: str
) -> None:
    queue = f"{namespace}.lifecycle.shard.000"
    unroutable = f"{namespace}.nowhere"  # no queue bound: the broker returns the publish
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.declare_exchange(unroutable, aio_pika.ExchangeType.TOPIC, auto_delete=True)
        confirms = await channel.get_underlay_channel()
        outcomes: asyncio.Queue[tuple[bool, Delivery]] = asyncio.Queue()

        async def deliver(delivery: Delivery) -> None:
            if outcomes.empty():
                rerouted = await reroute(
                    delivery,  # type: ignore[arg-type]
                    confirms,
                    unroutable,
                    "c-1",
                    SystemClock(),
                    CONFIRM_MS,
                )
                outcomes.put_nowait((rerouted, delivery))
            else:
                await delivery.ack()
                outcomes.put_nowait((True, delivery))

        consumer = ShardConsumer(connection, queue, deliver, _lost, 10)
        try:
            await consumer.start()
            message = aio_pika.Message(b'{"conversationId": "c-1"}', message_id="m-1")
            await channel.default_exchange.publish(message, queue)
            async with asyncio.timeout(WAIT_S):
                returned, _ = await outcomes.get()
                _, again = await outcomes.get()
            assert returned is False
            assert again.message_id == "m-1"
            assert isinstance(again, AmqpDelivery) and again.properties.headers is not None
            assert again.properties.headers.get("x-delivery-count") == 1  # requeued once
        finally:
            await consumer.close()
            await _delete_queue(channel, amqp_url, queue)


async def _delete_queue(channel: aio_pika.abc.AbstractChannel, amqp_url: str, queue: str) -> None:
    """Delete ``queue`` on ``channel`` (open: no new channel number), or on a connection of
    its own when the test's went: aiormq can reuse a channel number the broker has not
    closed yet, and the broker then closes the whole connection with CHANNEL_ERROR
    "expected 'channel.open'" (seen in this test's cleanup, twice in a few hundred runs)."""
    if not channel.is_closed:
        try:
            await channel.queue_delete(queue)
            return
        except (aiormq.exceptions.AMQPError, RuntimeError):  # closed under it
            pass
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        other = await connection.channel()
        await other.queue_delete(queue)
