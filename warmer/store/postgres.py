"""A store in PostgreSQL, shared by the replicas of a namespace: a row lock per shard fences.

``postgresql://[user[:password]@]host[:port]/database[?schema=name][&sslmode=mode]``
(``postgres://`` too) keeps everything in one schema of that database, ``warmer`` unless
``?schema=`` says, created at the first ``open`` (``warmer.store.postgres_schema``).

Every ``commit``, ``check`` and ``restore`` of a view is one transaction that first locks its
shard's row in ``shards`` (SELECT ... FOR UPDATE): an epoch above the view's is StoreFenced,
one below it or no row at all (the store lost or rolled back data) StoreLost, and so is a
writer entry missing or behind (``warmer.store.base``); nothing is written in either case.
The lock also orders the writes of a shard: a transaction whose COMMIT went unanswered
holds it until it ends, so the same changes sent again wait for it and a late copy never
lands beneath a later commit.

What fails before COMMIT is sent was not written (PostgreSQL rolls the transaction back):
StoreError. A COMMIT left unanswered is StoreOutcomeUnknown. No connection is
StoreUnreachable. The server ends a session left idle inside a transaction after
``IDLE_TIMEOUTS`` timeouts, so a client gone half way holds its shard's lock no longer.
Wall-clock times (epochs, owners, presence) are the server's: one clock for every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from warmer.core.gaps import MODEL_KEY
from warmer.observe.log import get_logger
from warmer.store.base import (
    Loaded,
    Owner,
    Replica,
    Store,
    StoreError,
    StoreLost,
    StoreOutcomeUnknown,
    StoreUnreachable,
)
from warmer.store.postgres_schema import CHUNK, NOW_MS, Target, parse_url, prepare
from warmer.store.postgres_view import PostgresView

if TYPE_CHECKING:
    from warmer.store.postgres_schema import Connection

log = get_logger(__name__)

T = TypeVar("T")
POOL_SIZE = 4
"""Connections a replica holds at most: its views take turns on them."""
IDLE_TIMEOUTS = 3
"""Call timeouts after which the server ends a session idle inside a transaction."""
INFO_CHARS = 1000
"""What ``beat`` keeps of a replica's ``info``: a long host name must not fail a heartbeat."""

_BACKEND_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# Refused credentials or a database that does not exist: waiting does not change them.
_REFUSED = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
)
_GONE = (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError)


