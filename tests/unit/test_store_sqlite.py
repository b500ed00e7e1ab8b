"""SqliteStore: the file's schema and its upgrade, group commit, and every way a file is bad.

What every back end does (commit, load, delete, token) is in test_store_contract.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sqlite_lock import Locker
from warmer.store import Loaded, SqliteShared, SqliteStore, Store, StoreError
from warmer.store import sqlite as sqlite_module
from warmer.store.base import WRITERS_KEPT
from warmer.store.sqlite import SCHEMA_VERSION

NOBODY = 65534


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "warmer.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(db_path)
    await opened.open()
    yield opened
    await opened.close()


async def reopened(path: Path, **options: Any) -> SqliteStore:
    fresh = SqliteStore(path, **options)
    await fresh.open()
    return fresh


async def load_once(path: Path) -> Loaded:
    fresh = await reopened(path)
    try:
        return await fresh.load()
    finally:
        await fresh.close()


def side_query(path: Path, sql: str) -> list[tuple[object, ...]]:
    """What a separate connection reads: only committed rows."""
    side = sqlite3.connect(path)
    try:
        return list(side.execute(sql).fetchall())
    finally:
        side.close()


def tables_in(path: Path) -> list[str]:
    """The names of the file's tables, sorted."""
    rows = side_query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")
    names = [name for (name,) in rows if isinstance(name, str)]
    assert len(names) == len(rows), rows
    return sorted(names)


def side_execute(path: Path, *statements: str | tuple[str, tuple[object, ...]]) -> None:
    side = sqlite3.connect(path)
    try:
        with side:
            for statement in statements:
                if isinstance(statement, tuple):
                    side.execute(*statement)
                else:
                    side.execute(statement)
    finally:
        side.close()


def write_version_1(path: Path, settings: dict[str, object], token: int | None) -> None:
    """A file as the schema-1 store left it."""
    side_execute(
        path,
        "CREATE TABLE settings (conversation_id TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('schema_version', 1)",
        *(
            ("INSERT INTO settings VALUES (?, ?)", (conversation_id, value))
            for conversation_id, value in settings.items()
        ),
        *((("INSERT INTO meta VALUES ('token', ?)", (token,)),) if token is not None else ()),
    )


