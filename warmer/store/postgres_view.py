"""One shard of a PostgreSQL store: the ``Store`` a shard runner commits through.

Opening the view takes the shard (its epoch raised to max(stored + 1, the server's wall ms),
the owner recorded) and records the view's writer entry, in one transaction. See
``warmer.store.postgres`` for how each later write is fenced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from warmer.core.gaps import MODEL_KEY
from warmer.observe.log import get_logger
from warmer.store.base import (
    WRITERS_KEPT,
    Loaded,
    StoreError,
    StoreFenced,
    StoreLost,
    check_commit,
    new_writer,
    next_sequence,
    refresh_due,
)
from warmer.store.postgres_schema import CHUNK, NOW_MS, prepare

if TYPE_CHECKING:
    from warmer.store.postgres import PostgresShared
    from warmer.store.postgres_schema import Connection

log = get_logger(__name__)

_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"


class PostgresView:
    """Shard ``shard`` of a ``PostgresShared``, taken for ``replica`` by ``open``."""

    def __init__(self, shared: PostgresShared, shard: int, replica: str) -> None:
        self.shard = shard
        self.epoch = 0
        """The epoch ``open`` took; 0 before."""
        self.replica = replica
        self.writer = new_writer()
        """This view's entry in ``writers``."""
        self._shared = shared
        self._timeout = shared.timeout_ms / 1000
        self._is_open = False
        self._sent = 0
        """The sequence of the last write sent."""
        self._seen = 0
        """The sequence of the last write acknowledged: the entry may not be below it."""
        # Writes leave in the order they were issued (a Lock is FIFO), one at a time.
        self._writes = asyncio.Lock()

    def _table(self, name: str) -> str:
        return self._shared.table(name)

    async def open(self) -> None:
        """Take the shard and record this writer; StoreError when the store cannot."""
        if self._is_open:
            return
        async with self._writes:
            sequence = self._next()
            self.epoch = await self._shared.run(
                f"cannot take shard {self.shard} of", lambda conn: self._take(conn, sequence)
            )
            self._seen = sequence
            self._is_open = True
        log.info("store_shard_taken", shard=self.shard, epoch=self.epoch, writer=self.writer)

    async def _take(self, conn: Connection, sequence: int) -> int:
        # The shard's row first: an old owner's commit holds it and then wants its own
        # entry, which the forgetting below must not be holding meanwhile (a deadlock).
        epoch: int = await conn.fetchval(
            f"INSERT INTO {self._table('shards')} (shard, epoch, replica, since_ms) "
            f"VALUES ($1, {NOW_MS}, $2, {NOW_MS}) ON CONFLICT (shard) DO UPDATE SET "
            "epoch = GREATEST(shards.epoch + 1, EXCLUDED.epoch), replica = EXCLUDED.replica, "
            "since_ms = EXCLUDED.since_ms, released = false RETURNING epoch",
            self.shard,
            self.replica,
            timeout=self._timeout,
        )
        # Keep the most recent entries, this one's to come included (killed workers leave
        # theirs); one a commit is writing now is skipped, kept for this time.
        writers = self._table("writers")
        await conn.execute(
            f"DELETE FROM {writers} WHERE writer IN (SELECT writer FROM {writers} "
            "ORDER BY sequence DESC OFFSET $1 FOR UPDATE SKIP LOCKED)",
            WRITERS_KEPT - 1,
            timeout=self._timeout,
        )
        await self._put_entry(conn, sequence)
        return epoch

    async def close(self) -> None:
        """Let issued writes finish, release the shard (the epoch stays) and forget this
        writer; twice is harmless, and a store that cannot be reached only says so."""
        if not self._is_open:
            return
        async with self._writes:
            self._is_open = False
            try:
                await self._shared.run(f"cannot release shard {self.shard} of", self._release)
            except StoreError as exc:
                log.info("store_shard_not_released", shard=self.shard, error=str(exc)[:300])

    async def _release(self, conn: Connection) -> None:
        await conn.execute(
            f"UPDATE {self._table('shards')} SET released = true WHERE shard = $1 AND epoch = $2",
            self.shard,
            self.epoch,
            timeout=self._timeout,
        )
        # A late copy of a write, finding no entry, is refused instead of landing.
        await conn.execute(
            f"DELETE FROM {self._table('writers')} WHERE writer = $1",
            self.writer,
            timeout=self._timeout,
        )

    def _opened(self) -> None:
        if not self._is_open:
            raise StoreError(
                f"shard {self.shard} of postgresql store {self._shared.url} is not open"
            )

    async def load(self) -> Loaded:
        """This shard's records (its gap model among them) and the store's token: one
        snapshot, read CHUNK records a statement."""
        self._opened()
        return await self._shared.run(
            f"cannot read shard {self.shard} of", self._read, writes=False, begin=_READ
        )

    async def _read(self, conn: Connection) -> Loaded:
        rows = await self._shared.read_shard(conn, self.shard, "id, record")
        records: dict[str, bytes] = dict(rows)  # type: ignore[arg-type]
        model = await conn.fetchval(
            f"SELECT record FROM {self._table('models')} WHERE shard = $1",
            self.shard,
            timeout=self._timeout,
        )
        if model is not None:
            records[MODEL_KEY] = model
        token = await conn.fetchval(
            f"SELECT coalesce(max(value), 0) FROM {self._table('token')}", timeout=self._timeout
        )
        return Loaded(records=records, settings={}, token=token)

    async def commit(self, changes: Mapping[str, bytes | None], token: int) -> None:
        """Put and delete records, raise the token: one fenced transaction."""
        _refuse(changes, token)
        self._opened()
        async with self._writes:
            sequence = self._next()
            await self._shared.run(
                f"cannot commit shard {self.shard} to",
                lambda conn: self._write(conn, changes, token, sequence, restore=False),
            )
            self._seen = sequence

    async def check(self) -> None:
        """StoreFenced once another view took the shard, StoreLost when the store lost what
        this writer committed. An entry older than WRITER_REFRESH_MS is raised to now, so
        that a live writer, however long idle, is never forgotten by the opens of others."""
        self._opened()
        async with self._writes:
            sequence = self._next() if refresh_due(self._seen) else 0
            await self._shared.run(
                f"cannot check shard {self.shard} of", lambda conn: self._check(conn, sequence)
            )
            if sequence:
                self._seen = sequence

    async def _check(self, conn: Connection, sequence: int) -> None:
        await self._fence(conn, restore=False)
        await self._check_entry(conn)
        if sequence:
            await self._put_entry(conn, sequence)

    async def restore(self, records: Mapping[str, bytes], token: int) -> None:
        """Write every record again (tables made again if gone), the shard taken back at
        this view's epoch unless another took it since, and this writer's entry afresh."""
        _refuse(records, token)
        self._opened()
        async with self._writes:
            sequence = self._next()
            await self._shared.run(
                f"cannot restore shard {self.shard} of",
                lambda conn: self._write(conn, records, token, sequence, restore=True),
            )
            self._seen = sequence
        # Tables made again are new objects to the statements the connections prepared.
        await self._shared.expire()

    async def _write(
        self,
        conn: Connection,
        changes: Mapping[str, bytes | None],
        token: int,
        sequence: int,
        *,
        restore: bool,
    ) -> None:
        if restore:
            await prepare(conn, self._shared.schema, self._timeout)
        await self._fence(conn, restore=restore)
        if not restore:
            await self._check_entry(conn)
        puts: list[tuple[str, bytes | None]] = []
        deletes: list[tuple[str, bytes | None]] = []
        for key, record in changes.items():
            if key != MODEL_KEY:
                (deletes if record is None else puts).append((key, record))
        conversations = self._table("conversations")
        for start in range(0, len(puts), CHUNK):
            chunk = puts[start : start + CHUNK]
            await conn.execute(
                f"INSERT INTO {conversations} (id, shard, record) SELECT p.id, $1, p.record "
                "FROM unnest($2::text[], $3::bytea[]) AS p(id, record) "
                "ON CONFLICT (id) DO UPDATE SET shard = EXCLUDED.shard, record = EXCLUDED.record",
                self.shard,
                [key for key, _ in chunk],
                [record for _, record in chunk],
                timeout=self._timeout,
            )
        if deletes:
            await conn.execute(
                f"DELETE FROM {conversations} WHERE shard = $1 AND id = ANY($2::text[])",
                self.shard,
                [key for key, _ in deletes],
                timeout=self._timeout,
            )
        if MODEL_KEY in changes:
            await self._put_model(conn, changes[MODEL_KEY])
        if token:
            await conn.execute(
                f"INSERT INTO {self._table('token')} (shard, value) VALUES ($1, $2) "
                "ON CONFLICT (shard) DO UPDATE SET value = GREATEST(token.value, EXCLUDED.value)",
                self.shard,
                token,
                timeout=self._timeout,
            )
        await self._put_entry(conn, sequence)

    async def _put_model(self, conn: Connection, model: bytes | None) -> None:
        models = self._table("models")
        if model is None:
            await conn.execute(
                f"DELETE FROM {models} WHERE shard = $1", self.shard, timeout=self._timeout
            )
            return
        await conn.execute(
            f"INSERT INTO {models} (shard, record) VALUES ($1, $2) "
            "ON CONFLICT (shard) DO UPDATE SET record = EXCLUDED.record",
            self.shard,
            model,
            timeout=self._timeout,
        )

    async def _fence(self, conn: Connection, *, restore: bool) -> None:
        """Lock the shard's row; StoreFenced when another view took the shard since, and
        StoreLost when the row is gone or behind (a ``restore`` writes it back instead)."""
        stored = await conn.fetchval(
            f"SELECT epoch FROM {self._table('shards')} WHERE shard = $1 FOR UPDATE",
            self.shard,
            timeout=self._timeout,
        )
        if stored is not None and stored > self.epoch:
            raise StoreFenced(
                f"shard {self.shard} of postgresql store {self._shared.url} was taken at epoch "
                f"{stored}, after this view's {self.epoch}: nothing written"
            )
        if stored == self.epoch:
            return
        if not restore:
            raise StoreLost(
                f"postgresql store {self._shared.url} lost writer {self.writer}'s data: shard "
                f"{self.shard}'s epoch is {stored if stored is not None else 'gone'}, "
                f"not {self.epoch}"
            )
        taken = await conn.fetchval(
            f"INSERT INTO {self._table('shards')} (shard, epoch, replica, since_ms) "
            f"VALUES ($1, $2, $3, {NOW_MS}) ON CONFLICT (shard) DO UPDATE SET "
            "epoch = EXCLUDED.epoch, replica = EXCLUDED.replica, since_ms = EXCLUDED.since_ms, "
            "released = false WHERE shards.epoch <= EXCLUDED.epoch RETURNING epoch",
            self.shard,
            self.epoch,
            self.replica,
            timeout=self._timeout,
        )
        if taken is None:  # taken by another since the row was read as missing
            raise StoreFenced(
                f"shard {self.shard} of postgresql store {self._shared.url} was taken by "
                "another view during this view's restore: nothing written"
            )

    async def _check_entry(self, conn: Connection) -> None:
        held = await conn.fetchval(
            f"SELECT sequence FROM {self._table('writers')} WHERE writer = $1",
            self.writer,
            timeout=self._timeout,
        )
        if held is None or held < self._seen:
            raise StoreLost(
                f"postgresql store {self._shared.url} lost writer {self.writer}'s data: its "
                f"entry holds {'nothing' if held is None else held}, not {self._seen} or above"
            )

    async def _put_entry(self, conn: Connection, sequence: int) -> None:
        await conn.execute(
            f"INSERT INTO {self._table('writers')} (writer, sequence) VALUES ($1, $2) "
            "ON CONFLICT (writer) DO UPDATE SET sequence = EXCLUDED.sequence",
            self.writer,
            sequence,
            timeout=self._timeout,
        )

    def _next(self) -> int:
        self._sent = next_sequence(self._sent)
        return self._sent


def _refuse(changes: Mapping[str, bytes | None], token: int) -> None:
    """``check_commit``, and the one id PostgreSQL text cannot hold (NUL): refused before
    it is sent, instead of failing every retry of the commit."""
    check_commit(changes, token)
    for conversation_id in changes:
        if "\x00" in conversation_id:
            raise ValueError(f"conversation id {conversation_id!r} holds a NUL character")
