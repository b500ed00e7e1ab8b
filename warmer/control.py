"""The client side of the bus for the operator's verbs: commands, events, dead letters.

`warmer state | enable | disable | interval | policy | send | dead` talk to a running worker
the way any other client does (docs/contract.md): a command goes to ``<ns>.commands`` with a
``reply_to`` queue of our own and a ``correlation_id``, an event to ``<ns>.lifecycle``,
and dead letters are read from ``<ns>.dead`` without being consumed. Nothing here
declares the worker's queues: its exchanges and the dead queue are only checked passively.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from typing import Any, Final

import aio_pika
import aiormq
import msgspec
from aio_pika import DeliveryMode, Message
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import DeliveryError, PublishError

from warmer.bus import lenient
from warmer.bus.deadletter import (
    ERROR,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    REASON,
    republished,
)
from warmer.bus.lenient import Undecodable
from warmer.bus.topology import COMMAND_ROUTING_KEY, Names
from warmer.config import mask_password
from warmer.contract import LifecycleEvent

__all__ = [
    "BrokerUnreachable",
    "Control",
    "ControlError",
    "DeadLetter",
    "DeadLetters",
    "Kept",
    "NamespaceMissing",
    "NoAnswer",
    "NotDelivered",
    "Replay",
]

CONNECT_TIMEOUT_S: Final = 10.0
CONVERSATION_HEADER: Final = "conversation-id"
_SETTLE_S: Final = 2.0
# What the worker and the broker add when they dead-letter a message; a replay drops them
# so the message goes out as it first came in (the worker adds fresh ones if it fails again).
_DEAD_LETTER_HEADER_PREFIXES: Final = (
    "x-warmer-",
    "x-death",
    "x-first-death-",
    "x-last-death-",
    "x-delivery-count",
)


class ControlError(Exception):
    """The bus could not do what a verb asked; the message says why, on one line."""


class BrokerUnreachable(ControlError):
    """No connection to the broker, or it was lost on the way."""


class NamespaceMissing(ControlError):
    """An exchange or queue of the namespace does not exist: no worker ever declared it."""


class NoAnswer(ControlError):
    """No worker answered a command in time."""


class NotDelivered(ControlError):
    """The broker did not take a publish: nothing routes it, or it was refused."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One message of ``<ns>.dead`` and why it is there."""

    position: int
    """1 for the oldest."""
    body: bytes
    content_type: str | None
    reason: str | None
    """``x-warmer-reason``: the contract's code, when the worker dead-lettered it."""
    error: str | None
    """``x-warmer-error``: what was wrong, one line."""
    exchange: str | None
    """Where it was first published: ``x-warmer-original-exchange``, else ``x-death``'s."""
    routing_key: str | None
    death_reason: str | None
    """``x-death``'s reason (``delivery_limit``, ``rejected``, ``expired``) when the broker
    dead-lettered it."""

    @property
    def replayable(self) -> bool:
        """True when it says where it came from, so a replay knows where to send it."""
        return self.exchange is not None and self.routing_key is not None


class DeadLetters(msgspec.Struct, frozen=True, kw_only=True):
    """The first dead letters of the queue, oldest first, and how many it holds."""

    queue: str
    total: int
    letters: list[DeadLetter]


