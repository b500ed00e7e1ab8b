"""Reading frames from the socket a buffer at a time instead of three reads a frame.

aiormq's ``FrameReceiver`` reads each frame with three ``readexactly`` calls (its first
byte, the rest of its header, its payload) under a lock, into a ``BytesIO``: about a
quarter of the worker's time in the pass-through profile once publishing was cheap
(BENCHMARKS.md), for three frames a delivery and one a confirm. ``BufferedFrameReceiver``
reads whatever the socket has (up to ``CHUNK`` bytes) and hands out every whole frame in
it without awaiting; frames are still decoded by pamqp, and every error is the one
aiormq's receiver raises in the same case (a peer that sends a protocol header, a frame
that does not decode, a connection cut mid-frame, an end of stream between frames).

``install()`` makes aiormq's connections use it (``aiormq.connection.FrameReceiver`` is
what ``Connection.connect`` instantiates): aio-pika still makes, watches and restores the
connections, and aiormq still dispatches every frame.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final, TypeVar

import aiormq.connection
import pamqp.frame
from aiormq.connection import ReceivedFrame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands as spec
from pamqp.exceptions import PAMQPException

from warmer.bus.pinned import check_pinned

PINNED: Final = {"aiormq": "7.2.", "pamqp": "4.0."}
"""The versions whose receiver this one stands in for; ``install()`` refuses others."""
CHUNK: Final = 256 * 1024
"""At most this much is read at once (the stream reader holds about 128 KiB at most)."""

_HEADER: Final = struct.Struct(">BHI")
_HEADER_SIZE: Final = 7
_METHOD: Final = 1
_FRAME_END: Final = 0xCE
_CHANNEL: Final = struct.Struct(">H")
_T = TypeVar("_T")
_INDEX: Final = struct.Struct(">I")
_TAG_BITS: Final = struct.Struct(">qB")  # signed, as pamqp decodes a longlong
_DELIVER: Final = spec.Basic.Deliver.index
_ACK: Final = spec.Basic.Ack.index


def _method(buffer: bytes, offset: int, end: int) -> spec.Basic.Deliver | spec.Basic.Ack | None:
    """``basic.deliver`` and ``basic.ack`` (most of what the broker sends) decoded
    directly into pamqp's classes, with the values pamqp would give them; None for any
    other method, or anything unexpected (pamqp then decodes it, errors included)."""
    index = _INDEX.unpack_from(buffer, offset + _HEADER_SIZE)[0]
    at = offset + _HEADER_SIZE + 4
    try:
        if index == _ACK:
            tag, bits = _TAG_BITS.unpack_from(buffer, at)
            if at + 9 != end - 1:
                return None
            ack = _new(spec.Basic.Ack)
            ack.delivery_tag, ack.multiple = tag, bool(bits & 1)
            return ack
        if index == _DELIVER:
            size = buffer[at]
            consumer_tag = buffer[at + 1 : at + 1 + size].decode()
            at += 1 + size
            tag, bits = _TAG_BITS.unpack_from(buffer, at)
            at += 9
            size = buffer[at]
            exchange = buffer[at + 1 : at + 1 + size].decode()
            at += 1 + size
            size = buffer[at]
            routing_key = buffer[at + 1 : at + 1 + size].decode()
            if at + 1 + size != end - 1:
                return None
            deliver = _new(spec.Basic.Deliver)
            deliver.consumer_tag, deliver.delivery_tag = consumer_tag, tag
            deliver.redelivered, deliver.exchange = bool(bits & 1), exchange
            deliver.routing_key = routing_key
            return deliver
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


def _new(cls: type[_T]) -> _T:
    return cls.__new__(cls)


class BufferedFrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's ``FrameReceiver``, reading a buffer at a time."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = b""
        self._offset = 0

    async def get_frame(self) -> ReceivedFrame:
        """The next frame: (bytes it took, channel, frame)."""
        while True:
            frame = self._whole_frame()
            if frame is not None:
                return frame
            async with self.lock:  # one reader at a time, as aiormq's
                if self._whole_frame_ready():
                    continue
                await self._read_more()

    def _whole_frame_ready(self) -> bool:
        buffer, offset = self._buffer, self._offset
        if len(buffer) - offset < _HEADER_SIZE:
            return False
        size: int = _HEADER.unpack_from(buffer, offset)[2]
        return len(buffer) >= offset + _HEADER_SIZE + size + 1

    def _whole_frame(self) -> ReceivedFrame | None:
        """The first frame of the buffer when it is all there (taken out of it)."""
        buffer, offset = self._buffer, self._offset
        if len(buffer) - offset < _HEADER_SIZE:
            return None
        if not self.started:
            if buffer.startswith(b"AMQP", offset):
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        _, _, size = _HEADER.unpack_from(buffer, offset)
        end = offset + _HEADER_SIZE + size + 1
        if len(buffer) < end:
            return None
        self._offset = end
        if buffer[offset] == _METHOD and buffer[end - 1] == _FRAME_END:
            method = _method(buffer, offset, end)
            if method is not None:
                return end - offset, _CHANNEL.unpack_from(buffer, offset + 1)[0], method
        try:
            return pamqp.frame.unmarshal(buffer[offset:end])
        except PAMQPException as e:
            raise InvalidFrameError(str(e)) from e

    async def _read_more(self) -> None:
        """Append what the socket has; the errors aiormq's receiver raises."""
        buffered = len(self._buffer) - self._offset
        if not buffered and self.reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        try:
            data = await self.reader.read(CHUNK)
        except ConnectionRefusedError as e:
            raise AMQPConnectionError(f"Server connection refused: {e!r}") from e
        except ConnectionResetError as e:
            raise AMQPConnectionError(f"Server connection reset: {e!r}") from e
        except ConnectionError as e:
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e
        if not data:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {buffered} bytes but {max(buffered + 1, 8)} bytes expected"
            )
        self._buffer = self._buffer[self._offset :] + data
        self._offset = 0


def install() -> None:
    """Have every aiormq connection made from now on read with ``BufferedFrameReceiver``;
    idempotent. Refuses a client version it was not written for (``PINNED``)."""
    check_pinned(PINNED, "warmer.bus.reader")
    aiormq.connection.FrameReceiver = BufferedFrameReceiver  # type: ignore[misc]


__all__ = ["CHUNK", "PINNED", "BufferedFrameReceiver", "install"]
