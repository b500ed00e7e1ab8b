"""A robust channel and its aiormq channel, faked down to the frames the publisher writes.

The publisher's fast path (``warmer.bus.wire``) registers confirms in the aiormq
channel's bookkeeping and puts framed bytes on the connection's write queue; this fake
has the same attributes, parses each write back into messages with pamqp (so the tests
read what would have gone on the wire), and settles each message's confirm with what
``broker(message)`` does: returns (confirmed), raises (the confirm fails so), or never
returns (no confirm comes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pamqp.frame
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

FRAME_MAX = 131_072


class Sent:
    """One message as parsed from the frames written."""

    def __init__(self, method: spec.Basic.Publish, header: ContentHeader, body: bytes) -> None:
        self.exchange = method.exchange
        self.routing_key = method.routing_key
        self.mandatory = method.mandatory
        self.properties: spec.Basic.Properties = header.properties
        self.body = body

    @property
    def expiration(self) -> str | None:
        return self.properties.expiration

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def headers(self) -> dict[str, Any] | None:
        return self.properties.headers


Broker = Callable[[Sent], Awaitable[object]]
"""Settles a message's confirm: what it returns (None: a basic.ack) or raises."""


def parse(payload: bytes) -> list[Sent]:
    """The messages in a write: method, content header, body frames, each in turn."""
    frames = []
    while payload:
        consumed, _, frame = pamqp.frame.unmarshal(payload)
        frames.append(frame)
        payload = payload[consumed:]
    sent: list[Sent] = []
    i = 0
    while i < len(frames):
        method, header = frames[i], frames[i + 1]
        assert isinstance(method, spec.Basic.Publish) and isinstance(header, ContentHeader)
        i += 2
        body = b""
        while len(body) < header.body_size:
            chunk = frames[i]
            assert isinstance(chunk, ContentBody)
            body += chunk.value
            i += 1
        sent.append(Sent(method, header, body))
    return sent


class WriteQueue:
    """The connection's write queue: each entry parsed and handed to the broker."""

    def __init__(self, underlay: Underlay) -> None:
        self.underlay = underlay
        self.entries = 0
        self.payloads: list[bytes] = []

    def full(self) -> bool:
        return False

    def put_nowait(self, entry: ChannelFrame) -> None:
        self.entries += 1
        self.payloads.append(entry.payload)
        for message in parse(entry.payload):
            self.underlay.received(message)

    async def put(self, entry: ChannelFrame) -> None:
        self.put_nowait(entry)


class Underlay:
    """aiormq's channel as the wire uses it, and its connection."""

    def __init__(self, broker: Broker, number: int = 1) -> None:
        self.broker = broker
        self.number = number
        self.is_closed = False
        self.delivery_tag = 0
        self.confirmations: dict[int, asyncio.Future[Any]] = {}
        self.message_id_delivery_tag: dict[str, int] = {}
        self.published: list[Sent] = []
        self._seen = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.closes = 0
        self.connection = SimpleNamespace(
            connection_tune=SimpleNamespace(frame_max=FRAME_MAX),
            write_queue=WriteQueue(self),
            is_closed=False,
            close=self._close_connection,
        )

    async def _close_connection(self, cause: BaseException) -> None:
        self.closes += 1

    @property
    @asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def received(self, message: Sent) -> None:
        self._seen += 1
        future = self.confirmations.pop(self._seen)
        task = asyncio.get_running_loop().create_task(self._settle(message, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, message: Sent, future: asyncio.Future[Any]) -> None:
        tag = self._seen
        try:
            result = await self.broker(message)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        self.published.append(message)
        if not future.done():
            future.set_result(spec.Basic.Ack(delivery_tag=tag) if result is None else result)


class Robust:
    """aio-pika's robust channel: its underlying channel, ready again when asked."""

    def __init__(
        self,
        underlay: Underlay,
        *,
        closed: bool = False,
        on_ready: Callable[[], None] = lambda: None,
    ) -> None:
        self.underlay = underlay
        self.is_closed = closed
        self.on_ready = on_ready
        """Called as the channel is back (an outage's time passing, say)."""

    async def get_underlay_channel(self) -> Underlay:
        return self.underlay

    async def ready(self) -> None:
        self.on_ready()
        self.is_closed = False