class Kept(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter a replay left in the queue, and why."""

    letter: DeadLetter
    why: str


class Replay(msgspec.Struct, frozen=True, kw_only=True):
    """What a replay re-published (and removed from the queue) and what it kept."""

    queue: str
    replayed: list[DeadLetter]
    kept: list[Kept]


class _Held:
    """Dead letters fetched and not yet settled; counts those acked."""

    def __init__(self) -> None:
        self.messages: list[AbstractIncomingMessage] = []
        self.acked = 0

    async def ack(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self.acked += 1


class Control:
    """One connection to the broker, speaking to the worker of one namespace."""

    def __init__(
        self, connection: AbstractConnection, channel: AbstractChannel, namespace: str, url: str
    ) -> None:
        """Use `Control.connect`; ``url`` is shown in messages, its password masked."""
        self._connection = connection
        self._channel = channel
        self._namespace = namespace
        self._names = Names.of(namespace)
        self._url = url

    @classmethod
    async def connect(
        cls, url: str, namespace: str, *, timeout: float = CONNECT_TIMEOUT_S
    ) -> Control:
        """Connect to the broker at ``url`` for the worker of ``namespace``."""
        # Dead letters may carry properties pamqp cannot decode: read them, do not drop.
        lenient.install()
        shown = mask_password(url)
        try:
            connection = await asyncio.wait_for(
                aio_pika.connect(
                    url, client_properties={"connection_name": f"warmer cli {namespace}"}
                ),
                timeout,
            )
        except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
            raise BrokerUnreachable(
                f"cannot reach RabbitMQ at {shown} ({_reason(exc)}): start a broker "
                "or set WARMER_AMQP_URL"
            ) from exc
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        return cls(connection, channel, namespace, shown)

    answered_by: str | None = None
    """The replica that answered the last command (its ``x-warmer-replica``), if it said."""

    async def close(self) -> None:
        """Close the connection; what was read and not settled goes back to its queue."""
        with suppress(aiormq.exceptions.AMQPError, OSError):
            await self._connection.close()

    async def command(
        self, body: dict[str, Any], *, timeout: float, expire: bool = True
    ) -> dict[str, Any]:
        """Send a command and return the worker's reply (ok or not); NoAnswer after ``timeout``.

        With ``expire`` the command expires in the queue after ``timeout``: one nobody took
        in time is dead-lettered (``x-death`` reason ``expired``), where an operator sees
        it, instead of applied later. A read (``get_state``) has nothing to apply late.
        """
        async with self._translated():
            exchange = await self._exchange(self._names.commands)
            replies = await self._channel.declare_queue(exclusive=True, auto_delete=True)
            correlation_id = uuid.uuid4().hex
            answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

            async def on_reply(message: AbstractIncomingMessage) -> None:
                # Replies are at least once: keep the first one that is ours.
                if message.correlation_id == correlation_id and not answer.done():
                    replica = (message.headers or {}).get("x-warmer-replica")
                    self.answered_by = replica if isinstance(replica, str) else None
                    answer.set_result(message.body)

            await replies.consume(on_reply, no_ack=True)
            message = Message(
                msgspec.json.encode(body),
                content_type="application/json",
                reply_to=replies.name,
                correlation_id=correlation_id,
                expiration=timedelta(seconds=timeout) if expire else None,
            )
            await self._publish(exchange, message, COMMAND_ROUTING_KEY, what="the command")
            try:
                raw = await asyncio.wait_for(answer, timeout)
            except TimeoutError:
                raise NoAnswer(
                    f"no worker answered within {timeout:g} s: is `warmer run` running with "
                    f"WARMER_NAMESPACE={self._namespace} on {self._url}?"
                ) from None
        try:
            reply = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ControlError(f"the worker's reply is not JSON: {exc}") from None
        if not isinstance(reply, dict):
            raise ControlError("the worker's reply is not a JSON object")
        return reply

    async def send(self, event: LifecycleEvent, body: bytes) -> None:
        """Publish ``body`` (the JSON of ``event``) as a lifecycle event, confirmed."""
        async with self._translated():
            exchange = await self._exchange(self._names.lifecycle)
            message = Message(
                body,
                content_type="application/json",
                delivery_mode=DeliveryMode.PERSISTENT,
                headers={CONVERSATION_HEADER: event.conversation_id},
            )
            routing_key = str(event.__struct_config__.tag)
            await self._publish(exchange, message, routing_key, what="the event")

    async def dead_count(self) -> int:
        """How many dead letters wait in ``<ns>.dead``."""
        async with self._translated():
            queue = await self._dead_queue()
            return queue.declaration_result.message_count or 0

    async def dead_letters(self, *, limit: int | None = None) -> DeadLetters:
        """The first ``limit`` (default all) dead letters, oldest first; all stay queued.

        The whole queue is read (and put back) to keep its order: see ``_held``.
        """
        async with self._translated(), self._held() as held:
            shown = held.messages[:limit]
            letters = [_letter(i, message) for i, message in enumerate(shown, 1)]
            total = len(held.messages)
        return DeadLetters(queue=self._names.dead, total=total, letters=letters)

    async def replay(self, count: int | None = None) -> Replay:
        """Re-publish the oldest ``count`` (default all) dead letters where they came from.

        Each goes to its original exchange and routing key without the dead-lettering
        headers, and leaves the dead queue only once the broker confirmed the replay.
        One that says nowhere where it came from, or that nothing routes, stays.
        """
        replayed: list[DeadLetter] = []
        kept: list[Kept] = []
        async with self._translated(), self._held() as held:
            chosen = held.messages[:count]
            going: list[tuple[DeadLetter, AbstractIncomingMessage, AbstractExchange]] = []
            for position, message in enumerate(chosen, 1):
                letter = _letter(position, message)
                destination = await self._destination(letter)
                if isinstance(destination, str):
                    kept.append(Kept(letter=letter, why=destination))
                else:
                    going.append((letter, message, destination))
            # What stays goes back first, in order: a replay that fails again is
            # dead-lettered anew and must land behind it, not before.
            leaving = {id(message) for _, message, _ in going}
            for message in held.messages:
                if id(message) not in leaving:
                    await message.reject(requeue=True)
            for letter, message, exchange in going:
                why = await self._replay_one(letter, message, exchange, held)
                if why is None:
                    replayed.append(letter)
                else:
                    kept.append(Kept(letter=letter, why=why))
        kept.sort(key=lambda item: item.letter.position)
        return Replay(queue=self._names.dead, replayed=replayed, kept=kept)

    async def purge(self) -> int:
        """Delete every dead letter of ``<ns>.dead``; how many were deleted."""
        async with self._translated():
            queue = await self._dead_queue()
            result = await queue.purge()
            return int(result.message_count or 0)

    # -- helpers --------------------------------------------------------------------

    async def _destination(self, letter: DeadLetter) -> AbstractExchange | str:
        """The exchange ``letter`` came from, or why it cannot go back there."""
        if letter.exchange is None or letter.routing_key is None:
            return "it does not say which exchange and routing key it came from"
        if letter.exchange == "":
            return self._channel.default_exchange
        if not await self._exchange_exists(letter.exchange):
            return f"exchange {letter.exchange!r} does not exist"
        return await self._channel.get_exchange(letter.exchange, ensure=False)

    async def _replay_one(
        self,
        letter: DeadLetter,
        message: AbstractIncomingMessage,
        exchange: AbstractExchange,
        held: _Held,
    ) -> str | None:
        """Replay one dead letter, then ack it; None when done, else why it stays."""
        assert letter.routing_key is not None  # checked by _destination
        try:
            await exchange.publish(_replayed(message), letter.routing_key, mandatory=True)
        except PublishError:
            why = f"nothing is bound to {letter.exchange!r} for {letter.routing_key!r}"
        except DeliveryError:
            why = "the broker refused it (negative confirm: a queue full?)"
        else:
            await held.ack(message)
            return None
        await message.reject(requeue=True)
        return why

    @asynccontextmanager
    async def _held(self) -> AsyncIterator[_Held]:
        """Every dead letter the queue held at the start, oldest first, fetched, not settled.

        Whatever the caller did not ack goes back on exit, in order. The whole queue is
        read each time because a quorum queue before RabbitMQ 4.0 puts what comes back at
        its end: putting back only the first few would move them behind the others. (A
        dead letter that arrives meanwhile still ends up before them on such a broker.)
        Only what the queue held at the start is read: a replayed letter that fails again
        comes back behind it and is not read twice.
        """
        queue = await self._dead_queue()
        total = queue.declaration_result.message_count or 0
        held = _Held()
        try:
            while len(held.messages) < total:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                held.messages.append(message)
            yield held
        finally:
            # With the channel gone, the broker has already put them back (in order).
            with suppress(
                aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError
            ):
                for message in held.messages:
                    if not message.processed:
                        await message.reject(requeue=True)
                await self._until_ready(len(held.messages) - held.acked)

    async def _until_ready(self, count: int) -> None:
        """Wait (briefly) until the dead queue shows ``count`` ready again.

        A quorum queue applies a return after the reject went out: without this wait the
        next command could find the dead letters still out, and list none.
        """
        deadline = asyncio.get_running_loop().time() + _SETTLE_S
        while asyncio.get_running_loop().time() < deadline:
            queue = await self._dead_queue()
            if (queue.declaration_result.message_count or 0) >= count:
                return
            await asyncio.sleep(0.01)

    async def _dead_queue(self) -> AbstractQueue:
        try:
            return await self._channel.declare_queue(self._names.dead, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise self._missing("queue", self._names.dead) from None

    async def _exchange(self, name: str) -> AbstractExchange:
        try:
            return await self._channel.get_exchange(name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise self._missing("exchange", name) from None

    async def _exchange_exists(self, name: str) -> bool:
        # A failed passive declare closes its channel: check on one of its own, so the
        # dead letters held on the main channel stay held.
        channel = await self._connection.channel()
        try:
            await channel.get_exchange(name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            with suppress(aiormq.exceptions.AMQPError):
                await channel.close()
        return True

    async def _publish(
        self, exchange: AbstractExchange, message: Message, routing_key: str, *, what: str
    ) -> None:
        try:
            await exchange.publish(message, routing_key, mandatory=True)
        except PublishError:
            raise NotDelivered(
                f"the broker could not route {what}: no queue is bound to {exchange.name!r} "
                f"for {routing_key!r} (`warmer run` declares the namespace's topology)"
            ) from None
        except DeliveryError:
            raise NotDelivered(
                f"the broker refused {what} (negative confirm: is the queue full?)"
            ) from None

    def _missing(self, kind: str, name: str) -> NamespaceMissing:
        return NamespaceMissing(
            f"{kind} {name!r} does not exist on {self._url}: has `warmer run` ever run with "
            f"WARMER_NAMESPACE={self._namespace} on this broker?"
        )

    @asynccontextmanager
    async def _translated(self) -> AsyncIterator[None]:
        """A lost connection as BrokerUnreachable, other broker errors as ControlError."""
        try:
            yield
        except (ConnectionError, aiormq.exceptions.ChannelInvalidStateError) as exc:
            raise BrokerUnreachable(
                f"lost the connection to RabbitMQ at {self._url} ({_reason(exc)})"
            ) from exc
        except aiormq.exceptions.AMQPError as exc:
            raise ControlError(f"the broker refused: {_reason(exc)}") from exc


def _letter(position: int, message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    death = _first_death(headers.get("x-death"))
    exchange = _text(headers.get(ORIGINAL_EXCHANGE))
    routing_key = _text(headers.get(ORIGINAL_ROUTING_KEY))
    if exchange is None and death is not None:
        exchange = _text(death.get("exchange"))
        keys = death.get("routing-keys")
        routing_key = _text(keys[0]) if isinstance(keys, list) and keys else None
    return DeadLetter(
        position=position,
        body=message.body,
        content_type=message.content_type,
        reason=_text(headers.get(REASON)),
        error=_text(headers.get(ERROR)),
        exchange=exchange,
        routing_key=routing_key,
        death_reason=_text(death.get("reason")) if death is not None else None,
    )


def _first_death(value: object) -> dict[str, Any] | None:
    """The latest entry of ``x-death`` (the broker puts it first), if any."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[0]
    return None


def _text(value: object) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _replayed(message: AbstractIncomingMessage) -> Message:
    """``message`` as it was first published: no dead-lettering headers, persistent."""
    headers = {
        key: value
        for key, value in (message.headers or {}).items()
        if not key.startswith(_DEAD_LETTER_HEADER_PREFIXES) and not isinstance(value, Undecodable)
    }
    return republished(message, headers)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
