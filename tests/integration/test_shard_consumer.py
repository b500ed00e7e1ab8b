"""A shard's consumer on the real broker: it reports its loss and never consumes again by
itself; and why it is no lock (a quorum queue takes a second exclusive consumer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractRobustConnection

from warmer.bus.consumer import ShardConsumer
from warmer.bus.port import ChannelGone, Delivery
from warmer.bus.topology import inbound_queue_arguments

pytestmark = pytest.mark.broker

WAIT_S = 10.0


class Holder:
    """One side of the lock: its consumer, what it was delivered, why it lost it."""

    def __init__(self, connection: AbstractConnection, queue: str) -> None:
        self.delivered: asyncio.Queue[Delivery] = asyncio.Queue()
        self.lost: list[str] = []
        self.lost_event = asyncio.Event()
        self.consumer = ShardConsumer(connection, queue, self._deliver, self._lose, 10)

    async def _deliver(self, delivery: Delivery) -> None:
        self.delivered.put_nowait(delivery)

    def _lose(self, why: str) -> None:
        self.lost.append(why)
        self.lost_event.set()

    async def next(self) -> Delivery:
        return await asyncio.wait_for(self.delivered.get(), WAIT_S)


@pytest.fixture
async def queue(amqp_url: str, namespace: str) -> AsyncIterator[str]:
    """A quorum queue like a shard's, deleted afterwards."""
    name = f"{namespace}.lifecycle.shard.000"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        arguments = inbound_queue_arguments(f"{namespace}.dlx")
        await channel.declare_queue(name, durable=True, arguments=arguments)
        yield name
        await (await connection.channel()).queue_delete(name)


@pytest.fixture
async def connections(amqp_url: str) -> AsyncIterator[list[AbstractRobustConnection]]:
    """Two robust connections, as two replicas have."""
    opened: list[AbstractRobustConnection] = [
        await aio_pika.connect_robust(amqp_url) for _ in range(2)
    ]
    yield opened
    for connection in opened:
        await connection.close()


async def _publish(amqp_url: str, queue: str, body: bytes) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(aio_pika.Message(body), queue)


async def test_a_quorum_queue_takes_a_second_exclusive_consumer(
    queue: str, connections: list[AbstractRobustConnection]
) -> None:
    # Why the lock is an exclusive queue (warmer.bus.lock): RabbitMQ 3.10 enforces
    # `exclusive` on basic.consume for classic queues only. Should a broker upgrade refuse
    # this, an exclusive consumer could be the lock again.
    for connection in connections:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        await declared.consume(_ignore, exclusive=True)
    channel = await connections[0].channel()
    declared = await channel.declare_queue(queue, passive=True)
    assert declared.declaration_result.consumer_count == 2


async def _ignore(_: AbstractIncomingMessage) -> None:
    return None


async def test_unacknowledged_deliveries_go_back_when_closed(
    amqp_url: str, queue: str, connections: list[AbstractRobustConnection]
) -> None:
    first, second = Holder(connections[0], queue), Holder(connections[1], queue)
    await first.consumer.start()
    assert first.consumer.consuming
    await _publish(amqp_url, queue, b"one")
    delivery = await first.next()
    assert delivery.body == b"one"
    await first.consumer.close()
    assert not first.consumer.consuming
    await second.consumer.start()
    again = await second.next()
    assert again.body == b"one"
    await again.ack()
    assert first.lost == [] and second.lost == []


async def test_a_cancelled_consumer_still_acknowledges_what_it_was_given(
    amqp_url: str, queue: str, connections: list[AbstractRobustConnection]
) -> None:
    first, second = Holder(connections[0], queue), Holder(connections[1], queue)
    await first.consumer.start()
    await _publish(amqp_url, queue, b"one")
    delivery = await first.next()
    await first.consumer.cancel()
    assert not first.consumer.consuming
    await second.consumer.start()
    await delivery.ack()  # the cancelled owner drains what it was given
    await _publish(amqp_url, queue, b"two")
    assert (await second.next()).body == b"two"
    assert first.delivered.empty()
    await first.consumer.close()
    assert first.lost == []


async def test_a_lost_connection_is_a_lost_shard_and_is_not_taken_again_by_itself(
    queue: str, connections: list[AbstractRobustConnection]
) -> None:
    first = Holder(connections[0], queue)
    await first.consumer.start()
    transport = connections[0].transport
    assert transport is not None
    reconnected = asyncio.Event()
    connections[0].reconnect_callbacks.add(lambda *_: reconnected.set())
    await transport.connection.close(ConnectionResetError("cut by the test"))
    await asyncio.wait_for(first.lost_event.wait(), WAIT_S)
    assert len(first.lost) == 1 and "channel lost" in first.lost[0]
    assert not first.consumer.consuming
    await asyncio.wait_for(reconnected.wait(), WAIT_S)
    # Reconnected, the first did not consume again.
    channel = await connections[1].channel()
    declared = await channel.declare_queue(queue, passive=True)
    assert declared.declaration_result.consumer_count == 0
    assert len(first.lost) == 1


async def test_a_deleted_queue_is_a_lost_shard(
    amqp_url: str, queue: str, connections: list[AbstractRobustConnection]
) -> None:
    holder = Holder(connections[0], queue)
    await holder.consumer.start()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await (await connection.channel()).queue_delete(queue)
    await asyncio.wait_for(holder.lost_event.wait(), WAIT_S)
    assert holder.lost == [f"{queue}: consumer cancelled by the broker"]
    assert not holder.consumer.consuming
    await holder.consumer.close()


async def test_abort_forgets_without_a_word(
    queue: str, connections: list[AbstractRobustConnection]
) -> None:
    holder = Holder(connections[0], queue)
    await holder.consumer.start()
    holder.consumer.abort()
    assert not holder.consumer.consuming
    # The connection's end, once aborted, is no loss to report.
    await connections[0].close()
    await asyncio.sleep(0.1)
    assert holder.lost == []


async def test_starting_while_not_connected_says_so(amqp_url: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    await connection.close()
    holder = Holder(connection, queue)
    with pytest.raises(ChannelGone, match="not connected"):
        await holder.consumer.start()
