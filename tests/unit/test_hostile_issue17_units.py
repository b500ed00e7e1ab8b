"""Hostile tests for issue 17's changes (wire, overload, mem): a hostile peer's bytes
through the buffered frame reader and the lenient header fast path, late completions
against armed and sent retries, a worker behind forever, and inputs that never repeat
through the bounded sharing tables."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import sys
from typing import Any

import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat
from structlog.testing import capture_logs

from tests.unit.conftest import Shell
from warmer.bus import lenient
from warmer.bus.memory import MemoryChannel
from warmer.bus.reader import BufferedFrameReceiver
from warmer.clock import ManualClock
from warmer.core import Arm
from warmer.core.sharing import Sharing
from warmer.core.state import Conversation
from warmer.inputs import Inputs, Received
from warmer.observe.failures import FAILURE_SUMMARY_EVERY_MS, FailureLog
from warmer.scheduler import Scheduler

C = "conv-1"
TIMEOUT = 60_000
FRAME_MAX = 4096

# Every AMQP field type pamqp encodes, plus nesting, in one header table.
EVERY_FIELD: dict[str, Any] = {
    "bool": True,
    "short-short": 5,
    "short": 300,
    "long": 70_000,
    "long-long": 2**40,
    "negative": -(2**40),
    "float": 1.5,
    "decimal": decimal.Decimal("3.14"),
    "string": "é" * 300,
    "not-utf-8": "ZZZZ",  # replaced by bytes that are not UTF-8 once marshalled
    "timestamp": datetime.datetime(2026, 12, 7, 22, 0, tzinfo=datetime.UTC),
    "void": None,
    "array": [1, "two", [3, {"four": 4}]],
    "table": {"inner": {"deeper": "x"}},
}


def _delivery_stream() -> bytes:
    """A delivery with every field type, user_id and a timestamp, a body of frame_max
    body frames, then a simple delivery (the fast path), a multiple ack, a heartbeat."""
    frames: list[tuple[Any, int]] = []
    body = bytes(range(256)) * 40  # 10,240 bytes: three body frames at frame_max 4096
    properties = spec.Basic.Properties(
        content_type="application/json",
        headers=EVERY_FIELD,
        delivery_mode=2,
        priority=9,
        correlation_id="c" * 255,
        user_id="guest",
        timestamp=datetime.datetime(2026, 12, 7, 22, 0, 1, tzinfo=datetime.UTC),
        message_id="m-ü",
        app_id="hostile",
    )
    frames.append((spec.Basic.Deliver("ctag", 1, False, "ex", "rk"), 1))
    frames.append((ContentHeader(0, len(body), properties), 1))
    for start in range(0, len(body), FRAME_MAX - 8):
        frames.append((ContentBody(body[start : start + FRAME_MAX - 8]), 1))
    simple = spec.Basic.Properties(content_type="application/json", headers={}, delivery_mode=2)
    frames.append((spec.Basic.Deliver("ctag", 2, True, "ex", "rk"), 1))
    frames.append((ContentHeader(0, 2, simple), 1))
    frames.append((ContentBody(b"{}"), 1))
    frames.append((spec.Basic.Ack(7, multiple=True), 2))
    data = b"".join(pamqp.frame.marshal(f, ch) for f, ch in frames)
    assert data.count(b"ZZZZ") == 1
    data = data.replace(b"ZZZZ", b"\xff\xfe\xfd\xfc")
    return data + pamqp.frame.marshal(Heartbeat(), 0)


async def read_all(receiver: FrameReceiver) -> list[tuple[int, int, str]]:
    """Every frame, a header with all its properties (the lenient notes as text)."""
    out: list[tuple[int, int, str]] = []
    try:
        await _collect(receiver, out)
    except AMQPConnectionError as e:  # the end of stream between frames
        if "Read 0 bytes" not in str(e):
            raise
    return out


async def _collect(receiver: FrameReceiver, out: list[tuple[int, int, str]]) -> None:
    async for weight, channel, frame in receiver:
        if isinstance(frame, ContentHeader):
            props = {k: getattr(frame.properties, k) for k in frame.properties.__slots__}
            headers = dict(props["headers"] or {})
            notes = lenient.unreadable(headers)
            if notes is not None:
                headers[lenient.UNREADABLE] = notes.describe()
            props["headers"] = headers
            out.append((weight, channel, f"header {frame.body_size} {props}"))
        elif isinstance(frame, ContentBody):
            out.append((weight, channel, f"body {frame.value!r}"))
        else:
            slots = getattr(frame, "__slots__", ())
            out.append((weight, channel, f"{frame.name} {[getattr(frame, k) for k in slots]}"))


def _fed(data: bytes, cut: int) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data[:cut])

    async def rest() -> None:
        await asyncio.sleep(0)
        reader.feed_data(data[cut:])
        reader.feed_eof()

    reader._rest = asyncio.get_running_loop().create_task(rest())  # type: ignore[attr-defined]
    return reader


async def test_a_stream_split_at_every_byte_boundary_reads_as_aiormqs_receiver() -> None:
    lenient.install()
    data = _delivery_stream()
    expected = await read_all(FrameReceiver(_fed(data, len(data))))
    assert len(expected) == 10
    for cut in range(len(data) + 1):
        assert await read_all(BufferedFrameReceiver(_fed(data, cut))) == expected, cut


async def test_a_stream_fed_one_byte_a_turn_reads_whole() -> None:
    lenient.install()
    data = _delivery_stream()
    reader = asyncio.StreamReader()

    async def trickle() -> None:
        for i in range(len(data)):
            reader.feed_data(data[i : i + 1])
            await asyncio.sleep(0)
        reader.feed_eof()

    task = asyncio.get_running_loop().create_task(trickle())
    got = await read_all(BufferedFrameReceiver(reader))
    await task
    assert got == await read_all(FrameReceiver(_fed(data, len(data))))


def _header(flags: int, properties: bytes, body_size: int = 2) -> bytes:
    return (
        (60).to_bytes(2, "big")
        + b"\0\0"
        + body_size.to_bytes(8, "big")
        + (flags.to_bytes(2, "big") + properties)
    )


@pytest.mark.parametrize(
    ("name", "flag"),
    [("user_id", 1 << 4), ("app_id", 1 << 3), ("content_type", 1 << 15), ("message_id", 1 << 7)],
)
def test_a_short_string_that_is_not_utf_8_is_noted_not_raised(name: str, flag: int) -> None:
    raw = b"\xc3\x28\xff"
    header = lenient._unmarshal_header_frame(_header(flag, bytes([len(raw)]) + raw))
    assert getattr(header.properties, name) is None
    notes = lenient.unreadable(header.properties.headers)
    assert notes is not None and name in notes.describe()


def test_a_timestamp_in_microseconds_does_not_break_the_header() -> None:
    micros = 1_765_144_800_000_000  # a producer that wrote microseconds, not seconds
    header = lenient._unmarshal_header_frame(_header(1 << 6, micros.to_bytes(8, "big")))
    assert header.body_size == 2  # read (leniently), the delivery survives


# -- overload: late completions against an armed and a sent retry ---------------------------


def test_a_late_completion_after_the_retry_went_out_is_stale_and_the_retry_is_credited(
    shell: Shell,
) -> None:
    first = shell.warming(C)
    shell.fire(C)  # timed out while keeping up
    assert shell.status(C) == "retrying"
    shell.fire(C)  # the retry goes out
    assert shell.status(C) == "warming"
    retry = shell.last_warm
    assert retry.token != first.token
    warms = len(shell.warms)
    assert shell.completed(C, token=first.token).verdict == "stale"
    assert (shell.status(C), shell.conv(C).failures) == ("warming", 1)
    assert shell.completed(C, token=retry.token).verdict == "applied"
    assert (shell.status(C), shell.conv(C).failures) == ("armed", 0)
    assert len(shell.warms) == warms  # no warm sent twice


def test_a_late_completion_while_the_retry_is_armed_leaves_no_retry_to_fire(
    shell: Shell,
) -> None:
    first = shell.warming(C)
    shell.fire(C)
    retry_token = shell.conv(C).token
    assert shell.completed(C, token=first.token).verdict == "applied"
    warms = len(shell.warms)
    # The retry's timer, had it already fired and waited in the inputs: nothing.
    out = shell.fire_token(C, retry_token)
    assert out.effects == [] and len(shell.warms) == warms
    assert shell.status(C) == "armed"
    # And the answer of that retry (never sent) is stale, as is a duplicate.
    assert shell.completed(C, token=retry_token).verdict == "stale"
    assert shell.completed(C, token=first.token).verdict == "stale"


def test_a_worker_behind_forever_still_fails_the_warm_within_the_bound(shell: Shell) -> None:
    shell.warming(C)
    deadline, token = shell.timers[C]
    now, checks = deadline, 0
    while True:
        out = shell.warmer.on_timer(now, C, token, 10**9)  # behind by ~11 days, forever
        checks += 1
        if out.verdict != "extended":
            break
        (arm,) = out.effects
        assert isinstance(arm, Arm)
        assert arm.due_at > now
        now = arm.due_at
        assert checks < 10
    assert now <= deadline + TIMEOUT
    assert shell.status(C) == "retrying" and shell.conv(C).failures == 1


# -- mem: input that never repeats through the sharing tables -------------------------------


def _held_bytes(sharing: Sharing) -> int:
    return sum(sys.getsizeof(s) for s in sharing._strings)


def test_distinct_cwds_never_grow_the_table_past_its_bound() -> None:
    sharing = Sharing(max_strings=1000, max_chars=50_000)
    for i in range(20_000):
        sharing.text(f"/home/user/project-{i}/" + "x" * (i % 40))
        assert len(sharing._strings) <= 1000
        assert sharing._chars <= 50_000
    assert _held_bytes(sharing) < 1000 * 200


def test_the_bound_holds_in_memory_for_non_ascii_working_directories() -> None:
    """The bound is documented as memory ("8 MiB of characters"); a string of astral
    characters takes four bytes each, so counting characters lets a hostile cwd stream
    hold four times the bound."""
    sharing = Sharing(max_strings=100_000, max_chars=1_000_000)
    most = 0
    for i in range(2_000):
        sharing.text(f"{i:06d}" + "\U0001f600" * 2_000)
        if i % 50 == 49:
            most = max(most, _held_bytes(sharing) - 100 * len(sharing._strings))
    assert most <= 1_000_000


def test_adopting_thousands_of_distinct_conversations_keeps_the_tables_bounded() -> None:
    sharing = Sharing(max_strings=500, max_chars=100_000, max_numbers=64)
    for i in range(5_000):
        conv = Conversation(enabled=True, interval_ms=60_000 + i, idle_since=i)
        conv.cwd = f"/srv/{i}"
        conv.model_name = f"model-{i}"
        conv.timeout_ms = 1_000 + i
        sharing.adopt(conv)
        assert conv.cwd == f"/srv/{i}" and conv.interval_ms == 60_000 + i
    assert len(sharing._strings) <= 500 and len(sharing._numbers) <= 64


# -- overload: the failure summary's tail -------------------------------------------------


async def test_the_tail_of_a_failure_burst_is_told_without_another_batch() -> None:
    """A burst that pauses the conversations it hits leaves nothing to commit after it:
    its pauses were only told at the next batch (maybe hours later) or at stop."""
    clock = ManualClock(1_000_000)
    failures = FailureLog(clock)
    with capture_logs() as logs:
        failures.failed("timeout", "c1", "no answer", paused=False)
        failures.flush()  # the first batch of the burst: told at once
        failures.failed("timeout", "c1", "no answer", paused=True)
        failures.flush()  # within the interval: held
        task = asyncio.get_running_loop().create_task(failures.run())
        try:
            await asyncio.sleep(0)
            clock.advance(FAILURE_SUMMARY_EVERY_MS)  # and then nothing commits
            for _ in range(3):
                await asyncio.sleep(0)
        finally:
            task.cancel()
    lines = [e for e in logs if e["event"] == "warms_failed"]
    assert [line["paused"] for line in lines] == [0, 1]
    assert not task.done() or task.cancelled()


def test_a_backlog_that_never_drains_still_fails_an_outstanding_warm_within_the_bound(
    shell: Shell,
) -> None:
    shell.warming(C)
    deadline, token = shell.timers[C]
    assert shell.scheduler.checks[-1:] == [C]  # the worker armed the timeout as a check
    worker = shell.worker
    worker.inbound(worker.hold_above + 1, 0, 250)  # a flood the worker never drains
    assert worker._room() == 0
    fired: list[str] = []

    async def run() -> None:
        clock = ManualClock(shell.now)
        scheduler = Scheduler(clock, lambda key, token: fired.append(key), room=worker._room)
        scheduler.arm(C, deadline, token, check=True)  # the warm's timeout, as armed
        scheduler.arm("held", deadline, 1)  # a warm due as long: held back by the room
        scheduler.start()
        try:
            clock.set(deadline + 2 * TIMEOUT)  # past the bound: deadline + one more timeout
            for _ in range(5):
                await asyncio.sleep(0)
        finally:
            await scheduler.stop()

    shell._run(run())
    assert fired == [C]  # the check runs (and, the worker behind, fails at the bound)


# -- overload: commands first, not commands only --------------------------------------------


async def test_a_steady_stream_of_commands_does_not_starve_the_lifecycle_events() -> None:
    """Commands are taken first; a dashboard polling ``get_state`` (or a hostile publisher)
    sending a command before every batch must not keep completions and turns waiting for
    ever: they wait at most one commands batch."""
    clock = ManualClock(1_000_000)
    inputs = Inputs(clock)
    lifecycle, commands = MemoryChannel("lifecycle"), MemoryChannel("commands")
    await inputs.lifecycle(lifecycle.deliver(b"{}"))
    kinds = []
    for _ in range(10):
        await inputs.command(commands.deliver(b"{}"))  # one more command before each take
        batch = await inputs.take()
        assert batch is not None
        kinds.append({i.queue for i in batch if isinstance(i, Received)})
        clock.advance(5)
    assert {"lifecycle"} in kinds[:2]
    assert kinds[0] == {"commands"}  # and commands still come first
