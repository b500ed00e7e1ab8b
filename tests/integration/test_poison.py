"""One bad message never stalls the worker, drops its connection, or costs a good message.

Each case publishes poison, crafted at the frame level as another language's client
would send it (``raw_amqp``), in the middle of a stream of valid events, then checks:
every valid event applied exactly once (one surface update each) and none dead-lettered;
every poison message in ``<ns>.dead`` with its reason; the worker's connection never
re-established; a fresh valid event applied within a second afterwards.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import msgspec
import pytest
from aio_pika.robust_channel import RobustChannel

from tests.integration.probe import Listener, Probe, header
from tests.integration.raw_amqp import Raw, RawPublisher, props, short_bytes, table
from warmer.app import App
from warmer.bus import deadletter
from warmer.bus.topology import COMMAND_ROUTING_KEY
from warmer.core.records import decode_record
from warmer.store import MemoryStore

pytestmark = pytest.mark.broker

VALID = 100
CONVERSATIONS = 20
FRESH_WITHIN_S = 1.0
JSON = {"content_type": "application/json"}


def settled(i: int) -> bytes:
    return msgspec.json.encode({"type": "turn.settled", "conversationId": f"c{i % CONVERSATIONS}"})


def long_str(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


class Stream:
    """Publishes valid events around poison on one raw connection, and checks the outcome."""

    def __init__(self, raw: RawPublisher, probe: Probe, surfaces: Listener, app: App) -> None:
        self.raw = raw
        self.probe = probe
        self.surfaces = surfaces
        self.app = app

    async def event(self, body: bytes, **properties: Any) -> None:
        flags, encoded = props(**properties)
        routing_key = "turn.settled"
        await self.raw.publish(self.probe.names.lifecycle, routing_key, body, encoded, flags=flags)

    async def command(self, body: bytes, **properties: Any) -> None:
        flags, encoded = props(**properties)
        exchange = self.probe.names.commands
        await self.raw.publish(exchange, COMMAND_ROUTING_KEY, body, encoded, flags=flags)

    async def around(self, poison: Callable[[], Awaitable[None]]) -> None:
        """Half the valid events, the poison, the other half."""
        for i in range(VALID // 2):
            await self.event(settled(i), **JSON)
        await poison()
        for i in range(VALID // 2, VALID):
            await self.event(settled(i), **JSON)

    async def check(self, poison_count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Every valid event applied once, the poison dead-lettered; its dead letters."""
        applied: Counter[str] = Counter()
        for _ in range(VALID):
            body = await self.surfaces.next_body(30)
            applied[body["conversationId"]] += 1
        assert applied == {f"c{i}": VALID // CONVERSATIONS for i in range(CONVERSATIONS)}
        fresh = f"fresh-{uuid.uuid4().hex[:6]}"
        sent = time.monotonic()
        await self.event(msgspec.json.encode({"type": "turn.started", "conversationId": fresh}))
        body = await self.surfaces.next_body(FRESH_WITHIN_S)
        assert body["conversationId"] == fresh
        assert time.monotonic() - sent < FRESH_WITHIN_S
        await self.surfaces.nothing(0.2)  # nothing applied twice
        dead = [await self.probe.dead_letter(10) for _ in range(poison_count)]
        assert await self.probe.dead_count() == 0  # no valid event among them
        assert self.app.reconnections == 0
        assert self.app.worker is not None
        return dead


@pytest.fixture
async def stream(amqp_url: str, probe: Probe, start_worker: Any) -> AsyncIterator[Stream]:
    app = await start_worker()
    surfaces = await probe.surfaces()
    raw = await RawPublisher.connect(amqp_url)
    try:
        yield Stream(raw, probe, surfaces, app)
    finally:
        await raw.close()


def reasons(dead: list[aio_pika.abc.AbstractIncomingMessage]) -> Counter[str]:
    return Counter(str(message.headers.get("x-warmer-reason")) for message in dead)


def error_of(dead: aio_pika.abc.AbstractIncomingMessage) -> str:
    """The worker's error text on a dead letter: always a string."""
    error = dead.headers["x-warmer-error"]
    assert isinstance(error, str), error
    return error


# -- lifecycle events --------------------------------------------------------------------


async def test_more_poison_than_the_prefetch_with_headers_that_are_not_utf8(
    stream: Stream,
) -> None:
    count = 300  # the prefetch is 256
    header = Raw(table((b"trace", b"S", long_str(b"\xc3\x28\xff"))).data)

    async def poison() -> None:
        for _ in range(count):
            await stream.event(b"{not json", headers=header, **JSON)

    await stream.around(poison)
    dead = await stream.check(count)
    assert reasons(dead) == {"invalid_properties": count}
    assert dead[0].headers["trace"] == bytearray(b"\xc3\x28\xff")  # kept, as bytes
    assert "headers.trace: not UTF-8" in error_of(dead[0])
    assert dead[0].body == b"{not json"


@pytest.mark.parametrize(
    ("case", "properties", "noted"),
    [
        ("timestamp in microseconds", {"timestamp": 1_795_610_731_000_000}, "timestamp"),
        ("timestamp 2^64-1", {"timestamp": 2**64 - 1}, "timestamp"),
        ("message_id not UTF-8", {"message_id": short_bytes(b"m\xff")}, "message_id"),
        ("content_type not UTF-8", {"content_type": short_bytes(b"app\xfe")}, "content_type"),
        ("app_id not UTF-8", {"app_id": short_bytes(b"\x80")}, "app_id"),
        (
            "header key not UTF-8",
            {"headers": table((b"k\xff", b"S", long_str(b"v")))},
            "a key is not UTF-8",
        ),
        (
            "header timestamp beyond 9999",
            {"headers": table((b"when", b"T", struct.pack(">Q", 2**63 - 1)))},
            "headers.when: timestamp",
        ),
        (
            "nested table value not UTF-8",
            {"headers": table((b"outer", b"F", table((b"inner", b"S", long_str(b"\xff")))))},
            "headers.outer.inner: not UTF-8",
        ),
    ],
)
async def test_properties_the_client_cannot_decode(
    stream: Stream, case: str, properties: dict[str, Any], noted: str
) -> None:
    count = 5

    async def poison() -> None:
        for _ in range(count):  # a valid body: the properties alone make it poison
            await stream.event(settled(0), **{**JSON, **properties})

    await stream.around(poison)
    dead = await stream.check(count)
    assert reasons(dead) == {"invalid_properties": count}, case
    assert noted in error_of(dead[0])
    assert dead[0].body == settled(0)


async def test_headers_near_the_frame_size_are_cut_to_fit(stream: Stream) -> None:
    # The original's header frame ends 40 bytes short of the frame size (the quorum queue
    # adds 26 with x-delivery-count); the reason headers need more than that.
    big = "h" * (stream.raw.frame_max - 104)

    async def poison() -> None:
        await stream.event(b"b" * 60_000, headers={"big": big, "small": "s"}, **JSON)

    await stream.around(poison)
    (dead,) = await stream.check(1)
    assert dead.headers["x-warmer-reason"] == "invalid_json"
    assert dead.headers["x-warmer-headers-cut"] == "big"
    assert dead.headers["small"] == "s"
    assert dead.body == b"b" * 60_000


async def test_an_error_text_the_size_of_the_message(stream: Stream) -> None:
    body = b'{"type": ["' + "\u0378".encode() * 32_000 + b'"]}'

    async def poison() -> None:
        await stream.event(body, **JSON)

    await stream.around(poison)
    (dead,) = await stream.check(1)
    assert dead.headers["x-warmer-reason"] == "invalid_field"
    assert len(error_of(dead)) <= 500


async def test_deep_nesting(stream: Stream) -> None:
    async def poison() -> None:
        await stream.event(b"[" * 10_000 + b"]" * 10_000, **JSON)
        nested = b"[" * 10_000 + b"]" * 10_000
        await stream.event(b'{"type":"turn.started","conversationId":"x","n":' + nested + b"}")

    await stream.around(poison)
    dead = await stream.check(2)
    assert reasons(dead) == {"invalid_json": 2}
    assert "nested more than 32" in error_of(dead[0])


async def test_a_compressed_body(stream: Stream) -> None:
    async def poison() -> None:
        await stream.event(settled(0), content_encoding="gzip", **JSON)

    await stream.around(poison)
    (dead,) = await stream.check(1)
    assert dead.headers["x-warmer-reason"] == "invalid_content_type"


async def test_unknown_types_without_end_are_counted_in_bounded_memory(stream: Stream) -> None:
    count = 400

    async def poison() -> None:
        for i in range(count):
            kind = f"{i:05}" + "t" * 60_000
            await stream.event(msgspec.json.encode({"type": kind, "conversationId": "x"}))

    await stream.around(poison)
    await stream.check(0)
    worker = stream.app.worker
    assert worker is not None
    assert stream.app.metrics.value("warmer_events_consumed_total", type="unknown") == count
    remembered = worker._applier.unknown_types
    assert len(remembered) <= 257
    assert max(len(kind) for kind in remembered) <= 64


# -- another broker user's user_id -------------------------------------------------------


@pytest.fixture
def other_user(amqp_url: str) -> Iterator[str]:
    """A second broker user, made and removed with rabbitmqctl; its AMQP URL."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    parts = urlsplit(amqp_url)
    if rabbitmqctl is None or parts.hostname not in ("127.0.0.1", "localhost"):
        reason = "a second broker user needs rabbitmqctl on the broker's host"
        if os.environ.get("WARMER_REQUIRE_BROKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    name, password = f"wt-other-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    vhost = parts.path[1:] or "/"

    def ctl(*args: str) -> None:
        subprocess.run([rabbitmqctl, *args], check=True, capture_output=True, timeout=60)

    ctl("add_user", name, password)
    try:
        ctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        netloc = f"{name}:{password}@{parts.hostname}:{parts.port or 5672}"
        yield urlunsplit(
            (parts.scheme, netloc, quote(vhost, safe="") if vhost != "/" else "/", "", "")
        )
    finally:
        ctl("delete_user", name)


async def test_an_invalid_event_with_another_users_user_id(
    amqp_url: str, other_user: str, probe: Probe, start_worker: Any
) -> None:
    app = await start_worker()
    surfaces = await probe.surfaces()
    user = urlsplit(other_user).username
    other = await RawPublisher.connect(other_user)
    raw = await RawPublisher.connect(amqp_url)
    try:
        stream = Stream(raw, probe, surfaces, app)

        async def poison() -> None:
            flags, encoded = props(user_id=user, **JSON)
            for _ in range(30):
                await other.publish(probe.names.lifecycle, "x", b"{bad", encoded, flags=flags)

        await stream.around(poison)
        dead = await stream.check(30)
    finally:
        await other.close()
        await raw.close()
    assert reasons(dead) == {"invalid_json": 30}
    assert dead[0].user_id is None
    assert dead[0].headers["x-warmer-original-user-id"] == user


async def test_commands_with_another_users_user_id_are_answered_and_dead_lettered(
    other_user: str, probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    user = urlsplit(other_user).username
    replies = await probe.channel.declare_queue(exclusive=True, auto_delete=True)
    listener = Listener(replies)
    await listener.start()
    other = await RawPublisher.connect(other_user)
    try:
        flags, encoded = props(user_id=user, reply_to=replies.name, correlation_id="k", **JSON)
        for _ in range(10):
            await other.publish(
                probe.names.commands, COMMAND_ROUTING_KEY, b"[1]", encoded, flags=flags
            )
        good = await probe.command({"type": "get_state", "conversationId": "c"})
    finally:
        await other.close()
    assert good["ok"] is True
    for _ in range(10):
        reply = await listener.next_body()
        assert reply == {"ok": False, "error": "body is not a JSON object", "code": "invalid_json"}
    dead = [await probe.dead_letter() for _ in range(10)]
    assert reasons(dead) == {"invalid_json": 10}


# -- commands ------------------------------------------------------------------------------


async def test_poison_commands_are_answered_where_they_can_be_and_dead_lettered(
    stream: Stream,
) -> None:
    replies = await stream.probe.channel.declare_queue(exclusive=True, auto_delete=True)
    listener = Listener(replies)
    await listener.start()
    answered = {"reply_to": replies.name, **JSON}
    poison: list[tuple[bytes, dict[str, Any], str]] = [
        (b"[" * 10_000 + b"]" * 10_000, answered, "invalid_json"),
        (b'{"type": ["' + "\u0378".encode() * 32_000 + b'"]}', answered, "invalid_field"),
        (b"{}", {**answered, "timestamp": 1_795_610_731_000_000}, "invalid_properties"),
        (b"{}", {**answered, "correlation_id": short_bytes(b"\xff")}, "invalid_properties"),
        (b"{}", {**answered, "content_encoding": "br"}, "invalid_content_type"),
    ]
    for body, properties, _ in poison:
        await stream.command(body, **properties)
    get_state = msgspec.json.encode({"type": "get_state", "conversationId": "c"})
    await stream.command(get_state, **answered)
    codes = [(await listener.next_body())["code"] for _ in poison]
    assert codes == [code for _, _, code in poison]
    assert (await listener.next_body())["ok"] is True  # the good command after them
    dead = [await stream.probe.dead_letter() for _ in range(4)]  # all but the field error
    assert sorted(reasons(dead)) == ["invalid_content_type", "invalid_json", "invalid_properties"]
    assert stream.app.reconnections == 0


# -- when the dead letter itself is refused ------------------------------------------------


async def test_a_dead_letter_the_broker_refuses_is_rejected_to_the_queue(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = deadletter.build

    def refused(incoming: Any, rejection: Any, frame_max: int) -> Any:
        message = build(incoming, rejection, frame_max)
        message.user_id = "somebody-else"  # the broker refuses it: PRECONDITION_FAILED
        return message

    monkeypatch.setattr(deadletter, "build", refused)

    async def poison() -> None:
        for _ in range(3):
            await stream.event(b"{bad", **JSON)

    await stream.around(poison)
    dead = await stream.check(3)
    assert stream.app.worker is not None
    assert stream.app.metrics.value("warmer_dead_letters_refused_total") == 3
    for message in dead:
        assert "x-warmer-reason" not in message.headers
        assert header(message, "x-death")[0]["reason"] == "rejected"
        assert message.body == b"{bad"


async def test_a_refused_dead_letter_channel_aio_pika_did_not_restore_is_restored(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen once in CI: aio-pika's close callback failed, the dead-letter channel stayed
    # closed, and every later dead letter waited on it until the worker stopped. Here the
    # first restore after each refusal fails the same way.
    build = deadletter.build
    restore = RobustChannel.restore
    refusals = failures = 0

    def refused(incoming: Any, rejection: Any, frame_max: int) -> Any:
        nonlocal refusals
        refusals += 1
        message = build(incoming, rejection, frame_max)
        message.user_id = "somebody-else"  # the broker refuses it: PRECONDITION_FAILED
        return message

    async def failing(channel: RobustChannel, *args: Any) -> None:
        nonlocal failures
        if failures < refusals:
            failures += 1
            raise aiormq.exceptions.ChannelInvalidStateError("restore failed (simulated)")
        await restore(channel, *args)

    monkeypatch.setattr(deadletter, "build", refused)
    monkeypatch.setattr(RobustChannel, "restore", failing)
    assert stream.app._publisher is not None
    stream.app._publisher.nudge_after_s = 0.2

    async def poison() -> None:
        for _ in range(3):
            await stream.event(b"{bad", **JSON)

    started = time.monotonic()
    await stream.around(poison)
    dead = await stream.check(3)
    assert failures == 3 and time.monotonic() - started < 20
    assert stream.app.metrics.value("warmer_dead_letters_refused_total") == 3
    assert all(header(message, "x-death")[0]["reason"] == "rejected" for message in dead)


# -- a store that is down for a while ------------------------------------------------------


async def test_a_store_failing_30_times_dead_letters_nothing_and_loses_nothing(
    amqp_url: str, namespace: str, tmp_path: Any, probe: Probe
) -> None:
    from tests.integration.conftest import make_config

    app = App(make_config(amqp_url, namespace, tmp_path, store="memory://"), retry_ms=(5, 20))
    await app.start()
    try:
        store = app.store
        assert isinstance(store, MemoryStore)
        surfaces = await probe.surfaces()
        store.fail_next = 30
        for i in range(VALID):
            kind = "conversation.closed" if i % 2 else "turn.settled"
            await probe.event({"type": kind, "conversationId": f"c{i % CONVERSATIONS}"})
        applied: Counter[str] = Counter()
        for _ in range(VALID):
            applied[(await surfaces.next_body(30))["conversationId"]] += 1
        assert sum(applied.values()) == VALID
        assert app.worker is not None
        assert app.metrics.value("warmer_store_errors_total") == 30
        for i in range(CONVERSATIONS):
            record = decode_record(store.records[f"c{i}"])
            # The odd events close the odd conversations.
            assert record.settings.enabled is False
            assert record.state is not None
        assert await probe.dead_count() == 0
        assert app.reconnections == 0
    finally:
        await app.stop()
    queue = await probe.channel.declare_queue(probe.names.lifecycle, passive=True)
    assert queue.declaration_result.message_count == 0  # every event acknowledged
