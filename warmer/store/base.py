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


class Loaded(Struct, frozen=True, kw_only=True):
    """Everything a store holds, as read at start."""

    records: dict[str, bytes]
    """Conversation id -> its encoded record (``warmer.core.records``)."""
    settings: dict[str, RawSettings]
    """Settings of conversations with no record yet (left by a schema-1 store)."""
    token: int
    """The highest token committed, 0 when none was."""


class Store(Protocol):
    """Conversation records and the token counter, behind one asynchronous interface."""

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
