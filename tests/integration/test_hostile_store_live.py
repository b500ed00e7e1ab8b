"""Hostile: the store fails where the builder did not look, over the real broker and Redis.

A Redis of the test's own (``tests/redis_server.py``) restarted empty at the worst moment,
writers of other workers filling ``{prefix}:writers``, snapshots from before. The promise
under attack: nothing acknowledged is lost, and a command's reply matches what the store
holds, live and after a restart.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from structlog.testing import capture_logs

from tests.integration.probe import Probe
from tests.integration.test_store_faults import interval_of, set_interval
from tests.redis_server import HoldingProxy, redis_server
from tests.sqlite_lock import Locker
from tests.unit.test_hostile_store import WallClock
from warmer.app import App, StartupError
from warmer.store import RedisShared, RedisStore, StoreLost, StoreOutcomeUnknown
from warmer.store import redis as redis_store
from warmer.store.base import WRITER_REFRESH_MS, WRITERS_KEPT

pytestmark = pytest.mark.broker

TIMEOUT_MS = 1000


async def answer(probe: Probe, intervals: dict[str, int], answered: dict[str, int]) -> None:
    """Set each conversation's interval, each answered ok; ``answered`` keeps what was."""
    for cid, interval_ms in intervals.items():
        reply = await probe.command(set_interval(cid, interval_ms))
        assert reply["ok"] is True, reply
        answered[cid] = interval_ms


async def read_back(probe: Probe, answered: dict[str, int]) -> None:
    """The worker says what the replies said."""
    assert {cid: await interval_of(probe, cid) for cid in answered} == answered


async def test_a_worker_stopped_right_after_redis_came_back_empty_leaves_everything_behind(
    probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    # Redis restarted without persistence, and the worker stopped (SIGTERM: a rollout, a
    # node drain) before its 5-second check came round: the worker held every conversation
    # answered ok; the next worker must find them.
    async with redis_server(tmp_path) as server:
        store = f"{server.url}?prefix=stop"
        app: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        answered: dict[str, int] = {}
        await answer(probe, {f"c-{n}": 10_000 + n for n in range(20)}, answered)
        await server.restart()
        with capture_logs() as logs:
            await app.stop()
        said = [log["event"] for log in logs]
        assert said.count("store_data_lost") == 1 and said.count("store_restored") == 1
        assert "task_failed" not in said
        await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        await read_back(probe, answered)


async def test_an_idle_worker_s_entry_survives_many_killed_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A crash loop beside a live, idle worker: each killed worker leaves its entry, and
    # each start keeps the 256 most recent. The idle worker's entry is its last commit's
    # time, older than all of theirs: forgotten, its store then reads as lost (a false
    # store_data_lost, and a restore of everything it holds over what others wrote).
    # Ten killed workers every 5 s for over 4 minutes, the live one's check between.
    wall = WallClock(monkeypatch)
    async with redis_server(tmp_path) as server:
        url = f"{server.url}?prefix=crashloop"
        live = RedisStore(url)
        await live.open()
        await live.commit({"mine": b"x"}, 1)
        killed = []
        try:
            for n in range(2 * WRITERS_KEPT):
                other = RedisStore(url)
                await other.open()
                killed.append(other)  # never closed: SIGKILL leaves the entry
                if n % 10 == 9:
                    wall.advance(5_000)
                    await live.check()
            client = redis.asyncio.Redis.from_url(server.url)
            try:
                assert await client.hlen("crashloop:writers") == WRITERS_KEPT
                held = await client.hget("crashloop:writers", live.writer)
            finally:
                await client.aclose()
            # Raised only once it was old: within WRITER_REFRESH_MS a check writes nothing.
            assert held is not None and wall.ms - int(held) < WRITER_REFRESH_MS
            entry = live._seen
            await live.check()
            assert live._seen == entry
        except StoreLost as exc:
            pytest.fail(f"a live writer read its store as lost: {exc}")
        finally:
            for other in killed:
                client = other._client
                if client is not None:
                    await client.aclose()
            await live.close()


# -- a restore cut short, a restore delivered late ---------------------------------------


async def test_redis_restarted_empty_in_the_middle_of_a_restore_is_restored_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "_RESTORE_CHUNK", 10)  # 25 records: three chunks
    held = {f"c-{n}": f"v{n}".encode() for n in range(25)}
    async with redis_server(tmp_path) as server:
        store = RedisStore(server.url)
        await store.open()
        await store.commit(held, 7)
        await server.restart()
        sent = store._run
        calls = 0

        async def restart_after_the_first_chunk(*args: Any, **kwargs: Any) -> None:
            nonlocal calls
            await sent(*args, **kwargs)
            calls += 1
            if calls == 1:
                await server.restart()

        store._run = restart_after_the_first_chunk  # type: ignore[method-assign]
        with pytest.raises(StoreLost):
            await store.restore(held, 7)
        store._run = sent  # type: ignore[method-assign]
        with pytest.raises(StoreLost):  # still lost: a restore cut short reads as such
            await store.check()
        with pytest.raises(StoreLost):
            await store.commit({"c-0": b"new"}, 8)
        await store.restore(held, 7)
        await store.check()
        await store.commit({"c-0": b"new"}, 8)
        assert (await store.load()).records == held | {"c-0": b"new"}
        await store.close()


