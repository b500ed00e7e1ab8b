"""A loop turn's publishes on an aiormq channel, written with one socket write.

aiormq's ``basic_publish`` takes the channel lock, starts a timeout, marshals, and puts
one entry on the connection's write queue per publish, which its writer writes and
drains one by one. ``Wire.send`` instead takes a publish already framed
(``warmer.bus.frames``) and holds it until the end of the loop turn; then every
publish of the turn on a channel goes out as one entry of the write queue, so one
``transport.write``: a batch's surface updates and replies (the pipeline starts them
together) and the warm requests of the timers that fell due together.

Confirms stay aiormq's: under the channel's own lock (so no ``basic_publish`` of
aiormq's takes a delivery tag between ours and writes out of order) each publish gets
the channel's next delivery tag and a future in ``channel.confirmations``, which
aiormq's reader resolves as it does its own: the ``basic.ack`` frame, ``DeliveryError``
on a ``basic.nack``, the returned message for a mandatory publish the broker could not
route (its message id is registered for that, as aiormq does). The futures are the
channel's (``create_future``), so a channel or connection that closes rejects them with
its reason, as it rejects aiormq's own: the caller sees what it saw before. The write
queue entry is never split, so another writer's frames never interleave with a
publish's content frames.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiormq.abc import ChannelFrame
from aiormq.channel import Channel
from aiormq.exceptions import ChannelInvalidStateError

from warmer.bus.pinned import check_pinned
from warmer.observe.log import get_logger

log = get_logger(__name__)

PINNED: Final = {"aiormq": "7.2."}
"""The aiormq whose channel bookkeeping this shares (``lock``, ``delivery_tag``,
``confirmations``, ``message_id_delivery_tag``, the connection's ``write_queue``)."""


class _Outgoing:
    """One framed publish waiting for its loop turn's write."""

    __slots__ = ("future", "message_id", "payload")

    def __init__(self, payload: bytes, future: asyncio.Future[Any], message_id: str | None):
        self.payload = payload
        self.future = future
        self.message_id = message_id


class Wire:
    """Publishes framed messages on aiormq channels, a loop turn's together."""

    def __init__(self) -> None:
        check_pinned(PINNED, "warmer.bus.wire")
        self._pending: dict[Channel, list[_Outgoing]] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self.writes = 0
        """Write-queue entries made (each one socket write): for the tests and figures."""

    def send(
        self, channel: Channel, payload: bytes, *, returnable: str | None = None
    ) -> asyncio.Future[Any]:
        """Publish ``payload`` (a ``publish_frames`` for this channel's number and
        frame_max) at the end of this loop turn; the future of its confirm.

        ``returnable``: the message id of a mandatory publish, by which aiormq matches a
        ``basic.return`` to it. Cancelling the future before the write withdraws it.
        """
        if channel.is_closed:
            raise ChannelInvalidStateError(f"{channel!r} closed")
        future = channel.create_future()
        pending = self._pending.get(channel)
        if pending is None:
            if not self._pending:
                asyncio.get_running_loop().call_soon(self._flush)
            pending = self._pending[channel] = []
        pending.append(_Outgoing(payload, future, returnable))
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        loop = asyncio.get_running_loop()
        for channel, outgoing in pending.items():
            task = loop.create_task(self._write(channel, outgoing))
            self._writes.add(task)
            task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("publish_write_failed", exc_info=exc)

    async def _write(self, channel: Channel, outgoing: list[_Outgoing]) -> None:
        """Tag, register and write ``outgoing`` under the channel's lock, in one entry."""
        try:
            async with channel.lock:  # ChannelInvalidStateError once closed
                self._tag_and_write(channel, outgoing)
                if not outgoing:
                    return
                entry = ChannelFrame(
                    payload=b"".join(o.payload for o in outgoing),
                    should_close=False,
                    drain_future=channel.create_future(),  # the writer drains once per entry
                )
                write_queue = channel.connection.write_queue
                try:
                    if write_queue.full():
                        await write_queue.put(entry)
                    else:
                        write_queue.put_nowait(entry)
                except BaseException:
                    self._untag(channel, outgoing)
                    raise
                self.writes += 1
        except BaseException as exc:
            for o in outgoing:
                if not o.future.done():
                    o.future.set_exception(
                        exc if isinstance(exc, Exception) else ChannelInvalidStateError(repr(exc))
                    )
            if not isinstance(exc, Exception):
                raise

    @staticmethod
    def _tag_and_write(channel: Channel, outgoing: list[_Outgoing]) -> None:
        """Give each publish still wanted the channel's next delivery tag and register its
        confirm as aiormq does; drop from ``outgoing`` those withdrawn (cancelled)."""
        kept = [o for o in outgoing if not o.future.done()]
        outgoing[:] = kept
        confirmations = channel.confirmations
        for o in kept:
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            confirmations[tag] = o.future
            if o.message_id is not None:
                channel.message_id_delivery_tag[o.message_id] = tag
                o.future.add_done_callback(_forget(channel, o.message_id, tag))

    @staticmethod
    def _untag(channel: Channel, outgoing: list[_Outgoing]) -> None:
        """Undo ``_tag_and_write`` for a write that did not happen (lock still held)."""
        for o in reversed(outgoing):
            tag = channel.delivery_tag
            channel.delivery_tag -= 1
            channel.confirmations.pop(tag, None)
            returnable = channel.message_id_delivery_tag
            if o.message_id is not None and returnable.get(o.message_id) == tag:
                returnable.pop(o.message_id)


def _forget(channel: Channel, message_id: str, tag: int) -> Any:
    def forget(_: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            channel.message_id_delivery_tag.pop(message_id)

    return forget


__all__ = ["PINNED", "Wire"]
