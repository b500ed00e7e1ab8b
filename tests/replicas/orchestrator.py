"""A simulated session orchestrator, fast enough never to be what a replica test measures.

It binds a queue of its own to ``{ns}.warm``, answers every ``warm.requested`` at once with a
``warm.completed`` carrying the same token (a full cache read, docs/contract.md), and keeps
a record of every warm: which conversation, which token, which replica published it (the
header ``x-warmer-replica``), when the worker says it published it and when it arrived.

Completions go out in batches: every completion waiting when the sender wakes is published
at once and their confirms awaited together, so a burst of a hundred warms costs one round
of confirms, not a hundred. A sender that fails is not lost: ``check`` raises its error, and
``close`` does too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from warmer.bus.topology import WARM_ROUTING_KEY, Names

REPLICA_HEADER = "x-warmer-replica"


class Warm(msgspec.Struct, frozen=True):
    """One ``warm.requested`` as the orchestrator received it."""

    conversation: str
    token: int
    replica: str | None
    """The publisher's ``x-warmer-replica`` header (None from a worker that sets none)."""
    requested_at: int
    """``requestedAt``: the worker's wall-clock ms when it published."""
    received_ms: float
    """The test process's wall-clock ms when the request arrived."""


class _WarmBody(msgspec.Struct):
    """The fields of a ``warm.requested`` the record keeps (the contract's names)."""

    conversationId: str
    token: int
    requestedAt: int


_decode_warm = msgspec.json.Decoder(_WarmBody).decode


def completion(conversation: str, token: int) -> bytes:
    """The ``warm.completed`` of a warm whose whole prefix was read from the cache."""
    return msgspec.json.encode(
        {
            "type": "warm.completed",
            "conversationId": conversation,
            "token": token,
            "usage": {"inputTokens": 2000, "cacheReadTokens": 2000, "cacheWriteTokens": 0},
        }
    )


class Orchestrator:
    """Answers every warm of a namespace at once and records it (``warms``)."""

    def __init__(self, connection: AbstractConnection, names: Names, *, headers: bool) -> None:
        self._connection = connection
        self._names = names
        self._headers = headers
        self.warms: list[Warm] = []
        self._outbox: asyncio.Queue[Warm] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._channel: AbstractChannel | None = None

    @classmethod
    async def start(cls, amqp_url: str, namespace: str, *, headers: bool = True) -> Orchestrator:
        """Connect, bind, and answer from now on. ``headers=False``: completions go out
        without the ``conversation-id`` header, as from a publisher that never sets it."""
        connection = await aio_pika.connect(amqp_url)
        orchestrator = cls(connection, Names.of(namespace), headers=headers)
        await orchestrator._bind()
        return orchestrator

    async def _bind(self) -> None:
        names = self._names
        listen = await self._connection.channel()
        await listen.set_qos(prefetch_count=1000)
        publish = await self._connection.channel(publisher_confirms=True)
        # Publishers may declare exchanges with exactly the contract's arguments.
        warm = await listen.declare_exchange(names.warm, aio_pika.ExchangeType.TOPIC, durable=True)
        lifecycle = await publish.declare_exchange(
            names.lifecycle, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await listen.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(warm, WARM_ROUTING_KEY)
        self._channel = listen
        self._sender = asyncio.create_task(self._send_forever(lifecycle))
        await queue.consume(self._on_warm, no_ack=True)

    async def _on_warm(self, message: AbstractIncomingMessage) -> None:
        body = _decode_warm(message.body)
        replica = (message.headers or {}).get(REPLICA_HEADER)
        warm = Warm(
            conversation=body.conversationId,
            token=body.token,
            replica=replica.decode() if isinstance(replica, bytes) else replica,  # type: ignore[arg-type]
            requested_at=body.requestedAt,
            received_ms=time.time() * 1000,
        )
        self.warms.append(warm)
        self._outbox.put_nowait(warm)

    async def _send_forever(self, lifecycle: aio_pika.abc.AbstractExchange) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            await asyncio.gather(*(self._complete(lifecycle, warm) for warm in batch))

    async def _complete(self, lifecycle: aio_pika.abc.AbstractExchange, warm: Warm) -> None:
        headers: dict[str, Any] = {"conversation-id": warm.conversation} if self._headers else {}
        message = aio_pika.Message(
            completion(warm.conversation, warm.token),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,
        )
        await lifecycle.publish(message, "warm.completed")

    def check(self) -> None:
        """Raise what stopped the sender, if it stopped."""
        assert self._sender is not None
        if self._sender.done():
            self._sender.result()
            raise AssertionError("the orchestrator's sender stopped")

    async def close(self) -> None:
        """Stop answering; raise what stopped the sender, if it failed before."""
        assert self._sender is not None
        sender = self._sender
        failed = sender.exception() if sender.done() and not sender.cancelled() else None
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await self._connection.close()
        if failed is not None:
            raise failed
