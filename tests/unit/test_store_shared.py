"""The Shared contract, once, for every back end: shards, their fence, presence and moves.

Each test runs against every back end of ``BACKENDS`` (memory; SQLite, a file per test;
Redis, a key prefix per test, skipped without a Redis unless WARMER_REQUIRE_BROKER=1). A
back end added (PostgreSQL) is one more entry there: a function giving its ``Rig``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio

from warmer.core.gaps import MODEL_KEY
from warmer.store import (
    MemoryShared,
    MemoryStore,
    Owner,
    RedisShared,
    Shared,
    SqliteShared,
    Store,
    StoreFenced,
    StoreLost,
    open_store,
    postgres,
    redis_shared,
    sqlite_shared,
)
from warmer.store.postgres import PostgresShared, PostgresStore


@dataclass
class Rig:
    shared: Shared
    lose: Callable[[], Awaitable[None]]
    """Empty the back end behind the stores' backs (a Redis restarted without its data)."""
    alone: Callable[[], Store] | None
    """A store on its own (``open_store``) on the same data; None for memory."""
    shareable: bool


async def memory_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    shared = MemoryShared()

    async def lose() -> None:
        shared.lose()

    return Rig(shared=shared, lose=lose, alone=None, shareable=True)


async def sqlite_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    path = tmp_path / "warmer.db"

    async def lose() -> None:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as side:
            listed = side.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = [row[0] for row in listed]
            for name in tables:
                if name != "meta":
                    side.execute(f"DELETE FROM {name}")
            side.execute("DELETE FROM meta WHERE key != 'schema_version'")

    return Rig(
        shared=SqliteShared(path, busy_timeout_ms=200),
        lose=lose,
        alone=lambda: open_store(f"sqlite:///{path}"),
        shareable=False,
    )


async def redis_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    url: str = request.getfixturevalue("redis_store_url")
    prefix: str = request.getfixturevalue("redis_prefix")

    async def lose() -> None:
        client = redis.asyncio.Redis.from_url(url.partition("?")[0])
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    return Rig(shared=RedisShared(url), lose=lose, alone=lambda: open_store(url), shareable=True)


async def postgres_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    url: str = request.getfixturevalue("postgres_url")
    schema: str = request.getfixturevalue("postgres_schema")
    store_url: str = request.getfixturevalue("postgres_store_url")

    async def lose() -> None:
        conn = await asyncpg.connect(url)
        try:
            names = ("conversations", "models", "token", "shards", "writers", "replicas")
            await conn.execute(
                f"TRUNCATE {', '.join(f'{schema!r}.{n}' for n in names)}".replace("'", '"')
            )
            await conn.execute(f"DELETE FROM \"{schema}\".meta WHERE key <> 'schema_version'")
        finally:
            await conn.close()

    return Rig(
        shared=PostgresShared(store_url),
        lose=lose,
        alone=lambda: PostgresStore(store_url),
        shareable=True,
    )


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Awaitable[Rig]]] = {
    "memory": memory_rig,
    "sqlite": sqlite_rig,
    "redis": redis_rig,
    "postgres": postgres_rig,
}


@pytest.fixture(params=list(BACKENDS))
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    made = await BACKENDS[request.param](request, tmp_path)
    await made.shared.open()
    yield made
    await made.shared.close()


@pytest.fixture
async def views(rig: Rig) -> AsyncIterator[Callable[[int, str], Awaitable[Store]]]:
    """Opened views of ``rig.shared``, closed afterwards."""
    opened: list[Store] = []

    async def view(shard: int, replica: str) -> Store:
        store = rig.shared.shard(shard, replica)
        await store.open()
        opened.append(store)
        return store

    yield view
    for store in reversed(opened):
        await store.close()


View = Callable[[int, str], Awaitable[Store]]


