"""Read message properties leniently: what another client sends never costs the connection.

pamqp, the AMQP codec under aiormq and aio-pika, raises on a content header it cannot
decode (a short string that is not UTF-8, a timestamp beyond year 9999, a header of a
type it does not know, tables nested past the recursion limit), and aio-pika raises on
values it cannot take (a delivery mode other than 1 or 2). aiormq takes either for a
broken connection: it drops it, the broker redelivers the message, and the loop goes on
until the delivery limit, taking every unacknowledged message of the channel with it.

``install()`` replaces the one function pamqp uses to decode a content header frame with
one that decodes the standard way and, only when that fails, again property by property:
what it can read is kept, what it cannot is noted (and kept as raw bytes where it can be),
and the message is delivered as usual. The notes ride in the message's headers under
``UNREADABLE``, as an ``Unreadable`` instance: no value read off the wire can forge one.
The worker dead-letters such a message as ``invalid_properties``.

The patch is pinned to the client versions it was written for (``PINNED``); with any
other, ``install()`` refuses, so an upgrade is a deliberate step with these tests run.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable
from typing import Any, Final

import pamqp.frame
from pamqp import decode
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader

from warmer.bus.pinned import check_pinned

UNREADABLE: Final = "x-warmer-unreadable"
PINNED: Final = {"pamqp": "4.0.", "aiormq": "7.2.", "aio-pika": "10.2."}
MAX_NOTES: Final = 8
MAX_DESCRIBED: Final = 500  # docs/contract.md bounds x-warmer-error to 500 characters
MAX_DEPTH: Final = 16  # nested tables and arrays; RabbitMQ itself needs far fewer
_SHOWN_BYTES: Final = 24
_FLAG_BYTES: Final = 2
_FIXED: Final = struct.Struct(">HHQ")  # class id, weight, body size
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_DELIVERY_MODES: Final = (None, 0, 1, 2)  # aio-pika reads 0 as "not persistent"


class Unreadable:
    """What could not be read in one message's properties: bounded notes, raw values."""

    __slots__ = ("notes", "raw")

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.raw: dict[str, bytes | int] = {}

    def note(self, text: str) -> None:
        """Record one problem; past ``MAX_NOTES`` only the count grows."""
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("and more")

    def describe(self) -> str:
        """One line naming the problems noted, at most ``MAX_DESCRIBED`` characters."""
        text = "; ".join(self.notes)
        return text if len(text) <= MAX_DESCRIBED else text[: MAX_DESCRIBED - 3] + "..."


class Undecodable:
    """A header value that could not be decoded: its raw bytes and why."""

    __slots__ = ("raw", "why")

    def __init__(self, raw: bytes, why: str) -> None:
        self.raw = raw
        self.why = why

    def __repr__(self) -> str:
        return f"Undecodable({self.why!r}, {len(self.raw)} bytes)"


def unreadable(headers: object) -> Unreadable | None:
    """The notes ``install()`` left in a message's headers, or None when all was read."""
    if isinstance(headers, dict):
        found = headers.get(UNREADABLE)
        if isinstance(found, Unreadable):
            return found
    return None


def install() -> None:
    """Decode content headers leniently from now on; idempotent."""
    check_pinned(PINNED, "warmer.bus.lenient")
    pamqp.frame._unmarshal_header_frame = _unmarshal_header_frame


# The properties the fast path reads (strings and octets, in wire order), and the flags it
# leaves to pamqp: headers, timestamp, a second flag word (and the reserved bits).
_SIMPLE: Final = (
    ("content_type", 1 << 15, True),
    ("content_encoding", 1 << 14, True),
    ("headers", 1 << 13, None),  # only an empty table (what aio-pika sends by default)
    ("delivery_mode", 1 << 12, False),
    ("priority", 1 << 11, False),
    ("correlation_id", 1 << 10, True),
    ("reply_to", 1 << 9, True),
    ("expiration", 1 << 8, True),
    ("message_id", 1 << 7, True),
    ("message_type", 1 << 5, True),
    ("user_id", 1 << 4, True),
    ("app_id", 1 << 3, True),
    ("cluster_id", 1 << 2, True),
)
_NOT_SIMPLE: Final = (1 << 6) | 0b11
_EMPTY_TABLE: Final = b"\x00\x00\x00\x00"
_FLAGS: Final = struct.Struct(">H")


