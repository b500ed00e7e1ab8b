"""The test's publisher of commands and lifecycle events, in bulk.

Hundreds of commands with replies would cost hundreds of reply queues through
``Probe.command``; here one exclusive reply queue serves them all, replies are matched by
``correlation_id``, and publishes go out together with their confirms awaited as one batch.
``headers=False`` publishes as a client that never sets ``conversation-id`` (the replicas
must still route it to the owner).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import aio_pika
import msgspec
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage

from warmer.bus.topology import COMMAND_ROUTING_KEY, Names

Body = dict[str, Any]


class Requester:
    """Sends commands (replies matched by correlation id) and lifecycle events."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._pending: dict[str, asyncio.Future[Body]] = {}
        self._reply_to = ""
        self._commands: AbstractExchange | None = None
        self._lifecycle: AbstractExchange | None = None

    @classmethod
    async def connect(cls, amqp_url: str, namespace: str) -> Requester:
        """A requester on a connection of its own, ready to send."""
        requester = cls(await aio_pika.connect(amqp_url))
        await requester._declare(Names.of(namespace))
        return requester

    async def _declare(self, names: Names) -> None:
        channel = await self._connection.channel(publisher_confirms=True)
        self._commands = await channel.declare_exchange(
            names.commands, aio_pika.ExchangeType.DIRECT, durable=True
        )
        self._lifecycle = await channel.declare_exchange(
            names.lifecycle, aio_pika.ExchangeType.TOPIC, durable=True
        )
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        self._reply_to = replies.name
        await replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():  # a duplicate reply: the first counts
            future.set_result(msgspec.json.decode(message.body))

    async def commands(
        self, bodies: Iterable[Body], *, headers: bool = True, timeout: float = 20.0
    ) -> list[Body]:
        """Send every command at once; their replies, in the same order."""
        assert self._commands is not None
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Body]] = []
        publishes = []
        for body in bodies:
            correlation_id = uuid.uuid4().hex
            future: asyncio.Future[Body] = loop.create_future()
            self._pending[correlation_id] = future
            futures.append(future)
            message = aio_pika.Message(
                msgspec.json.encode(body),
                content_type="application/json",
                reply_to=self._reply_to,
                correlation_id=correlation_id,
                headers=_headers(body, headers),
            )
            publishes.append(self._commands.publish(message, COMMAND_ROUTING_KEY))
        await asyncio.gather(*publishes)
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
        except TimeoutError:
            # wait_for cancelled the gather, and with it every future not yet answered.
            missing = sum(1 for f in futures if f.cancelled() or not f.done())
            raise AssertionError(f"{missing} of {len(futures)} commands unanswered") from None

    async def events(self, bodies: Iterable[Body], *, headers: bool = True) -> None:
        """Publish lifecycle events (routing key = their type), persistent, confirmed."""
        assert self._lifecycle is not None
        await asyncio.gather(
            *(
                self._lifecycle.publish(
                    aio_pika.Message(
                        msgspec.json.encode(body),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        headers=_headers(body, headers),
                    ),
                    body["type"],
                )
                for body in bodies
            )
        )

    async def states(
        self, conversations: Iterable[str], *, headers: bool = True
    ) -> dict[str, Body]:
        """``get_state`` of each conversation: its reply's ``state``."""
        ids = list(conversations)
        replies = await self.commands(
            ({"type": "get_state", "conversationId": cid} for cid in ids), headers=headers
        )
        for cid, reply in zip(ids, replies, strict=True):
            assert reply.get("ok") is True, (cid, reply)
        return {cid: reply["state"] for cid, reply in zip(ids, replies, strict=True)}

    async def opt_in(
        self, conversations: Iterable[str], interval_ms: int, *, headers: bool = True
    ) -> None:
        """Make each conversation warm every ``interval_ms``, idle after a turn.

        The interval first, then the enable (which arms), then a turn that starts and
        settles (which re-arms from the settle): in the end each is enabled, idle and armed,
        whatever order the two queues' messages are applied in.
        """
        ids = list(conversations)
        intervals = await self.commands(
            (
                {"type": "set_interval", "conversationId": cid, "intervalMs": interval_ms}
                for cid in ids
            ),
            headers=headers,
        )
        enables = await self.commands(
            ({"type": "set_enabled", "conversationId": cid, "enabled": True} for cid in ids),
            headers=headers,
        )
        for reply in intervals + enables:
            assert reply.get("ok") is True, reply
            assert reply["settings"]["intervalMs"] == interval_ms, reply
        assert all(reply["settings"]["enabled"] is True for reply in enables), enables
        await self.events(
            (
                event
                for cid in ids
                for event in (
                    {"type": "turn.started", "conversationId": cid, "seq": 1},
                    {"type": "turn.settled", "conversationId": cid, "seq": 2},
                )
            ),
            headers=headers,
        )

    async def close(self) -> None:
        await self._connection.close()


def _headers(body: Body, headers: bool) -> dict[str, Any]:
    return {"conversation-id": body["conversationId"]} if headers else {}
