"""PostgresShared against a real PostgreSQL: shards taken with epochs, fenced writes, writer
entries, presence, layout, reshard moves, and every way it fails.

Each test has a schema of its own (``postgres_store_url``, tests/conftest.py), dropped
afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.redis_server import HoldingProxy
from warmer.core.gaps import MODEL_KEY
from warmer.store.base import (
    WRITERS_KEPT,
    Loaded,
    Store,
    StoreError,
    StoreFenced,
    StoreLost,
    StoreOutcomeUnknown,
    StoreUnreachable,
)
from warmer.store.postgres import PostgresShared, PostgresStore

TABLES = {"conversations", "models", "token", "shards", "writers", "replicas", "meta"}


@pytest.fixture
async def shared(postgres_store_url: str) -> AsyncIterator[PostgresShared]:
    opened = PostgresShared(postgres_store_url)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def raw(postgres_url: str, postgres_schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the same database, to look at (and break) the tables."""
    conn = await asyncpg.connect(postgres_url)
    await conn.execute(f'SET search_path = "{postgres_schema}"')
    yield conn
    await conn.close()


@contextlib.asynccontextmanager
async def opened(shared: PostgresShared, shard: int, replica: str) -> AsyncIterator[Store]:
    view = shared.shard(shard, replica)
    await view.open()
    try:
        yield view
    finally:
        await view.close()


