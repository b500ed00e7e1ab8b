"""Hostile: the store fails where the builder did not look, over the real broker and Redis.

A Redis of the test's own (``tests/redis_server.py``) restarted empty at the worst moment,
writers of other workers filling ``{prefix}:writers``, snapshots from before. The promise
under attack: nothing acknowledged is lost, and a command's reply matches what the store
holds, live and after a restart.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from tests.integration.probe import Probe
from tests.integration.test_store_faults import interval_of, set_interval
from tests.redis_server import redis_server
from warmer.app import App
from warmer.store import RedisStore, StoreLost
from warmer.store.base import WRITERS_KEPT

pytestmark = pytest.mark.broker

TIMEOUT_MS = 1000


async def test_a_worker_stopped_right_after_redis_came_back_empty_leaves_everything_behind(
    probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    # Redis restarted without persistence, and the worker stopped (SIGTERM: a rollout, a
    # node drain) before its 5-second check came round: the worker held every conversation
    # answered ok; the next worker must find them.
    async with redis_server(tmp_path) as server:
        store = f"{server.url}?prefix=stop"
        app: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        for n in range(20):
            assert (await probe.command(set_interval(f"c-{n}", 10_000 + n)))["ok"] is True
        await server.restart()
        await app.stop()
        await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        found = {n: await interval_of(probe, f"c-{n}") for n in range(20)}
        assert found == {n: 10_000 + n for n in range(20)}


async def test_an_idle_worker_s_entry_survives_many_killed_workers(tmp_path: Path) -> None:
    # A crash loop beside a live, idle worker: each killed worker leaves its entry, and
    # each start keeps the 256 most recent. The idle worker's entry is its last commit's
    # time, older than all of theirs: forgotten, its store then reads as lost (a false
    # store_data_lost, and a restore of everything it holds over what others wrote).
    async with redis_server(tmp_path) as server:
        url = f"{server.url}?prefix=crashloop"
        live = RedisStore(url)
        await live.open()
        await live.commit({"mine": b"x"}, 1)
        await asyncio.sleep(0.01)  # the killed workers start later
        killed = []
        try:
            for n in range(2 * WRITERS_KEPT):
                other = RedisStore(url)
                await other.open()
                killed.append(other)  # never closed: SIGKILL leaves the entry
                if n % 10 == 9:  # the live worker's check, every 5 s
                    await live.check()
            client = redis.asyncio.Redis.from_url(server.url)
            try:
                assert await client.hlen("crashloop:writers") == WRITERS_KEPT
            finally:
                await client.aclose()
        except StoreLost as exc:
            pytest.fail(f"a live writer read its store as lost: {exc}")
        finally:
            for other in killed:
                client = other._client
                if client is not None:
                    await client.aclose()
            await live.close()