async def test_a_restore_delivered_late_by_the_network_never_undoes_a_later_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first chunk of a restore, held up in the network, reaches Redis after the
    # restore was sent again and a command's commit was answered ok: it must not put the
    # older records back (until the next check, up to 5 s, and for good if the worker
    # dies meanwhile).
    monkeypatch.setattr(redis_store, "_RESTORE_CHUNK", 1)  # two records: two chunks
    async with redis_server(tmp_path) as server:
        proxy = HoldingProxy(server.port)
        await proxy.start()
        store = RedisStore(proxy.url, timeout=0.3, connect_timeout=0.3)
        try:
            await store.open()
            await store.commit({"a": b"one", "c": b"one"}, 1)
            client = redis.asyncio.Redis.from_url(server.url)
            await client.flushdb()  # as empty as a restart (whose links the proxy keeps)
            await client.aclose()
            with pytest.raises(StoreLost):
                await store.check()
            proxy.hold()
            with pytest.raises(StoreOutcomeUnknown):
                await store.restore({"a": b"one", "c": b"one"}, 1)
            await store.restore({"a": b"one", "c": b"one"}, 1)  # sent again, on a new link
            await store.commit({"a": b"two", "c": b"two"}, 2)  # answered ok
            await proxy.release()  # the first copy of the first chunk reaches Redis now
            assert (await store.load()).records == {"a": b"two", "c": b"two"}
            await store.check()
        finally:
            await store.close()
            await proxy.close()


