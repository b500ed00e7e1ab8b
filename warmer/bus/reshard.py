"""The broker's half of ``warmer reshard``: the sharded topology, draining, probing.

The names and arguments are the brief's (docs/contract.md once written): behind each
exchange publishers use, an ``x-consistent-hash`` exchange ``<exchange>.shards`` hashing
the ``conversation-id`` header, bound with weight ``"1"`` to the quorum queues
``<exchange>.shard.000`` .. ``.<S-1>``, in shard order (RabbitMQ 3.10 rebuilds the ring
at boot from the bindings sorted by name, so creation order must be name order). The
ring is a jump consistent hash over the bindings in order: removing the last bindings
leaves every other conversation where it was, which is why shards are always removed
from the top.

The client cannot compute which shard a conversation hashes to (the broker hashes its
own encoding of the header), so ``Probe`` asks the broker: a temporary twin of the
exchange, bound in the same order to as many exclusive queues, routes one message per
id exactly as the real exchange would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any, Final

import aiormq
import msgspec
from aio_pika import Message
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    ExchangeType,
)
from aio_pika.exceptions import DeliveryError, PublishError

from warmer.bus import deadletter
from warmer.bus.deadletter import republished
from warmer.bus.lenient import Undecodable, unreadable
from warmer.bus.port import PluginMissing
from warmer.bus.topology import (
    COMMAND_ROUTING_KEY,
    HASH_PLUGIN,
    MAX_SHARDS,
    SHARD_HEADER,
    inbound_queue_arguments,
)
from warmer.contract import (
    MAX_ERROR_CHARS,
    Rejection,
    UnknownType,
    decode_command,
    decode_event,
)

CONVERSATION_HEADER: Final = SHARD_HEADER
SHARD_WEIGHT: Final = "1"
PLUGIN: Final = HASH_PLUGIN
_BATCH: Final = 200  # messages moved per round of confirms
_PROBE_BATCH: Final = 2000
_PROBE_WAIT_S: Final = 30.0
_SETTLE_S: Final = 2.0
_SETTLE_POLL_S: Final = 0.05
# The quorum queue's count of deliveries, set by the broker: a moved message is a new
# one, its count starts again (the queue dead-letters at DELIVERY_LIMIT).
_DROPPED_HEADERS: Final = ("x-delivery-count",)


class Refused(Exception):
    """Something the broker must not be doing while a reshard runs (a worker consumes)."""


class Stream(msgspec.Struct, frozen=True, kw_only=True):
    """One inbound stream: the publishers' exchange and how its old queue is bound."""

    exchange: str
    """Also the name of the single queue of S = 1."""
    kind: ExchangeType
    routing_key: str
    """The binding of the S = 1 queue, and of the exchange-to-exchange binding."""

    @property
    def shards_exchange(self) -> str:
        """The ``x-consistent-hash`` exchange behind the publishers' one."""
        return f"{self.exchange}.shards"

    def shard_queue(self, shard: int) -> str:
        """The queue of shard ``shard``: zero-padded, so name order is shard order."""
        return f"{self.exchange}.shard.{shard:03d}"


def streams(namespace: str) -> tuple[Stream, Stream]:
    """The lifecycle and command streams of ``namespace``."""
    return (
        Stream(exchange=f"{namespace}.lifecycle", kind=ExchangeType.TOPIC, routing_key="#"),
        Stream(
            exchange=f"{namespace}.commands",
            kind=ExchangeType.DIRECT,
            routing_key=COMMAND_ROUTING_KEY,
        ),
    )


def shards_exchange_arguments() -> dict[str, Any]:
    """The arguments of a ``.shards`` exchange (and of the probe's twin)."""
    return {"hash-header": CONVERSATION_HEADER}


class Moved(msgspec.Struct, kw_only=True):
    """What draining one queue did."""

    queue: str
    moved: int = 0
    dead: int = 0