def _simple(frame_data: bytes) -> ContentHeader | None:
    """A content header with only string and octet properties and at most an empty header
    table, decoded as pamqp decodes it (the common case); None for any other or anything
    odd (a table with entries, a timestamp), which pamqp or the lenient reader decodes."""
    (flags,) = _FLAGS.unpack_from(frame_data, _FIXED.size)
    if flags & _NOT_SIMPLE:
        return None
    header = ContentHeader()
    header.class_id, header.weight, header.body_size = _FIXED.unpack_from(frame_data)
    properties = header.properties
    at = _FIXED.size + _FLAGS.size
    try:
        for name, flag, is_string in _SIMPLE:
            if not flags & flag:
                continue
            if is_string:
                size = frame_data[at]
                setattr(properties, name, frame_data[at + 1 : at + 1 + size].decode())
                at += 1 + size
            elif is_string is None:
                if frame_data[at : at + 4] != _EMPTY_TABLE:
                    return None
                properties.headers = {}
                at += 4
            else:
                setattr(properties, name, frame_data[at])
                at += 1
    except (IndexError, UnicodeDecodeError):
        return None
    if at > len(frame_data):
        return None
    return header


def _unmarshal_header_frame(frame_data: bytes) -> ContentHeader:
    simple = _simple(frame_data) if len(frame_data) >= _FIXED.size + _FLAGS.size else None
    if simple is not None:
        _check(simple.properties)
        return simple
    header = ContentHeader()
    try:
        header.unmarshal(frame_data)
    except Exception:  # ValueError, OverflowError, RecursionError...: read it our way
        header = ContentHeader()
        try:
            _unmarshal(header, frame_data)
        except struct.error as exc:  # not even the flags: the frame itself is broken
            raise UnmarshalingException("ContentHeader", exc) from exc
    _check(header.properties)
    return header


def _unmarshal(header: ContentHeader, data: bytes) -> None:
    header.class_id, header.weight, header.body_size = _FIXED.unpack_from(data)
    consumed, flags = header._get_flags(data[_FIXED.size :])
    properties = header.properties
    problems = Unreadable()
    view = memoryview(data)[_FIXED.size + consumed :]
    offset = 0
    for name in properties.__slots__:
        if not flags & properties.flags[name]:
            continue
        kind = getattr(type(properties), "_" + name)
        try:
            used, value = _READERS[kind](view[offset:], name, problems)
        except (struct.error, ValueError, IndexError):
            problems.note(f"{name}: truncated; the properties after it were not read")
            break
        setattr(properties, name, value)
        offset += used
    _attach(properties, problems)


def _check(properties: Any) -> None:
    """Values the decoder accepts but aio-pika would raise on, or the worker must refuse."""
    problems = unreadable(properties.headers) or Unreadable()
    if properties.delivery_mode not in _DELIVERY_MODES:
        problems.note(f"delivery_mode: {properties.delivery_mode} is not 1 or 2")
        properties.delivery_mode = None
    if properties.expiration is not None:
        try:
            float(properties.expiration)
        except ValueError:
            problems.note(f"expiration: {_shown(properties.expiration.encode())} is not a number")
            properties.expiration = None
    if isinstance(properties.headers, dict) and unreadable(properties.headers) is None:
        _find_bytes(properties.headers, "headers", problems, 0)
    _attach(properties, problems)


def _attach(properties: Any, problems: Unreadable) -> None:
    if not problems.notes:
        return
    if not isinstance(properties.headers, dict):
        properties.headers = {}
    properties.headers[UNREADABLE] = problems


