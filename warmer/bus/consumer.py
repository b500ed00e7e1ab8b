"""Consuming straight from the underlying channel: one delivery, one small object.

aio-pika's ``Queue.consume`` wraps every delivery in a task of its own and an
``IncomingMessage`` (a full ``Message``, attribute by attribute), on top of the task
aiormq already makes; on the pipeline's hot path that was a sixth of the worker's time
(BENCHMARKS.md). ``Consumer`` registers with aiormq directly and hands the pipeline an
``AmqpDelivery``; since aio-pika's robust channel does not know this consumer, it consumes
again itself each time the channel is reopened (after a reconnection, or a channel the
broker closed), the queue and the prefetch being restored by the robust channel first.

``ShardConsumer`` is the other kind, for a shard's owner: never consumed again behind the
owner's back; losing it is reported, and consuming again is the owner's decision.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractConnection, AbstractRobustChannel
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from warmer.bus.port import ChannelGone, Delivery
from warmer.observe.log import get_logger

log = get_logger(__name__)


class AmqpDelivery:
    """A delivery as the pipeline and the dead-letter builder read it."""

    __slots__ = (
        "_channel",
        "app_id",
        "body",
        "content_encoding",
        "content_type",
        "correlation_id",
        "delivery_tag",
        "exchange",
        "headers",
        "message_id",
        "priority",
        "properties",
        "reply_to",
        "routing_key",
        "timestamp",
        "type",
        "user_id",
    )

    def __init__(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        self.properties: spec.Basic.Properties = properties
        """As decoded, for a re-publish that keeps them (``warmer.bus.reroute``)."""
        self._channel: AbstractChannel = message.channel
        self.body: bytes = message.body
        self.headers: dict[str, Any] = properties.headers or {}
        self.content_type: str | None = properties.content_type
        self.content_encoding: str | None = properties.content_encoding
        self.priority: int | None = properties.priority
        self.correlation_id: str | None = properties.correlation_id
        self.reply_to: str | None = properties.reply_to
        self.message_id: str | None = properties.message_id
        self.timestamp: datetime | None = properties.timestamp
        self.type: str | None = properties.message_type
        self.user_id: str | None = properties.user_id
        self.app_id: str | None = properties.app_id
        self.delivery_tag: int | None = message.delivery_tag
        self.exchange: str | None = message.exchange
        self.routing_key: str | None = message.routing_key

    @property
    def channel(self) -> AbstractChannel:
        """The channel it came on; ChannelGone once that channel is closed."""
        if self._channel.is_closed:
            raise ChannelGone("the delivery's channel is closed")
        return self._channel

    async def ack(self, multiple: bool = False) -> None:
        """basic.ack (with ``multiple``, every earlier unacknowledged one too)."""
        await self._channel.basic_ack(self.delivery_tag or 0, multiple=multiple)

    async def reject(self, requeue: bool = False) -> None:
        """basic.reject: back to the queue, or to its dead-lettering."""
        await self._channel.basic_reject(self.delivery_tag or 0, requeue=requeue)


class Consumer:
    """One queue consumed into ``deliver``, consumed again whenever the channel reopens."""

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: str,
        deliver: Callable[[Delivery], Awaitable[None]],
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._deliver = deliver
        self._tag: str | None = None
        self._underlay: AbstractChannel | None = None
        self._cancelled = False

    @property
    def consuming(self) -> bool:
        """True while the broker delivers to this consumer on an open channel (not once the
        broker cancelled it, as it does when the queue is deleted)."""
        underlay = self._underlay
        return (
            not self._cancelled
            and self._tag is not None
            and underlay is not None
            and not underlay.is_closed
        )

    async def start(self) -> None:
        """Consume now, and again after every reopening of the channel."""
        self._channel.reopen_callbacks.add(self._reopened)
        await self._consume()

    async def cancel(self) -> None:
        """Stop consuming (basic.cancel); deliveries already made stay to be settled."""
        self._cancelled = True
        self._channel.reopen_callbacks.discard(self._reopened)
        if self._tag is not None and self._underlay is not None and not self._underlay.is_closed:
            await self._underlay.basic_cancel(self._tag)

    async def _consume(self) -> None:
        self._tag = None
        underlay = await self._channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        ok = await underlay.basic_consume(self._queue, self._on_message, no_ack=False)
        self._underlay, self._tag = underlay, ok.consumer_tag

    def _on_broker_cancel(self, frame: spec.Basic.Cancel) -> None:
        # The broker ends a consumer on its own when the queue is deleted; aio-pika's
        # recovery does not know this consumer, so nothing consumes again on this channel.
        if frame.consumer_tag is not None and frame.consumer_tag == self._tag:
            self._tag = None
            log.warning(
                "consumer_cancelled_by_broker",
                queue=self._queue,
                action="not ready; consuming again after the next reconnection or restart",
            )

    async def _reopened(self, *_: object) -> None:
        if not self._cancelled:
            await self._consume()
            log.info("consumer_restored", queue=self._queue)

    async def _on_message(self, message: DeliveredMessage) -> None:
        await self._deliver(AmqpDelivery(message))


class ShardConsumer:
    """One queue of an owned shard consumed on a channel of its own, never restored.

    Opened on the connection's current underlying connection and unknown to aio-pika, so
    it is not consumed again behind the owner's back after a reconnection: the owner takes
    its shard again in its own steps (the lock, the store's epoch, then this). ``lost(why)``
    is called once when consuming ends without ``cancel``, ``close`` or ``abort`` (the
    broker cancelled the consumer, the channel or the connection closed): the shard is lost.
    Not a lock: RabbitMQ 3.10's quorum queues accept a second ``exclusive`` consumer
    (``warmer.bus.lock`` is the lock).
    """

    def __init__(
        self,
        connection: AbstractConnection,
        queue: str,
        deliver: Callable[[Delivery], Awaitable[None]],
        lost: Callable[[str], None],
        prefetch: int,
    ) -> None:
        self._connection = connection
        self._queue = queue
        self._deliver = deliver
        self._lost = lost
        self._prefetch = prefetch
        self._underlay: AbstractChannel | None = None
        self._tag: str | None = None
        self._watch: asyncio.Future[object] | None = None

    @property
    def consuming(self) -> bool:
        """True while consuming (started, not yet cancelled, closed, aborted nor lost)."""
        return self._tag is not None

    async def start(self) -> None:
        """Consume; ChannelGone when not connected."""
        if self._underlay is not None:
            raise RuntimeError(f"{self._queue}: already started")
        underlay = await own_channel(self._connection)
        try:
            await underlay.basic_qos(prefetch_count=self._prefetch)
            ok = await underlay.basic_consume(self._queue, self._on_message, no_ack=False)
        except BaseException:
            await close_quietly(underlay)
            raise
        self._underlay, self._tag = underlay, ok.consumer_tag
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        self._watch = underlay.closing
        self._watch.add_done_callback(self._on_closed)

    async def cancel(self) -> None:
        """Stop consuming (basic.cancel); deliveries already made stay to be settled."""
        tag, underlay = self._forget()
        if tag is not None and underlay is not None and not underlay.is_closed:
            try:
                await underlay.basic_cancel(tag)
            except aiormq.exceptions.AMQPError as exc:
                raise ChannelGone(f"cancel failed: {exc!r}"[:300]) from exc

    async def close(self) -> None:
        """Close the channel: what is unacknowledged goes back to the queue."""
        self._forget()
        underlay, self._underlay = self._underlay, None
        if underlay is not None:
            await close_quietly(underlay)

    def abort(self) -> None:
        """Forget the consumer without a word to the broker: its connection is gone."""
        self._forget()
        self._underlay = None

    def _forget(self) -> tuple[str | None, AbstractChannel | None]:
        """Stop watching (so no ``lost`` follows); the tag and channel it had."""
        tag, self._tag = self._tag, None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.remove_done_callback(self._on_closed)
            watch.cancel()
        if self._underlay is not None:
            self._underlay.on_consumer_cancel_callbacks.discard(self._on_broker_cancel)
        return tag, self._underlay

    def _on_broker_cancel(self, frame: spec.Basic.Cancel) -> None:
        if frame.consumer_tag is not None and frame.consumer_tag == self._tag:
            self._forget()
            self._lost(f"{self._queue}: consumer cancelled by the broker")

    def _on_closed(self, closing: asyncio.Future[object]) -> None:
        if self._tag is None:
            return
        self._forget()
        self._underlay = None
        error = None if closing.cancelled() else closing.exception()
        why = "closed" if error is None else repr(error)
        self._lost(f"{self._queue}: channel lost: {why}"[:300])

    async def _on_message(self, message: DeliveredMessage) -> None:
        await self._deliver(AmqpDelivery(message))


async def own_channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel on the connection's current underlying connection, which aio-pika does
    not know and so never reopens; ChannelGone when not connected."""
    transport = connection.transport
    if transport is None or transport.connection.is_closed:
        raise ChannelGone("not connected")
    try:
        return await transport.connection.channel()
    except (aiormq.exceptions.AMQPConnectionError, RuntimeError) as exc:
        raise ChannelGone(f"not connected: {exc!r}"[:300]) from exc


async def close_quietly(underlay: AbstractChannel) -> None:
    """Close a channel; one already gone (with its connection) is fine."""
    if underlay.is_closed:
        return
    with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
        await underlay.close()


__all__ = ["AmqpDelivery", "Consumer", "ShardConsumer", "close_quietly", "own_channel"]
