"""The Store contract, once, for every back end: what the worker may rely on from any of them.

Each test runs against memory, SQLite (a file per test) and Redis (a key prefix per test;
skipped without a Redis unless WARMER_REQUIRE_BROKER=1). "A new store" is a new object on
the same file or prefix, so what it loads was durable; the memory store has nothing
durable and reopens itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import pytest
import redis.asyncio

from warmer.store import (
    Loaded,
    MemoryStore,
    RedisStore,
    SqliteStore,
    Store,
    StoreError,
    StoreLost,
)


class Backend(Protocol):
    async def store(self) -> Store:
        """A new, opened store on the back end's data."""
        ...

    def broken(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Inside, a commit raises StoreError."""
        ...

    async def lose(self) -> None:
        """Empty the store behind its back, as a Redis restarted without persistence."""
        ...


class MemoryBackend:
    def __init__(self) -> None:
        self.memory = MemoryStore()

    async def store(self) -> Store:
        await self.memory.open()
        return self.memory

    @contextlib.asynccontextmanager
    async def broken(self) -> AsyncIterator[None]:
        self.memory.fail_next = 1
        yield
        self.memory.fail_next = 0

    async def lose(self) -> None:
        self.memory.lose()


class SqliteBackend:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened: list[SqliteStore] = []

    async def store(self) -> Store:
        store = SqliteStore(self.path, busy_timeout_ms=50)
        await store.open()
        self.opened.append(store)
        return store

    @contextlib.asynccontextmanager
    async def broken(self) -> AsyncIterator[None]:
        # Another writer holds the file past the busy timeout.
        locker = sqlite3.connect(self.path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            locker.execute("ROLLBACK")
            locker.close()

    async def lose(self) -> None:
        # The file as it was before this worker ever wrote: a restored old copy.
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as side:
            side.execute("DELETE FROM conversations")
            side.execute("DELETE FROM meta WHERE key != 'schema_version'")


class RedisBackend:
    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[RedisStore] = []

    async def store(self) -> Store:
        store = RedisStore(self.url)
        await store.open()
        self.opened.append(store)
        return store

    @contextlib.asynccontextmanager
    async def broken(self) -> AsyncIterator[None]:
        # A token key of the wrong type: the commit script refuses before writing anything.
        token_key = self.opened[-1].token_key
        aside = f"{token_key}:aside"
        client = redis.asyncio.Redis.from_url(self.url.partition("?")[0])
        try:
            moved = bool(await client.exists(token_key))
            if moved:
                await client.rename(token_key, aside)
            await client.rpush(token_key, b"not a token")
            try:
                yield
            finally:
                await client.delete(token_key)
                if moved:
                    await client.rename(aside, token_key)
        finally:
            await client.aclose()

    async def lose(self) -> None:
        client = redis.asyncio.Redis.from_url(self.url.partition("?")[0])
        try:
            store = self.opened[-1]
            await client.delete(store.records_key, store.token_key, store.writers_key)
        finally:
            await client.aclose()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    opened: list[SqliteStore] | list[RedisStore]
    if request.param == "sqlite":
        sqlite = SqliteBackend(tmp_path / "warmer.db")
        opened = sqlite.opened
        yield sqlite
    else:
        remote = RedisBackend(request.getfixturevalue("redis_store_url"))
        opened = remote.opened
        yield remote
    for store in opened:
        await store.close()


async def test_an_empty_store_loads_nothing(backend: Backend) -> None:
    store = await backend.store()
    assert await store.load() == Loaded(records={}, settings={}, token=0)


async def test_a_commit_is_loaded_by_a_new_store(backend: Backend) -> None:
    store = await backend.store()
    await store.commit({"c-1": b"one", "c-2": b"two"}, 7)
    await store.close()
    again = await backend.store()
    assert await again.load() == Loaded(
        records={"c-1": b"one", "c-2": b"two"}, settings={}, token=7
    )


async def test_a_put_replaces_the_record(backend: Backend) -> None:
    store = await backend.store()
    await store.commit({"c-1": b"first"}, 1)
    await store.commit({"c-1": b"second"}, 2)
    assert (await (await backend.store()).load()).records == {"c-1": b"second"}


async def test_none_deletes_the_record(backend: Backend) -> None:
    store = await backend.store()
    await store.commit({"c-1": b"one", "c-2": b"two"}, 1)
    await store.commit({"c-1": None, "never-stored": None}, 2)
    loaded = await (await backend.store()).load()
    assert loaded.records == {"c-2": b"two"}
    assert loaded.token == 2


async def test_the_token_only_grows(backend: Backend) -> None:
    store = await backend.store()
    await store.commit({}, 100)
    # A lower token still commits its records; 99 > 100 as strings, not as numbers.
    await store.commit({"c-1": b"one"}, 99)
    await store.commit({}, 3)
    loaded = await (await backend.store()).load()
    assert loaded.token == 100
    assert loaded.records == {"c-1": b"one"}


async def test_the_largest_token_round_trips(backend: Backend) -> None:
    store = await backend.store()
    await store.commit({}, 2**63 - 2)
    await store.commit({}, 2**63 - 1)
    await store.commit({}, 2**62)
    assert (await (await backend.store()).load()).token == 2**63 - 1


async def test_what_is_not_a_commit_is_refused_and_changes_nothing(backend: Backend) -> None:
    store = await backend.store()
    await store.commit({"c-1": b"one"}, 5)
    with pytest.raises(ValueError):
        await store.commit({"c-1": b"two"}, -1)
    with pytest.raises(ValueError):
        await store.commit({"c-1": b"two"}, 2**63)
    with pytest.raises(TypeError):
        await store.commit({"c-1": b"two", "c-2": "text"}, 6)  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        await store.commit({"c-1": b"two", "\ud800": b"lone surrogate"}, 6)
    assert await store.load() == Loaded(records={"c-1": b"one"}, settings={}, token=5)


async def test_later_changes_win(backend: Backend) -> None:
    store = await backend.store()
    await store.commit({"gone": b"here"}, 1)
    # Issued together: a back end may merge them, and then the later change of an id wins.
    await asyncio.gather(
        store.commit({"c-1": b"1", "gone": None}, 2),
        store.commit({"c-1": b"2", "back": b"1"}, 4),
        store.commit({"c-1": None, "back": None}, 3),
        store.commit({"c-1": b"4", "back": b"2", "gone": b"again"}, 1),
        store.commit({"gone": None}, 2),
    )
    loaded = await (await backend.store()).load()
    assert loaded.records == {"c-1": b"4", "back": b"2"}
    assert loaded.token == 4


async def test_two_concurrent_commits_are_both_durable(backend: Backend) -> None:
    store = await backend.store()
    await asyncio.gather(store.commit({"c-1": b"one"}, 1), store.commit({"c-2": b"two"}, 2))
    await store.close()
    loaded = await (await backend.store()).load()
    assert loaded == Loaded(records={"c-1": b"one", "c-2": b"two"}, settings={}, token=2)


async def test_a_failed_commit_changes_nothing(backend: Backend) -> None:
    store = await backend.store()
    await store.commit({"c-1": b"one", "c-2": b"two"}, 5)
    async with backend.broken():
        with pytest.raises(StoreError):
            await store.commit({"c-1": b"changed", "c-2": None, "c-3": b"new"}, 99)
    before = Loaded(records={"c-1": b"one", "c-2": b"two"}, settings={}, token=5)
    assert await store.load() == before
    assert await (await backend.store()).load() == before
    # The store works again once the trouble is over.
    await store.commit({"c-3": b"new"}, 6)
    assert (await store.load()).records["c-3"] == b"new"


async def test_a_big_batch_in_one_commit(backend: Backend) -> None:
    records = {f"conversation-{n:05d}": n.to_bytes(4, "big") * 30 for n in range(10_000)}
    store = await backend.store()
    await store.commit(records, 10_000)
    loaded = await (await backend.store()).load()
    assert loaded.records == records
    assert loaded.token == 10_000
    await store.commit(dict.fromkeys(records), 10_001)
    assert (await (await backend.store()).load()).records == {}


async def test_odd_conversation_ids_round_trip(backend: Backend) -> None:
    ids = [
        "",
        "a'b\"c;--",
        "conv:with:colons {and} braces",
        "ünïcødé-✓-会話-🙂",
        "x" * 200,
        "é" * 100,  # 200 bytes of UTF-8
        "\x00nul\x00inside",
    ]
    store = await backend.store()
    await store.commit({conversation_id: conversation_id.encode() for conversation_id in ids}, 1)
    loaded = await (await backend.store()).load()
    assert loaded.records == {conversation_id: conversation_id.encode() for conversation_id in ids}


async def test_record_bytes_round_trip_exactly(backend: Backend) -> None:
    every_byte = bytes(range(256))
    records = {"every-byte": every_byte, "reversed": every_byte[::-1], "empty": b"", "nul": b"\0"}
    store = await backend.store()
    await store.commit(records, 1)
    assert (await (await backend.store()).load()).records == records


# A store that lost what this writer committed says so, and takes it all again


async def test_a_store_that_lost_its_data_refuses_commits_until_restored(
    backend: Backend,
) -> None:
    store = await backend.store()
    await store.commit({"c-1": b"one", "c-2": b"two"}, 5)
    await store.check()
    await backend.lose()
    with pytest.raises(StoreLost):
        await store.check()
    with pytest.raises(StoreLost):
        await store.commit({"c-3": b"three"}, 6)
    assert await store.load() == Loaded(records={}, settings={}, token=0)
    await store.restore({"c-1": b"one", "c-2": b"two"}, 6)
    await store.check()
    await store.commit({"c-3": b"three"}, 7)
    assert await (await backend.store()).load() == Loaded(
        records={"c-1": b"one", "c-2": b"two", "c-3": b"three"}, settings={}, token=7
    )


async def test_a_restore_keeps_the_records_of_others(backend: Backend) -> None:
    store = await backend.store()
    await store.commit({"c-1": b"one", "theirs": b"kept"}, 5)
    await store.restore({"c-1": b"again"}, 5)
    assert (await store.load()).records == {"c-1": b"again", "theirs": b"kept"}


async def test_a_store_just_opened_on_lost_data_notices_at_its_first_commit(
    backend: Backend,
) -> None:
    store = await backend.store()
    await backend.lose()
    with pytest.raises(StoreLost):
        await store.commit({"c-1": b"one"}, 1)
    assert (await store.load()).records == {}


async def test_two_writers_on_one_store_do_not_trouble_each_other(backend: Backend) -> None:
    first = await backend.store()
    second = await backend.store()
    await first.commit({"c-1": b"one"}, 1)
    await second.commit({"c-2": b"two"}, 2)
    await first.commit({"c-3": b"three"}, 3)
    await first.check()
    await second.check()
    assert (await first.load()).records == {"c-1": b"one", "c-2": b"two", "c-3": b"three"}