def _find_bytes(value: object, path: str, problems: Unreadable, depth: int) -> None:
    """pamqp reads a long string that is not UTF-8 as bytes: note each one."""
    if depth > MAX_DEPTH:
        return
    if isinstance(value, bytes):
        problems.note(f"{path}: not UTF-8: {_shown(value)}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _find_bytes(item, f"{path}.{_shown_key(key)}", problems, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _find_bytes(item, f"{path}[{index}]", problems, depth + 1)


# -- property readers: (view, name, problems) -> (bytes used, value) ---------------------


def _short_str(view: memoryview, name: str, problems: Unreadable) -> tuple[int, str | None]:
    length = view[0]
    raw = bytes(view[1 : 1 + length])
    if len(raw) < length:
        raise ValueError("short string overruns the frame")
    try:
        return 1 + length, raw.decode()
    except UnicodeDecodeError:
        problems.note(f"{name}: not UTF-8: {_shown(raw)}")
        problems.raw[name] = raw
        return 1 + length, None


def _octet(view: memoryview, name: str, problems: Unreadable) -> tuple[int, int]:
    return 1, view[0]


def _timestamp(
    view: memoryview, name: str, problems: Unreadable
) -> tuple[int, datetime.datetime | None]:
    (seconds,) = _U64.unpack_from(view)
    moment = _moment(seconds)
    if moment is None:
        problems.note(f"{name}: {seconds} is beyond year 9999")
        problems.raw[name] = seconds
    return _U64.size, moment


def _table_property(
    view: memoryview, name: str, problems: Unreadable
) -> tuple[int, dict[str, object]]:
    return _table(view, name, problems, 0)


_READERS: Final[dict[str, Callable[[memoryview, str, Unreadable], tuple[int, Any]]]] = {
    "shortstr": _short_str,
    "octet": _octet,
    "timestamp": _timestamp,
    "table": _table_property,
}


# -- field tables and arrays -------------------------------------------------------------


def _table(
    view: memoryview, path: str, problems: Unreadable, depth: int
) -> tuple[int, dict[str, object]]:
    (length,) = _U32.unpack_from(view)
    end = _U32.size + length
    if end > len(view):
        problems.note(f"{path}: its length overruns the frame")
        end = len(view)
    table: dict[str, object] = {}
    offset = _U32.size
    while offset < end:
        key_length = view[offset]
        raw_key = bytes(view[offset + 1 : offset + 1 + key_length])
        offset += 1 + key_length
        try:
            key = raw_key.decode()
        except UnicodeDecodeError:
            key = raw_key.decode(errors="backslashreplace")
            problems.note(f"{path}: a key is not UTF-8: {_shown(raw_key)}")
        where = f"{path}.{_shown_key(key)}"
        used, value = _field(view[offset:end], where, problems, depth)
        table[key] = value
        offset += used
    return end, table


def _array(
    view: memoryview, path: str, problems: Unreadable, depth: int
) -> tuple[int, list[object]]:
    (length,) = _U32.unpack_from(view)
    end = _U32.size + length
    if end > len(view):
        problems.note(f"{path}: its length overruns the frame")
        end = len(view)
    array: list[object] = []
    offset = _U32.size
    while offset < end:
        used, value = _field(view[offset:end], f"{path}[{len(array)}]", problems, depth)
        array.append(value)
        offset += used
    return end, array


def _field(view: memoryview, path: str, problems: Unreadable, depth: int) -> tuple[int, object]:
    """One tagged value; what cannot be read takes the rest of its table as raw bytes."""
    tag = bytes(view[:1])
    body = view[1:]
    try:
        if tag in (b"F", b"A"):
            if depth >= MAX_DEPTH:
                (length,) = _U32.unpack_from(body)
                return _rest(view, 1 + _U32.size + length, path, "nested too deep", problems)
            nested: tuple[int, object]
            if tag == b"F":
                nested = _table(body, path, problems, depth + 1)
            else:
                nested = _array(body, path, problems, depth + 1)
            return 1 + nested[0], nested[1]
        if tag == b"S":
            (length,) = _U32.unpack_from(body)
            raw = bytes(body[_U32.size : _U32.size + length])
            if len(raw) < length:
                return _rest(view, len(view), path, "truncated", problems)
            try:
                return 1 + _U32.size + length, raw.decode()
            except UnicodeDecodeError:
                problems.note(f"{path}: not UTF-8: {_shown(raw)}")
                return 1 + _U32.size + length, raw
        if tag == b"T":
            (seconds,) = _U64.unpack_from(body)
            moment = _moment(seconds)
            if moment is None:
                problems.note(f"{path}: timestamp {seconds} is beyond year 9999")
                return 1 + _U64.size, Undecodable(bytes(body[: _U64.size]), "timestamp")
            return 1 + _U64.size, moment
        reader = decode.TABLE_MAPPING.get(tag)
        if reader is None:
            return _rest(view, len(view), path, f"unknown field type {tag!r}", problems)
        used, value = reader(bytes(body))
        return 1 + used, value
    except (struct.error, ValueError, IndexError):
        return _rest(view, len(view), path, "truncated", problems)


def _rest(
    view: memoryview, end: int, path: str, why: str, problems: Unreadable
) -> tuple[int, Undecodable]:
    """Keep ``view[:end]`` raw: a value of unknown length ends its table."""
    end = min(end, len(view))
    problems.note(f"{path}: {why}")
    return end, Undecodable(bytes(view[:end]), why)


def _moment(seconds: int) -> datetime.datetime | None:
    """pamqp's reading of a timestamp (above 2^32 it takes milliseconds), None past 9999."""
    value: float = seconds / 1000.0 if seconds > 0xFFFFFFFF else seconds
    try:
        return datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _shown(raw: bytes) -> str:
    text = repr(raw[:_SHOWN_BYTES])
    return text if len(raw) <= _SHOWN_BYTES else f"{text}... ({len(raw)} bytes)"


def _shown_key(key: str) -> str:
    return key if len(key) <= _SHOWN_BYTES else key[:_SHOWN_BYTES] + "..."


__all__ = ["PINNED", "UNREADABLE", "Undecodable", "Unreadable", "install", "unreadable"]