class Broker:
    """One connection and one confirming channel, for the reshard of one namespace."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        """Use the connection's own channel with publisher confirms."""
        self._connection = connection
        self._channel = channel

    async def queue(self, name: str) -> AbstractQueue | None:
        """The queue ``name`` when it exists (a passive declare), else None."""
        channel = await self._connection.channel()
        try:
            return await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            with suppress(aiormq.exceptions.AMQPError):
                await channel.close()

    async def existing(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Each queue of ``names`` that exists -> (messages ready, consumers).

        A quorum queue counts each ``basic.get`` not yet settled as a consumer for a moment
        after its ack (RabbitMQ 3.10 applies acks through its log): consumers seen are
        looked at again until they are gone or ``_SETTLE_S`` has passed, so only a real
        one (a worker) remains.
        """
        deadline = asyncio.get_running_loop().time() + _SETTLE_S
        found = await self._counts(names)
        while asyncio.get_running_loop().time() < deadline:
            busy = [name for name, (_, consumers) in found.items() if consumers]
            if not busy:
                break
            await asyncio.sleep(_SETTLE_POLL_S)
            found |= await self._counts(busy)
        return found

    async def held(self, names: Sequence[str]) -> list[str]:
        """The exclusive queues of ``names`` that exist: another connection's answers a
        passive declare with RESOURCE_LOCKED, which closes the channel too."""
        found: list[str] = []
        channel = await self._connection.channel()
        try:
            for name in names:
                if channel.is_closed:
                    channel = await self._connection.channel()
                try:
                    await channel.declare_queue(name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    continue
                except aiormq.exceptions.ChannelLockedResource:
                    pass
                found.append(name)
        finally:
            with suppress(aiormq.exceptions.AMQPError):
                await channel.close()
        return found

    async def _counts(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        # A passive declare of a missing queue closes its channel: a new one only then.
        found: dict[str, tuple[int, int]] = {}
        channel = await self._connection.channel()
        try:
            for name in names:
                if channel.is_closed:
                    channel = await self._connection.channel()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    continue
                result = queue.declaration_result
                found[name] = (result.message_count or 0, result.consumer_count or 0)
        finally:
            with suppress(aiormq.exceptions.AMQPError):
                await channel.close()
        return found

    async def declare_shards(self, stream: Stream, shards: int, dlx: str) -> AbstractExchange:
        """The sharded half of ``stream`` for ``shards`` shards, bound in shard order, and
        the publishers' exchange bound to it; the ``.shards`` exchange.

        PluginMissing when the broker lacks the exchange type.
        """
        publishers = await self._channel.declare_exchange(
            stream.exchange, stream.kind, durable=True
        )
        try:
            exchange = await self._channel.declare_exchange(
                stream.shards_exchange,
                ExchangeType.X_CONSISTENT_HASH,
                durable=True,
                arguments=shards_exchange_arguments(),
            )
        except aiormq.exceptions.ConnectionCommandInvalid as exc:
            raise PluginMissing(str(exc)) from exc
        for shard in range(shards):
            queue = await self._channel.declare_queue(
                stream.shard_queue(shard), durable=True, arguments=inbound_queue_arguments(dlx)
            )
            await queue.bind(exchange, SHARD_WEIGHT)
        await exchange.bind(publishers, stream.routing_key)
        return exchange

    async def declare_dead(self, dlx: str, dead: str) -> None:
        """The dead-letter exchange and queue (docs/contract.md), where a message with no
        readable id goes: present before any worker ran in a namespace that publishers
        declared alone."""
        exchange = await self._channel.declare_exchange(dlx, ExchangeType.FANOUT, durable=True)
        queue = await self._channel.declare_queue(
            dead, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, "")

    async def declare_single(self, stream: Stream, dlx: str) -> AbstractQueue:
        """The S = 1 queue of ``stream``, bound to the publishers' exchange."""
        publishers = await self._channel.declare_exchange(
            stream.exchange, stream.kind, durable=True
        )
        queue = await self._channel.declare_queue(
            stream.exchange, durable=True, arguments=inbound_queue_arguments(dlx)
        )
        await queue.bind(publishers, stream.routing_key)
        return queue

    async def default_exchange(self) -> AbstractExchange:
        """The default exchange: a queue by its name (where S = 1 moves messages to)."""
        return self._channel.default_exchange

    async def unbind_single(self, stream: Stream) -> None:
        """Stop routing new messages of ``stream`` to its S = 1 queue (when it exists)."""
        if await self.queue(stream.exchange) is not None:
            queue = await self._channel.get_queue(stream.exchange, ensure=False)
            await queue.unbind(stream.exchange, stream.routing_key)

    async def unbind_shards(self, stream: Stream, shards: Sequence[int]) -> None:
        """Remove ``shards``' queues from the ring, highest first (the others keep their
        conversations: see the module's docstring)."""
        for shard in sorted(shards, reverse=True):
            queue = await self._channel.get_queue(stream.shard_queue(shard), ensure=False)
            await queue.unbind(stream.shards_exchange, SHARD_WEIGHT)

    async def drop_shards_exchange(self, stream: Stream) -> None:
        """Back to S = 1: unbind and delete ``stream``'s ``.shards`` exchange."""
        await self._channel.exchange_delete(stream.shards_exchange)

    async def delete_if_empty(self, name: str) -> bool:
        """Delete the queue ``name`` if it holds nothing and nobody consumes it; False when
        it holds messages or has a consumer.

        Checked, then deleted: RabbitMQ 3.10 refuses ``if-empty`` on a quorum queue (and
        closes the whole connection: NOT_IMPLEMENTED). Nothing routes to an old queue any
        more when this runs, so nothing arrives between the two.
        """
        counts = (await self.existing([name])).get(name)
        if counts is None:
            return True
        if counts != (0, 0):
            return False
        await self._channel.queue_delete(name)
        return True

    async def drain(
        self,
        queue: str,
        destination: AbstractExchange,
        routing_key: Callable[[AbstractIncomingMessage], str],
        *,
        commands: bool,
        dlx: str,
        progress: Callable[[Moved], None],
    ) -> Moved:
        """Move the messages ``queue`` holds now to ``destination``, oldest first.

        Each goes out with the ``conversation-id`` header its body names, confirmed
        before the original is acknowledged (a crash in between leaves a copy in both:
        at least once, as everywhere in the contract). One with no readable id is
        dead-lettered to ``dlx`` as the worker would. Only what the queue held at the
        start is moved: a message republished into it (a kept shard) is not read twice.
        """
        declared = await self._channel.declare_queue(queue, passive=True)
        left = declared.declaration_result.message_count or 0
        frame_max = (
            await self._channel.get_underlay_channel()
        ).connection.connection_tune.frame_max
        dead_exchange = await self._channel.get_exchange(dlx, ensure=False)
        done = Moved(queue=queue)
        while left > 0:
            batch: list[AbstractIncomingMessage] = []
            while len(batch) < min(left, _BATCH):
                message = await declared.get(no_ack=False, fail=False)
                if message is None:
                    break
                batch.append(message)
            if not batch:
                break
            sends: list[Awaitable[Any]] = []
            for message in batch:
                found = conversation_of(message, commands=commands)
                if isinstance(found, Rejection):
                    sends.append(self._dead_letter(message, found, dead_exchange, frame_max))
                    done.dead += 1
                else:
                    moved = with_conversation(message, found)
                    sends.append(destination.publish(moved, routing_key(message), mandatory=True))
                    done.moved += 1
            try:
                await asyncio.gather(*sends)
            except (PublishError, DeliveryError) as exc:
                raise Refused(
                    f"the broker did not take a message moved from {queue}: {exc}"
                ) from exc
            for message in batch:
                if not message.processed:
                    await message.ack()
            left -= len(batch)
            progress(done)
        return done

    @staticmethod
    async def _dead_letter(
        message: AbstractIncomingMessage,
        rejection: Rejection,
        exchange: AbstractExchange,
        frame_max: int,
    ) -> None:
        """Dead-letter ``message`` as the worker does; one too large even without its own
        headers is rejected, so the queue's own dead-lettering takes it."""
        try:
            letter = deadletter.build(message, rejection, frame_max)
        except deadletter.DeadLetterUnfit:
            await message.reject(requeue=False)
            return
        await exchange.publish(letter, message.routing_key or "")

    async def probe(
        self,
        name: str,
        shards: int,
        ids: Sequence[str],
        progress: Callable[[int], None],
    ) -> dict[str, int]:
        """Each id of ``ids`` -> the shard the real ``.shards`` exchange of ``shards``
        bindings routes it to; ``progress`` gets the count probed after each batch.

        The twin exchange ``name`` and its queues ``name.NNN`` are bound like the real
        one (same hash header, weight "1" each, in shard order) and go away with the
        channel: the queues auto-delete with their consumers, the exchange with its last
        binding.
        """
        channel = await self._connection.channel(publisher_confirms=True)
        try:
            exchange = await channel.declare_exchange(
                name,
                ExchangeType.X_CONSISTENT_HASH,
                auto_delete=True,
                arguments=shards_exchange_arguments(),
            )
            shard_of: dict[str, int] = {}
            arrived = asyncio.Event()
            expected = 0

            def catch(shard: int) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
                async def on_message(message: AbstractIncomingMessage) -> None:
                    shard_of[message.body.decode()] = shard
                    if len(shard_of) >= expected:
                        arrived.set()

                return on_message

            for shard in range(shards):
                queue = await channel.declare_queue(
                    f"{name}.{shard:03d}", exclusive=True, auto_delete=True
                )
                await queue.bind(exchange, SHARD_WEIGHT)
                await queue.consume(catch(shard), no_ack=True)
            for start in range(0, len(ids), _PROBE_BATCH):
                chunk = ids[start : start + _PROBE_BATCH]
                expected = start + len(chunk)
                arrived.clear()
                await asyncio.gather(
                    *(
                        exchange.publish(
                            Message(
                                conversation.encode(),
                                headers={CONVERSATION_HEADER: conversation},
                            ),
                            "",
                            mandatory=True,
                        )
                        for conversation in chunk
                    )
                )
                if len(shard_of) < expected:
                    await asyncio.wait_for(arrived.wait(), _PROBE_WAIT_S)
                progress(expected)
            return shard_of
        finally:
            with suppress(aiormq.exceptions.AMQPError):
                await channel.close()


def conversation_of(message: AbstractIncomingMessage, *, commands: bool) -> str | Rejection:
    """The conversation ``message`` belongs to, or why the worker would dead-letter it.

    A body the contract reads gives its ``conversationId``; so does one with a wrong
    field or an unknown type, as long as that field is a string (its owner then answers
    or drops it as usual). What has no readable id (properties the client could not
    read, not JSON, no ``conversationId``) gets the code the worker would give it.
    """
    notes = unreadable(message.headers)
    if notes is not None:
        return Rejection("invalid_properties", notes.describe()[:MAX_ERROR_CHARS])
    decode = decode_command if commands else decode_event
    decoded = decode(message.body, message.content_type, content_encoding=message.content_encoding)
    if not isinstance(decoded, Rejection | UnknownType):
        return decoded.conversation_id
    if isinstance(decoded, Rejection) and decoded.dead_letter_always:
        return decoded
    try:
        addressed = msgspec.json.decode(message.body, type=_Addressed)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    else:
        return addressed.conversation_id
    if isinstance(decoded, UnknownType):
        return Rejection("unknown_type", f"type: unknown {decoded.shown}, and no conversationId")
    return decoded


class _Addressed(msgspec.Struct, frozen=True, rename="camel"):
    conversation_id: str


def with_conversation(message: AbstractIncomingMessage, conversation: str) -> Message:
    """``message`` as a new persistent one whose ``conversation-id`` header is its id."""
    headers = {
        key: value
        for key, value in (message.headers or {}).items()
        if key not in _DROPPED_HEADERS and not isinstance(value, Undecodable)
    }
    headers[CONVERSATION_HEADER] = conversation
    return republished(message, headers)


__all__ = [
    "CONVERSATION_HEADER",
    "MAX_SHARDS",
    "PLUGIN",
    "Broker",
    "Moved",
    "PluginMissing",
    "Refused",
    "Stream",
    "conversation_of",
    "shards_exchange_arguments",
    "streams",
    "with_conversation",
]
