"""The embedded default store: one SQLite file, WAL mode, fsynced at every commit.

Commits issued while one is in flight are merged and committed together, so a burst of
them costs one fsync, not one each; every caller still returns only once its own changes
are committed.

The write-ahead log stays small: SQLite copies it into the database every
``WAL_CHECKPOINT_PAGES`` pages and then cuts it back to ``WAL_LIMIT_BYTES``, and ``check``
(every few seconds) empties it when no commit is under way. The writer's entry
(``warmer.store.base``) is a ``meta`` row ``writer:<id>``, checked inside each commit's
transaction: a file swapped for an older copy is noticed at the next commit or check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite

from warmer.observe.log import get_logger
from warmer.observe.tasks import watch
from warmer.store.base import (
    MAX_SHARDS,
    WRITERS_KEPT,
    Loaded,
    RawSettings,
    StoreError,
    StoreFenced,
    StoreLost,
    StoreOutcomeUnknown,
    StoreUnreachable,
    check_commit,
    judge_epoch,
    new_epoch,
    new_writer,
    next_sequence,
    refresh_due,
    wall_ms,
)

log = get_logger(__name__)

SCHEMA_VERSION = 2
WAL_CHECKPOINT_PAGES = 128
"""Pages in the log (4 KiB each by default) after which a commit copies it into the file."""
WAL_LIMIT_BYTES = 512 * 1024
"""What the log is cut back to after a checkpoint (it may grow past it within one commit)."""
"""1: settings per conversation. 2: one opaque record per conversation (settings kept)."""

_CREATE_CONVERSATIONS = (
    "CREATE TABLE {table} (conversation_id TEXT PRIMARY KEY, record BLOB NOT NULL)"
)
# Untyped value: integers today, room for other kinds of metadata later.
_CREATE_META = "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL)"
# Added beside schema 2 when missing (an older warmer reading the file ignores them).
_CREATE_OWNERS = (
    "CREATE TABLE IF NOT EXISTS owners (shard INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, "
    "replica TEXT NOT NULL, since_ms INTEGER NOT NULL, released INTEGER NOT NULL)"
)
_CREATE_REPLICAS = (
    "CREATE TABLE IF NOT EXISTS replicas (replica TEXT PRIMARY KEY, info TEXT NOT NULL, "
    "seen_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL)"
)
_SET_VERSION = (
    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_PUT_RECORD = (
    "INSERT INTO {table} (conversation_id, record) VALUES (?, ?) "
    "ON CONFLICT (conversation_id) DO UPDATE SET record = excluded.record"
)
_DELETE_RECORD = "DELETE FROM {table} WHERE conversation_id = ?"
_DELETE_SETTINGS = "DELETE FROM settings WHERE conversation_id = ?"
_PUT_TOKEN = (
    "INSERT INTO meta (key, value) VALUES ('token', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)
_SELECT_RECORDS = "SELECT conversation_id, record FROM {table}"
_SELECT_SETTINGS = (
    "SELECT conversation_id, value FROM settings "
    "WHERE conversation_id NOT IN (SELECT conversation_id FROM conversations)"
)
_SELECT_TOKEN = "SELECT value FROM meta WHERE key = 'token'"
_SELECT_ENTRY = "SELECT value FROM meta WHERE key = ?"
_PUT_ENTRY = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_DELETE_ENTRY = "DELETE FROM meta WHERE key = ?"
_FORGET_OLD_WRITERS = (
    "DELETE FROM meta WHERE key IN (SELECT key FROM meta WHERE key LIKE 'writer:%' "
    "ORDER BY value DESC LIMIT -1 OFFSET ?)"
)
_SELECT_EPOCH = "SELECT epoch FROM owners WHERE shard = ?"
_PUT_OWNER = (
    "INSERT INTO owners (shard, epoch, replica, since_ms, released) VALUES (?, ?, ?, ?, 0) "
    "ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch, replica = excluded.replica, "
    "since_ms = excluded.since_ms, released = 0"
)
_RELEASE_OWNER = "UPDATE owners SET released = 1 WHERE shard = ? AND epoch = ?"


def table(shard: int) -> str:
    """The table of shard ``shard``'s records: shard 0's is the one a store had before
    shards existed, so that its records load unchanged."""
    if not 0 <= shard < MAX_SHARDS:
        raise ValueError(f"shard {shard} is outside 0..{MAX_SHARDS - 1}")
    return "conversations" if shard == 0 else f"conversations_{shard}"


# What the driver raises when the file, the disk or the connection fails. aiosqlite
# raises ValueError on a closed connection.
BACKEND_ERRORS = (sqlite3.Error, OSError, ValueError)


@dataclass
class _Batch:
    """Changes waiting for the next transaction, and who waits for them."""

    changes: dict[str, bytes | None] = field(default_factory=dict)
    token: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    restore: bool = False
    """Write this writer's entry (and the shard's epoch) afresh instead of checking them."""


class SqliteFile:
    """One connection to the file, with its schema prepared: owned by a SqliteStore on its
    own, or shared by every view of a ``SqliteShared`` (one transaction at a time)."""

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000, shared: bool = False
    ) -> None:
        """Use the file at ``path``, waiting up to ``busy_timeout_ms`` for a lock held
        elsewhere; ``shared``: add the tables of shards (owners, replicas) when missing."""
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._shared = shared
        self.conn: aiosqlite.Connection | None = None
        self.legacy = False
        """Whether the file has the schema-1 settings table."""
        self.token = 0
        """The token known committed: a commit that would not raise it may skip the disk."""
        # One transaction at a time on the one connection: load beside the group commit.
        self.transaction = asyncio.Lock()

    async def connect(self) -> aiosqlite.Connection:
        """Connect, switch to WAL with full fsync, create or upgrade the schema; then, in
        a transaction of its own, ``prepare`` (a view's registration) when given."""
        if self.conn is not None:
            return self.conn
        if not self.path.parent.is_dir():
            raise StoreError(
                f"store directory {self.path.parent} does not exist (store file {self.path})"
            )
        if self.path.is_dir():
            raise StoreError(f"cannot open store {self.path}: it is a directory, not a file")
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except BACKEND_ERRORS as exc:
            raise self.error("cannot open store", exc) from exc
        try:
            journal_mode = await self._prepare(conn)
        except BaseException as exc:
            await _close_quietly(conn)
            error = self.opening_error(exc)
            if error is exc:
                raise
            raise error from exc
        self.conn = conn
        if journal_mode != "wal":
            log.warning("store_wal_unavailable", path=str(self.path), journal_mode=journal_mode)
        log.info("store_opened", path=str(self.path), journal_mode=journal_mode)
        return conn

    def opening_error(self, exc: BaseException) -> BaseException:
        """What a failure while opening is: unreachable while another process holds the
        file (an old pod still stopping: wait for it), else a StoreError naming it."""
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return StoreUnreachable(str(self.error("cannot open store", exc)))
        if isinstance(exc, BACKEND_ERRORS):
            return self.error("cannot open store", exc)
        return exc

    async def disconnect(self) -> None:
        """Close the connection; calling it twice is harmless."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            await conn.close()
        except BACKEND_ERRORS as exc:
            raise self.error("cannot close store", exc) from exc
        log.info("store_closed", path=str(self.path))

    def connection(self) -> aiosqlite.Connection:
        """The open connection; StoreError when there is none."""
        if self.conn is None:
            raise StoreError(f"store {self.path} is not open")
        return self.conn

    async def _prepare(self, conn: aiosqlite.Connection) -> str:
        await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
        # NORMAL in WAL mode may lose the last commits on power loss; a commit must be durable.
        await conn.execute("PRAGMA synchronous = FULL")
        # SQLite's default (1000 pages, never cut back) let the log alone fill a small volume.
        await conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        await conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await self._migrate(conn)
            self.token = await self.read_token(conn)
            await conn.execute("COMMIT")
        except BaseException:
            await rollback_quietly(conn)
            raise
        return str(rows[0][0]).lower()

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        """Bring the file to SCHEMA_VERSION inside the caller's transaction."""
        tables = await self.tables(conn)
        if "meta" not in tables:
            await conn.execute(_CREATE_META)
            version: object = 0
        else:
            found = list(
                await conn.execute_fetchall("SELECT value FROM meta WHERE key = 'schema_version'")
            )
            version = found[0][0] if found else None
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {version!r}; "
                f"this warmer reads up to {SCHEMA_VERSION}"
            )
        if version < 2 and "conversations" not in tables:
            await conn.execute(_CREATE_CONVERSATIONS.format(table="conversations"))
        if self._shared:
            await conn.execute(_CREATE_OWNERS)
            await conn.execute(_CREATE_REPLICAS)
        if version < SCHEMA_VERSION:
            await conn.execute(_SET_VERSION, (SCHEMA_VERSION,))
            if version > 0:
                log.info("store_upgraded", path=str(self.path), version=SCHEMA_VERSION)
        self.legacy = "settings" in tables

    async def tables(self, conn: aiosqlite.Connection) -> set[str]:
        """The names of the file's tables."""
        rows = await conn.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {str(row[0]) for row in rows}

    async def read_token(self, conn: aiosqlite.Connection) -> int:
        """The token stored, 0 when none is; StoreError when it is no token."""
        rows = list(await conn.execute_fetchall(_SELECT_TOKEN))
        if not rows:
            return 0
        token = rows[0][0]
        if type(token) is not int or token < 0:
            raise StoreError(
                f"store {self.path} is corrupt: the token is {_short(token)}, "
                "not a non-negative integer"
            )
        return token

    def error(self, doing: str, exc: BaseException) -> StoreError:
        """One line naming the file and what is wrong with it, the cause attached."""
        if isinstance(exc, StoreError):
            return exc
        error = StoreError(f"{doing} {self.path}: {self._diagnose(exc)}")
        error.__cause__ = exc
        return error

    def _diagnose(self, exc: BaseException) -> str:
        """What went wrong, in words a reader can act on: the driver's own are terse."""
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if self.path.is_dir():
            return "it is a directory, not a file"
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            return f"permission denied: this process cannot read and write the file ({reason})"
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            return (
                f"permission denied: this process cannot create files in {self.path.parent}, "
                f"which WAL mode needs ({reason})"
            )
        if isinstance(exc, sqlite3.DatabaseError) and reason == "file is not a database":
            return "the file is not an SQLite database (corrupted, or another kind of file)"
        if isinstance(exc, sqlite3.DatabaseError) and "malformed" in reason:
            return f"the database file is corrupted ({reason})"
        return reason


