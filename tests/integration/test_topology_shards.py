"""The sharded topology (S > 1) on the real broker: the consistent-hash plugin keeps each
conversation on one shard, the same shard for its events and its commands."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from warmer.bus.port import PluginMissing
from warmer.bus.topology import COMMAND_ROUTING_KEY, Names, declare, declare_exchange, delete

pytestmark = pytest.mark.broker

SHARDS = 4


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield connection


@pytest.fixture
async def names(connection: AbstractConnection, namespace: str) -> AsyncIterator[Names]:
    """A sharded namespace declared for the test and deleted after it."""
    names = Names.of(namespace, SHARDS)
    await declare(await connection.channel(), names)
    yield names
    await delete(await connection.channel(), names)


async def _shards_holding(channel: AbstractChannel, queues: list[str]) -> list[int]:
    """The index of each queue with a message in it, the messages taken off."""
    holding = []
    for index, name in enumerate(queues):
        queue = await channel.declare_queue(name, passive=True)
        while await queue.get(no_ack=True, fail=False) is not None:
            holding.append(index)
    return holding


async def _publish(channel: AbstractChannel, exchange: str, key: str, conversation: str) -> None:
    message = aio_pika.Message(b"{}", headers={"conversation-id": conversation})
    await (await channel.get_exchange(exchange)).publish(message, key, mandatory=True)


async def test_a_conversation_stays_on_one_shard_for_events_and_commands(
    names: Names, connection: AbstractConnection
) -> None:
    channel = await connection.channel(publisher_confirms=True)
    lifecycle = [names.shard_queues(k)[0] for k in range(SHARDS)]
    commands = [names.shard_queues(k)[1] for k in range(SHARDS)]
    seen: set[int] = set()
    for conversation in (f"c-{uuid.uuid4().hex}" for _ in range(12)):
        for _ in range(3):
            await _publish(channel, names.lifecycle, "turn.settled", conversation)
            await _publish(channel, names.commands, COMMAND_ROUTING_KEY, conversation)
        events = await _shards_holding(channel, lifecycle)
        assert len(events) == 3 and len(set(events)) == 1
        # The same bucket of two rings built alike: its commands reach the same owner.
        assert await _shards_holding(channel, commands) == events
        seen |= set(events)
    assert len(seen) > 1  # 12 conversations on one shard of 4: (1/4)^11, not the hashing


async def test_declaring_again_changes_nothing(
    names: Names, connection: AbstractConnection
) -> None:
    channel = await connection.channel(publisher_confirms=True)
    conversation = f"c-{uuid.uuid4().hex}"
    lifecycle = [names.shard_queues(k)[0] for k in range(SHARDS)]
    await _publish(channel, names.lifecycle, "turn.settled", conversation)
    before = await _shards_holding(channel, lifecycle)
    await declare(await connection.channel(), names)
    await _publish(channel, names.lifecycle, "turn.settled", conversation)
    assert await _shards_holding(channel, lifecycle) == before


async def test_delete_removes_every_name_of_the_sharded_namespace(
    connection: AbstractConnection, namespace: str
) -> None:
    names = Names.of(namespace, SHARDS)
    await declare(await connection.channel(), names)
    await delete(await connection.channel(), names)
    for exchange, _ in names.exchanges():
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_exchange(exchange, passive=True)
    for queue, _ in names.queues():
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(queue, passive=True)


async def test_an_exchange_type_the_broker_lacks_names_the_plugin(amqp_url: str) -> None:
    # A broker without rabbitmq_consistent_hash_exchange answers x-consistent-hash exactly
    # as this one answers a type no plugin provides: connection.close 503 COMMAND_INVALID.
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(PluginMissing) as caught:
            await declare_exchange(channel, f"wt-{uuid.uuid4().hex[:10]}", "x-not-a-plugin")
    text = str(caught.value)
    assert "'x-not-a-plugin'" in text
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in text
