"""The persisted-state port: what the worker needs from a store, and how a store fails.

A back end keeps one record per conversation (settings and schedule, encoded by
``warmer.core.records``: the store never looks inside) and one token counter that only
grows (docs/contract.md, "Outbound: warm requests"). Everything is read once at start so the
hot path never waits on disk; the worker then commits each batch's changes in one
transaction (``commit``), durable when it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from msgspec import Struct

MAX_TOKEN = 2**63 - 1
"""The largest token a store keeps: a signed 64-bit integer, in SQLite as in Redis."""

RawSettings = dict[str, object]
"""Settings as an older store (schema 1) kept them, decoded but not validated."""


class StoreError(Exception):
    """A store back end failed; the worker retries the commit in place (or answers a command)."""


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

        Durable when it returns; on StoreError nothing of it was committed.
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
