"""SqliteStore: settings and the token survive, writes are committed, failures are StoreError."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from warmer.store import SqliteStore, Store, StoreError
from warmer.store.sqlite import SCHEMA_VERSION


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "warmer.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(db_path)
    await opened.open()
    yield opened
    await opened.close()


async def reopened(path: Path) -> SqliteStore:
    fresh = SqliteStore(path)
    await fresh.open()
    return fresh


def raw_rows(path: Path) -> dict[str, object]:
    """The settings table read by a separate connection, which sees only committed rows."""
    with sqlite3.connect(path) as side:
        return dict(side.execute("SELECT conversation_id, value FROM settings").fetchall())


def insert_raw(path: Path, conversation_id: str, value: object) -> None:
    side = sqlite3.connect(path)
    with side:
        side.execute("INSERT INTO settings VALUES (?, ?)", (conversation_id, value))
    side.close()


def test_satisfies_the_store_protocol(db_path: Path) -> None:
    store: Store = SqliteStore(db_path)
    assert isinstance(store, SqliteStore)


async def test_settings_round_trip(store: SqliteStore) -> None:
    await store.put_settings("c-1", True, 60000)
    await store.put_settings("c-2", False, 240000)
    assert await store.load_settings() == {
        "c-1": {"enabled": True, "intervalMs": 60000},
        "c-2": {"enabled": False, "intervalMs": 240000},
    }


async def test_empty_store_loads_nothing(store: SqliteStore) -> None:
    assert await store.load_settings() == {}
    assert await store.load_token() == 0


async def test_put_settings_overwrites(store: SqliteStore, db_path: Path) -> None:
    await store.put_settings("c-1", True, 60000)
    await store.put_settings("c-1", False, 5000)
    assert await store.load_settings() == {"c-1": {"enabled": False, "intervalMs": 5000}}
    assert len(raw_rows(db_path)) == 1


async def test_odd_conversation_ids_round_trip(store: SqliteStore) -> None:
    ids = ["", "a'b\"c", "conv:with:colons", "ünïcødé-✓", "x" * 4096]
    for conversation_id in ids:
        await store.put_settings(conversation_id, True, 1000)
    assert sorted(await store.load_settings()) == sorted(ids)


async def test_put_settings_is_committed_when_it_returns(store: SqliteStore, db_path: Path) -> None:
    await store.put_settings("c-1", True, 60000)
    # Another connection sees only committed data; the store is still open.
    assert raw_rows(db_path) == {"c-1": '{"enabled":true,"intervalMs":60000}'}


async def test_settings_survive_a_reopen(store: SqliteStore, db_path: Path) -> None:
    await store.put_settings("c-1", True, 90000)
    await store.close()
    again = await reopened(db_path)
    try:
        assert await again.load_settings() == {"c-1": {"enabled": True, "intervalMs": 90000}}
    finally:
        await again.close()


async def test_file_is_in_wal_mode_with_full_sync(store: SqliteStore, db_path: Path) -> None:
    with sqlite3.connect(db_path) as side:
        assert side.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # synchronous is per connection: read it on the store's own (2 = FULL).
    assert store._conn is not None
    rows = list(await store._conn.execute_fetchall("PRAGMA synchronous"))
    assert rows[0][0] == 2


async def test_malformed_rows_read_back_raw(store: SqliteStore, db_path: Path) -> None:
    await store.put_settings("good", True, 60000)
    insert_raw(db_path, "wrong-types", '{"enabled": "yes", "intervalMs": "soon"}')
    insert_raw(db_path, "extra", '{"enabled": true, "intervalMs": 1.5, "colour": "red"}')
    insert_raw(db_path, "nan", '{"enabled": false, "intervalMs": NaN}')
    insert_raw(db_path, "not-json", "not json {")
    insert_raw(db_path, "array", "[1, 2]")
    insert_raw(db_path, "number", 5)
    insert_raw(db_path, "bad-bytes", b"\xff\xfe")
    loaded = await store.load_settings()
    assert loaded["good"] == {"enabled": True, "intervalMs": 60000}
    assert loaded["wrong-types"] == {"enabled": "yes", "intervalMs": "soon"}
    assert loaded["extra"] == {"enabled": True, "intervalMs": 1.5, "colour": "red"}
    interval = loaded["nan"]["intervalMs"]
    assert isinstance(interval, float)
    assert math.isnan(interval)
    assert loaded["not-json"] == {}
    assert loaded["array"] == {}
    assert loaded["number"] == {}
    assert loaded["bad-bytes"] == {}


async def test_token_keeps_the_maximum(store: SqliteStore) -> None:
    await store.put_token(5)
    await store.put_token(3)
    assert await store.load_token() == 5
    await store.put_token(2**53 - 1)
    assert await store.load_token() == 2**53 - 1


async def test_token_survives_a_reopen(store: SqliteStore, db_path: Path) -> None:
    await store.put_token(1_700_000_000_000_000)
    await store.close()
    again = await reopened(db_path)
    try:
        assert await again.load_token() == 1_700_000_000_000_000
        await again.put_token(7)
        assert await again.load_token() == 1_700_000_000_000_000
    finally:
        await again.close()


async def test_concurrent_tokens_keep_the_maximum(store: SqliteStore) -> None:
    await asyncio.gather(*(store.put_token(token) for token in (40, 90, 10, 70)))
    assert await store.load_token() == 90


async def test_put_token_rejects_what_is_not_a_token(store: SqliteStore) -> None:
    with pytest.raises(ValueError):
        await store.put_token(-1)
    with pytest.raises(ValueError):
        await store.put_token(2**63)
    assert await store.load_token() == 0


async def test_concurrent_puts_share_commits(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = 0
    commit = store._commit

    async def counting(*args: object, **kwargs: object) -> Exception | None:
        nonlocal commits
        commits += 1
        return await commit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_commit", counting)
    await asyncio.gather(*(store.put_settings(f"c-{n}", True, 1000 + n) for n in range(50)))
    assert commits <= 2
    loaded = await store.load_settings()
    assert len(loaded) == 50
    assert loaded["c-49"] == {"enabled": True, "intervalMs": 1049}


async def test_concurrent_puts_for_one_conversation_keep_the_last(store: SqliteStore) -> None:
    await asyncio.gather(
        store.put_settings("c-1", True, 1000),
        store.put_settings("c-1", False, 2000),
        store.put_settings("c-1", True, 3000),
    )
    assert await store.load_settings() == {"c-1": {"enabled": True, "intervalMs": 3000}}


async def test_close_waits_for_pending_writes(store: SqliteStore, db_path: Path) -> None:
    put = asyncio.create_task(store.put_settings("c-1", True, 60000))
    await asyncio.sleep(0)  # the put is queued before close starts
    await store.close()
    await put
    assert "c-1" in raw_rows(db_path)


async def test_close_twice_and_open_twice_are_harmless(db_path: Path) -> None:
    store = SqliteStore(db_path)
    await store.open()
    await store.open()
    await store.put_token(3)
    await store.close()
    await store.close()
    again = await reopened(db_path)
    try:
        assert await again.load_token() == 3
    finally:
        await again.close()


async def test_calls_before_open_raise_store_error(db_path: Path) -> None:
    store = SqliteStore(db_path)
    with pytest.raises(StoreError, match="not open"):
        await store.load_settings()
    with pytest.raises(StoreError, match="not open"):
        await store.put_settings("c-1", True, 1000)
    assert not await asyncio.to_thread(db_path.exists)


async def test_calls_after_close_raise_store_error(store: SqliteStore) -> None:
    await store.close()
    with pytest.raises(StoreError):
        await store.put_settings("c-1", True, 1000)
    with pytest.raises(StoreError):
        await store.put_token(1)
    with pytest.raises(StoreError):
        await store.load_token()


async def test_missing_directory_is_a_store_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "warmer.db"
    store = SqliteStore(missing)
    with pytest.raises(StoreError, match="nowhere"):
        await store.open()
    assert not missing.parent.exists()


async def test_a_file_that_is_not_a_database_is_a_store_error(db_path: Path) -> None:
    await asyncio.to_thread(db_path.write_bytes, b"not a database, just bytes " * 100)
    store = SqliteStore(db_path)
    with pytest.raises(StoreError, match=str(db_path)) as raised:
        await store.open()
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    with pytest.raises(StoreError, match="not open"):
        await store.load_token()


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    store = await reopened(db_path)
    await store.close()
    with sqlite3.connect(db_path) as side:
        side.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,)
        )
    with pytest.raises(StoreError, match="schema version"):
        await SqliteStore(db_path).open()


async def test_a_locked_database_fails_the_write_then_recovers(db_path: Path) -> None:
    store = SqliteStore(db_path, busy_timeout_ms=50)
    await store.open()
    try:
        locker = sqlite3.connect(db_path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError, match="locked") as raised:
            await store.put_settings("c-1", True, 1000)
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        locker.execute("ROLLBACK")
        locker.close()
        assert await store.load_settings() == {}
        await store.put_settings("c-1", True, 2000)
        assert raw_rows(db_path) == {"c-1": '{"enabled":true,"intervalMs":2000}'}
    finally:
        await store.close()


async def test_every_waiter_of_a_failed_batch_gets_a_store_error(db_path: Path) -> None:
    store = SqliteStore(db_path, busy_timeout_ms=50)
    await store.open()
    try:
        locker = sqlite3.connect(db_path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        results = await asyncio.gather(
            store.put_settings("c-1", True, 1000),
            store.put_settings("c-2", True, 1000),
            store.put_token(9),
            return_exceptions=True,
        )
        locker.execute("ROLLBACK")
        locker.close()
        assert all(isinstance(result, StoreError) for result in results)
        assert len({id(result) for result in results}) == 3
        assert await store.load_token() == 0
    finally:
        await store.close()


async def test_a_broken_table_is_a_store_error(store: SqliteStore, db_path: Path) -> None:
    with sqlite3.connect(db_path) as side:
        side.execute("DROP TABLE settings")
    with pytest.raises(StoreError, match="settings"):
        await store.load_settings()
    with pytest.raises(StoreError):
        await store.put_settings("c-1", True, 1000)
    # The token lives elsewhere and still works after the failed transaction rolled back.
    await store.put_token(4)
    assert await store.load_token() == 4