def assert_one_line_naming(error: StoreError, path: Path, *words: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


def test_satisfies_the_store_protocol(db_path: Path) -> None:
    store: Store = SqliteStore(db_path)
    assert isinstance(store, SqliteStore)


# The file


async def test_a_new_file_has_schema_2(store: SqliteStore, db_path: Path) -> None:
    assert SCHEMA_VERSION == 2
    assert side_query(db_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(2,)]
    columns = side_query(db_path, "SELECT name, type, pk FROM pragma_table_info('conversations')")
    assert columns == [("conversation_id", "TEXT", 1), ("record", "BLOB", 0)]
    assert tables_in(db_path) == ["conversations", "meta"]


async def test_file_is_in_wal_mode_with_full_sync(store: SqliteStore, db_path: Path) -> None:
    assert side_query(db_path, "PRAGMA journal_mode") == [("wal",)]
    # synchronous is per connection: read it on the store's own (2 = FULL).
    assert store._conn is not None
    rows = list(await store._conn.execute_fetchall("PRAGMA synchronous"))
    assert rows[0][0] == 2


async def test_a_commit_is_committed_when_it_returns(store: SqliteStore, db_path: Path) -> None:
    await store.commit({"c-1": b"\x00one"}, 3)
    # Another connection sees only committed data; the store is still open.
    assert side_query(db_path, "SELECT conversation_id, record FROM conversations") == [
        ("c-1", b"\x00one")
    ]
    assert side_query(db_path, "SELECT value FROM meta WHERE key = 'token'") == [(3,)]


async def test_close_twice_and_open_twice_are_harmless(db_path: Path) -> None:
    store = SqliteStore(db_path)
    await store.open()
    await store.open()
    await store.commit({"c-1": b"one"}, 3)
    await store.close()
    await store.close()
    assert await load_once(db_path) == Loaded(records={"c-1": b"one"}, settings={}, token=3)


# Upgrading a schema-1 file


async def test_a_version_1_file_is_upgraded_keeping_its_settings(db_path: Path) -> None:
    write_version_1(db_path, {"c-1": '{"enabled":true,"intervalMs":60000}'}, 41)
    assert await load_once(db_path) == Loaded(
        records={}, settings={"c-1": {"enabled": True, "intervalMs": 60000}}, token=41
    )
    assert side_query(db_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(2,)]


async def test_a_version_1_file_without_a_token_loads_0(db_path: Path) -> None:
    write_version_1(db_path, {}, None)
    assert await load_once(db_path) == Loaded(records={}, settings={}, token=0)


async def test_the_upgrade_is_one_transaction(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_version_1(db_path, {"c-1": "{}"}, 5)
    # Fails after the new table was created: the whole upgrade must roll back.
    monkeypatch.setattr(sqlite_module, "_SET_VERSION", "UPDATE no_such_table SET x = ?")
    with pytest.raises(StoreError, match="no_such_table"):
        await SqliteStore(db_path).open()
    assert tables_in(db_path) == ["meta", "settings"]
    assert side_query(db_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(1,)]


async def test_legacy_settings_read_back_raw(db_path: Path) -> None:
    write_version_1(
        db_path,
        {
            "good": '{"enabled":true,"intervalMs":60000}',
            "wrong-types": '{"enabled": "yes", "intervalMs": "soon"}',
            "extra": '{"enabled": true, "intervalMs": 1.5, "colour": "red"}',
            "nan": '{"enabled": false, "intervalMs": NaN}',
            "not-json": "not json {",
            "array": "[1, 2]",
            "number": 5,
            "bad-bytes": b"\xff\xfe",
        },
        None,
    )
    settings = (await load_once(db_path)).settings
    assert settings["good"] == {"enabled": True, "intervalMs": 60000}
    assert settings["wrong-types"] == {"enabled": "yes", "intervalMs": "soon"}
    assert settings["extra"] == {"enabled": True, "intervalMs": 1.5, "colour": "red"}
    interval = settings["nan"]["intervalMs"]
    assert isinstance(interval, float)
    assert math.isnan(interval)
    assert settings["not-json"] == {}
    assert settings["array"] == {}
    assert settings["number"] == {}
    assert settings["bad-bytes"] == {}


async def test_a_commit_for_an_id_removes_its_legacy_settings(db_path: Path) -> None:
    legacy = json.dumps({"enabled": True, "intervalMs": 1000})
    write_version_1(db_path, {"put": legacy, "deleted": legacy, "kept": legacy}, 2)
    store = await reopened(db_path)
    try:
        await store.commit({"put": b"record", "deleted": None}, 3)
        assert await store.load() == Loaded(
            records={"put": b"record"},
            settings={"kept": {"enabled": True, "intervalMs": 1000}},
            token=3,
        )
    finally:
        await store.close()
    assert side_query(db_path, "SELECT conversation_id FROM settings") == [("kept",)]


async def test_legacy_settings_of_an_id_with_a_record_are_not_loaded(db_path: Path) -> None:
    write_version_1(db_path, {"both": "{}", "old": "{}"}, None)
    store = await reopened(db_path)
    await store.close()
    side_execute(db_path, "INSERT INTO conversations VALUES ('both', x'01')")
    assert await load_once(db_path) == Loaded(
        records={"both": b"\x01"}, settings={"old": {}}, token=0
    )


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    store = await reopened(db_path)
    await store.close()
    side_execute(
        db_path,
        ("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,)),
    )
    with pytest.raises(StoreError, match="schema version 3; this warmer reads up to 2") as raised:
        await SqliteStore(db_path).open()
    assert_one_line_naming(raised.value, db_path)


async def test_a_schema_version_that_is_not_a_number_is_refused(db_path: Path) -> None:
    side_execute(
        db_path,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL)",
        "INSERT INTO meta VALUES ('schema_version', 'two')",
    )
    with pytest.raises(StoreError, match="schema version 'two'") as raised:
        await SqliteStore(db_path).open()
    assert_one_line_naming(raised.value, db_path)


# A file that cannot be used: StoreError, one line, naming the file and what is wrong


async def test_missing_directory_is_a_store_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "warmer.db"
    with pytest.raises(StoreError, match=r"nowhere.*does not exist"):
        await SqliteStore(missing).open()
    assert not missing.parent.exists()


async def test_garbage_in_place_of_the_database(db_path: Path) -> None:
    garbage = b"not a database, just bytes " * 100
    await asyncio.to_thread(db_path.write_bytes, garbage)
    store = SqliteStore(db_path)
    with pytest.raises(StoreError) as raised:
        await store.open()
    assert_one_line_naming(raised.value, db_path, "not an SQLite database")
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    assert await asyncio.to_thread(db_path.read_bytes) == garbage  # never a silent reset
    with pytest.raises(StoreError, match="not open"):
        await store.load()


async def test_a_directory_in_place_of_the_file(db_path: Path) -> None:
    await asyncio.to_thread(db_path.mkdir)
    with pytest.raises(StoreError) as raised:
        await SqliteStore(db_path).open()
    assert_one_line_naming(raised.value, db_path, "is a directory")


async def test_corrupted_pages_fail_the_load(db_path: Path) -> None:
    store = await reopened(db_path)
    await store.commit({f"c-{n}": bytes(100) for n in range(2000)}, 1)
    await store.close()
    # Overwrite the pages after the first (the header stays valid).
    with db_path.open("r+b") as file:
        file.seek(4096)
        file.write(b"\xa5" * 40_000)
    with pytest.raises(StoreError) as raised:
        fresh = await reopened(db_path)
        try:
            await fresh.load()
        finally:
            await fresh.close()
    assert_one_line_naming(raised.value, db_path, "corrupt")


async def test_a_record_that_is_not_a_blob(db_path: Path) -> None:
    store = await reopened(db_path)
    await store.commit({"fine": b"ok"}, 1)
    side_execute(db_path, "INSERT INTO conversations VALUES ('c-text', 'some text')")
    try:
        with pytest.raises(StoreError) as raised:
            await store.load()
    finally:
        await store.close()
    assert_one_line_naming(raised.value, db_path, "'c-text'", "TEXT, not a BLOB")


async def test_a_conversation_id_that_is_not_text(db_path: Path) -> None:
    await (await reopened(db_path)).close()
    side_execute(db_path, "INSERT INTO conversations VALUES (x'ff00', x'01')")
    store = await reopened(db_path)
    try:
        with pytest.raises(StoreError) as raised:
            await store.load()
    finally:
        await store.close()
    assert_one_line_naming(raised.value, db_path, "conversation id", "not TEXT")


@pytest.mark.parametrize("token", ["'soon'", "1.5", "-3", "x'00'"])
async def test_a_token_that_is_not_an_integer(db_path: Path, token: str) -> None:
    store = await reopened(db_path)
    await store.commit({}, 5)
    side_execute(db_path, f"UPDATE meta SET value = {token} WHERE key = 'token'")
    with pytest.raises(StoreError) as at_load:
        await store.load()
    await store.close()
    assert_one_line_naming(at_load.value, db_path, "the token is", "not a non-negative integer")
    with pytest.raises(StoreError) as at_open:
        await SqliteStore(db_path).open()
    assert_one_line_naming(at_open.value, db_path, "the token is")


async def test_a_missing_table_is_a_store_error_naming_it(
    store: SqliteStore, db_path: Path
) -> None:
    side_execute(db_path, "DROP TABLE conversations")
    with pytest.raises(StoreError, match="conversations") as raised:
        await store.load()
    assert_one_line_naming(raised.value, db_path)
    with pytest.raises(StoreError, match="conversations"):
        await store.commit({"c-1": b"one"}, 1)
    # The failed transaction rolled back: the token, elsewhere, still commits.
    await store.commit({}, 4)
    assert side_query(db_path, "SELECT value FROM meta WHERE key = 'token'") == [(4,)]


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory another user can enter (tmp_path's parents are private to root)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    made = Path(tempfile.mkdtemp(prefix="warmer-test-"))
    made.chmod(0o755)
    try:
        yield made
    finally:
        shutil.rmtree(made)


async def _open_error(path: Path) -> str:
    store = SqliteStore(path)
    try:
        await store.open()
    except StoreError as exc:
        return str(exc)
    await store.close()
    return "opened"


def open_without_root(path: Path) -> str:
    """What opening ``path`` says to a user with no special rights over files.

    Root reads any file: as root, the store is opened in a forked child that became
    ``nobody`` (forked, not spawned: the interpreter lives under /root).
    """
    if os.geteuid() != 0:
        return asyncio.run(_open_error(path))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write, asyncio.run(_open_error(path)).encode())
            code = 0
        except BaseException as exc:
            os.write(write, f"the child failed: {exc!r}".encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, said
    return said


def test_a_file_this_process_may_not_read(shared_dir: Path) -> None:
    path = shared_dir / "warmer.db"
    asyncio.run(_open_error(path))
    path.chmod(0o000 if os.geteuid() != 0 else 0o600)
    try:
        said = open_without_root(path)
    finally:
        path.chmod(0o600)
    assert "\n" not in said
    assert said.startswith(f"cannot open store {path}: permission denied"), said


def test_a_directory_this_process_may_not_write(shared_dir: Path) -> None:
    directory = shared_dir / "read-only"
    directory.mkdir()
    path = directory / "warmer.db"
    asyncio.run(_open_error(path))
    (directory / "warmer.db-wal").unlink(missing_ok=True)
    (directory / "warmer.db-shm").unlink(missing_ok=True)
    path.chmod(0o666)
    directory.chmod(0o555)
    try:
        said = open_without_root(path)
    finally:
        directory.chmod(0o755)
    assert "\n" not in said
    assert said.startswith(f"cannot open store {path}: permission denied"), said
    assert str(directory) in said


# Locked by another process


async def test_a_file_locked_by_another_process(db_path: Path) -> None:
    store = await reopened(db_path, busy_timeout_ms=50)
    locker = await Locker.hold(db_path)
    try:
        with pytest.raises(StoreError, match="locked") as raised:
            await store.commit({"c-1": b"one"}, 1)
        assert_one_line_naming(raised.value, db_path, "cannot commit")
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        assert not raised.value.unknown  # rolled back: known not to have written
        assert await locker.release() == 0
        await store.commit({"c-1": b"one"}, 1)
        assert await store.load() == Loaded(records={"c-1": b"one"}, settings={}, token=1)
    finally:
        await locker.kill()
        await store.close()


async def test_every_waiter_of_a_failed_batch_gets_a_store_error(db_path: Path) -> None:
    store = await reopened(db_path, busy_timeout_ms=50)
    try:
        locker = sqlite3.connect(db_path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        results = await asyncio.gather(
            store.commit({"c-1": b"one"}, 1),
            store.commit({"c-2": b"two"}, 2),
            store.commit({}, 9),
            return_exceptions=True,
        )
        locker.execute("ROLLBACK")
        locker.close()
        assert all(isinstance(result, StoreError) for result in results)
        assert len({id(result) for result in results}) == 3
        assert await store.load() == Loaded(records={}, settings={}, token=0)
    finally:
        await store.close()


# Group commit


async def test_concurrent_commits_share_transactions(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions = 0
    commit = store._commit

    async def counting(*args: object, **kwargs: object) -> StoreError | None:
        nonlocal transactions
        transactions += 1
        return await commit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_commit", counting)
    await asyncio.gather(*(store.commit({f"c-{n}": bytes([n])}, n) for n in range(50)))
    assert transactions <= 2
    loaded = await store.load()
    assert len(loaded.records) == 50
    assert loaded.records["c-49"] == bytes([49])
    assert loaded.token == 49


async def test_a_commit_with_nothing_new_skips_the_transaction(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.commit({}, 10)
    transactions = 0
    commit = store._commit

    async def counting(*args: object, **kwargs: object) -> StoreError | None:
        nonlocal transactions
        transactions += 1
        return await commit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_commit", counting)
    await store.commit({}, 10)
    await store.commit({}, 3)
    assert transactions == 0
    await store.commit({}, 11)
    assert transactions == 1


async def test_close_waits_for_pending_commits(store: SqliteStore, db_path: Path) -> None:
    commit = asyncio.create_task(store.commit({"c-1": b"one"}, 1))
    await asyncio.sleep(0)  # the commit is queued before close starts
    await store.close()
    await commit
    assert side_query(db_path, "SELECT conversation_id FROM conversations") == [("c-1",)]


async def test_calls_before_open_raise_store_error(db_path: Path) -> None:
    store = SqliteStore(db_path)
    with pytest.raises(StoreError, match="not open"):
        await store.load()
    with pytest.raises(StoreError, match="not open"):
        await store.commit({"c-1": b"one"}, 1)
    assert not await asyncio.to_thread(db_path.exists)


async def test_a_commit_after_close_fails_and_changes_nothing(
    store: SqliteStore, db_path: Path
) -> None:
    await store.commit({"c-1": b"one"}, 1)
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.commit({"c-1": None, "c-2": b"two"}, 2)
    with pytest.raises(StoreError, match="not open"):
        await store.commit({}, 1)
    with pytest.raises(StoreError, match="not open"):
        await store.load()
    assert await load_once(db_path) == Loaded(records={"c-1": b"one"}, settings={}, token=1)


# The write-ahead log stays small while the store runs


async def test_the_log_is_checkpointed_and_cut_back_while_running(
    store: SqliteStore, db_path: Path
) -> None:
    wal = db_path.with_name(db_path.name + "-wal")
    largest = 0
    for n in range(400):
        # About 4 KiB of records a commit: 400 of them would be 1.6 MiB of log unchecked.
        await store.commit({f"c-{n % 50}-{k}": bytes([n % 256]) * 200 for k in range(20)}, n)
        largest = max(largest, wal.stat().st_size)
    page = 4096
    bound = sqlite_module.WAL_CHECKPOINT_PAGES * page + 8 * page  # + one commit's pages
    assert largest <= bound, f"the log reached {largest} bytes"
    await store.check()  # idle: the log is emptied
    assert wal.stat().st_size == 0
    assert len((await store.load()).records) == 50 * 20


async def test_the_writer_entries_are_bounded_and_a_closed_writer_leaves_none(
    db_path: Path,
) -> None:
    first = await reopened(db_path)
    await first.close()
    with sqlite3.connect(db_path) as side:
        side.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [(f"writer:old-{n}", n) for n in range(300)],
        )
    store = await reopened(db_path)
    try:
        rows = side_query(db_path, "SELECT key FROM meta WHERE key LIKE 'writer:%'")
        keys = {str(key) for (key,) in rows}
        assert len(keys) == WRITERS_KEPT
        assert f"writer:{store.writer}" in keys
        assert "writer:old-299" in keys and "writer:old-44" not in keys
        assert f"writer:{first.writer}" not in keys
    finally:
        await store.close()
    assert side_query(db_path, f"SELECT 1 FROM meta WHERE key = 'writer:{store.writer}'") == []


async def test_a_file_written_before_shards_opens_shared_with_nothing_lost(db_path: Path) -> None:
    alone = await reopened(db_path)
    await alone.commit({"c-1": b"one", "c-2": b"two"}, 8)
    await alone.close()
    shared = SqliteShared(db_path)
    await shared.open()
    zero, three = shared.shard(0, "a"), shared.shard(3, "a")
    try:
        await zero.open()
        await three.open()
        assert await shared.layout() == 1
        loaded = await zero.load()
        assert (loaded.records, loaded.token) == ({"c-1": b"one", "c-2": b"two"}, 8)
        await three.commit({"c-3": b"three"}, 9)
        assert (await three.load()).records == {"c-3": b"three"}
    finally:
        await zero.close()
        await three.close()
        await shared.close()
    assert tables_in(db_path) == [
        "conversations",
        "conversations_3",
        "meta",
        "owners",
        "replicas",
    ]
    assert side_query(db_path, "SELECT shard, released FROM owners") == [(0, 1), (3, 1)]
    assert await load_once(db_path) == Loaded(
        records={"c-1": b"one", "c-2": b"two"}, settings={}, token=9
    )


async def test_views_of_one_file_share_its_connection(db_path: Path) -> None:
    shared = SqliteShared(db_path)
    await shared.open()
    views = [shared.shard(shard, "a") for shard in range(4)]
    try:
        for view in views:
            await view.open()
        await asyncio.gather(
            *(
                view.commit({f"c-{n}-{k}": b"x" for k in range(50)}, n)
                for n, view in enumerate(views)
            )
        )
        assert len({view._conn for view in views}) == 1
        for n, view in enumerate(views):
            loaded = await view.load()
            assert sorted(loaded.records) == sorted(f"c-{n}-{k}" for k in range(50))
            assert sorted(await shared.ids(n)) == sorted(loaded.records)
            assert loaded.token == 3
    finally:
        for view in views:
            await view.close()
        await shared.close()
