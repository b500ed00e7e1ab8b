"""The persisted-state port: what the worker needs from a store, and how a store fails.

A back end keeps one record per conversation (settings and schedule, encoded by
``warmer.core.records``: the store never looks inside) and one token counter that only
grows (docs/contract.md, "Outbound: warm requests"). Everything is read once at start so the
hot path never waits on disk; the worker then commits each batch's changes in one
transaction (``commit``), durable when it returns.

A store does not always tell the truth on its own: a Redis restarted without persistence
comes back empty, a file restored from a backup goes back in time, and a timeout leaves a
write that may land later. So each opened store is a *writer* with an entry of its own in
the store (written at ``open``, raised by every commit): a commit, or a ``check``, that
finds the entry missing or behind the last commit this writer saw acknowledged raises
``StoreLost`` instead of writing, and the worker writes everything it holds again
(``restore``). A commit whose outcome is not known raises ``StoreOutcomeUnknown``; a later
copy of it never undoes a later commit (each carries a sequence that only grows, and the
store ignores one not above the writer's entry), so sending the same changes again is safe.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Protocol

from msgspec import Struct

MAX_TOKEN = 2**63 - 1
"""The largest token a store keeps: a signed 64-bit integer, in SQLite as in Redis."""

RawSettings = dict[str, object]
"""Settings as an older store (schema 1) kept them, decoded but not validated."""


class StoreError(Exception):
    """A store back end failed, and nothing of the call was written.

    The worker retries the commit in place, or answers a command ``store_error``.
    """

    unknown: bool = False
    """Whether the call may have been written after all (``StoreOutcomeUnknown``)."""


class StoreOutcomeUnknown(StoreError):
    """The call may or may not have been written (a timeout, a connection lost after
    sending): never answered as a failure; sending the same changes again is safe."""

    unknown = True


class StoreUnreachable(StoreError):
    """The store cannot be reached now (no connection, no answer, a lock held elsewhere):
    nothing was written, and trying again later may help (start-up waits for it)."""


class StoreLost(StoreError):
    """The store no longer holds what this writer committed (its data lost, or rolled back
    to an older copy); nothing of the call was written. ``restore`` writes it all again."""


class StoreFenced(StoreError):
    """Another replica took this shard since this view opened it (the shard's epoch in the
    store is above this view's): nothing of the call was written. Never retried: the shard
    is another's now, so its runner stops, gives back what it holds unacknowledged and
    publishes nothing more for it."""


class Loaded(Struct, frozen=True, kw_only=True):
    """Everything a store holds, as read at start."""

    records: dict[str, bytes]
    """Conversation id -> its encoded record (``warmer.core.records``)."""
    settings: dict[str, RawSettings]
    """Settings of conversations with no record yet (left by a schema-1 store)."""
    token: int
    """The highest token committed, 0 when none was."""


class Store(Protocol):
    """Conversation records and the token counter, behind one asynchronous interface.

    With shards (``Shared`` below) a Store is one shard's view: ``shard`` names it and
    ``epoch`` is the ownership epoch its ``open`` took (0 before it is open, and for a
    back end without shards).
    """

    @property
    def shard(self) -> int:
        """The shard this view is of (0 for a store without shards)."""
        ...

    @property
    def epoch(self) -> int:
        """The ownership epoch ``open`` took (0 before, and for a store without shards)."""
        ...

    async def open(self) -> None:
        """Connect and prepare the schema; raises StoreError when the store is unusable."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release the back end; calling it twice is harmless."""
        ...

    async def load(self) -> Loaded:
        """Everything persisted; raises StoreError when it cannot be read."""
        ...

    async def commit(self, changes: Mapping[str, bytes | None], token: int) -> None:
        """In one transaction: put each record (``None`` deletes it), token = max(stored, token).

        Durable when it returns. On StoreError nothing of it was committed, but on
        StoreOutcomeUnknown, which may have been; StoreLost when this writer's entry is
        missing or behind (nothing written).
        """
        ...

    async def check(self) -> None:
        """Raise StoreLost when this writer's entry is missing or behind, StoreError when the
        store cannot be read; a back end may also tidy up here (checkpoint its log)."""
        ...

    async def restore(self, records: Mapping[str, bytes], token: int) -> None:
        """Put every record in ``records`` and raise the token, then record this writer's
        entry afresh: what the worker holds, written again after ``StoreLost``.

        Records the store holds beside them are kept (another writer may own them). Until
        it returns, a ``check`` or ``commit`` still raises StoreLost.
        """
        ...


def check_commit(changes: Mapping[str, bytes | None], token: int) -> None:
    """Refuse what no back end may take (ValueError, TypeError), before any of it is queued.

    A bad value found only inside a back end's transaction would fail every commit merged
    with it, and every retry of them.
    """
    if not 0 <= token <= MAX_TOKEN:
        raise ValueError(f"token {token} is outside 0..{MAX_TOKEN}")
    for conversation_id, record in changes.items():
        if not isinstance(conversation_id, str):
            raise TypeError(f"conversation id {conversation_id!r} is not a str")
        if record is not None and not isinstance(record, bytes):
            raise TypeError(f"record of {conversation_id!r} is {type(record).__name__}, not bytes")
        try:
            conversation_id.encode()
        except UnicodeEncodeError:
            raise ValueError(f"conversation id {conversation_id!r} is not valid Unicode") from None


WRITERS_KEPT = 256
"""Writer entries a store keeps: ``open`` forgets the least recent beyond these (left by
workers that were killed; one that stops cleanly removes its own)."""


WRITER_REFRESH_MS = 60_000
"""How old a writer's entry may grow before ``check`` raises it: a live writer idle for
long stays among the most recent ``open`` keeps. Not at every check: a store that comes
back without its last second (AOF ``everysec``) would then often read as one that lost
commits, when all it lost was a check's write."""


def refresh_due(seen: int) -> bool:
    """Whether ``check`` should raise the entry, ``seen`` being its last sequence
    acknowledged (sequences are wall-clock milliseconds when the clock is ahead)."""
    return time.time_ns() // 1_000_000 - seen >= WRITER_REFRESH_MS


def new_writer() -> str:
    """A fresh writer id: one per opened store, never reused."""
    return uuid.uuid4().hex[:16]


def next_sequence(last: int) -> int:
    """The sequence of the next write: above ``last``, and the wall clock's milliseconds
    when those are ahead, so that the most recent writers have the highest entries."""
    return max(last + 1, time.time_ns() // 1_000_000)


# -- Shards: one store shared by several replicas -------------------------------------------
#
# A ``Shared`` store is one connection to a back end that holds the records of every shard
# of a namespace; ``shard(k, replica)`` gives the ``Store`` above for shard ``k`` alone (a
# *view*). Opening a view *takes* the shard: it raises the shard's ownership epoch in the
# store (``epoch`` afterwards holds the one taken) and records ``replica`` as its owner;
# every later ``commit``, ``check`` and ``restore`` of the view checks, in the same atomic
# step as its writes, that the shard's epoch is still its own, and raises ``StoreFenced``
# (nothing written) once another view took it. Epochs only grow, also across a store that
# lost its data: a new epoch is max(stored + 1, wall-clock ms). A view's ``load`` reads its
# shard's records only (the gap model under ``MODEL_KEY`` is kept per shard too, each
# written by its shard's owner alone); the token is one for the whole store (max of all).
# Shard 0 of a store laid out for one shard is exactly what a store held before shards
# existed (same keys, same tables): a single worker upgrades in place.


MAX_SHARDS = 256
"""The most shards a store is laid out for (``WARMER_SHARDS``): shard ids are 0..255."""

PRESENCE_INFO_CHARS = 1000
"""What ``beat`` keeps of a replica's ``info``."""


def new_epoch(stored: int | None) -> int:
    """The epoch a view takes over ``stored`` (None: no entry): above it, and the wall
    clock's milliseconds when those are ahead, so that a store that lost its entries (and
    so ``stored``) still hands out epochs above every one taken before."""
    return max((stored or 0) + 1, time.time_ns() // 1_000_000)


def wall_ms() -> int:
    """The wall clock in milliseconds, as the stores read it (``since_ms``, ``seen_ms``)."""
    return time.time_ns() // 1_000_000


def judge_epoch(held: int | None, epoch: int, *, restoring: bool, where: str) -> None:
    """The fence, as every back end applies it inside its atomic step: StoreFenced when
    the shard's stored epoch ``held`` is above the view's ``epoch`` (another view took the
    shard); StoreLost when it is missing or below (the store lost it, or went back to an
    older copy), unless ``restoring``, which writes it again."""
    if held is not None and held > epoch:
        raise StoreFenced(f"{where}: taken at epoch {held}, above this view's {epoch}")
    if not restoring and held != epoch:
        raise StoreLost(f"{where} lost the shard's epoch: it holds {held}, not {epoch}")


class Owner(Struct, frozen=True, kw_only=True):
    """Who took a shard last, as the store records it."""

    shard: int
    epoch: int
    replica: str
    """The replica id given to ``shard(k, replica)``."""
    since_ms: int
    """Wall-clock ms when it took the shard."""
    released: bool = False
    """Its view was closed (handed over or stopped); the shard waits for a new owner."""


class Replica(Struct, frozen=True, kw_only=True):
    """A replica's presence, as ``beat`` left it."""

    id: str
    info: str
    """What the replica said of itself (host, pid, version: free text, at most 1,000 chars)."""
    seen_ms: int
    """Wall-clock ms of its last beat."""


class Shared(Protocol):
    """One back end holding every shard of a namespace, shared by its replicas."""

    url: str
    """The URL with any password masked: safe to log."""

    shareable: bool
    """Whether replicas on other hosts can use it (Redis, PostgreSQL) or not (SQLite)."""

    async def open(self) -> None:
        """Connect and prepare the schema (idempotent); StoreUnreachable while it cannot be
        reached, StoreError when it is unusable."""
        ...

    async def close(self) -> None:
        """Release the back end; views must be closed first. Calling it twice is harmless."""
        ...

    def shard(self, shard: int, replica: str) -> Store:
        """A view of shard ``shard`` (0-based), not yet opened: its ``open`` takes the shard
        for ``replica``, its ``close`` releases it (the epoch stays)."""
        ...

    async def layout(self) -> int | None:
        """How many shards the records are laid out for: None for an empty store never laid
        out, 1 for a store written before shards existed."""
        ...

    async def set_layout(self, shards: int) -> None:
        """Record the layout (at the first start, or by ``warmer reshard``)."""
        ...

    async def beat(self, replica: str, info: str, ttl_ms: int) -> list[Replica]:
        """Record that ``replica`` is alive (for ``ttl_ms``); every replica alive now,
        this one included, sorted by id. Entries older than their ttl are removed."""
        ...

    async def leave(self, replica: str) -> None:
        """Remove ``replica``'s presence (a clean stop)."""
        ...

    async def replicas(self) -> list[Replica]:
        """Every replica alive now, sorted by id, read without beating (``warmer shards``)."""
        ...

    async def owners(self) -> list[Owner]:
        """Every shard ever taken, by shard."""
        ...

    async def ids(self, shard: int) -> list[str]:
        """The conversation ids of shard ``shard`` (``warmer reshard``; not on a hot path)."""
        ...

    async def assign(self, moves: Mapping[str, int]) -> None:
        """Move each conversation's record (and nothing else) to the shard given, in
        chunks; only while no replica runs (``warmer reshard``). An id with no record is
        skipped; ``MODEL_KEY`` is never moved."""
        ...