def through(port: int, url: str) -> str:
    """``url`` sent to 127.0.0.1:``port`` (a proxy) instead."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def assert_one_line(error: BaseException, *words: str) -> None:
    message = str(error)
    assert "\n" not in message
    for word in words:
        assert word in message, message


# The schema and the URL


async def test_open_makes_the_tables_in_the_schema_and_is_idempotent(
    postgres_store_url: str, raw: asyncpg.Connection, postgres_schema: str
) -> None:
    # Two replicas starting together: the advisory lock makes them take turns.
    first, second = PostgresShared(postgres_store_url), PostgresShared(postgres_store_url)
    await asyncio.gather(first.open(), second.open())
    await first.open()
    try:
        found = await raw.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1", postgres_schema
        )
        assert {row[0] for row in found} == TABLES
        assert first.shareable and first.schema == postgres_schema
    finally:
        await first.close()
        await second.close()
        await second.close()


def test_the_url_forms() -> None:
    shared = PostgresShared("postgres://warmer:s3cret@db.example:6543/app")
    assert shared.schema == "warmer"
    assert shared.url == "postgres://warmer:***@db.example:6543/app"
    assert PostgresShared("postgresql://db/app?schema=team_a&sslmode=require").schema == "team_a"
    for bad in (
        "postgresql://warmer:s3cret@db/app?schema=Bad-Name",
        "postgresql://warmer:s3cret@db/app?prefix=x",
        "postgresql://warmer:s3cret@db",
        "postgresql://warmer:s3cret@db:port/app",
        "postgresql://warmer:s3cret@db/app?sslmode=sometimes",
        "mysql://warmer:s3cret@db/app",
    ):
        with pytest.raises(ValueError) as raised:
            PostgresShared(bad)
        assert "s3cret" not in str(raised.value), bad


async def test_calls_before_open_and_after_close_raise_store_error(
    postgres_store_url: str,
) -> None:
    shared = PostgresShared(postgres_store_url)
    with pytest.raises(StoreError, match="not open"):
        await shared.owners()
    await shared.open()
    view = shared.shard(0, "r1")
    with pytest.raises(StoreError, match="not open"):
        await view.load()
    await view.open()
    await view.close()
    await view.close()
    with pytest.raises(StoreError, match="not open"):
        await view.commit({"c-1": b"one"}, 1)
    await shared.close()
    await shared.close()
    with pytest.raises(StoreError, match="not open"):
        await shared.layout()


# A view: its shard's records, the store's token


async def test_a_view_loads_its_own_shard_and_the_token_of_all(shared: PostgresShared) -> None:
    async with opened(shared, 0, "r1") as zero, opened(shared, 1, "r1") as one:
        await zero.commit({"c-1": b"\x00one", "c-2": b"two", MODEL_KEY: b"model 0"}, 7)
        await zero.commit({"c-2": None}, 3)
        await one.commit({"c-3": b"three", MODEL_KEY: b"model 1"}, 5)
        assert await zero.load() == Loaded(
            records={"c-1": b"\x00one", MODEL_KEY: b"model 0"}, settings={}, token=7
        )
        assert await one.load() == Loaded(
            records={"c-3": b"three", MODEL_KEY: b"model 1"}, settings={}, token=7
        )
        await one.commit({MODEL_KEY: None, "c-1": None}, 0)  # another shard's record stays
        assert (await one.load()).records == {"c-3": b"three"}
        assert (await zero.load()).records == {"c-1": b"\x00one", MODEL_KEY: b"model 0"}


async def test_a_record_put_by_another_shard_moves_to_it(shared: PostgresShared) -> None:
    async with opened(shared, 0, "r1") as zero, opened(shared, 1, "r1") as one:
        await zero.commit({"c-1": b"one"}, 1)
        await one.commit({"c-1": b"one again"}, 2)
        assert (await zero.load()).records == {}
        assert (await one.load()).records == {"c-1": b"one again"}


async def test_a_recovery_sized_commit_stays_well_within_the_timeout(
    shared: PostgresShared,
) -> None:
    records = {f"conversation-{n:06d}": bytes(1500) for n in range(10_000)}
    async with opened(shared, 0, "r1") as view:
        started = time.monotonic()
        await view.commit(records, 10_000)
        took = time.monotonic() - started
        # About 0.2 s here, idle; the margin is for a machine busy with other work.
        assert took < shared.timeout_ms / 1000 * 0.75, took
        # A restore of more than one statement's worth, and a load of it in chunks.
        more = {f"c-{n}": n.to_bytes(3, "big") for n in range(25_000)}
        await view.restore(more, 3)
        assert (await view.load()).records == records | more


async def test_an_id_postgresql_text_cannot_hold_is_refused_before_sending(
    shared: PostgresShared,
) -> None:
    async with opened(shared, 0, "r1") as view:
        with pytest.raises(ValueError, match="NUL"):
            await view.commit({"c-1": b"one", "bad\x00id": b"x"}, 1)
        with pytest.raises(ValueError):
            await view.commit({"c-1": b"one"}, -1)
        assert (await view.load()).records == {}


# Fencing: a view's open takes the shard, an older view writes nothing


async def test_a_second_view_fences_the_first(
    shared: PostgresShared, raw: asyncpg.Connection
) -> None:
    old = shared.shard(0, "r1")
    await old.open()
    await old.commit({"c-1": b"one"}, 1)
    async with opened(shared, 0, "r2") as new:
        assert new.epoch > old.epoch > 0
        for call in (
            old.commit({"c-1": b"stale", "c-2": b"stale"}, 9),
            old.check(),
            old.restore({"c-1": b"stale"}, 9),
        ):
            with pytest.raises(StoreFenced) as raised:
                await call
            assert_one_line(raised.value, "shard 0", str(new.epoch))
        assert await new.load() == Loaded(records={"c-1": b"one"}, settings={}, token=1)
        await new.commit({"c-1": b"two"}, 2)
        await old.close()  # the shard is another's: not released by this view
        [owner] = await shared.owners()
        assert (owner.shard, owner.epoch, owner.replica, owner.released) == (
            0,
            new.epoch,
            "r2",
            False,
        )
        assert abs(owner.since_ms - time.time() * 1000) < 60_000
    [owner] = await shared.owners()
    assert owner.released and owner.epoch == new.epoch


async def test_an_epoch_is_above_the_stored_one_and_the_wall_clock(
    shared: PostgresShared, raw: asyncpg.Connection
) -> None:
    before = time.time_ns() // 1_000_000
    async with opened(shared, 3, "r1") as view:
        assert view.epoch >= before - 5_000  # the server's clock, not this process's
    far = before + 10**9
    await raw.execute("UPDATE shards SET epoch = $1 WHERE shard = 3", far)
    async with opened(shared, 3, "r1") as view:
        assert view.epoch == far + 1
    # A store that lost its data: the wall clock keeps epochs growing.
    await raw.execute("DELETE FROM shards")
    async with opened(shared, 3, "r1") as view:
        assert before - 5_000 <= view.epoch < far


# Writer entries: lost or rolled-back data noticed, written again by restore


async def test_a_store_that_lost_its_entries_is_lost_until_restored(
    shared: PostgresShared, raw: asyncpg.Connection
) -> None:
    async with opened(shared, 0, "r1") as view:
        await view.commit({"c-1": b"one"}, 1)
        await raw.execute("TRUNCATE writers, conversations, token")
        with pytest.raises(StoreLost, match="lost writer"):
            await view.check()
        with pytest.raises(StoreLost):
            await view.commit({"c-2": b"two"}, 2)
        assert (await view.load()).records == {}
        await view.restore({"c-1": b"one"}, 1)
        await view.commit({"c-2": b"two"}, 2)
        await view.check()
        assert await view.load() == Loaded(
            records={"c-1": b"one", "c-2": b"two"}, settings={}, token=2
        )


async def test_a_store_gone_back_in_time_is_lost(
    shared: PostgresShared, raw: asyncpg.Connection
) -> None:
    async with opened(shared, 0, "r1") as view:
        await view.commit({"c-1": b"one"}, 1)
        before = await raw.fetchval("SELECT sequence FROM writers")
        await view.commit({"c-1": b"two"}, 2)
        await raw.execute("UPDATE writers SET sequence = $1", before)
        await raw.execute("UPDATE conversations SET record = 'one'")
        with pytest.raises(StoreLost):
            await view.check()
        with pytest.raises(StoreLost):
            await view.commit({"c-2": b"new"}, 3)
        assert (await view.load()).records == {"c-1": b"one"}


async def test_a_shard_row_gone_or_behind_is_lost_not_fenced(
    shared: PostgresShared, raw: asyncpg.Connection
) -> None:
    async with opened(shared, 0, "r1") as view:
        await raw.execute("DELETE FROM shards")
        with pytest.raises(StoreLost, match="epoch is gone"):
            await view.commit({"c-1": b"one"}, 1)
        await view.restore({"c-1": b"one"}, 1)
        await raw.execute("UPDATE shards SET epoch = epoch - 1")
        with pytest.raises(StoreLost):
            await view.check()
        await view.restore({"c-1": b"one"}, 1)
        await view.commit({"c-2": b"two"}, 2)
        [owner] = await shared.owners()
        assert (owner.epoch, owner.replica) == (view.epoch, "r1")


async def test_a_dropped_schema_is_lost_and_restore_makes_it_again(
    shared: PostgresShared, raw: asyncpg.Connection, postgres_schema: str
) -> None:
    async with opened(shared, 0, "r1") as view:
        await view.commit({"c-1": b"one"}, 4)
        await raw.execute(f'DROP SCHEMA "{postgres_schema}" CASCADE')
        with pytest.raises(StoreLost, match="lost its tables"):
            await view.check()
        await view.restore({"c-1": b"one"}, 4)
        await view.commit({"c-2": b"two"}, 5)
        assert await view.load() == Loaded(
            records={"c-1": b"one", "c-2": b"two"}, settings={}, token=5
        )


async def test_close_forgets_the_writer_and_open_keeps_the_most_recent_writers(
    shared: PostgresShared, raw: asyncpg.Connection
) -> None:
    await raw.executemany(
        "INSERT INTO writers (writer, sequence) VALUES ($1, $2)",
        [(f"old-{n}", n) for n in range(300)],
    )
    async with opened(shared, 0, "r1") as view:
        writers = {row[0] for row in await raw.fetch("SELECT writer FROM writers")}
        assert len(writers) == WRITERS_KEPT
        assert view.writer in writers  # type: ignore[attr-defined]
        assert "old-299" in writers and "old-44" not in writers
    writers = {row[0] for row in await raw.fetch("SELECT writer FROM writers")}
    assert view.writer not in writers  # type: ignore[attr-defined]


# Outcomes: known not written, or unknown and safe to send again


@pytest.fixture
async def proxy(postgres_url: str) -> AsyncIterator[HoldingProxy]:
    held = HoldingProxy(urlsplit(postgres_url).port or 5432)
    await held.start()
    yield held
    await held.close()


async def test_a_commit_left_unanswered_lands_late_and_never_beneath_a_later_one(
    postgres_store_url: str, proxy: HoldingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = PostgresShared(through(proxy.port, postgres_store_url), timeout_ms=500)
    await shared.open()
    view = shared.shard(0, "r1")
    await view.open()
    await view.commit({"c-1": b"one"}, 1)
    execute = asyncpg.connection.Connection.execute
    armed = True

    async def holding_the_commit(self: Any, query: str, *args: Any, **options: Any) -> Any:
        nonlocal armed
        if query == "COMMIT" and armed:
            armed = False
            proxy.hold()  # the network keeps the COMMIT: no answer
        return await execute(self, query, *args, **options)

    monkeypatch.setattr(asyncpg.connection.Connection, "execute", holding_the_commit)
    try:
        with pytest.raises(StoreOutcomeUnknown) as raised:
            await view.commit({"c-1": b"two", "c-2": b"two"}, 2)
        assert_one_line(raised.value, "outcome unknown", shared.url)
        # Sent again on a new connection, it waits for the shard's row the first holds.
        again = asyncio.create_task(view.commit({"c-1": b"two", "c-2": b"two"}, 2))
        await asyncio.sleep(0.1)
        assert not again.done()
        await proxy.release()  # the first COMMIT reaches PostgreSQL now
        await again
        await view.commit({"c-1": b"three", "c-2": None}, 3)
        assert await view.load() == Loaded(records={"c-1": b"three"}, settings={}, token=3)
        await view.check()
    finally:
        await view.close()
        await shared.close()


async def test_a_commit_never_delivered_ends_with_its_session_and_holds_the_shard_no_longer(
    postgres_store_url: str, proxy: HoldingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = PostgresShared(through(proxy.port, postgres_store_url), timeout_ms=300)
    await shared.open()
    view = shared.shard(0, "r1")
    await view.open()
    execute = asyncpg.connection.Connection.execute
    armed = True

    async def holding_the_commit(self: Any, query: str, *args: Any, **options: Any) -> Any:
        nonlocal armed
        if query == "COMMIT" and armed:
            armed = False
            proxy.hold()  # and never released
        return await execute(self, query, *args, **options)

    monkeypatch.setattr(asyncpg.connection.Connection, "execute", holding_the_commit)
    try:
        with pytest.raises(StoreOutcomeUnknown):
            await view.commit({"c-1": b"lost"}, 1)
        started = time.monotonic()
        waits = 0
        while True:
            try:
                await view.commit({"c-2": b"two"}, 2)
                break
            except StoreError as exc:
                # Waiting for the shard's row: sent, refused, nothing written.
                assert not exc.unknown, exc
                waits += 1
        # The server ended the silent session (3 timeouts idle in its transaction).
        assert waits >= 1 and time.monotonic() - started < 3
        assert await view.load() == Loaded(records={"c-2": b"two"}, settings={}, token=2)
    finally:
        await view.close()
        await shared.close()


async def test_check_raises_an_old_entry_to_now(
    shared: PostgresShared, raw: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened(shared, 0, "r1") as view:
        before = await raw.fetchval("SELECT sequence FROM writers")
        await view.check()
        assert await raw.fetchval("SELECT sequence FROM writers") == before
        monkeypatch.setattr("warmer.store.postgres_view.refresh_due", lambda seen: True)
        await view.check()
        assert await raw.fetchval("SELECT sequence FROM writers") > before
        await view.commit({"c-1": b"one"}, 1)


async def test_cut_connections_are_known_not_to_have_written(
    postgres_store_url: str, proxy: HoldingProxy
) -> None:
    shared = PostgresShared(through(proxy.port, postgres_store_url), timeout_ms=500)
    await shared.open()
    view = shared.shard(0, "r1")
    await view.open()
    await view.commit({"c-1": b"one"}, 1)
    await proxy.close()  # every connection cut, nothing listens any more
    with pytest.raises(StoreError) as raised:
        await view.commit({"c-1": b"two"}, 2)
    assert not raised.value.unknown, raised.value
    with pytest.raises(StoreUnreachable):
        await view.commit({"c-1": b"two"}, 2)
    await view.close()  # says so in a log line, raises nothing
    await shared.close()


async def _unused_port() -> int:
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


async def test_open_is_unreachable_when_nothing_listens() -> None:
    port = await _unused_port()
    shared = PostgresShared(f"postgresql://warmer:s3cret-pass@127.0.0.1:{port}/db")
    started = time.monotonic()
    with pytest.raises(StoreUnreachable) as raised:
        await shared.open()
    assert time.monotonic() - started < 5
    assert_one_line(raised.value, f"postgresql://warmer:***@127.0.0.1:{port}/db")
    assert "s3cret" not in str(raised.value)
    with pytest.raises(StoreError, match="not open"):
        await shared.owners()


async def test_open_is_unreachable_when_the_server_does_not_answer() -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        shared = PostgresShared(f"postgresql://:s3cret@127.0.0.1:{port}/db", timeout_ms=300)
        started = time.monotonic()
        with pytest.raises(StoreUnreachable) as raised:
            await shared.open()
        assert time.monotonic() - started < 3
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert_one_line(raised.value, "no answer within 300 ms")
    assert "s3cret" not in str(raised.value)


async def test_a_database_that_does_not_exist_is_an_error_not_a_wait(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    host = parts.netloc.rpartition("@")[2]
    shared = PostgresShared(f"postgresql://postgres:s3cret@{host}/warmer_no_such_database")
    with pytest.raises(StoreError) as raised:
        await shared.open()
    assert not isinstance(raised.value, StoreUnreachable)
    assert_one_line(raised.value, "warmer_no_such_database", "postgres:***@")
    assert "s3cret" not in str(raised.value)


async def test_a_store_on_its_own_is_shard_0_with_its_own_connections(
    postgres_store_url: str, shared: PostgresShared
) -> None:
    alone = PostgresStore(postgres_store_url, replica="alone")
    assert alone.epoch == 0 and alone.url == shared.url
    await alone.open()
    try:
        await alone.commit({"before": b"shards"}, 6)
        await alone.check()
        assert alone.epoch > 0
    finally:
        await alone.close()
    [owner] = await shared.owners()
    assert (owner.shard, owner.replica, owner.released) == (0, "alone", True)
    async with opened(shared, 0, "r1") as view:
        assert await view.load() == Loaded(records={"before": b"shards"}, settings={}, token=6)


# Presence, layout, reshard moves


async def test_presence_lists_the_live_replicas_by_id(shared: PostgresShared) -> None:
    await shared.beat("r-b", "host b", 60_000)
    await shared.beat("r-c", "host c", 1)
    await asyncio.sleep(0.05)
    alive = await shared.beat("r-a", "x" * 2000, 60_000)
    assert [replica.id for replica in alive] == ["r-a", "r-b"]
    assert len(alive[0].info) == 1000 and alive[1].info == "host b"
    assert abs(alive[0].seen_ms - time.time() * 1000) < 60_000
    await shared.leave("r-b")
    assert [replica.id for replica in await shared.beat("r-a", "", 60_000)] == ["r-a"]


async def test_the_layout(shared: PostgresShared) -> None:
    assert await shared.layout() is None
    async with opened(shared, 0, "r1") as view:
        await view.commit({"c-1": b"one"}, 1)
    assert await shared.layout() == 1  # written without one
    await shared.set_layout(4)
    assert await shared.layout() == 4
    with pytest.raises(ValueError):
        await shared.set_layout(0)


async def test_assign_moves_records_and_never_the_gap_model(shared: PostgresShared) -> None:
    async with opened(shared, 0, "r1") as view:
        await view.commit({"a": b"1", "b": b"2", "c": b"3", MODEL_KEY: b"model"}, 1)
    await shared.assign({"a": 1, "b": 1, "no-record": 2, MODEL_KEY: 3})
    assert await shared.ids(0) == ["c", MODEL_KEY]
    assert await shared.ids(1) == ["a", "b"]
    assert await shared.ids(2) == []
    async with opened(shared, 0, "r1") as zero, opened(shared, 3, "r1") as three:
        assert (await zero.load()).records == {"c": b"3", MODEL_KEY: b"model"}
        assert (await three.load()).records == {}
    with pytest.raises(ValueError):
        await shared.assign({"a": 256})
