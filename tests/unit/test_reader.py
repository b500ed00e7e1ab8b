"""The buffered frame receiver hands out what aiormq's receiver does, however the bytes
arrive, and fails as it fails."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from warmer.bus.reader import BufferedFrameReceiver


def stream(count: int, seed: int) -> bytes:
    """Deliveries (method, header, body of up to 3 frames), confirms and heartbeats."""
    rng = random.Random(seed)
    frames: list[tuple[Any, int]] = []
    for tag in range(1, count + 1):
        kind = rng.random()
        channel = rng.randint(1, 3)
        if kind < 0.6:
            body = rng.randbytes(rng.choice([0, 1, 90, 256, 5000]))
            properties = spec.Basic.Properties(
                content_type="application/json", headers={"conversation-id": f"c-é-{tag}"}
            )
            redelivered = rng.random() < 0.3
            deliver = spec.Basic.Deliver(f"ctag-é{tag}", tag, redelivered, "ex", f"rk-ü-{tag}")
            frames.append((deliver, channel))
            frames.append((ContentHeader(0, len(body), properties), channel))
            for start in range(0, len(body), 2048):
                frames.append((ContentBody(body[start : start + 2048]), channel))
        elif kind < 0.9:
            frames.append((spec.Basic.Ack(tag, multiple=rng.random() < 0.5), channel))
        else:
            frames.append((Heartbeat(), 0))
    return b"".join(pamqp.frame.marshal(frame, channel) for frame, channel in frames)


async def read_all(receiver: FrameReceiver) -> list[tuple[int, int, str]]:
    """Every frame until the stream ends: between frames, aiormq ends the iteration when
    it saw the end first, and raises a connection error when it was waiting for it."""
    out = []
    try:
        async for weight, channel, frame in receiver:
            out.append((weight, channel, _describe(frame)))
    except AMQPConnectionError as e:
        if "Read 0 bytes" not in str(e):
            raise
    return out


def _describe(frame: Any) -> str:
    if isinstance(frame, ContentBody):
        return f"body {frame.value!r}"
    if isinstance(frame, ContentHeader):
        return f"header {frame.body_size} {frame.properties.headers}"
    return f"{frame.name} " + repr({k: getattr(frame, k) for k in getattr(frame, "__slots__", ())})


def feed(data: bytes, chunks: list[int], eof: bool = True) -> asyncio.StreamReader:
    """A stream reader fed ``data`` in pieces, a loop turn apart."""
    reader = asyncio.StreamReader()

    async def feeding() -> None:
        position = 0
        for size in chunks:
            reader.feed_data(data[position : position + size])
            position += size
            await asyncio.sleep(0)
        reader.feed_data(data[position:])
        if eof:
            reader.feed_eof()

    task = asyncio.get_running_loop().create_task(feeding())
    reader._feeding = task  # type: ignore[attr-defined]  # kept alive
    return reader


@pytest.mark.parametrize("seed", range(6))
async def test_the_same_frames_as_aiormqs_receiver_however_the_bytes_are_split(
    seed: int,
) -> None:
    data = stream(300, seed)
    rng = random.Random(seed)
    chunks = [rng.choice([1, 3, 7, 8, 100, 4096, 70_000]) for _ in range(200)]
    theirs = await read_all(FrameReceiver(feed(data, chunks)))
    ours = await read_all(BufferedFrameReceiver(feed(data, chunks)))
    assert ours == theirs
    assert len(ours) > 300


async def test_a_connection_cut_mid_frame_is_a_connection_error_as_in_aiormq() -> None:
    data = stream(20, 1)
    for receiver_type in (FrameReceiver, BufferedFrameReceiver):
        receiver = receiver_type(feed(data[:-5], [50]))
        with pytest.raises(AMQPConnectionError, match=r"unexpectedly closed\. Read [1-9]"):
            await read_all(receiver)


async def test_a_protocol_header_from_the_peer_is_refused_as_in_aiormq() -> None:
    header = b"AMQP\x00\x00\x09\x01"
    for receiver_type in (FrameReceiver, BufferedFrameReceiver):
        with pytest.raises(ProtocolSyntaxError):
            await receiver_type(feed(header, [])).get_frame()


async def test_a_frame_that_does_not_decode_is_an_invalid_frame_as_in_aiormq() -> None:
    bad = pamqp.frame.marshal(spec.Basic.Ack(1), 1)[:-1] + b"\x00"  # no frame end
    for receiver_type in (FrameReceiver, BufferedFrameReceiver):
        with pytest.raises(InvalidFrameError):
            await receiver_type(feed(bad, [])).get_frame()


async def test_many_frames_in_one_read_come_out_without_waiting_for_the_socket() -> None:
    data = stream(100, 2)
    reader = feed(data, [], eof=False)
    receiver = BufferedFrameReceiver(reader)
    await receiver.get_frame()  # the one read
    reads = 0
    original = reader.read

    async def counted(n: int = -1) -> bytes:
        nonlocal reads
        reads += 1
        return await original(n)

    reader.read = counted  # type: ignore[method-assign]
    for _ in range(100):
        await receiver.get_frame()
    assert reads == 0


@pytest.mark.parametrize(
    "frame",
    [
        spec.Basic.Deliver("", 2**63 - 1, True, "", ""),
        spec.Basic.Deliver("t" * 255, 1, False, "x" * 127, "é" * 127),
        spec.Basic.Ack(0, False),
        spec.Basic.Ack(-1, True),
        spec.Basic.Nack(5, True, False),
        spec.Basic.Cancel("ctag", True),
    ],
)
async def test_the_methods_decoded_directly_are_pamqps(frame: Any) -> None:
    data = pamqp.frame.marshal(frame, 9)
    ours = await BufferedFrameReceiver(feed(data, [])).get_frame()
    theirs = pamqp.frame.unmarshal(data)
    assert (ours[0], ours[1], _describe(ours[2])) == (theirs[0], theirs[1], _describe(theirs[2]))


async def test_a_deliver_that_is_not_utf_8_fails_as_in_aiormq() -> None:
    data = pamqp.frame.marshal(spec.Basic.Deliver("ab", 1, False, "", "cd"), 1)
    bad = data.replace(b"\x02ab", b"\x02\xff\xfe")
    for receiver_type in (FrameReceiver, BufferedFrameReceiver):
        with pytest.raises(InvalidFrameError, match="utf-8"):
            await receiver_type(feed(bad, [])).get_frame()


_SIMPLE_NAMES: tuple[str, ...] = ("content_type", "content_encoding", "correlation_id", "reply_to")
_SIMPLE_NAMES += ("expiration", "message_id", "message_type", "user_id", "app_id")


@settings(max_examples=300, deadline=None)
@given(
    strings=st.fixed_dictionaries(
        {},
        optional={name: st.text(alphabet="ab1-é€😀", max_size=60) for name in _SIMPLE_NAMES},
    ),
    headers=st.sampled_from([None, {}]),
    delivery_mode=st.sampled_from([None, 1, 2, 0, 255]),
    priority=st.sampled_from([None, 0, 9, 255]),
    body_size=st.integers(0, 2**40),
)
def test_a_simple_content_header_is_decoded_as_pamqp_decodes_it(
    strings: dict[str, str],
    headers: dict[str, Any] | None,
    delivery_mode: int | None,
    priority: int | None,
    body_size: int,
) -> None:
    from warmer.bus import lenient

    given_: dict[str, Any] = dict(strings)
    properties = spec.Basic.Properties(priority=priority, headers=headers, **given_)
    properties.delivery_mode = delivery_mode  # 0 and 255 too: pamqp's constructor refuses them
    data = ContentHeader(0, body_size, properties).marshal()
    ours = lenient._simple(data)
    theirs = ContentHeader()
    theirs.unmarshal(data)
    assert ours is not None
    decoded: list[tuple[Any, ...]] = [
        (header.class_id, header.weight, header.body_size) for header in (ours, theirs)
    ]
    assert decoded == [(60, 0, body_size)] * 2
    for name in spec.Basic.Properties.__slots__:
        assert getattr(ours.properties, name) == getattr(theirs.properties, name), name


def test_headers_timestamps_and_odd_bytes_are_left_to_pamqp_and_the_lenient_reader() -> None:
    from datetime import UTC, datetime

    from warmer.bus import lenient

    for properties in [
        spec.Basic.Properties(headers={"a": "b"}),  # an empty table is read here
        spec.Basic.Properties(timestamp=datetime(2026, 1, 1, tzinfo=UTC)),
    ]:
        assert lenient._simple(ContentHeader(0, 1, properties).marshal()) is None
    data = ContentHeader(0, 1, spec.Basic.Properties(message_id="ab")).marshal()
    assert lenient._simple(data.replace(b"\x02ab", b"\x02\xff\xfe")) is None  # not UTF-8
    assert lenient._simple(data[:-1]) is None  # cut short