async def test_flushdb_is_a_store_lost_like_a_restart(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as server:
        store = RedisStore(server.url)
        await store.open()
        await store.commit({"c": b"one"}, 1)
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            await client.flushdb()
            with pytest.raises(StoreLost):
                await store.commit({"c": b"two"}, 2)
            assert await client.hlen("warmer:conversations") == 0  # nothing written
        finally:
            await client.aclose()
        await store.restore({"c": b"one"}, 1)
        await store.commit({"c": b"two"}, 2)
        assert (await store.load()).records == {"c": b"two"}
        await store.close()


async def test_redis_back_from_an_older_snapshot_is_given_what_came_after(
    probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    # Redis saved a snapshot, the worker went on (new conversations, a changed one), then
    # Redis came back from that snapshot: the worker's entry is behind, not missing.
    async with redis_server(tmp_path) as server:
        store = f"{server.url}?prefix=snap"
        app: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        answered: dict[str, int] = {}
        await answer(probe, {f"c-{n}": 10_000 + n for n in range(10)}, answered)
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            await client.save()
            await answer(probe, {f"c-{n}": 20_000 + n for n in range(10, 20)}, answered)
            await answer(probe, {"c-0": 33_333}, answered)
            await server.restart()  # loads the snapshot: c-0 is 10000, c-10.. unknown
            assert await client.hget("snap:conversations", "c-15") is None
            assert await client.hget("snap:conversations", "c-5") is not None  # older
        finally:
            await client.aclose()
        await answer(probe, {"c-20": 44_444}, answered)
        assert app.metrics.value("warmer_store_data_lost_total") == 1
        await app.stop()
        await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        await read_back(probe, answered)


async def test_a_killed_worker_s_commit_delivered_late_never_undoes_the_next_worker_s(
    tmp_path: Path,
) -> None:
    # A killed worker's entry stays, so its commit held up in the network would land
    # whenever it arrived, over what the next worker committed since. The next worker
    # took the shard (a higher epoch): the late commit is fenced inside the script.
    async with redis_server(tmp_path) as server:
        proxy = HoldingProxy(server.port)
        await proxy.start()
        lost = RedisShared(proxy.url, timeout=0.3, connect_timeout=0.3)
        here = RedisShared(server.url)
        await lost.open()
        await here.open()
        first, second = lost.shard(0, "lost"), here.shard(0, "next")
        try:
            await first.open()
            await first.commit({"c": b"one"}, 1)
            proxy.hold()  # a network partition: the node and its worker are lost
            with pytest.raises(StoreOutcomeUnknown):
                await first.commit({"c": b"two"}, 2)
            # The worker is killed (its entry stays); the next one takes the shard,
            # redelivers the command and answers two more ok.
            await second.open()
            await second.commit({"c": b"two"}, 2)
            await second.commit({"c": b"three"}, 3)
            await proxy.release()  # the partition heals: the kernel sends the bytes on
            assert (await second.load()).records == {"c": b"three"}
            await second.check()
        finally:
            await second.close()
            await here.close()
            await proxy.close()
            client = lost._link.client
            if client is not None:
                await client.aclose()


async def test_stopped_while_a_write_s_outcome_is_unknown_the_command_is_answered_by_the_next(
    probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    # SIGTERM while Redis is frozen mid-write: the command is not answered, the worker
    # goes (within its grace), Redis thaws (the first write lands, or not), and the next
    # worker answers the command delivered again: ok, and what the store holds.
    async with redis_server(tmp_path) as server:
        store = f"{server.url}?prefix=term"
        app: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        answered: dict[str, int] = {}
        await answer(probe, {"frozen": 30_000, "other": 40_000}, answered)
        server.freeze()
        try:
            pending = asyncio.create_task(probe.command(set_interval("frozen", 55_555), timeout=60))
            await asyncio.sleep(TIMEOUT_MS / 1000 * 2)
            assert not pending.done()
            with capture_logs() as logs:
                await asyncio.wait_for(app.stop(), 30)
        finally:
            server.thaw()
        said = [(log["event"], log["log_level"]) for log in logs]
        assert ("task_failed", "error") not in said
        assert ("store_unchecked_at_stop", "warning") in said  # frozen: nothing known
        await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        reply = await pending
        assert reply["ok"] is True, reply
        answered["frozen"] = 55_555
        await read_back(probe, answered)


async def test_a_restore_under_way_is_not_the_first_entry_forgotten(tmp_path: Path) -> None:
    # A worker writing a large state again (in chunks, its entry a nonce meanwhile) while
    # another starts beside 256 entries: ranked as the least recent of all, the nonce was
    # forgotten first, and the restore's next chunk found the store lost again.
    async with redis_server(tmp_path) as server:
        url = f"{server.url}?prefix=nonce"
        restoring = RedisStore(url)
        await restoring.open()
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            killed = {f"killed-{n}": str(1_000 + n) for n in range(WRITERS_KEPT)}
            await client.hset("nonce:writers", mapping=killed)
            sent = restoring._run
            other = RedisStore(url)

            async def another_starts_after_the_first_chunk(*args: Any, **kwargs: Any) -> None:
                await sent(*args, **kwargs)
                if other._client is None:
                    await other.open()

            restoring._run = another_starts_after_the_first_chunk  # type: ignore[method-assign]
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(redis_store, "_RESTORE_CHUNK", 1)
                await restoring.restore({"a": b"1", "b": b"2"}, 1)
            restoring._run = sent  # type: ignore[method-assign]
            await restoring.check()
            await other.close()
        finally:
            await client.aclose()
            await restoring.close()


async def test_an_sqlite_file_locked_at_start_up_is_waited_for_then_used(
    probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    # Another process holding the file (an old pod still stopping) is waited for like an
    # absent broker; without a wait (WARMER_STARTUP_WAIT_S=0) it is a clear refusal. Either
    # way nothing changes.
    app: App = await start_worker(store_timeout_ms=TIMEOUT_MS)
    answered: dict[str, int] = {}
    await answer(probe, {"kept": 30_000}, answered)
    await app.stop()
    locker = await Locker.hold(tmp_path / "warmer.db")
    try:
        started = time.monotonic()
        with pytest.raises(StartupError, match="locked") as refused:
            await start_worker(store_timeout_ms=TIMEOUT_MS, startup_wait_s=0)
        assert time.monotonic() - started < TIMEOUT_MS / 1000 + 3
        assert len(str(refused.value)) <= 500 and "\n" not in str(refused.value)
        waiting = asyncio.ensure_future(
            start_worker(store_timeout_ms=TIMEOUT_MS, startup_wait_s=60)
        )
        await asyncio.sleep(TIMEOUT_MS / 1000 + 1.5)  # a first attempt and pause passed
        assert not waiting.done()
    finally:
        assert await locker.release() == 0
        await locker.kill()
    await asyncio.wait_for(waiting, 30)
    await read_back(probe, answered)


async def test_redis_restarted_empty_again_in_the_middle_of_the_worker_s_restore(
    probe: Probe, start_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two restarts in quick succession: the second between two chunks of the restore the
    # first set off (a command right behind it). The command's reply must match what the
    # store holds; every conversation answered before must survive.
    monkeypatch.setattr(redis_store, "_RESTORE_CHUNK", 10)
    async with redis_server(tmp_path) as server:
        store = f"{server.url}?prefix=twice"
        app: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        answered: dict[str, int] = {}
        await answer(probe, {f"c-{n}": 10_000 + n for n in range(35)}, answered)
        backend = app.store
        assert isinstance(backend, RedisStore)
        sent = backend._run
        chunks = 0

        async def restart_after_the_first_chunk(*args: Any, **kwargs: Any) -> None:
            nonlocal chunks
            restoring = kwargs["entry"].startswith("r")  # a chunk before the last
            await sent(*args, **kwargs)
            if restoring:
                chunks += 1
                if chunks == 1:
                    await server.restart()

        backend._run = restart_after_the_first_chunk  # type: ignore[method-assign]
        await server.restart()
        reply = await probe.command(set_interval("c-0", 77_777), timeout=15)
        if reply["ok"]:
            answered["c-0"] = 77_777
        else:  # lost again after the restore the batch began with: refused, not written
            assert reply["code"] == "store_error", reply
            assert len(reply["error"]) <= 500
        assert chunks >= 1
        await app.stop()
        await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        await read_back(probe, answered)


async def test_redis_restarted_empty_twice_while_a_worker_starts_loses_nothing(
    probe: Probe, start_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker has read everything, Redis comes back empty (its recovery commit finds
    # the store lost and writes it all again), and again in the middle of that restore:
    # the worker is then the only one holding the conversations answered ok before.
    monkeypatch.setattr(redis_store, "_RESTORE_CHUNK", 10)
    async with redis_server(tmp_path) as server:
        store = f"{server.url}?prefix=boot"
        app: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        answered: dict[str, int] = {}
        await answer(probe, {f"c-{n}": 10_000 + n for n in range(25)}, answered)
        await app.stop()
        loaded = RedisStore.load
        run = RedisStore._run
        chunks = 0

        async def load_then_restart(self: RedisStore) -> Any:
            found = await loaded(self)
            await server.restart()
            return found

        async def restart_after_the_first_chunk(
            self: RedisStore, *args: Any, **kwargs: Any
        ) -> None:
            nonlocal chunks
            await run(self, *args, **kwargs)
            if kwargs["entry"].startswith("r"):
                chunks += 1
                if chunks == 1:
                    await server.restart()

        monkeypatch.setattr(RedisStore, "load", load_then_restart)
        monkeypatch.setattr(RedisStore, "_run", restart_after_the_first_chunk)
        with capture_logs() as logs:
            recovering: App = await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        said = [log["event"] for log in logs]
        assert said.count("store_data_lost") == 1 and "store_restore_retrying" in said
        monkeypatch.setattr(RedisStore, "load", loaded)
        monkeypatch.setattr(RedisStore, "_run", run)
        assert chunks >= 1
        await recovering.stop()
        await start_worker(store=store, store_timeout_ms=TIMEOUT_MS)
        await read_back(probe, answered)