class PostgresShared:
    """Every shard of a namespace in one PostgreSQL schema, shared by its replicas."""

    shareable = True

    def __init__(self, url: str, *, timeout_ms: int = 2000, pool_size: int = POOL_SIZE) -> None:
        """Use the database ``url`` names; ValueError (never showing the password) when
        malformed. ``timeout_ms``: how long one statement may go unanswered."""
        target = parse_url(url)
        self._target: Target = target
        self.url = target.masked
        """The URL with its password masked: safe to log."""
        self.schema = target.schema
        self.timeout_ms = timeout_ms
        self._timeout = timeout_ms / 1000
        self._pool_size = pool_size
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None

    def table(self, name: str) -> str:
        """The schema-qualified name of one of the store's tables."""
        return f'"{self.schema}".{name}'

    async def open(self) -> None:
        """Connect, create the schema when missing; StoreUnreachable while no connection
        can be made, StoreError when the database refuses us or holds a newer schema."""
        if self._pool is not None:
            return
        settings = {
            "application_name": "warmer",
            "statement_timeout": str(self.timeout_ms),
            "idle_in_transaction_session_timeout": str(IDLE_TIMEOUTS * self.timeout_ms),
        }
        try:
            pool = await asyncpg.create_pool(
                **self._target.connect,
                # None held open: a pool that keeps a floor reconnects, and logs, on its own.
                min_size=0,
                max_size=self._pool_size,
                timeout=self._timeout,
                command_timeout=self._timeout,
                server_settings=settings,
            )
        except _BACKEND_ERRORS as exc:
            raise self.error("cannot reach", exc, connecting=True) from exc
        self._pool = pool
        try:
            await self.run("cannot prepare", lambda conn: prepare(conn, self.schema, self._timeout))
            await self._durability()
        except BaseException:
            self._pool = None
            pool.terminate()
            raise
        log.info("store_opened", url=self.url, schema=self.schema)

    async def _durability(self) -> None:
        """Warn when a commit returning is not a commit on disk."""

        async def settings(conn: Connection) -> dict[str, str]:
            rows = await conn.fetch(
                "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', "
                "'synchronous_commit')",
                timeout=self._timeout,
            )
            return {str(row[0]): str(row[1]) for row in rows}

        found = await self.run("cannot read the settings of", settings, writes=False)
        if "off" in found.values():
            log.warning(
                "store_not_durable",
                url=self.url,
                **found,
                advice="set fsync and synchronous_commit on: a crash loses acknowledged commits",
            )

    async def close(self) -> None:
        """Close the connections (views first), dropping those the server does not close
        within the timeout; twice is harmless."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._timeout)
        except _BACKEND_ERRORS as exc:
            # A server that does not see the connections out: they are dropped instead.
            pool.terminate()
            log.info("store_closed_abruptly", url=self.url, error=type(exc).__name__)
            return
        except BaseException:
            pool.terminate()
            raise
        log.info("store_closed", url=self.url)

    def shard(self, shard: int, replica: str) -> Store:
        """A view of shard ``shard``, not yet opened (``open`` takes it for ``replica``)."""
        if not 0 <= shard <= 255:
            raise ValueError(f"shard {shard} is outside 0..255")
        return PostgresView(self, shard, replica)

    async def layout(self) -> int | None:
        """The layout recorded; 1 for a store written without one, None for an empty one."""

        async def read(conn: Connection) -> int | None:
            found = await conn.fetchval(
                f"SELECT value FROM {self.table('meta')} WHERE key = 'layout'",
                timeout=self._timeout,
            )
            if found is not None:
                return int(found)
            held = await conn.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {self.table('conversations')}) "
                f"OR EXISTS (SELECT 1 FROM {self.table('models')}) "
                f"OR EXISTS (SELECT 1 FROM {self.table('token')})",
                timeout=self._timeout,
            )
            return 1 if held else None

        return await self.run("cannot read the layout of", read, writes=False)

    async def set_layout(self, shards: int) -> None:
        """Record how many shards the records are laid out for."""
        if not 1 <= shards <= 256:
            raise ValueError(f"layout {shards} is outside 1..256")
        await self.run(
            "cannot record the layout in",
            lambda conn: conn.execute(
                f"INSERT INTO {self.table('meta')} (key, value) VALUES ('layout', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                shards,
                timeout=self._timeout,
            ),
        )

    async def beat(self, replica: str, info: str, ttl_ms: int) -> list[Replica]:
        """Record ``replica`` alive for ``ttl_ms`` (server time), forget the expired; who is
        alive, sorted by id. ``info`` is cut to INFO_CHARS."""
        table = self.table("replicas")

        async def beat(conn: Connection) -> list[Replica]:
            # SKIP LOCKED: two replicas forgetting the same dead ones never deadlock.
            await conn.execute(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} "
                f"WHERE expires_ms < {NOW_MS} FOR UPDATE SKIP LOCKED)",
                timeout=self._timeout,
            )
            await conn.execute(
                f"INSERT INTO {table} (id, info, seen_ms, expires_ms) "
                f"VALUES ($1, $2, {NOW_MS}, {NOW_MS} + $3) ON CONFLICT (id) DO UPDATE SET "
                "info = EXCLUDED.info, seen_ms = EXCLUDED.seen_ms, "
                "expires_ms = EXCLUDED.expires_ms",
                replica,
                info[:INFO_CHARS],
                ttl_ms,
                timeout=self._timeout,
            )
            rows = await conn.fetch(
                f"SELECT id, info, seen_ms FROM {table} ORDER BY id", timeout=self._timeout
            )
            return [Replica(id=row[0], info=row[1], seen_ms=row[2]) for row in rows]

        return await self.run("cannot beat in", beat)

    async def replicas(self) -> list[Replica]:
        """Every live replica (by the server's clock), by id."""
        rows = await self.run(
            "cannot read the replicas in",
            lambda conn: conn.fetch(
                f"SELECT id, info, seen_ms FROM {self.table('replicas')} "
                f"WHERE expires_ms >= {NOW_MS} ORDER BY id",
                timeout=self._timeout,
            ),
        )
        return [Replica(id=row[0], info=row[1], seen_ms=row[2]) for row in rows]

    async def leave(self, replica: str) -> None:
        """Remove ``replica``'s presence."""
        await self.run(
            "cannot leave",
            lambda conn: conn.execute(
                f"DELETE FROM {self.table('replicas')} WHERE id = $1",
                replica,
                timeout=self._timeout,
            ),
        )

    async def owners(self) -> list[Owner]:
        """Every shard ever taken, by shard."""

        async def read(conn: Connection) -> list[Owner]:
            rows = await conn.fetch(
                f"SELECT shard, epoch, replica, since_ms, released FROM {self.table('shards')} "
                "ORDER BY shard",
                timeout=self._timeout,
            )
            return [
                Owner(shard=r[0], epoch=r[1], replica=r[2], since_ms=r[3], released=r[4])
                for r in rows
            ]

        return await self.run("cannot read the owners in", read, writes=False)

    async def ids(self, shard: int) -> list[str]:
        """The ids of shard ``shard``, in chunks of one snapshot: its conversations', and
        ``MODEL_KEY`` when it has a gap model (what ``load`` gives, as the other back ends)."""

        async def read(conn: Connection) -> list[str]:
            found = [row[0] for row in await self.read_shard(conn, shard, "id")]
            model = await conn.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {self.table('models')} WHERE shard = $1)",
                shard,
                timeout=self._timeout,
            )
            return [*found, MODEL_KEY] if model else found

        return await self.run("cannot read the ids in", read, writes=False)

    async def read_shard(self, conn: Connection, shard: int, columns: str) -> list[asyncpg.Record]:
        """``columns`` of every conversation row of ``shard``, CHUNK rows a statement (the
        caller's transaction keeps them one snapshot).

        Each chunk walks the (shard, id) index. Without planner statistics (a table just
        filled by a restore or a migration, before autovacuum analyzed it) PostgreSQL plans
        a chunk as a bitmap scan of every later row and a sort: 0.4-0.5 s a chunk, a
        minute for a million and past the store's timeout on a busy server, against 14 ms;
        so bitmap scans are off for this transaction."""
        table = self.table("conversations")
        rows: list[asyncpg.Record] = []
        await conn.execute("SET LOCAL enable_bitmapscan = off", timeout=self._timeout)
        chunk = await conn.fetch(
            f"SELECT {columns} FROM {table} WHERE shard = $1 ORDER BY id LIMIT {CHUNK}",
            shard,
            timeout=self._timeout,
        )
        while True:
            rows += chunk
            if len(chunk) < CHUNK:
                return rows
            chunk = await conn.fetch(
                f"SELECT {columns} FROM {table} WHERE shard = $1 AND id > $2 ORDER BY id "
                f"LIMIT {CHUNK}",
                shard,
                chunk[-1]["id"],
                timeout=self._timeout,
            )

    async def assign(self, moves: Mapping[str, int]) -> None:
        """Move each conversation's record to the shard given, CHUNK a transaction; ids
        with no record (and the per-shard gap model, not a conversation) are skipped."""
        for conversation_id, shard in moves.items():
            if not isinstance(shard, int) or not 0 <= shard <= 255:
                raise ValueError(f"shard {shard!r} of {conversation_id!r} is outside 0..255")
        items = list(moves.items())
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            await self.run(
                "cannot assign shards in",
                lambda conn, chunk=chunk: conn.execute(  # type: ignore[misc]
                    f"UPDATE {self.table('conversations')} AS c SET shard = m.shard "
                    "FROM unnest($1::text[], $2::int[]) AS m(id, shard) "
                    "WHERE c.id = m.id AND c.shard <> m.shard",
                    [conversation_id for conversation_id, _ in chunk],
                    [shard for _, shard in chunk],
                    timeout=self._timeout,
                ),
            )

    async def run(
        self,
        doing: str,
        body: Callable[[Connection], Awaitable[T]],
        *,
        writes: bool = True,
        begin: str = "BEGIN",
    ) -> T:
        """``body`` in one transaction on a pooled connection, its failures as StoreErrors.

        A failure before COMMIT was sent wrote nothing; a COMMIT left unanswered (only when
        ``writes``) may have written: StoreOutcomeUnknown. A connection in an unknown state
        is closed, never handed back to the pool.
        """
        pool = self._opened()
        try:
            conn = await pool.acquire(timeout=self._timeout)
        except _BACKEND_ERRORS as exc:
            raise self.error(doing, exc, connecting=True) from exc
        try:
            try:
                await conn.execute(begin, timeout=self._timeout)
                result = await body(conn)
            except BaseException as exc:
                await self._abandon(conn, exc)
                if isinstance(exc, _BACKEND_ERRORS):
                    raise self.error(doing, exc) from exc
                raise
            try:
                await conn.execute("COMMIT", timeout=self._timeout)
            except BaseException as exc:
                if not isinstance(exc, asyncpg.PostgresError):  # no answer: what happened?
                    _drop(conn)
                if isinstance(exc, _BACKEND_ERRORS):
                    unknown = writes and not isinstance(exc, asyncpg.PostgresError)
                    raise self.error(doing, exc, unknown=unknown) from exc
                raise
            return result
        finally:
            with contextlib.suppress(*_BACKEND_ERRORS):
                await pool.release(conn, timeout=self._timeout)

    async def _abandon(self, conn: Connection, exc: BaseException) -> None:
        """Roll back on a connection that answered; close one that may be mid-statement."""
        if isinstance(exc, StoreError | asyncpg.PostgresError):
            try:
                await conn.execute("ROLLBACK", timeout=self._timeout)
                return
            except _BACKEND_ERRORS:
                pass
        _drop(conn)

    def _opened(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StoreError(f"postgresql store {self.url} is not open")
        return self._pool

    async def expire(self) -> None:
        """Let every connection go once idle: their prepared statements name tables
        that were created again."""
        await self._opened().expire_connections()

    def error(
        self, doing: str, exc: BaseException, *, unknown: bool = False, connecting: bool = False
    ) -> StoreError:
        """One line naming the masked URL and what went wrong, without the password; of
        the kind that says whether anything may have been written."""
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self.timeout_ms} ms"
        else:
            reason = " ".join(str(exc).split()) or "no detail"
        for secret in self._target.secrets:
            reason = reason.replace(secret, "***")
        message = f"{doing} postgresql store {self.url}: {type(exc).__name__}: {reason}"
        if unknown:
            return StoreOutcomeUnknown(f"{message} (outcome unknown)")
        if isinstance(exc, _GONE):
            return StoreLost(f"postgresql store {self.url} lost its tables: {reason}")
        if connecting and not isinstance(exc, _REFUSED):
            return StoreUnreachable(message)
        return StoreError(message)