async def test_the_next_view_of_a_shard_fences_the_one_before(rig: Rig, views: View) -> None:
    first = await views(0, "a")
    await first.commit({"c": b"one"}, 1)
    second = await views(0, "b")
    assert second.shard == 0 and second.epoch > first.epoch > 0
    with pytest.raises(StoreFenced):
        await first.commit({"c": b"two", "d": b"new"}, 9)
    with pytest.raises(StoreFenced):
        await first.check()
    with pytest.raises(StoreFenced):
        await first.restore({"c": b"three"}, 9)
    loaded = await second.load()
    assert (loaded.records, loaded.token) == ({"c": b"one"}, 1)  # nothing of the fenced
    await second.commit({"c": b"four"}, 2)
    await second.check()
    assert (await second.load()).records == {"c": b"four"}
    [owner] = await rig.shared.owners()
    assert (owner.shard, owner.epoch, owner.replica) == (0, second.epoch, "b")
    assert not owner.released


async def test_a_fenced_view_s_close_leaves_the_new_owner_in_place(rig: Rig, views: View) -> None:
    first = await views(3, "a")
    second = await views(3, "b")
    await first.close()
    [owner] = await rig.shared.owners()
    assert (owner.epoch, owner.replica, owner.released) == (second.epoch, "b", False)


async def test_close_releases_the_shard_and_keeps_its_epoch(rig: Rig, views: View) -> None:
    view = await views(1, "a")
    await view.close()
    [owner] = await rig.shared.owners()
    assert owner == Owner(
        shard=1, epoch=view.epoch, replica="a", since_ms=owner.since_ms, released=True
    )
    again = await views(1, "a")
    assert again.epoch > view.epoch
    assert not (await rig.shared.owners())[0].released


async def test_epochs_grow_across_a_store_that_lost_its_data(rig: Rig, views: View) -> None:
    first = await views(0, "a")
    await first.commit({"c": b"one"}, 1)
    await rig.lose()
    await asyncio.sleep(0.002)  # the wall clock's next milliseconds: the only memory left
    second = await views(0, "b")
    assert second.epoch > first.epoch
    with pytest.raises(StoreFenced):
        await first.restore({"c": b"one"}, 1)
    await second.commit({"c": b"two"}, 2)
    assert (await second.load()).records == {"c": b"two"}


async def test_a_restore_after_a_loss_writes_the_shard_s_epoch_again(rig: Rig, views: View) -> None:
    view = await views(2, "a")
    await view.commit({"c": b"one"}, 4)
    await rig.lose()
    with pytest.raises(StoreLost):
        await view.commit({"c": b"two"}, 5)
    with pytest.raises(StoreLost):
        await view.check()
    await view.restore({"c": b"one"}, 4)
    [owner] = await rig.shared.owners()
    assert (owner.shard, owner.epoch, owner.replica) == (2, view.epoch, "a")
    await view.commit({"c": b"two"}, 5)
    await view.check()
    loaded = await view.load()
    assert (loaded.records, loaded.token) == ({"c": b"two"}, 5)


async def test_each_shard_loads_its_own_records_and_the_one_token(rig: Rig, views: View) -> None:
    zero, one = await views(0, "a"), await views(1, "a")
    await zero.commit({"c0": b"zero", MODEL_KEY: b"model 0"}, 3)
    await one.commit({"c1": b"one", MODEL_KEY: b"model 1"}, 7)
    await zero.commit({"c0": b"zero again"}, 4)
    loaded_zero, loaded_one = await zero.load(), await one.load()
    assert loaded_zero.records == {"c0": b"zero again", MODEL_KEY: b"model 0"}
    assert loaded_one.records == {"c1": b"one", MODEL_KEY: b"model 1"}
    assert loaded_zero.token == loaded_one.token == 7
    assert sorted(await rig.shared.ids(1)) == sorted(["c1", MODEL_KEY])
    assert await rig.shared.ids(5) == []


async def test_taking_one_shard_fences_no_other(rig: Rig, views: View) -> None:
    zero = await views(0, "a")
    await views(1, "b")
    await zero.commit({"c": b"one"}, 1)
    await zero.check()
    assert [owner.replica for owner in await rig.shared.owners()] == ["a", "b"]


