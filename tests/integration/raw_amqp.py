"""A tiny AMQP 0-9-1 client for tests that plays another team's client in another language.

aio-pika and pamqp refuse to encode what a client written elsewhere may well send: a
``message_id`` that is not UTF-8, a header table with an unknown type tag, a table whose
declared length overruns. :class:`RawPublisher` speaks the protocol over asyncio streams,
uses pamqp for the standard method frames and writes the *content header frame* by hand,
so any property can hold arbitrary bytes::

    publisher = await RawPublisher.connect("amqp://guest:guest@127.0.0.1:5672/")
    flags, properties = props(message_id=short_bytes(b"\\xff\\xfe"), delivery_mode=2)
    await publisher.publish("an-exchange", "a.key", b"{}", properties, flags=flags)
    await publisher.close()

:func:`props` builds the property list and its flag word from normal Python values or
:class:`Raw` bytes put in verbatim; :func:`short_bytes` length-prefixes a shortstr and
:func:`table` builds a field table from ``(key, type tag, value)`` byte triples.
:meth:`RawPublisher.get` reads a message back with ``basic.get`` without decoding its
properties, since aio-pika itself may fail to decode them.

Findings (RabbitMQ 3.10.8, a quorum queue bound to a topic exchange)
---------------------------------------------------------------------
Method: one throwaway topic exchange and quorum queue per case, the case published twice with
:class:`RawPublisher` as guest (the "itself" case as a second user made with ``rabbitmqctl
add_user``/``set_permissions`` and deleted after), ``rabbitmqctl list_queues name messages``
polled (its count lags about 5 s), one copy read back with :meth:`RawPublisher.get`, the other
with aio-pika's ``queue.get``. "acked" means basic.ack and a queue depth of 2; every refused
case left a depth of 0.

==================================  ===============================================  =========
case                                broker                                           delivered
==================================  ===============================================  =========
baseline (content_type, mode 2)     acked                                            yes
message_id not UTF-8                acked                                            yes [a]
content_type not UTF-8              acked                                            yes [a]
header key not UTF-8                acked                                            yes [a]
header ``S`` value not UTF-8        acked                                            yes [b]
header ``T`` = 2**63-1              acked                                            yes [a]
timestamp 1795610731000000 (µs)     acked                                            yes [a]
timestamp 2**64-1                   acked                                            yes [a]
nested ``F`` table, non-UTF-8       acked                                            yes [a]
45 KB header (one ``S`` value)      acked                                            yes
priority 255                        acked                                            yes
user_id = itself (second user)      acked                                            yes
delivery_mode 3                     channel.close 406 PRECONDITION_FAILED -          no
                                    invalid message: {delivery_mode_unknown,3}
delivery_mode 0                     channel.close 406 PRECONDITION_FAILED -          no
                                    invalid message: {delivery_mode_unknown,0}
user_id = another user, as guest    channel.close 406 PRECONDITION_FAILED - user_id  no
                                    property set to '<user>' but authenticated user
                                    was 'guest'
expiration "soon"                   channel.close 406 PRECONDITION_FAILED - invalid  no
                                    expiration 'soon': no_integer
expiration "-1"                     channel.close 406 PRECONDITION_FAILED - invalid  no
                                    expiration '-1': {value_negative,-1}
header type tag ``z``               connection.close 541 INTERNAL_ERROR              no
header type tag ``U``               connection.close 541 INTERNAL_ERROR              no
header table length overruns        connection.close 541 INTERNAL_ERROR              no
==================================  ===============================================  =========

- Delivered properties are the bytes that were published, except that the quorum queue adds
  ``x-delivery-count`` (type ``l``, 0 on first delivery) at the end of ``headers``, setting
  the headers flag when the message had none.
- The 541s close the whole connection, and happen at publish whatever is bound (also with no
  queue bound, and for a classic queue): the broker parses the header table on publish.
- [a] aio-pika 10.2.1 / pamqp 4.0.1 cannot decode the delivery: ``InvalidFrameError: Could not
  unmarshal ContentHeader frame`` (UnicodeDecodeError, or "year ... is out of range" for the
  timestamps), raised in aiormq's reader, which ends. With a manual-ack ``queue.consume`` the
  callback never runs and the message goes back to the queue when the connection is closed,
  ``x-delivery-count`` growing each time: a poison message for an aio-pika consumer.
- [b] aio-pika decodes it; the non-UTF-8 ``S`` value comes out as ``bytes``, not ``str``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from pamqp import body as pamqp_body
from pamqp import commands, constants, encode
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp.base import Frame

CHANNEL = 1
BASIC_CLASS_ID = 60
FRAME_OVERHEAD = 8  # type (1), channel (2), size (4) and the frame-end octet
CLOSE_WAIT_S = 5.0


@dataclass(frozen=True)
class Raw:
    """Bytes :func:`props` puts in the property list verbatim (length prefix included)."""

    data: bytes


def short_bytes(value: bytes) -> Raw:
    """A shortstr holding any bytes (UTF-8 or not): a length octet, then ``value``."""
    if len(value) > 255:
        raise ValueError(f"a shortstr holds at most 255 bytes, got {len(value)}")
    return Raw(bytes([len(value)]) + value)


def table(*entries: tuple[bytes, bytes, bytes | Raw], length: int | None = None) -> Raw:
    """A field table from ``(key, type tag, encoded value)`` triples, written as given.

    The key gets its length octet; the value is put in verbatim (a nested table is
    ``table(...)`` itself, an ``S`` long string is ``struct.pack(">I", n) + data``).
    ``length`` overrides the declared byte length, e.g. to make it overrun.
    """
    parts = []
    for key, tag, value in entries:
        data = value.data if isinstance(value, Raw) else value
        parts.append(bytes([len(key)]) + key + tag + data)
    content = b"".join(parts)
    return Raw(struct.pack(">I", len(content) if length is None else length) + content)


_SHORTSTR = "shortstr"
_OCTET = "octet"
_TIMESTAMP = "timestamp"
_TABLE = "table"

#: Basic's properties in wire order: (name, flag bit, standard encoding).
PROPERTIES: tuple[tuple[str, int, str], ...] = (
    ("content_type", 0x8000, _SHORTSTR),
    ("content_encoding", 0x4000, _SHORTSTR),
    ("headers", 0x2000, _TABLE),
    ("delivery_mode", 0x1000, _OCTET),
    ("priority", 0x0800, _OCTET),
    ("correlation_id", 0x0400, _SHORTSTR),
    ("reply_to", 0x0200, _SHORTSTR),
    ("expiration", 0x0100, _SHORTSTR),
    ("message_id", 0x0080, _SHORTSTR),
    ("timestamp", 0x0040, _TIMESTAMP),
    ("type", 0x0020, _SHORTSTR),
    ("user_id", 0x0010, _SHORTSTR),
    ("app_id", 0x0008, _SHORTSTR),
    ("cluster_id", 0x0004, _SHORTSTR),
)


def _standard(name: str, kind: str, value: Any) -> bytes:
    if kind == _SHORTSTR:
        if not isinstance(value, str):
            raise TypeError(f"{name}: str or Raw expected, got {type(value).__name__}")
        return short_bytes(value.encode("utf-8")).data
    if kind == _OCTET:
        return struct.pack(">B", value)
    if kind == _TIMESTAMP:
        return struct.pack(">Q", value)
    if not isinstance(value, dict):
        raise TypeError(f"{name}: dict or Raw expected, got {type(value).__name__}")
    return encode.field_table(value)


def props(**fields: Any) -> tuple[int, bytes]:
    """The property flags and property list for ``fields``, in AMQP order.

    A field is a normal value encoded the standard way (a ``str`` shortstr, an ``int``
    octet for ``delivery_mode``/``priority``, an ``int`` uint64 ``timestamp``, a ``dict``
    ``headers`` table) or a :class:`Raw` whose bytes are written verbatim.
    """
    known = {name for name, _, _ in PROPERTIES}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown properties: {', '.join(unknown)}")
    flags = 0
    parts = []
    for name, bit, kind in PROPERTIES:
        if name not in fields:
            continue
        value = fields[name]
        flags |= bit
        parts.append(value.data if isinstance(value, Raw) else _standard(name, kind, value))
    return flags, b"".join(parts)


class RawPublishRefused(Exception):
    """The broker refused a publish: basic.nack, channel.close or connection.close."""

    def __init__(self, text: str, code: int | None = None, source: str = "basic.nack") -> None:
        super().__init__(f"{source}: {text}" if code is None else f"{source}: {code} {text}")
        self.text = text
        self.code = code
        #: What refused: ``basic.nack``, ``channel.close``, ``connection.close``,
        #: ``connection lost`` (the socket closed without a connection.close) or
        #: ``unexpected frame``.
        self.source = source


@dataclass(frozen=True)
class RawMessage:
    """A message read with ``basic.get``, its properties left undecoded."""

    flags: int
    properties: bytes
    body: bytes
    routing_key: str
    redelivered: bool


class RawPublisher:
    """One connection with one confirm-mode channel (channel 1)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._tag = 0
        self._closed = False
        self.frame_max = constants.FRAME_MAX_SIZE

    @classmethod
    async def connect(cls, url: str) -> RawPublisher:
        """Open a connection (PLAIN auth, heartbeat 0) and channel 1 in confirm mode."""
        parts = urlsplit(url)
        if parts.scheme != "amqp":
            raise ValueError(f"only amqp:// URLs are supported, got {parts.scheme!r}")
        user = unquote(parts.username or "guest")
        password = unquote(parts.password or "guest")
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        reader, writer = await asyncio.open_connection(
            parts.hostname or "localhost", parts.port or 5672
        )
        publisher = cls(reader, writer)
        try:
            await publisher._handshake(user, password, vhost)
        except BaseException:
            writer.close()
            raise
        return publisher

    async def _handshake(self, user: str, password: str, vhost: str) -> None:
        self._writer.write(pamqp_frame.marshal(pamqp_header.ProtocolHeader(), 0))
        await self._expect(0, commands.Connection.Start)
        start_ok = commands.Connection.StartOk(
            client_properties={"product": "warmer-tests-raw-amqp"},
            mechanism="PLAIN",
            response=f"\0{user}\0{password}",
        )
        await self._send(start_ok, 0)
        tune = await self._expect(0, commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        if tune.frame_max:
            self.frame_max = tune.frame_max
        await self._send(commands.Connection.TuneOk(tune.channel_max, self.frame_max, 0), 0)
        await self._send(commands.Connection.Open(virtual_host=vhost), 0)
        await self._expect(0, commands.Connection.OpenOk)
        await self._open_channel()

    async def _open_channel(self) -> None:
        await self._send(commands.Channel.Open(), CHANNEL)
        await self._expect(CHANNEL, commands.Channel.OpenOk)
        await self._send(commands.Confirm.Select(), CHANNEL)
        await self._expect(CHANNEL, commands.Confirm.SelectOk)
        self._tag = 0

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: bytes, *, flags: int
    ) -> None:
        """Publish ``body`` with a hand-written content header; wait for its basic.ack.

        Raises :class:`RawPublishRefused` on basic.nack, channel.close (channel 1 is then
        reopened, so the publisher stays usable) or connection.close.
        """
        header = struct.pack(">HHQ", BASIC_CLASS_ID, 0, len(body))
        header += struct.pack(">H", flags) + properties
        frames = [
            pamqp_frame.marshal(
                commands.Basic.Publish(exchange=exchange, routing_key=routing_key), CHANNEL
            ),
            _frame(constants.FRAME_HEADER, CHANNEL, header),
        ]
        step = self.frame_max - FRAME_OVERHEAD
        frames += [
            pamqp_frame.marshal(pamqp_body.ContentBody(body[i : i + step]), CHANNEL)
            for i in range(0, len(body), step)
        ]
        self._tag += 1
        tag = self._tag
        self._writer.write(b"".join(frames))
        await self._writer.drain()
        while True:
            reply = await self._expect(CHANNEL, commands.Basic.Ack, commands.Basic.Nack)
            assert isinstance(reply, commands.Basic.Ack | commands.Basic.Nack)
            delivery_tag = reply.delivery_tag or 0
            if delivery_tag == tag or (reply.multiple and delivery_tag > tag):
                break
        if isinstance(reply, commands.Basic.Nack):
            raise RawPublishRefused(f"basic.nack for delivery tag {tag}")

    async def get(self, queue: str) -> RawMessage | None:
        """``basic.get`` (no-ack) one message from ``queue``; ``None`` when it is empty."""
        await self._send(commands.Basic.Get(queue=queue, no_ack=True), CHANNEL)
        reply = await self._expect(CHANNEL, commands.Basic.GetOk, commands.Basic.GetEmpty)
        if isinstance(reply, commands.Basic.GetEmpty):
            return None
        assert isinstance(reply, commands.Basic.GetOk)
        header = await self._content_frame(constants.FRAME_HEADER)
        (size,) = struct.unpack_from(">Q", header, 4)
        body = b""
        while len(body) < size:
            body += await self._content_frame(constants.FRAME_BODY)
        (flags,) = struct.unpack_from(">H", header, 12)
        return RawMessage(flags, header[14:], body, reply.routing_key or "", reply.redelivered)

    async def close(self) -> None:
        """connection.close, wait for close-ok, close the socket (fine if already closed)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError, TimeoutError, RawPublishRefused):
                await self._send(commands.Connection.Close(200, "Normal shutdown", 0, 0), 0)
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await self._expect(0, commands.Connection.CloseOk)
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _send(self, method: Frame, channel: int) -> None:
        self._writer.write(pamqp_frame.marshal(method, channel))
        await self._writer.drain()

    async def _read(self) -> tuple[int, int, bytes]:
        """The next frame: its type, channel and payload."""
        try:
            head = await self._reader.readexactly(7)
            frame_type, channel, size = struct.unpack(">BHI", head)
            rest = await self._reader.readexactly(size + 1)
        except (asyncio.IncompleteReadError, OSError) as error:
            self._closed = True
            raise RawPublishRefused(repr(error), source="connection lost") from error
        if rest[-1] != constants.FRAME_END:
            raise RawPublishRefused(f"bad frame end {rest[-1]:#x}", source="connection lost")
        return frame_type, channel, rest[:-1]

    async def _content_frame(self, frame_type: int) -> bytes:
        kind, channel, payload = await self._read()
        if kind != frame_type or channel != CHANNEL:
            raise RawPublishRefused(
                f"expected frame type {frame_type}, got {kind} on channel {channel}",
                source="unexpected frame",
            )
        return payload

    async def _expect(self, channel: int, *kinds: type[Frame]) -> Frame:
        """The next method of one of ``kinds`` on ``channel``; answers closes by the broker."""
        while True:
            kind, on, payload = await self._read()
            if kind != constants.FRAME_METHOD:
                continue  # heartbeats are off; nothing else is expected here
            _, _, method = pamqp_frame.unmarshal(_frame(kind, on, payload))
            assert isinstance(method, Frame)
            if isinstance(method, commands.Connection.Close):
                with contextlib.suppress(OSError):
                    await self._send(commands.Connection.CloseOk(), 0)
                self._closed = True
                self._writer.close()
                raise RawPublishRefused(method.reply_text, method.reply_code, "connection.close")
            if isinstance(method, commands.Channel.Close):
                await self._send(commands.Channel.CloseOk(), on)
                if on == CHANNEL:
                    await self._open_channel()
                raise RawPublishRefused(method.reply_text, method.reply_code, "channel.close")
            if on == channel and isinstance(method, kinds):
                return method


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return (
        struct.pack(">BHI", frame_type, channel, len(payload)) + payload + constants.FRAME_END_CHAR
    )
