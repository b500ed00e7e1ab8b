"""The test's side of the bus: publishes events and commands, listens to what comes out."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractMessage,
    AbstractQueue,
)

from warmer.bus.topology import COMMAND_ROUTING_KEY, Names

DEFAULT_WAIT_S = 10.0


def header(message: AbstractMessage, name: str) -> Any:
    """The value of header ``name`` (KeyError if absent).

    aio-pika types it as any AMQP field value; the test knows its shape (``x-death``:
    a list of tables) and says so in its asserts.
    """
    return message.headers[name]


class Listener:
    """An exclusive queue bound to one of the worker's outbound exchanges."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self._messages: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def start(self) -> None:
        await self.queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._messages.put_nowait(message)

    async def next(self, timeout: float = DEFAULT_WAIT_S) -> AbstractIncomingMessage:
        """The next message; fails the test when none comes in time."""
        try:
            return await asyncio.wait_for(self._messages.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no message on {self.queue.name} within {timeout} s") from None

    async def next_body(self, timeout: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        """The next message's decoded body."""
        return msgspec.json.decode((await self.next(timeout)).body)  # type: ignore[no-any-return]

    async def until(self, predicate: Any, timeout: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        """Skip messages until one whose body satisfies ``predicate``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            body = await self.next_body(max(left, 0.01))
            if predicate(body):
                return body

    async def nothing(self, within: float = 0.5) -> None:
        """Assert that no message arrives within ``within`` seconds."""
        try:
            message = await asyncio.wait_for(self._messages.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message: {message.body!r}")


class Probe:
    """A connection of the test's own to the worker's namespace."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel, ns: str):
        self.connection = connection
        self.channel = channel
        self.names = Names.of(ns)

    @classmethod
    async def connect(cls, url: str, namespace: str) -> Probe:
        connection = await aio_pika.connect(url)
        channel = await connection.channel(publisher_confirms=True)
        probe = cls(connection, channel, namespace)
        # Publishers may declare exchanges with exactly the contract's arguments.
        for name, kind in probe.names.exchanges():
            await channel.declare_exchange(name, kind, durable=True)
        return probe

    async def close(self) -> None:
        await self.connection.close()

    async def listen(self, exchange: str, routing_key: str = "#") -> Listener:
        """Bind an exclusive queue to ``exchange`` (a name from ``self.names``)."""
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key)
        listener = Listener(queue)
        await listener.start()
        return listener

    async def warms(self) -> Listener:
        """Play the orchestrator: receive warm requests."""
        return await self.listen(self.names.warm)

    async def surfaces(self) -> Listener:
        """Play a dashboard: receive surface updates."""
        return await self.listen(self.names.surface)

    async def event(
        self,
        body: dict[str, Any] | bytes,
        *,
        routing_key: str | None = None,
        content_type: str | None = "application/json",
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish a lifecycle event (routing key = its type unless given)."""
        raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
        if routing_key is None:
            routing_key = body.get("type", "unknown") if isinstance(body, dict) else "unknown"
        exchange = await self.channel.get_exchange(self.names.lifecycle)
        await exchange.publish(
            aio_pika.Message(raw, content_type=content_type, headers=headers or {}),
            routing_key,
        )

    async def send_command(
        self,
        body: dict[str, Any] | bytes,
        *,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = "application/json",
    ) -> None:
        """Publish a command without waiting for a reply."""
        raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
        exchange = await self.channel.get_exchange(self.names.commands)
        await exchange.publish(
            aio_pika.Message(
                raw,
                content_type=content_type,
                reply_to=reply_to,
                correlation_id=correlation_id,
            ),
            COMMAND_ROUTING_KEY,
        )

    async def command(
        self,
        body: dict[str, Any] | bytes,
        *,
        content_type: str | None = "application/json",
        timeout: float = DEFAULT_WAIT_S,
    ) -> dict[str, Any]:
        """Send a command and wait for its reply (matched by correlation id)."""
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        correlation_id = uuid.uuid4().hex
        listener = Listener(queue)
        await listener.start()
        await self.send_command(
            body, reply_to=queue.name, correlation_id=correlation_id, content_type=content_type
        )
        message = await listener.next(timeout)
        assert message.correlation_id == correlation_id
        assert message.content_type == "application/json"
        await queue.delete(if_unused=False, if_empty=False)
        return msgspec.json.decode(message.body)  # type: ignore[no-any-return]

    async def dead_letter(self, timeout: float = DEFAULT_WAIT_S) -> AbstractIncomingMessage:
        """The next message in the dead-letter queue."""
        queue = await self.channel.get_queue(self.names.dead)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                return message
            await asyncio.sleep(0.05)
        raise AssertionError(f"nothing dead-lettered within {timeout} s")

    async def dead_count(self) -> int:
        """How many messages wait in the dead-letter queue."""
        queue = await self.channel.declare_queue(self.names.dead, passive=True)
        return queue.declaration_result.message_count or 0
