"""Hostile tests for issue 17's wire (frames from templates, a loop turn's publishes in one
write, confirms in aiormq's bookkeeping, the buffered frame reader) on the real broker:
a returned mandatory publish among a batch, nacks among confirms, a channel the broker
closes while a batch is queued, a connection cut in the middle of a coalesced write.
Each test declares its own names and deletes them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import DeliveryError
from pamqp import commands as spec

from tests.integration.probe import Probe
from tests.reliability.tcp_proxy import TcpProxy
from warmer.bus import lenient, reader
from warmer.bus.frames import FRAME_OVERHEAD, Properties, method_frame, publish_frames
from warmer.bus.wire import Wire

PROPS = Properties({"content_type": "application/json", "delivery_mode": 2}, ("message_id",))


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    reader.install()
    lenient.install()
    conn = await aio_pika.connect_robust(amqp_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def name() -> str:
    return f"wt-h17-{uuid.uuid4().hex[:8]}"


async def _cleanup(amqp_url: str, queues: list[str], exchanges: list[str]) -> None:
    conn = await aio_pika.connect(amqp_url)
    try:
        channel = await conn.channel()
        for q in queues:
            await channel.queue_delete(q)
        for e in exchanges:
            await channel.exchange_delete(e)
    finally:
        await conn.close()


def _frames(channel: Any, exchange: str, key: str, body: bytes, mid: str, mandatory: bool) -> bytes:
    max_body = channel.connection.connection_tune.frame_max - FRAME_OVERHEAD
    method = method_frame(channel.number, exchange, key, mandatory=mandatory)
    return publish_frames(channel.number, max_body, method, PROPS.encode(mid), body)


async def _settled(futures: list[asyncio.Future[Any]], timeout: float = 10) -> list[Any]:
    done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)
    return list(done)


async def test_a_returned_warm_among_a_batch_of_surfaces_and_nacks_among_confirms(
    amqp_url: str, connection: Any, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    robust = await connection.channel(publisher_confirms=True)
    exchange = await robust.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=False)
    queue = await robust.declare_queue(
        name, arguments={"x-max-length": 5, "x-overflow": "reject-publish"}
    )
    await queue.bind(exchange, "s")
    try:
        channel = await robust.get_underlay_channel()
        wire = Wire()
        futures = []
        writes = wire.writes
        for i in range(12):
            mandatory = i == 6  # a warm nobody consumes, among surfaces
            key = "nowhere" if mandatory else "s"
            body = b"x" * (channel.connection.connection_tune.frame_max * 2 if i == 3 else 10)
            futures.append(
                wire.send(
                    channel,
                    _frames(channel, name, key, body, f"m-{i}", mandatory),
                    returnable=f"m-{i}" if mandatory else None,
                )
            )
        results = await _settled(futures)
        assert wire.writes == writes + 1  # one write for the turn
        returned = results[6]
        assert isinstance(returned, DeliveredMessage)
        assert returned.header.properties.message_id == "m-6"
        others = results[:6] + results[7:]
        acked = [r for r in others if isinstance(r, spec.Basic.Ack)]
        nacked = [r for r in others if isinstance(r, DeliveryError)]
        assert (len(acked), len(nacked)) == (5, 6), results  # the queue holds 5, refuses more
        assert all(isinstance(r, spec.Basic.Ack) for r in results[:5])
        declared = await channel.queue_declare(name, passive=True)
        assert declared.message_count == 5
        # The channel still works afterwards: the bookkeeping is consistent.
        await queue.purge()
        again = wire.send(channel, _frames(channel, name, "s", b"{}", "m-after", False))
        assert isinstance(await asyncio.wait_for(again, 10), spec.Basic.Ack)
        assert not channel.confirmations
        assert not channel.message_id_delivery_tag
        bad = [
            r
            for r in caplog.records
            if r.name.startswith("aiormq") and r.levelno >= logging.WARNING
        ]
        assert not bad, [r.getMessage() for r in bad]
    finally:
        await _cleanup(amqp_url, [name], [name])


async def test_a_channel_closed_by_the_broker_fails_every_queued_publish_and_confirms_none(
    amqp_url: str, connection: Any, name: str
) -> None:
    robust = await connection.channel(publisher_confirms=True)
    channel = await robust.get_underlay_channel()
    wire = Wire()
    # A batch to an exchange that does not exist: the broker closes the channel (404).
    first = [
        wire.send(channel, _frames(channel, name, "k", b"{}", f"a-{i}", False)) for i in range(20)
    ]
    await asyncio.sleep(0)
    second = []
    if not channel.is_closed:  # queued behind the first, before the close arrives
        second = [
            wire.send(channel, _frames(channel, name, "k", b"{}", f"b-{i}", False))
            for i in range(20)
        ]
    results = await _settled(first + second)
    confirmed = [r for r in results if not isinstance(r, BaseException)]
    assert confirmed == []
    assert channel.is_closed


async def test_a_connection_cut_mid_write_loses_no_confirmed_publish(
    amqp_url: str, name: str
) -> None:
    reader.install()
    lenient.install()
    proxy = await TcpProxy.to_broker(amqp_url)
    conn = await aio_pika.connect(proxy.url(amqp_url))
    try:
        robust = await conn.channel(publisher_confirms=True)
        await robust.declare_queue(name, durable=True)
        channel: Any = await robust.get_underlay_channel()
        wire = Wire()
        body = b"y" * 20_000
        futures: list[asyncio.Future[Any]] = []
        acks = 0

        def counted(future: asyncio.Future[Any]) -> None:
            nonlocal acks
            acks += not future.cancelled() and future.exception() is None

        cut_at = None
        for turn in range(200):  # 20 publishes a turn, coalesced; cut once some are confirmed
            if cut_at is None and acks >= 60:
                proxy.cut()
                cut_at = turn
            try:
                for _ in range(20):
                    mid = f"c-{len(futures)}"
                    future = wire.send(channel, _frames(channel, "", name, body, mid, False))
                    future.add_done_callback(counted)
                    futures.append(future)
            except Exception:  # the channel is known closed: nothing more to send
                break
            await asyncio.sleep(0.002)
        assert cut_at is not None
        results = await _settled(futures, timeout=20)
        confirmed = {f"c-{i}" for i, r in enumerate(results) if isinstance(r, spec.Basic.Ack)}
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(confirmed) + len(failed) == len(futures)
        assert failed, "the cut came too late to test anything"
    finally:
        await proxy.close()
        with contextlib.suppress(Exception):  # the connection was cut under it
            await conn.close()
    # Every publish confirmed is in the queue.
    check = await aio_pika.connect(amqp_url)
    try:
        ch = await check.channel()
        q = await ch.declare_queue(name, durable=True, passive=True)
        seen: set[str] = set()
        while True:
            message = await q.get(no_ack=True, fail=False)
            if message is None:
                break
            assert message.message_id is not None
            seen.add(message.message_id)
        assert confirmed <= seen, sorted(confirmed - seen)[:5]
    finally:
        await check.close()
        await _cleanup(amqp_url, [name], [])


@pytest.fixture
async def slow_path(amqp_url: str) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy.to_broker(amqp_url)
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_a_broker_slow_to_answer_the_inbound_check_leaks_no_channel(
    slow_path: TcpProxy, amqp_url: str, start_worker: Any
) -> None:
    """The overload's inbound check (a passive declare every 250 ms on a channel of its
    own) gave up on a late answer by opening another channel, leaving the old one open:
    one channel more per slow answer, for as long as the connection lives (channel_max
    2047), under the overload that makes the broker slow."""
    app = await start_worker(amqp_url=slow_path.url(amqp_url), confirm_timeout_ms=1000)
    connection = app._connection.transport.connection
    await asyncio.sleep(0.6)  # the check's channel is open
    before = len(connection.channels)
    for _ in range(2):
        slow_path.blackhole()  # the answer comes late, not never
        await asyncio.sleep(1.5)
        slow_path.restore()
        await asyncio.sleep(0.6)
    assert app.reconnections == 0
    assert len(connection.channels) <= before


async def test_a_connection_cut_in_a_flood_loses_no_surface_and_leaves_no_unseen_error(
    slow_path: TcpProxy,
    amqp_url: str,
    start_worker: Any,
    probe: Probe,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Events flood in; the connection is cut while batches of surface updates are being
    written and confirmed. Every event is applied and its surface published after the
    reconnection (none acknowledged on a surface that was never confirmed), and no task
    fails unseen ("Task exception was never retrieved", a traceback in the log)."""
    caplog.set_level(logging.WARNING)
    app = await start_worker(amqp_url=slow_path.url(amqp_url))
    surfaces = await probe.surfaces()
    count = 400
    seen: set[str] = set()
    flowing = asyncio.Event()

    async def collect() -> None:
        while len(seen) < count:
            body = await surfaces.next_body(timeout=30)
            seen.add(body["conversationId"])
            if len(seen) >= 20:
                flowing.set()

    collecting = asyncio.get_running_loop().create_task(collect())
    for i in range(count):
        await probe.event({"type": "turn.settled", "conversationId": f"flood-{i}", "cwd": "/r"})
        if i == count // 3:
            await asyncio.wait_for(flowing.wait(), 10)  # surfaces are flowing
            slow_path.cut()
    await asyncio.wait_for(collecting, 40)
    assert len(seen) == count
    assert app.reconnections >= 1
    gc.collect()
    await asyncio.sleep(0.05)
    unseen = [str(r.msg) for r in caplog.records if "never retrieved" in str(r.msg)]
    assert not unseen
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert "never retrieved" not in out + err
