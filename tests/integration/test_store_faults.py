"""The store lies or fails under a running worker: each fault once, over the real broker.

A Redis of the test's own (``tests/redis_server.py``) is restarted empty or frozen with
SIGSTOP; an SQLite file is locked by another process. In each case a command's reply is
what the store holds, live and after the next worker's start, and a command is answered
within the bound the README states (``WARMER_STORE_TIMEOUT_MS`` and one reply) whenever
its outcome is known.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from tests.integration.probe import Probe
from tests.redis_server import redis_server
from tests.sqlite_lock import Locker
from warmer.app import STORE_CHECK_MS, App

pytestmark = pytest.mark.broker

TIMEOUT_MS = 1000
BOUND_S = TIMEOUT_MS / 1000 + 1.5  # the store's timeout, then the reply's round trip


def set_interval(cid: str, interval_ms: int) -> dict[str, Any]:
    return {"type": "set_interval", "conversationId": cid, "intervalMs": interval_ms}


async def interval_of(probe: Probe, cid: str) -> int:
    reply = await probe.command({"type": "get_state", "conversationId": cid}, timeout=5)
    assert reply["ok"] is True, reply
    return int(reply["state"]["intervalMs"])


async def timed(probe: Probe, body: dict[str, Any], timeout: float = 10) -> tuple[Any, float]:
    started = time.monotonic()
    reply = await probe.command(body, timeout=timeout)
    return reply, time.monotonic() - started


async def test_a_redis_restarted_empty_is_given_every_conversation_again(
    probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    async with redis_server(tmp_path) as server:
        store = f"{server.url}?prefix=faults"
        app: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        answered: dict[str, int] = {}
        for n in range(60):
            reply = await probe.command(set_interval(f"c-{n}", 10_000 + n))
            assert reply["ok"] is True, reply
            answered[f"c-{n}"] = 10_000 + n
        await server.restart()  # no persistence: it comes back empty
        # Idle: the periodic check notices, and the worker writes everything again.
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            deadline = time.monotonic() + STORE_CHECK_MS / 1000 + 5
            while await client.hlen("faults:conversations") < 60:
                assert time.monotonic() < deadline, "the store was not given its data again"
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()
        assert app.metrics.value("warmer_store_data_lost_total") == 1
        assert app.readiness() is None
        # Commands go on; then one more restart, with a command right behind it.
        for n in range(60, 80):
            reply = await probe.command(set_interval(f"c-{n}", 20_000 + n))
            assert reply["ok"] is True, reply
            answered[f"c-{n}"] = 20_000 + n
        await server.restart()
        reply = await probe.command(set_interval("c-0", 30_000))
        assert reply["ok"] is True, reply
        answered["c-0"] = 30_000
        assert app.metrics.value("warmer_store_data_lost_total") == 2
        await app.stop()
        again: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        for cid, interval_ms in answered.items():
            assert await interval_of(probe, cid) == interval_ms, cid
        assert again.metrics.value("warmer_store_data_lost_total") == 0


async def test_a_frozen_redis_answers_a_command_once_its_outcome_is_known(
    probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    async with redis_server(tmp_path) as server:
        store = f"{server.url}?prefix=faults"
        app: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        assert (await probe.command(set_interval("frozen", 30_000)))["ok"] is True
        assert (await probe.command(set_interval("other", 40_000)))["ok"] is True
        server.freeze()
        try:
            pending = asyncio.create_task(timed(probe, set_interval("frozen", 55_555), 30))
            await asyncio.sleep(TIMEOUT_MS / 1000 * 3)
            assert not pending.done(), "answered while its outcome was unknown"
            assert "store" in (app.readiness() or "")
            # A command behind it is known not to be written: answered at once.
            refused, took = await timed(probe, set_interval("other", 44_444))
            assert refused["ok"] is False and refused["code"] == "store_error", refused
            assert "not written" in refused["error"], refused
            assert took < BOUND_S, took
        finally:
            server.thaw()
        reply, _ = await pending
        assert reply == {"ok": True, "settings": {"enabled": False, "intervalMs": 55_555}}
        assert await interval_of(probe, "frozen") == 55_555
        assert await interval_of(probe, "other") == 40_000
        assert app.readiness() is None
        await app.stop()
        await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        assert await interval_of(probe, "frozen") == 55_555
        assert await interval_of(probe, "other") == 40_000


async def test_a_locked_sqlite_file_answers_store_error_within_the_bound(
    probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    app: App = await start_worker(store_timeout_ms=TIMEOUT_MS)
    assert (await probe.command(set_interval("locked", 30_000)))["ok"] is True
    locker = await Locker.hold(tmp_path / "warmer.db")
    try:
        for _ in range(3):
            reply, took = await timed(probe, set_interval("locked", 2_000))
            assert reply["ok"] is False and reply["code"] == "store_error", reply
            assert took < BOUND_S, took
        # While a lifecycle event's commit is retried, commands are not held behind it.
        await probe.event({"type": "turn.settled", "conversationId": "event"})
        await asyncio.sleep(TIMEOUT_MS / 1000 / 2)
        reply, took = await timed(probe, set_interval("locked", 3_000))
        assert reply["ok"] is False and reply["code"] == "store_error", reply
        assert took < BOUND_S, took
        assert "store" in (app.readiness() or "")
    finally:
        assert await locker.release() == 0
        await locker.kill()
    assert await interval_of(probe, "locked") == 30_000
    await app.stop()
    await start_worker(store_timeout_ms=TIMEOUT_MS)
    assert await interval_of(probe, "locked") == 30_000
