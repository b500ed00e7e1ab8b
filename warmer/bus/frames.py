"""A publish's AMQP 0-9-1 frames as bytes, from templates instead of field by field.

aiormq builds a ``Basic.Publish``, a ``ContentHeader`` and its ``Basic.Properties`` for
every publish, and pamqp marshals each of them attribute by attribute (a type lookup,
a validation and an encoder call per field): the largest share of the worker's time in
the pass-through profile (BENCHMARKS.md). The publisher's messages are few kinds with
most properties fixed, so ``Properties`` encodes the fixed ones once and only the ones
that change per message (headers, message id, expiration, timestamp, correlation id)
each time, and ``publish_frames`` puts the method, content header and body frames
together with ``struct``. The bytes are pamqp's exactly (``tests/unit/test_frames.py``
compares them over many property sets): the same property flags, the same omission of
``None`` and ``""``, header tables with their keys sorted as pamqp sorts them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from pamqp import encode

FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_END: Final = b"\xce"
FRAME_OVERHEAD: Final = 8
"""Bytes a frame adds to its payload: type, channel, size, frame end."""

_FRAME: Final = struct.Struct(">BHI")
_CONTENT_HEADER: Final = struct.Struct(">HHQ")
_FLAGS: Final = struct.Struct(">H")
_LONG: Final = struct.Struct(">I")
_TIMESTAMP: Final = struct.Struct(">Q")
_BASIC: Final = 60
_PUBLISH: Final = b"\x00\x3c\x00\x28\x00\x00"  # Basic.Publish (60, 40), ticket 0
_SHORT_MAX: Final = 255

# Basic's content properties in wire order, with their flag bits (AMQP 0-9-1, 4.2.6.1).
PROPERTY_FLAGS: Final[Mapping[str, int]] = {
    "content_type": 1 << 15,
    "content_encoding": 1 << 14,
    "headers": 1 << 13,
    "delivery_mode": 1 << 12,
    "priority": 1 << 11,
    "correlation_id": 1 << 10,
    "reply_to": 1 << 9,
    "expiration": 1 << 8,
    "message_id": 1 << 7,
    "timestamp": 1 << 6,
    "message_type": 1 << 5,
    "user_id": 1 << 4,
    "app_id": 1 << 3,
    "cluster_id": 1 << 2,
}


def short_string(value: str) -> bytes:
    """A shortstr; TypeError past 255 bytes (as pamqp)."""
    data = value.encode()
    if len(data) > _SHORT_MAX:
        raise TypeError(f"string exceeds maximum length of {_SHORT_MAX} bytes")
    return bytes((len(data),)) + data


def table(value: Mapping[str, Any] | bytes) -> bytes:
    """A field table, keys sorted; string values fast, any other through pamqp; bytes are
    a table already encoded (``KeyedTable``)."""
    if isinstance(value, bytes):
        return value
    if not value:
        return b"\x00\x00\x00\x00"
    parts: list[bytes] = []
    for key, item in sorted(value.items()):
        if item.__class__ is not str or len(key) > 128:
            return encode.field_table(dict(value))  # other types, long keys: pamqp's rules
        parts.append(short_string(key))
        data = item.encode()
        parts.append(b"S" + _LONG.pack(len(data)) + data)
    joined = b"".join(parts)
    return _LONG.pack(len(joined)) + joined


class KeyedTable:
    """A header table of string values, fixed but for the value of one key: encoded as
    ``table`` encodes the whole (keys in the same order), the fixed entries once."""

    __slots__ = ("_after", "_before", "_key")

    def __init__(self, key: str, fixed: Mapping[str, str]) -> None:
        if key in fixed or any(len(k.encode()) > 128 for k in [key, *fixed]):
            raise ValueError("a key given twice, or longer than 128 bytes")
        self._before = table({k: v for k, v in fixed.items() if k < key})[4:]
        self._after = table({k: v for k, v in fixed.items() if k > key})[4:]
        self._key = short_string(key) + b"S"

    def encode(self, value: str) -> bytes:
        """The table with ``value`` at the key."""
        data = value.encode()
        inner = b"".join((self._before, self._key, _LONG.pack(len(data)), data, self._after))
        return _LONG.pack(len(inner)) + inner


def _octet(value: int) -> bytes:
    return bytes((value,))


def _timestamp(value: int) -> bytes:
    """Seconds since the epoch (what pamqp writes for a datetime, truncated)."""
    return _TIMESTAMP.pack(value)


_ENCODERS: Final[Mapping[str, Callable[[Any], bytes]]] = {
    "content_type": short_string,
    "content_encoding": short_string,
    "headers": table,
    "delivery_mode": _octet,
    "priority": _octet,
    "correlation_id": short_string,
    "reply_to": short_string,
    "expiration": short_string,
    "message_id": short_string,
    "timestamp": _timestamp,
    "message_type": short_string,
    "user_id": short_string,
    "app_id": short_string,
    "cluster_id": short_string,
}


class Properties:
    """One kind of message's content properties: ``fixed`` encoded once, ``varying``
    (property names) given to ``encode`` in wire order, each time.

    A value that is ``None`` or ``""`` is left out, as pamqp leaves it out; ``timestamp``
    is whole seconds since the epoch.
    """

    __slots__ = ("_flags", "_segments", "varying")

    def __init__(self, fixed: Mapping[str, Any], varying: Sequence[str] = ()) -> None:
        unknown = (set(fixed) | set(varying)) - set(PROPERTY_FLAGS)
        if unknown or set(fixed) & set(varying):
            raise ValueError(f"properties unknown or both fixed and varying: {sorted(unknown)}")
        self._flags = 0
        # Constant runs as bytes; a varying property as (flag, encoder).
        segments: list[bytes | tuple[int, Callable[[Any], bytes]]] = []
        for name, flag in PROPERTY_FLAGS.items():
            if name in varying:
                segments.append((flag, _ENCODERS[name]))
                continue
            value = fixed.get(name)
            if value is None or value == "":
                continue
            self._flags |= flag
            data = _ENCODERS[name](value)
            if segments and isinstance(segments[-1], bytes):
                segments[-1] += data
            else:
                segments.append(data)
        self._segments = tuple(segments)
        self.varying = tuple(name for name in PROPERTY_FLAGS if name in varying)
        """The varying properties, in the order ``encode`` takes them."""

    def encode(self, *values: Any) -> bytes:
        """The property flags and list, with ``values`` for the varying properties."""
        flags = self._flags
        parts = [b""]
        position = 0
        for segment in self._segments:
            if isinstance(segment, bytes):
                parts.append(segment)
                continue
            flag, encoder = segment
            value = values[position]
            position += 1
            if value is None or value == "":
                continue
            flags |= flag
            parts.append(encoder(value))
        if position != len(values):
            raise TypeError(f"{len(values)} values for {position} varying properties")
        parts[0] = _FLAGS.pack(flags)
        return b"".join(parts)


def method_frame(channel: int, exchange: str, routing_key: str, *, mandatory: bool) -> bytes:
    """The ``basic.publish`` method frame (never immediate: RabbitMQ refuses it)."""
    if len(routing_key) > _SHORT_MAX:
        raise ValueError("Routing key too long (max 255 bytes)")  # as aiormq says it
    payload = b"".join(
        (
            _PUBLISH,
            short_string(exchange),
            short_string(routing_key),
            b"\x01" if mandatory else b"\x00",
        )
    )
    return _FRAME.pack(FRAME_METHOD, channel, len(payload)) + payload + FRAME_END


def publish_frames(
    channel: int, max_body: int, method: bytes, properties: bytes, body: bytes
) -> bytes:
    """One publish: ``method`` (a ``method_frame``), the content header with
    ``properties`` (``Properties.encode``), then ``body`` in frames of at most
    ``max_body`` bytes (the connection's frame_max less ``FRAME_OVERHEAD``)."""
    size = len(body)
    header = _CONTENT_HEADER.pack(_BASIC, 0, size) + properties
    parts = [method, _FRAME.pack(FRAME_HEADER, channel, len(header)), header, FRAME_END]
    if size <= max_body:
        if size:
            parts += (_FRAME.pack(FRAME_BODY, channel, size), body, FRAME_END)
    else:
        for start in range(0, size, max_body):
            chunk = body[start : start + max_body]
            parts += (_FRAME.pack(FRAME_BODY, channel, len(chunk)), chunk, FRAME_END)
    return b"".join(parts)


__all__ = [
    "FRAME_OVERHEAD",
    "PROPERTY_FLAGS",
    "KeyedTable",
    "Properties",
    "method_frame",
    "publish_frames",
    "short_string",
    "table",
]