async def test_shard_0_is_what_a_store_on_its_own_holds(rig: Rig, views: View) -> None:
    if rig.alone is None:  # memory: a store on its own is another store, sharing nothing
        other = MemoryStore()
        await other.open()
        await other.commit({"before": b"shards"}, 6)
        assert await rig.shared.layout() is None
        assert (await (await views(0, "a")).load()).records == {}
        return
    alone = rig.alone()
    await alone.open()
    try:
        await alone.commit({"before": b"shards"}, 6)
    finally:
        await alone.close()
    assert await rig.shared.layout() == 1  # written before shards: laid out for one
    view = await views(0, "a")
    loaded = await view.load()
    assert (loaded.records, loaded.token) == ({"before": b"shards"}, 6)


async def test_the_layout_is_none_until_set(rig: Rig, views: View) -> None:
    assert await rig.shared.layout() is None
    await rig.shared.set_layout(4)
    assert await rig.shared.layout() == 4
    await rig.shared.set_layout(2)
    assert await rig.shared.layout() == 2


async def test_a_shard_written_makes_a_store_laid_out_for_one(rig: Rig, views: View) -> None:
    view = await views(0, "a")
    await view.commit({"c": b"one"}, 1)
    assert await rig.shared.layout() == 1


async def test_presence_lists_the_live_replicas_and_forgets_the_expired(rig: Rig) -> None:
    first = await rig.shared.beat("b", "host b", 1)
    assert [(r.id, r.info) for r in first] == [("b", "host b")]
    assert first[0].seen_ms > 0
    await asyncio.sleep(0.005)  # past b's 1 ms
    live = await rig.shared.beat("a", "host a, pid 7", 60_000)
    assert [(r.id, r.info) for r in live] == [("a", "host a, pid 7")]
    live = await rig.shared.beat("c", "x" * 5000, 60_000)
    assert [r.id for r in live] == ["a", "c"] and len(live[1].info) == 1000
    assert [r.id for r in await rig.shared.replicas()] == ["a", "c"]  # read, not beaten
    await rig.shared.leave("a")
    assert [r.id for r in await rig.shared.replicas()] == ["c"]
    assert [r.id for r in await rig.shared.beat("c", "", 60_000)] == ["c"]


async def test_assign_moves_records_and_nothing_else(rig: Rig, views: View) -> None:
    zero, one = await views(0, "a"), await views(1, "a")
    await zero.commit({"c1": b"1", "c2": b"2", "c3": b"3", MODEL_KEY: b"m0"}, 1)
    await one.commit({"d1": b"d", MODEL_KEY: b"m1"}, 1)
    await zero.close()
    await one.close()
    await rig.shared.assign({"c1": 1, "c2": 2, "d1": 0, "c3": 0, MODEL_KEY: 2, "none": 3})
    assert sorted(await rig.shared.ids(0)) == sorted(["c3", "d1", MODEL_KEY])
    assert sorted(await rig.shared.ids(1)) == sorted(["c1", MODEL_KEY])
    assert await rig.shared.ids(2) == ["c2"]
    assert await rig.shared.ids(3) == []
    two = await views(2, "b")
    assert (await two.load()).records == {"c2": b"2"}
    zero = await views(0, "b")
    assert (await zero.load()).records == {"c3": b"3", "d1": b"d", MODEL_KEY: b"m0"}


async def test_assign_moves_in_chunks(
    rig: Rig, views: View, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (sqlite_shared, redis_shared):
        monkeypatch.setattr(module, "ASSIGN_CHUNK", 3)
    monkeypatch.setattr(postgres, "CHUNK", 3)
    zero = await views(0, "a")
    await zero.commit({f"c{n}": bytes([n]) for n in range(8)}, 1)
    await zero.close()
    await rig.shared.assign({f"c{n}": n % 3 for n in range(8)})
    for shard in range(3):
        expected = sorted(f"c{n}" for n in range(8) if n % 3 == shard)
        assert sorted(await rig.shared.ids(shard)) == expected


async def test_only_a_store_other_hosts_reach_is_shareable(rig: Rig) -> None:
    assert rig.shared.shareable is rig.shareable