class PostgresStore:
    """Shard 0 of a ``PostgresShared`` of its own: the ``Store`` ``open_store`` gives for a
    PostgreSQL URL (one replica, one shard), opening and closing its connections too."""

    def __init__(self, url: str, *, timeout_ms: int = 2000, replica: str = "") -> None:
        """As ``PostgresShared``; ``replica`` names the owner (host name:pid by default)."""
        self._shared = PostgresShared(url, timeout_ms=timeout_ms)
        self.url = self._shared.url
        self._view = self._shared.shard(0, replica or f"{socket.gethostname()}:{os.getpid()}")
        self.shard = 0

    @property
    def epoch(self) -> int:
        """The epoch the view took: 0 before ``open``."""
        return self._view.epoch

    async def open(self) -> None:
        """Connect, then take shard 0."""
        await self._shared.open()
        try:
            await self._view.open()
        except BaseException:
            await self._shared.close()
            raise

    async def close(self) -> None:
        """Release shard 0, then the connections."""
        await self._view.close()
        await self._shared.close()

    async def load(self) -> Loaded:
        """Everything in shard 0."""
        return await self._view.load()

    async def commit(self, changes: Mapping[str, bytes | None], token: int) -> None:
        """As ``Store.commit``."""
        await self._view.commit(changes, token)

    async def check(self) -> None:
        """As ``Store.check``."""
        await self._view.check()

    async def restore(self, records: Mapping[str, bytes], token: int) -> None:
        """As ``Store.restore``."""
        await self._view.restore(records, token)


def _drop(conn: Connection) -> None:
    """Close a connection at once (one already lost is taken back by the pool itself)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


__all__ = ["PostgresShared", "PostgresStore"]
