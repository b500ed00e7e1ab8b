"""The embedded default store: one SQLite file, WAL mode, fsynced at every commit.

Writes issued while a commit is in flight are gathered and committed together, so a burst
of ``put_settings`` costs one fsync, not one each; every caller still returns only once
its own write is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite
import structlog

from warmer.observe.tasks import watch
from warmer.store.base import RawSettings, StoreError

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
"""Bumped by a change to the tables below (the persisted schedules will make it 2)."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS settings (conversation_id TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Untyped value: integers today, room for other kinds of metadata later.
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL)",
    f"INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', {SCHEMA_VERSION})",
)
_PUT_SETTINGS = (
    "INSERT INTO settings (conversation_id, value) VALUES (?, ?) "
    "ON CONFLICT (conversation_id) DO UPDATE SET value = excluded.value"
)
_PUT_TOKEN = (
    "INSERT INTO meta (key, value) VALUES ('token', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)
_MAX_INTEGER = 2**63 - 1
# What the driver raises when the file, the disk or the connection fails. aiosqlite
# raises ValueError on a closed connection.
_BACKEND_ERRORS = (sqlite3.Error, OSError, ValueError)


@dataclass
class _Batch:
    """Writes waiting for the next commit, and who waits for it."""

    settings: dict[str, str] = field(default_factory=dict)
    token: int | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class SqliteStore:
    """A Store in one SQLite file; the directory holding it must exist."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> None:
        """Use the file at ``path``, waiting up to ``busy_timeout_ms`` for a lock held elsewhere."""
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None
        self._pending: _Batch | None = None
        self._writer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect, switch to WAL with full fsync, and create the tables if missing."""
        if self._conn is not None:
            return
        if not self.path.parent.is_dir():
            raise StoreError(
                f"store directory {self.path.parent} does not exist (store file {self.path})"
            )
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except _BACKEND_ERRORS as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        try:
            journal_mode = await self._prepare(conn)
        except BaseException as exc:
            await _close_quietly(conn)
            if isinstance(exc, _BACKEND_ERRORS):
                raise StoreError(f"cannot open store {self.path}: {exc}") from exc
            raise
        self._conn = conn
        if journal_mode != "wal":
            log.warning("store_wal_unavailable", path=str(self.path), journal_mode=journal_mode)
        log.info("store_opened", path=str(self.path), journal_mode=journal_mode)

    async def _prepare(self, conn: aiosqlite.Connection) -> str:
        await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
        # NORMAL in WAL mode may lose the last commits on power loss; a put must be durable.
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                await conn.execute(statement)
            version_rows = list(
                await conn.execute_fetchall("SELECT value FROM meta WHERE key = 'schema_version'")
            )
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback_quietly(conn)
            raise
        version = version_rows[0][0]
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {version!r}; "
                f"this warmer reads up to {SCHEMA_VERSION}"
            )
        return str(rows[0][0]).lower()

    async def close(self) -> None:
        """Wait for pending writes, then close the file; calling it twice is harmless."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._writer is not None:
            # wait() rather than await: cancelling close must not abandon a commit half way.
            await asyncio.wait({self._writer})
        try:
            await conn.close()
        except _BACKEND_ERRORS as exc:
            raise StoreError(f"cannot close store {self.path}: {exc}") from exc
        log.info("store_closed", path=str(self.path))

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is not open")
        return self._conn

    async def load_settings(self) -> dict[str, RawSettings]:
        """Every stored settings value, decoded but not validated (``{}`` when undecodable)."""
        conn = self._connection()
        try:
            rows = await conn.execute_fetchall("SELECT conversation_id, value FROM settings")
        except _BACKEND_ERRORS as exc:
            raise StoreError(f"cannot read settings from {self.path}: {exc}") from exc
        return {str(conversation_id): _decode(value) for conversation_id, value in rows}

    async def put_settings(self, conversation_id: str, enabled: bool, interval_ms: int) -> None:
        """Replace a conversation's settings; committed when this returns."""
        conn = self._connection()
        value = json.dumps({"enabled": enabled, "intervalMs": interval_ms}, separators=(",", ":"))
        batch = self._next_batch()
        batch.settings[conversation_id] = value
        await self._await_commit(conn, batch)

    async def load_token(self) -> int:
        """The highest token stored, 0 when none was."""
        conn = self._connection()
        try:
            rows = list(await conn.execute_fetchall("SELECT value FROM meta WHERE key = 'token'"))
        except _BACKEND_ERRORS as exc:
            raise StoreError(f"cannot read the token from {self.path}: {exc}") from exc
        if not rows:
            return 0
        token = rows[0][0]
        if not isinstance(token, int):
            raise StoreError(f"store {self.path} holds a token that is not an integer: {token!r}")
        return token

    async def put_token(self, token: int) -> None:
        """Store ``max(stored, token)``; committed when this returns."""
        if not 0 <= token <= _MAX_INTEGER:
            raise ValueError(f"token {token} is outside 0..{_MAX_INTEGER}")
        conn = self._connection()
        batch = self._next_batch()
        batch.token = token if batch.token is None else max(batch.token, token)
        await self._await_commit(conn, batch)

    def _next_batch(self) -> _Batch:
        if self._pending is None:
            self._pending = _Batch()
        return self._pending

    async def _await_commit(self, conn: aiosqlite.Connection, batch: _Batch) -> None:
        # A caller cancelled while waiting may still see its write committed.
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
                _settle(batch.waiters, failure)
        finally:
            self._writer = None
            # Only reached with waiters left when this task was cancelled mid-commit.
            interrupted = StoreError(f"write to {self.path} was interrupted")
            for left in (batch, self._pending):
                if left is not None:
                    _settle(left.waiters, interrupted)
            self._pending = None

    async def _commit(self, conn: aiosqlite.Connection, batch: _Batch) -> Exception | None:
        """Write one batch in one transaction; the backend error, if any, instead of raising."""
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                if batch.settings:
                    await conn.executemany(_PUT_SETTINGS, batch.settings.items())
                if batch.token is not None:
                    await conn.execute(_PUT_TOKEN, (batch.token,))
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback_quietly(conn)
                raise
        except _BACKEND_ERRORS as exc:
            return exc
        return None


def _settle(waiters: list[asyncio.Future[None]], failure: Exception | None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if failure is None:
            waiter.set_result(None)
        elif isinstance(failure, StoreError):
            waiter.set_exception(StoreError(str(failure)))
        else:
            # A fresh error per waiter: one exception object raised in many tasks would
            # collect all their tracebacks.
            error = StoreError(f"cannot write the store: {failure}")
            error.__cause__ = failure
            waiter.set_exception(error)


def _decode(value: object) -> RawSettings:
    """A stored settings value as the object it holds; ``{}`` when it holds none."""
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


async def _rollback_quietly(conn: aiosqlite.Connection) -> None:
    # The first error is the one worth reporting; a failed rollback (none was open, or
    # the file is gone) adds nothing to it.
    with contextlib.suppress(*_BACKEND_ERRORS):
        await conn.execute("ROLLBACK")


async def _close_quietly(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(*_BACKEND_ERRORS):
        await conn.close()