class SqliteStore:
    """A Store in one SQLite file; the directory holding it must exist.

    On its own (``SqliteStore(path)``) it is shard 0, never fenced, with a connection of
    its own; ``SqliteShared.shard`` gives views that share the shared store's connection
    and take their shard at ``open``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = 5000,
        file: SqliteFile | None = None,
        shard: int = 0,
        replica: str | None = None,
    ) -> None:
        """Use the file at ``path``, waiting up to ``busy_timeout_ms`` for a lock held elsewhere."""
        self._owns_file = file is None
        self._file = file if file is not None else SqliteFile(path, busy_timeout_ms=busy_timeout_ms)
        self.path = self._file.path
        self.shard = shard
        self.epoch = 0
        self._replica = replica
        """Who takes the shard at ``open``: None for a store on its own (never fenced)."""
        self._table = table(shard)
        self.writer = new_writer()
        """This store's writer id: its entry is the ``meta`` row ``writer:<id>``."""
        self._entry_key = f"writer:{self.writer}"
        self._seen = 0
        """The sequence of the last commit: the entry may not be below it."""
        self._registered = False
        self._pending: _Batch | None = None
        self._writer: asyncio.Task[None] | None = None

    @property
    def _conn(self) -> aiosqlite.Connection | None:
        return self._file.conn

    @_conn.setter
    def _conn(self, value: aiosqlite.Connection | None) -> None:
        self._file.conn = value

    async def open(self) -> None:
        """Connect (a store on its own), take the shard (a view), record this writer."""
        if self._registered and self._conn is not None:
            return
        conn = await self._file.connect()
        try:
            async with self._file.transaction:
                await self._register(conn)
        except BaseException as exc:
            if self._owns_file:
                await self._file.disconnect()
            error = self._file.opening_error(exc)
            if error is exc:
                raise
            raise error from exc
        self._registered = True

    async def _register(self, conn: aiosqlite.Connection) -> None:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            if self.shard:
                await conn.execute(
                    _CREATE_CONVERSATIONS.format(table=self._table).replace(
                        "CREATE TABLE", "CREATE TABLE IF NOT EXISTS"
                    )
                )
            await conn.execute(_FORGET_OLD_WRITERS, (WRITERS_KEPT - 1,))
            if self._replica is not None:
                epoch = new_epoch(await self._stored_epoch(conn))
                await conn.execute(_PUT_OWNER, (self.shard, epoch, self._replica, wall_ms()))
            self._seen = next_sequence(self._seen)
            await conn.execute(_PUT_ENTRY, (self._entry_key, self._seen))
            await conn.execute("COMMIT")
        except BaseException:
            await rollback_quietly(conn)
            raise
        if self._replica is not None:
            self.epoch = epoch

    async def _stored_epoch(self, conn: aiosqlite.Connection) -> int | None:
        rows = list(await conn.execute_fetchall(_SELECT_EPOCH, (self.shard,)))
        held = rows[0][0] if rows else None
        return held if type(held) is int else None

    async def close(self) -> None:
        """Wait for pending commits, release the shard, forget this writer, then close the
        file (a store on its own); calling it twice is harmless."""
        conn = self._conn
        if conn is None or not self._registered:
            return
        self._registered = False
        if self._writer is not None:
            # wait() rather than await: cancelling close must not abandon a commit half way.
            await asyncio.wait({self._writer})
        async with self._file.transaction:
            with contextlib.suppress(*BACKEND_ERRORS):
                await conn.execute(_DELETE_ENTRY, (self._entry_key,))
                if self._replica is not None:
                    await conn.execute(_RELEASE_OWNER, (self.shard, self.epoch))
        if self._owns_file:
            await self._file.disconnect()

    def _connection(self) -> aiosqlite.Connection:
        conn = self._file.connection()
        if not self._registered:
            raise StoreError(f"store {self.path} is not open")
        return conn

    async def load(self) -> Loaded:
        """This shard's records, the legacy settings of ids without one (shard 0), and the
        token: one snapshot."""
        conn = self._connection()
        legacy_settings = self._file.legacy and self.shard == 0
        async with self._file.transaction:
            try:
                await conn.execute("BEGIN")
                try:
                    rows = await conn.execute_fetchall(_SELECT_RECORDS.format(table=self._table))
                    legacy = (
                        await conn.execute_fetchall(_SELECT_SETTINGS) if legacy_settings else ()
                    )
                    token = await self._file.read_token(conn)
                finally:
                    await rollback_quietly(conn)
            except BACKEND_ERRORS as exc:
                raise self._error("cannot read store", exc) from exc
        records = self._records(rows)
        settings = {str(conversation_id): _decode(value) for conversation_id, value in legacy}
        self._file.token = max(self._file.token, token)
        return Loaded(records=records, settings=settings, token=token)

    def _records(self, rows: Iterable[sqlite3.Row]) -> dict[str, bytes]:
        records: dict[str, bytes] = dict(rows)  # type: ignore[arg-type]
        # One pass in C to find out whether a slow pass is needed to name the bad row.
        if all(type(record) is bytes for record in records.values()) and all(
            type(conversation_id) is str for conversation_id in records
        ):
            return records
        for conversation_id, record in records.items():
            if type(conversation_id) is not str:
                raise StoreError(
                    f"store {self.path} is corrupt: conversation id {_short(conversation_id)} "
                    f"is {type(conversation_id).__name__}, not TEXT"
                )
            if type(record) is not bytes:
                raise StoreError(
                    f"store {self.path} is corrupt: the record of {_short(conversation_id)} "
                    f"is {_sql_type(record)}, not a BLOB"
                )
        return records

    async def commit(self, changes: Mapping[str, bytes | None], token: int) -> None:
        """Put and delete records, raise the token: committed, with fsync, when this returns."""
        check_commit(changes, token)
        self._connection()
        if not changes and token <= self._file.token:
            return
        await self._enqueue(changes, token, restore=False)

    async def restore(self, records: Mapping[str, bytes], token: int) -> None:
        """Write every record again, the shard's epoch when it is missing, and this writer's
        entry afresh, in one transaction; StoreFenced when a higher epoch is there."""
        check_commit(records, token)
        self._connection()
        await self._enqueue(records, token, restore=True)

    async def check(self) -> None:
        """StoreFenced once another view took the shard; StoreLost when this writer's entry
        is gone or behind; empty the log when idle. An entry older than WRITER_REFRESH_MS
        is raised to now in the same transaction, so that a live writer, however long
        idle, is never forgotten by the starts of others."""
        conn = self._connection()
        async with self._file.transaction:
            refresh = refresh_due(self._seen)
            sequence = next_sequence(self._seen)
            try:
                await conn.execute("BEGIN IMMEDIATE" if refresh else "BEGIN")
                try:
                    await self._check_entry(conn)
                    if refresh:
                        await conn.execute(_PUT_ENTRY, (self._entry_key, sequence))
                    await conn.execute("COMMIT")
                except BaseException:
                    await rollback_quietly(conn)
                    raise
                if refresh:
                    self._seen = sequence
                if self._pending is None and self._writer is None:
                    await conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except BACKEND_ERRORS as exc:
                raise self._error("cannot check store", exc) from exc

    async def _enqueue(
        self, changes: Mapping[str, bytes | None], token: int, *, restore: bool
    ) -> None:
        conn = self._connection()
        if self._pending is None:
            self._pending = _Batch()
        batch = self._pending
        # A commit merged with a restore is part of what the restore writes again.
        batch.restore = batch.restore or restore
        batch.changes.update(changes)
        batch.token = max(batch.token, token)
        # A caller cancelled while waiting may still see its changes committed.
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch.waiters.append(waiter)
        if self._writer is None:
            self._writer = watch(asyncio.create_task(self._commit_batches(conn)))
        await waiter

    async def _commit_batches(self, conn: aiosqlite.Connection) -> None:
        """Commit batches one after the other until none is waiting."""
        batch: _Batch | None = None
        try:
            while self._pending is not None:
                batch, self._pending = self._pending, None
                failure = await self._commit(conn, batch)
                if failure is None:
                    self._file.token = max(self._file.token, batch.token)
                _settle(batch.waiters, failure)
        finally:
            self._writer = None
            # Only reached with waiters left when this task was cancelled mid-commit: the
            # transaction runs on in SQLite's thread, and may still commit.
            interrupted = StoreOutcomeUnknown(f"commit to store {self.path} was interrupted")
            for left in (batch, self._pending):
                if left is not None:
                    _settle(left.waiters, interrupted)
            self._pending = None

    async def _commit(self, conn: aiosqlite.Connection, batch: _Batch) -> StoreError | None:
        """Write one batch in one transaction; the error, if any, instead of raising."""
        puts = [(key, record) for key, record in batch.changes.items() if record is not None]
        deletes = [(key,) for key, record in batch.changes.items() if record is None]
        async with self._file.transaction:
            sequence = next_sequence(self._seen)  # after a check's, which holds the lock
            try:
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    if batch.restore:
                        await self._take_again(conn)
                    else:
                        await self._check_entry(conn)
                    if puts:
                        await conn.executemany(_PUT_RECORD.format(table=self._table), puts)
                    if deletes:
                        await conn.executemany(_DELETE_RECORD.format(table=self._table), deletes)
                    if self._file.legacy and self.shard == 0:
                        # A conversation lives in one place: its record, or (never written
                        # since the upgrade) its legacy settings.
                        await conn.executemany(_DELETE_SETTINGS, ((key,) for key in batch.changes))
                    await conn.execute(_PUT_TOKEN, (batch.token,))
                    await conn.execute(_PUT_ENTRY, (self._entry_key, sequence))
                    await conn.execute("COMMIT")
                except BaseException:
                    await rollback_quietly(conn)
                    raise
            except (StoreLost, StoreFenced) as exc:
                return exc
            except BACKEND_ERRORS as exc:
                return self._error("cannot commit to store", exc)
        self._seen = sequence
        return None

    async def _take_again(self, conn: aiosqlite.Connection) -> None:
        """A restore's fence: refused under a higher epoch, the epoch written again when
        it is missing or below (the store lost it)."""
        if self._replica is None:
            return
        held = await self._stored_epoch(conn)
        judge_epoch(held, self.epoch, restoring=True, where=self._where())
        if held != self.epoch:
            await conn.execute(_PUT_OWNER, (self.shard, self.epoch, self._replica, wall_ms()))

    async def _check_entry(self, conn: aiosqlite.Connection) -> None:
        if self._replica is not None:
            held = await self._stored_epoch(conn)
            judge_epoch(held, self.epoch, restoring=False, where=self._where())
        rows = list(await conn.execute_fetchall(_SELECT_ENTRY, (self._entry_key,)))
        self._judge_entry(rows)

    def _where(self) -> str:
        return f"store {self.path} shard {self.shard}"

    def _judge_entry(self, rows: list[sqlite3.Row]) -> None:
        """StoreLost unless ``rows`` hold this writer's entry at its last sequence or above."""
        held = rows[0][0] if rows else None
        if type(held) is not int or held < self._seen:
            raise StoreLost(
                f"store {self.path} lost writer {self.writer}'s data: its entry holds "
                f"{_short(held)}, not {self._seen} or above"
            )

    def _error(self, doing: str, exc: BaseException) -> StoreError:
        return self._file.error(doing, exc)


def _settle(waiters: list[asyncio.Future[None]], failure: StoreError | None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if failure is None:
            waiter.set_result(None)
        else:
            # A fresh error per waiter: one exception object raised in many tasks would
            # collect all their tracebacks.
            error = type(failure)(str(failure))
            error.__cause__ = failure.__cause__
            waiter.set_exception(error)


def _decode(value: object) -> RawSettings:
    """A legacy settings value as the object it holds; ``{}`` when it holds none."""
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return {}
    if not isinstance(value, str):
        return {}
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _short(value: object) -> str:
    """``repr(value)`` cut to fit in a one-line error."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _sql_type(value: object) -> str:
    """The SQLite storage class a Python value read from a row came from."""
    names = {str: "TEXT", int: "INTEGER", float: "REAL", type(None): "NULL"}
    return names.get(type(value), type(value).__name__)


async def rollback_quietly(conn: aiosqlite.Connection) -> None:
    # The first error is the one worth reporting; a failed rollback (none was open, or
    # the file is gone) adds nothing to it.
    with contextlib.suppress(*BACKEND_ERRORS):
        await conn.execute("ROLLBACK")


async def _close_quietly(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(*BACKEND_ERRORS):
        await conn.close()
