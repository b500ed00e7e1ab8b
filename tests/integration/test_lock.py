"""A shard's lock with two real connections: one holds it, the other is refused until the
first releases it or its connection ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from warmer.bus.lock import ShardLock
from warmer.bus.port import ShardHeld
from warmer.bus.topology import Names

pytestmark = pytest.mark.broker

WAIT_S = 10.0


class Replica:
    """One side: its lock and why it lost it."""

    def __init__(self, connection: AbstractConnection, queue: str) -> None:
        self.lost: list[str] = []
        self.lost_event = asyncio.Event()
        self.lock = ShardLock(connection, queue, self._lose)

    def _lose(self, why: str) -> None:
        self.lost.append(why)
        self.lost_event.set()


@pytest.fixture
def queue(namespace: str) -> str:
    # Exclusive: the broker deletes it with the last connection holding it.
    return Names.of(namespace, 4).lock(2)


@pytest.fixture
async def connections(amqp_url: str) -> AsyncIterator[list[AbstractRobustConnection]]:
    """Two robust connections, as two replicas have."""
    opened: list[AbstractRobustConnection] = [
        await aio_pika.connect_robust(amqp_url) for _ in range(2)
    ]
    yield opened
    for connection in opened:
        await connection.close()


async def test_the_second_is_refused_until_the_first_releases(
    queue: str, connections: list[AbstractRobustConnection]
) -> None:
    first, second = Replica(connections[0], queue), Replica(connections[1], queue)
    await first.lock.take()
    with pytest.raises(ShardHeld, match=queue):
        await second.lock.take()
    assert first.lock.held and not second.lock.held
    with pytest.raises(ShardHeld):  # refused again: a refusal costs nothing
        await second.lock.take()
    await first.lock.release()
    assert not first.lock.held
    await second.lock.take()
    assert second.lock.held
    await second.lock.release()
    assert first.lost == [] and second.lost == []


async def test_a_lost_connection_loses_the_lock_and_frees_it(
    queue: str, connections: list[AbstractRobustConnection]
) -> None:
    first, second = Replica(connections[0], queue), Replica(connections[1], queue)
    await first.lock.take()
    transport = connections[0].transport
    assert transport is not None
    await transport.connection.close(ConnectionResetError("cut by the test"))
    await asyncio.wait_for(first.lost_event.wait(), WAIT_S)
    assert len(first.lost) == 1 and "lock channel lost" in first.lost[0]
    assert not first.lock.held
    await second.lock.take()
    assert second.lock.held


async def test_abort_forgets_and_the_connection_end_frees_it(
    queue: str, connections: list[AbstractRobustConnection], amqp_url: str
) -> None:
    first, second = Replica(connections[0], queue), Replica(connections[1], queue)
    await first.lock.take()
    first.lock.abort()
    assert not first.lock.held
    with pytest.raises(ShardHeld):  # nothing was said to the broker
        await second.lock.take()
    await connections[0].close()
    await second.lock.take()
    assert first.lost == []


async def test_the_owner_may_take_its_own_lock_again(
    queue: str, connections: list[AbstractRobustConnection]
) -> None:
    # What a lock channel lost while the connection lives comes to: the queue is still the
    # connection's, so taking it again succeeds.
    first = Replica(connections[0], queue)
    await first.lock.take()
    first.lock.abort()
    await first.lock.take()
    assert first.lock.held
    with pytest.raises(ShardHeld):
        await Replica(connections[1], queue).lock.take()
