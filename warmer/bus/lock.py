"""The ownership lock of a shard: an exclusive queue, which one connection alone may hold.

A replica owns shard k while its connection holds the exclusive queue ``{ns}.lock.NNN``
(``Names.lock``). Another connection's declare is refused with 405 RESOURCE_LOCKED
(``ShardHeld``: try later); the broker deletes the queue when the owner's connection
ends, so a dead replica's shards are free as soon as the broker sees its connection gone
(its heartbeat), at the moment its consumers die too. Not an exclusive *consumer*: RabbitMQ
3.10's quorum queues accept a second one (tests/integration/test_shard_consumer.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import aiormq
from aio_pika.abc import AbstractConnection
from aiormq.abc import AbstractChannel

from warmer.bus.consumer import close_quietly, own_channel
from warmer.bus.port import ChannelGone, ShardHeld

_QUEUE_TYPE: Final = "classic"


class ShardLock:
    """One shard's lock, taken and released on a channel of its own.

    ``lost(why)`` is called once when the lock's channel closes while it is held (the
    connection is gone, or the channel failed): never after ``release`` or ``abort``. A
    lock lost with its channel while the connection lives is still this connection's
    (the queue outlives the channel): ``take`` again succeeds at once.
    """

    def __init__(self, connection: AbstractConnection, queue: str, lost: Callable[[str], None]):
        self._connection = connection
        self._queue = queue
        self._lost = lost
        self._underlay: AbstractChannel | None = None
        self._watch: asyncio.Future[object] | None = None

    @property
    def held(self) -> bool:
        """True from a successful ``take`` until ``release``, ``abort`` or a loss."""
        return self._underlay is not None

    async def take(self) -> None:
        """Declare the exclusive queue; ShardHeld while another connection holds it,
        ChannelGone when not connected."""
        if self._underlay is not None:
            raise RuntimeError(f"{self._queue}: already held")
        underlay = await own_channel(self._connection)
        try:
            # Classic whatever the vhost's default queue type: a quorum queue cannot be
            # exclusive, and this one holds nothing.
            await underlay.queue_declare(
                self._queue,
                exclusive=True,
                auto_delete=False,
                arguments={"x-queue-type": _QUEUE_TYPE},
            )
        except aiormq.exceptions.ChannelLockedResource as exc:
            raise ShardHeld(f"{self._queue} is held by another connection") from exc
        except BaseException:
            await close_quietly(underlay)
            raise
        self._underlay = underlay
        self._watch = underlay.closing
        self._watch.add_done_callback(self._on_closed)

    async def release(self) -> None:
        """Delete the lock queue (the shard is free) and close the channel."""
        underlay = self._forget()
        if underlay is None or underlay.is_closed:
            return
        try:
            await underlay.queue_delete(self._queue)
        except aiormq.exceptions.AMQPError as exc:
            raise ChannelGone(f"{self._queue}: release failed: {exc!r}"[:300]) from exc
        finally:
            await close_quietly(underlay)

    def abort(self) -> None:
        """Forget the lock without a word to the broker: its connection is gone."""
        self._forget()

    def _forget(self) -> AbstractChannel | None:
        underlay, self._underlay = self._underlay, None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.remove_done_callback(self._on_closed)
            watch.cancel()
        return underlay

    def _on_closed(self, closing: asyncio.Future[object]) -> None:
        if self._underlay is None:
            return
        self._forget()
        error = None if closing.cancelled() else closing.exception()
        why = "closed" if error is None else repr(error)
        self._lost(f"{self._queue}: lock channel lost: {why}"[:300])


__all__ = ["ShardLock"]
