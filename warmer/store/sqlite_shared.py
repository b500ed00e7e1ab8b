"""The shards of one SQLite file: views sharing its connection, layout, owners, presence.

The file is not shareable (``shareable`` is False): one replica runs on it, and all of its
shards' views share one connection and take turns at its transactions. Shard 0's records
stay in the table ``conversations`` a store had before shards existed; shard k > 0 has a
table ``conversations_k`` of the same form, created when a view of it opens or a record
is moved to it. The owners of shards are rows of ``owners`` (shard, epoch, replica,
since_ms, released), presence rows of ``replicas``, the layout the ``meta`` row ``layout``;
these tables are added to an older file at ``open`` (nothing else changes in it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from warmer.core.gaps import MODEL_KEY
from warmer.store.base import PRESENCE_INFO_CHARS, Owner, Replica, wall_ms
from warmer.store.sqlite import (
    BACKEND_ERRORS,
    SqliteFile,
    SqliteStore,
    rollback_quietly,
    table,
)

ASSIGN_CHUNK = 10_000
"""Moves written in one transaction by ``assign``."""

_SELECT_LAYOUT = "SELECT value FROM meta WHERE key = 'layout'"
_PUT_LAYOUT = (
    "INSERT INTO meta (key, value) VALUES ('layout', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_ANY_DATA = (
    "SELECT EXISTS (SELECT 1 FROM conversations) OR EXISTS (SELECT 1 FROM meta WHERE key = 'token')"
)
_PUT_REPLICA = (
    "INSERT INTO replicas (replica, info, seen_ms, expires_ms) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (replica) DO UPDATE SET info = excluded.info, seen_ms = excluded.seen_ms, "
    "expires_ms = excluded.expires_ms"
)
_FORGET_REPLICAS = "DELETE FROM replicas WHERE expires_ms < ?"
_SELECT_LIVE = "SELECT replica, info, seen_ms FROM replicas WHERE expires_ms >= ? ORDER BY replica"
_SELECT_REPLICAS = "SELECT replica, info, seen_ms FROM replicas ORDER BY replica"
_SELECT_OWNERS = "SELECT shard, epoch, replica, since_ms, released FROM owners ORDER BY shard"
_IDS = "SELECT value FROM json_each(?)"


class SqliteShared:
    """A Shared store in one SQLite file, for one replica (not shareable)."""

    shareable = False

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> None:
        """Use the file at ``path``, waiting up to ``busy_timeout_ms`` for a lock held elsewhere."""
        self._file = SqliteFile(path, busy_timeout_ms=busy_timeout_ms, shared=True)
        self.path = self._file.path
        self.url = f"sqlite:///{self.path}"

    async def open(self) -> None:
        """Connect and prepare the schema (idempotent)."""
        await self._file.connect()

    async def close(self) -> None:
        """Close the file; views must be closed first."""
        await self._file.disconnect()

    def shard(self, shard: int, replica: str) -> SqliteStore:
        """A view of ``shard`` on the shared connection, taken for ``replica`` at ``open``."""
        return SqliteStore(self.path, file=self._file, shard=shard, replica=replica)

    async def layout(self) -> int | None:
        """The layout recorded; 1 for a file with records or a token but none; else None."""
        rows = await self._read(_SELECT_LAYOUT)
        if rows:
            return int(rows[0][0])
        (any_data,) = (await self._read(_ANY_DATA))[0]
        return 1 if any_data else None

    async def set_layout(self, shards: int) -> None:
        """Record the layout."""
        await self._write([(_PUT_LAYOUT, (shards,))])

    async def beat(self, replica: str, info: str, ttl_ms: int) -> list[Replica]:
        """Record ``replica`` alive for ``ttl_ms``, forget the expired; the live ones."""
        now = wall_ms()
        put = (replica, info[:PRESENCE_INFO_CHARS], now, now + ttl_ms)
        rows = await self._write(
            [(_PUT_REPLICA, put), (_FORGET_REPLICAS, (now,))], then=_SELECT_REPLICAS
        )
        return [Replica(id=str(r[0]), info=str(r[1]), seen_ms=int(r[2])) for r in rows]

    async def leave(self, replica: str) -> None:
        """Remove ``replica``'s presence."""
        await self._write([("DELETE FROM replicas WHERE replica = ?", (replica,))])

    async def replicas(self) -> list[Replica]:
        """Every live replica, by id."""
        rows = await self._read(_SELECT_LIVE, (wall_ms(),))
        return [Replica(id=str(r[0]), info=str(r[1]), seen_ms=int(r[2])) for r in rows]

    async def owners(self) -> list[Owner]:
        """Every shard ever taken, by shard."""
        rows = await self._read(_SELECT_OWNERS)
        return [
            Owner(
                shard=int(r[0]),
                epoch=int(r[1]),
                replica=str(r[2]),
                since_ms=int(r[3]),
                released=bool(r[4]),
            )
            for r in rows
        ]

    async def ids(self, shard: int) -> list[str]:
        """The conversation ids of ``shard`` (none for a shard with no table yet)."""
        name = table(shard)
        conn = self._file.connection()
        async with self._file.transaction:
            try:
                if name not in await self._file.tables(conn):
                    return []
                rows = await conn.execute_fetchall(f"SELECT conversation_id FROM {name}")
            except BACKEND_ERRORS as exc:
                raise self._file.error("cannot read store", exc) from exc
        return [str(row[0]) for row in rows]

    async def assign(self, moves: Mapping[str, int]) -> None:
        """Move records between shard tables, ``ASSIGN_CHUNK`` moves a transaction."""
        items = [(cid, shard) for cid, shard in moves.items() if cid != MODEL_KEY]
        for start in range(0, len(items), ASSIGN_CHUNK):
            targets: dict[int, list[str]] = {}
            for conversation_id, shard in items[start : start + ASSIGN_CHUNK]:
                targets.setdefault(shard, []).append(conversation_id)
            await self._move(targets)

    async def _move(self, targets: dict[int, list[str]]) -> None:
        conn = self._file.connection()
        async with self._file.transaction:
            try:
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    tables = {t for t in await self._file.tables(conn) if _is_shard_table(t)}
                    for shard, ids in targets.items():
                        target = table(shard)
                        await conn.execute(
                            f"CREATE TABLE IF NOT EXISTS {target} "
                            "(conversation_id TEXT PRIMARY KEY, record BLOB NOT NULL)"
                        )
                        chosen = json.dumps(ids)
                        for source in sorted(tables - {target}):
                            await conn.execute(
                                f"INSERT OR REPLACE INTO {target} SELECT conversation_id, record "
                                f"FROM {source} WHERE conversation_id IN ({_IDS})",
                                (chosen,),
                            )
                            await conn.execute(
                                f"DELETE FROM {source} WHERE conversation_id IN ({_IDS})",
                                (chosen,),
                            )
                        tables.add(target)
                    await conn.execute("COMMIT")
                except BaseException:
                    await rollback_quietly(conn)
                    raise
            except BACKEND_ERRORS as exc:
                raise self._file.error("cannot move records in store", exc) from exc

    async def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self._file.connection()
        async with self._file.transaction:
            try:
                return [tuple(row) for row in await conn.execute_fetchall(sql, parameters)]
            except BACKEND_ERRORS as exc:
                raise self._file.error("cannot read store", exc) from exc

    async def _write(
        self, statements: list[tuple[str, tuple[object, ...]]], *, then: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Run ``statements`` in one transaction, then read ``then`` in it."""
        conn = self._file.connection()
        async with self._file.transaction:
            try:
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    for sql, parameters in statements:
                        await conn.execute(sql, parameters)
                    rows = list(await conn.execute_fetchall(then)) if then else []
                    await conn.execute("COMMIT")
                except BaseException:
                    await rollback_quietly(conn)
                    raise
            except BACKEND_ERRORS as exc:
                raise self._file.error("cannot write to store", exc) from exc
        return [tuple(row) for row in rows]


def _is_shard_table(name: str) -> bool:
    prefix, _, number = name.partition("_")
    return name == "conversations" or (prefix == "conversations" and number.isdigit())


__all__ = ["ASSIGN_CHUNK", "SqliteShared"]
