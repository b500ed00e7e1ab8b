"""The lenient reader of message properties: one test per thing another client may send.

Each case builds a content header frame byte by byte, as a client in another language
would put it on the wire, decodes it through pamqp (with ``lenient.install()`` in place)
and then into aio-pika's ``IncomingMessage``, which must not raise either.
"""

from __future__ import annotations

import datetime
import re
import struct
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, cast

import pamqp.frame
import pytest
from aio_pika import IncomingMessage
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands
from pamqp.header import ContentHeader

from warmer.bus import flow, lenient, pinned, reader
from warmer.bus.lenient import MAX_DEPTH, UNREADABLE, Undecodable, unreadable
from warmer.bus.wire import Wire

lenient.install()

CONTENT_TYPE = 0x8000
CONTENT_ENCODING = 0x4000
HEADERS = 0x2000
DELIVERY_MODE = 0x1000
PRIORITY = 0x0800
CORRELATION_ID = 0x0400
REPLY_TO = 0x0200
EXPIRATION = 0x0100
MESSAGE_ID = 0x0080
TIMESTAMP = 0x0040
TYPE = 0x0020
USER_ID = 0x0010
APP_ID = 0x0008


def short(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def long(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def table(*entries: tuple[bytes, bytes, bytes]) -> bytes:
    """A field table from (key, type tag, encoded value) triples."""
    return long(b"".join(short(key) + tag + value for key, tag, value in entries))


def frame(flags: int, properties: bytes, body_size: int = 2) -> bytes:
    """A whole content header frame on channel 1."""
    payload = struct.pack(">HHQH", 60, 0, body_size, flags) + properties
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


def read(flags: int, properties: bytes) -> commands.Basic.Properties:
    """Decode the frame as aiormq would; it must never raise."""
    _, channel, header = pamqp.frame.unmarshal(frame(flags, properties))
    assert channel == 1
    assert isinstance(header, ContentHeader)
    assert header.body_size == 2
    return header.properties


def incoming(properties: commands.Basic.Properties) -> IncomingMessage:
    """The message aio-pika builds from those properties; it must not raise."""
    header = ContentHeader(body_size=2, properties=properties)
    deliver = commands.Basic.Deliver(
        consumer_tag="c", delivery_tag=1, redelivered=False, exchange="x", routing_key="k"
    )
    # No channel: a no_ack message is never settled, so aio-pika never reaches for one.
    no_channel = cast(AbstractChannel, None)
    delivered = DeliveredMessage(delivery=deliver, header=header, body=b"{}", channel=no_channel)
    return IncomingMessage(delivered, no_ack=True)


def notes_of(properties: commands.Basic.Properties) -> str:
    notes = unreadable(properties.headers)
    assert notes is not None, "expected the properties to be noted as unreadable"
    return notes.describe()


# -- what reads as usual ---------------------------------------------------------------


def test_ordinary_properties_read_as_pamqp_reads_them() -> None:
    properties = read(
        CONTENT_TYPE | HEADERS | DELIVERY_MODE | MESSAGE_ID | TIMESTAMP,
        short(b"application/json")
        + table((b"conversation-id", b"S", long(b"c1")), (b"n", b"b", b"\x05"))
        + b"\x02"
        + short(b"m-1")
        + struct.pack(">Q", 1_700_000_000),
    )
    assert properties.content_type == "application/json"
    assert properties.headers == {"conversation-id": "c1", "n": 5}
    assert properties.delivery_mode == 2
    assert properties.message_id == "m-1"
    assert properties.timestamp == datetime.datetime.fromtimestamp(1_700_000_000, datetime.UTC)
    assert unreadable(properties.headers) is None
    assert incoming(properties).message_id == "m-1"


def test_a_publisher_cannot_forge_the_unreadable_note() -> None:
    properties = read(HEADERS, table((UNREADABLE.encode(), b"S", long(b"forged"))))
    assert properties.headers == {UNREADABLE: "forged"}
    assert unreadable(properties.headers) is None


def test_timestamps_in_milliseconds_read_as_pamqp_reads_them() -> None:
    properties = read(TIMESTAMP, struct.pack(">Q", 1_700_000_000_123))
    assert properties.timestamp is not None
    assert properties.timestamp.year == 2023
    assert unreadable(properties.headers) is None


# -- what cannot be read: noted, the rest kept, aio-pika happy -------------------------


@pytest.mark.parametrize(
    ("flag", "name"),
    [
        (CONTENT_TYPE, "content_type"),
        (CONTENT_ENCODING, "content_encoding"),
        (MESSAGE_ID, "message_id"),
        (CORRELATION_ID, "correlation_id"),
        (REPLY_TO, "reply_to"),
        (TYPE, "message_type"),
        (USER_ID, "user_id"),
        (APP_ID, "app_id"),
    ],
)
def test_a_short_string_that_is_not_utf8(flag: int, name: str) -> None:
    bad = short(b"\xff\xfe")  # properties go on the wire in flag order, high bit first
    properties = read(flag | PRIORITY, bad + b"\x07" if flag > PRIORITY else b"\x07" + bad)
    assert getattr(properties, name) is None
    assert properties.priority == 7  # what follows or precedes it is still read
    assert f"{name}: not UTF-8" in notes_of(properties)
    assert unreadable(properties.headers).raw[name] == b"\xff\xfe"  # type: ignore[union-attr]
    incoming(properties)


@pytest.mark.parametrize(
    "seconds",
    [
        1_795_610_731_000_000,  # microseconds: pamqp reads them as milliseconds, year 58882
        2**64 - 1,
        253_402_300_800_000,  # 10000-01-01 in milliseconds
    ],
)
def test_a_timestamp_beyond_year_9999(seconds: int) -> None:
    properties = read(TIMESTAMP | APP_ID, struct.pack(">Q", seconds) + short(b"app"))
    assert properties.timestamp is None
    assert properties.app_id == "app"
    assert f"timestamp: {seconds} is beyond year 9999" in notes_of(properties)
    assert incoming(properties).timestamp is None


@pytest.mark.parametrize("mode", [3, 9, 255])
def test_a_delivery_mode_other_than_1_or_2(mode: int) -> None:
    properties = read(DELIVERY_MODE, bytes([mode]))
    assert properties.delivery_mode is None
    assert f"delivery_mode: {mode} is not 1 or 2" in notes_of(properties)
    incoming(properties)  # aio-pika raises ValueError on DeliveryMode(3)


def test_an_expiration_that_is_not_a_number() -> None:
    properties = read(EXPIRATION, short(b"soon"))
    assert properties.expiration is None
    assert "expiration" in notes_of(properties)
    incoming(properties)


def test_a_header_long_string_that_is_not_utf8() -> None:
    properties = read(HEADERS, table((b"trace", b"S", long(b"\xc3\x28")), (b"ok", b"t", b"\x01")))
    assert properties.headers is not None
    assert properties.headers["trace"] == b"\xc3\x28"
    assert properties.headers["ok"] is True
    assert "headers.trace: not UTF-8" in notes_of(properties)


def test_a_header_key_that_is_not_utf8() -> None:
    properties = read(HEADERS, table((b"k\xff", b"S", long(b"v")), (b"after", b"b", b"\x01")))
    assert properties.headers is not None
    assert properties.headers["k\\xff"] == "v"
    assert properties.headers["after"] == 1
    assert "a key is not UTF-8" in notes_of(properties)


def test_a_header_timestamp_beyond_year_9999() -> None:
    properties = read(HEADERS, table((b"when", b"T", struct.pack(">Q", 2**63 - 1))))
    assert properties.headers is not None
    value = properties.headers["when"]
    assert isinstance(value, Undecodable)
    assert value.raw == struct.pack(">Q", 2**63 - 1)
    assert "headers.when: timestamp" in notes_of(properties)
    incoming(properties)


@pytest.mark.parametrize("tag", [b"z", b"U", b"\x7f"])
def test_a_header_of_a_type_nobody_knows_keeps_the_rest_raw(tag: bytes) -> None:
    properties = read(
        HEADERS | APP_ID,
        table((b"first", b"S", long(b"a")), (b"odd", tag, b"\x00\x01"), (b"last", b"t", b"\x01"))
        + short(b"app"),
    )
    assert properties.headers is not None
    assert properties.headers["first"] == "a"
    odd = properties.headers["odd"]
    assert isinstance(odd, Undecodable)
    assert odd.raw.startswith(tag)  # the rest of the table, unread, kept as it came
    assert "last" not in properties.headers
    assert properties.app_id == "app"  # the table's length still says where it ends
    assert f"headers.odd: unknown field type {tag!r}" in notes_of(properties)
    incoming(properties)


def test_a_table_whose_length_overruns_the_frame() -> None:
    properties = read(HEADERS, struct.pack(">I", 5000) + short(b"k") + b"S" + long(b"v"))
    assert properties.headers is not None
    assert properties.headers["k"] == "v"
    assert "length overruns" in notes_of(properties)


def test_tables_nested_past_any_recursion_limit() -> None:
    nested = table((b"leaf", b"t", b"\x01"))
    for _ in range(20_000):  # 5 bytes a level: 100 KB, within a 128 KB frame
        nested = table((b"n", b"F", nested))
    properties = read(HEADERS, nested)
    depth = 0
    value: Any = properties.headers
    while isinstance(value, dict) and "n" in value:
        value, depth = value["n"], depth + 1
    assert isinstance(value, Undecodable)
    assert depth == MAX_DEPTH + 1  # the headers hold MAX_DEPTH tables; the next stays raw
    assert "nested too deep" in notes_of(properties)


def test_arrays_are_read_leniently_too() -> None:
    array = long(b"S" + long(b"ok") + b"S" + long(b"\xff") + b"T" + struct.pack(">Q", 2**64 - 1))
    properties = read(HEADERS, table((b"list", b"A", array)))
    assert properties.headers is not None
    items = properties.headers["list"]
    assert isinstance(items, list)
    assert items[:2] == ["ok", b"\xff"]
    assert isinstance(items[2], Undecodable)
    notes = notes_of(properties)
    assert "headers.list[1]: not UTF-8" in notes
    assert "headers.list[2]: timestamp" in notes


def test_a_truncated_property_stops_the_reading_and_says_so() -> None:
    properties = read(MESSAGE_ID | APP_ID, bytes([200]) + b"short")
    assert properties.message_id is None
    assert properties.app_id is None
    assert "message_id: truncated" in notes_of(properties)


def test_notes_are_bounded_however_many_problems() -> None:
    entries = [(f"k{i}".encode(), b"S", long(b"\xff" * 1000)) for i in range(100)]
    properties = read(HEADERS, table(*entries))
    notes = unreadable(properties.headers)
    assert notes is not None
    assert len(notes.notes) == lenient.MAX_NOTES + 1
    assert notes.notes[-1] == "and more"
    assert len(notes.describe()) <= lenient.MAX_DESCRIBED


def test_pinned_to_the_versions_it_was_written_for() -> None:
    for package, prefix in lenient.PINNED.items():
        assert version(package).startswith(prefix)


def test_install_refuses_other_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pinned, "version", lambda package: "99.0.0")
    with pytest.raises(RuntimeError, match=re.escape("warmer.bus.lenient was written for pamqp")):
        lenient.install()


@pytest.mark.parametrize(
    ("install", "who"),
    [(reader.install, "reader"), (flow.install, "flow"), (Wire, "wire")],
)
def test_every_patch_refuses_other_versions(
    monkeypatch: pytest.MonkeyPatch, install: Callable[[], object], who: str
) -> None:
    monkeypatch.setattr(pinned, "version", lambda package: "99.0.0")
    refusal = re.escape(f"warmer.bus.{who} was written for aiormq 7.2.x")
    with pytest.raises(RuntimeError, match=refusal):
        install()
