"""An in-memory bus for the pipeline's unit tests: deliveries on channels, a publisher.

``MemoryChannel`` keeps AMQP's acknowledgement rules: delivery tags grow per channel, an
acknowledgement with ``multiple`` settles every unsettled delivery up to its tag, settling
one twice or on a closed channel is an error (as the broker would close the channel).
``MemoryOutbound`` records what was published and raises what a test queues for it, or
holds a publish's confirm back until it is cancelled (a connection that went silent).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec

from warmer.bus.port import ChannelGone
from warmer.contract import Rejection, Reply, SurfaceChanged, WarmRequested


class MemoryChannel:
    """A consumer channel: hands out delivery tags and records how each was settled."""

    def __init__(self, name: str = "channel") -> None:
        self.name = name
        self.is_closed = False
        self.settled: dict[int, str] = {}
        """Delivery tag -> "ack", "reject" or "requeue"."""
        self.frames: list[tuple[str, int, bool]] = []
        """Every settlement as sent: (method, tag, multiple or requeue)."""
        self.refuse: set[str] = set()
        """Methods ("ack", "reject") whose frames cannot be sent (ConnectionError), the
        channel staying open."""
        self._next_tag = 0

    def deliver(self, body: dict[str, Any] | bytes, **properties: Any) -> MemoryDelivery:
        """A new delivery on this channel."""
        self._next_tag += 1
        raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
        return MemoryDelivery(self, self._next_tag, raw, **properties)

    def close(self) -> None:
        """The channel went away: nothing on it can be settled any more."""
        self.is_closed = True

    def outcome(self, delivery: MemoryDelivery) -> str | None:
        """How ``delivery`` was settled, None while it is not."""
        return self.settled.get(delivery.delivery_tag)

    def _settle(self, tag: int, how: str, multiple: bool) -> None:
        if self.is_closed:
            raise ChannelGone(f"{self.name} is closed")
        if ("ack" if how == "ack" else "reject") in self.refuse:
            raise ConnectionError(f"{self.name}: the {how} frame could not be sent")
        if tag in self.settled or tag > self._next_tag:
            raise AssertionError(
                f"delivery tag {tag} settled twice or unknown: the broker "
                "would close the channel (PRECONDITION_FAILED)"
            )
        tags = range(1, tag + 1) if multiple else (tag,)
        for each in tags:
            self.settled.setdefault(each, how)


class MemoryDelivery:
    """A delivery as the pipeline reads it."""

    def __init__(
        self,
        channel: MemoryChannel,
        tag: int,
        body: bytes,
        *,
        content_type: str | None = "application/json",
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        routing_key: str = "key",
        reply_to: str | None = None,
        correlation_id: str | None = None,
        message_id: str | None = None,
    ) -> None:
        self._channel = channel
        self.delivery_tag = tag
        self.body = body
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers = headers or {}
        self.routing_key = routing_key
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.message_id = message_id
        self.user_id: str | None = None
        self.exchange = "exchange"

    @property
    def channel(self) -> MemoryChannel:
        """The channel; ChannelGone once it is closed."""
        if self._channel.is_closed:
            raise ChannelGone(f"{self._channel.name} is closed")
        return self._channel

    async def ack(self, multiple: bool = False) -> None:
        """Acknowledge (with ``multiple``, every unsettled one up to this tag)."""
        self._channel.frames.append(("ack", self.delivery_tag, multiple))
        self._channel._settle(self.delivery_tag, "ack", multiple)

    async def reject(self, requeue: bool = False) -> None:
        """Reject: back to the queue (``requeue``) or to its dead-lettering."""
        self._channel.frames.append(("reject", self.delivery_tag, requeue))
        self._channel._settle(self.delivery_tag, "requeue" if requeue else "reject", False)


class MemoryOutbound:
    """The publisher's interface, in memory; ``fail[kind]`` lists what its next calls raise,
    ``hold[kind]`` how many of its next calls never see their confirm (until cancelled)."""

    def __init__(self) -> None:
        self.surfaces: list[SurfaceChanged] = []
        self.warms: list[WarmRequested] = []
        self.replies: list[tuple[str, str | None, Reply]] = []
        self.dead_letters: list[tuple[Any, Rejection]] = []
        self.fail: dict[str, list[BaseException]] = {}
        self.hold: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.resets: list[str] = []
        """Why each ``reset`` was asked for, in order."""
        self.on_reset: Callable[[], None] | None = None
        """What a reset does besides being recorded (a test closes its channels)."""
        self.routed = True
        self.closing = False

    async def _attempt(self, kind: str) -> None:
        self.calls[kind] += 1
        queued = self.fail.get(kind)
        if queued:
            raise queued.pop(0)
        if self.hold[kind] > 0:
            self.hold[kind] -= 1
            await asyncio.get_running_loop().create_future()  # the confirm never comes

    async def surface(self, update: SurfaceChanged) -> None:
        """Record a surface update."""
        await self._attempt("surface")
        self.surfaces.append(update)

    async def warm(
        self, request: WarmRequested, timeout_ms: int, still_wanted: Callable[[], bool]
    ) -> bool:
        """Record a warm request; returns ``routed``."""
        await self._attempt("warm")
        self.warms.append(request)
        return self.routed

    async def reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        """Record a reply."""
        await self._attempt("reply")
        self.replies.append((reply_to, correlation_id, reply))

    async def dead_letter(self, incoming: Any, rejection: Rejection) -> None:
        """Record a dead letter."""
        await self._attempt("dead_letter")
        self.dead_letters.append((incoming, rejection))

    async def reset(self, why: str) -> None:
        """Record the reset; ``on_reset`` plays what the broker does then."""
        self.resets.append(why)
        if self.on_reset is not None:
            self.on_reset()


__all__ = ["MemoryChannel", "MemoryDelivery", "MemoryOutbound"]
