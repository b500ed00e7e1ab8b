"""The persisted-state port: what the worker needs from a store, and how a store fails.

A back end keeps, per conversation, the settings a dashboard chose, and one token counter
that only grows (CONTRACT.md, "Outbound: warm requests"). Everything is read once at start
so the hot path never waits on disk; writes are durable when they return.

Room is kept for the persisted schedules of SEMANTICS.md, "Restart" (a runtime snapshot
per conversation): they will arrive as ``put_schedules`` / ``load_schedules`` on this
protocol, with a table of their own in each back end, without changing what is here.
"""

from __future__ import annotations

from typing import Protocol

RawSettings = dict[str, object]
"""A conversation's settings as stored, decoded but not validated: the core parses them."""


class StoreError(Exception):
    """A store back end failed; the caller answers ``store_error`` or leaves the message unacked."""


class Store(Protocol):
    """Persisted settings and the token counter, behind one asynchronous interface."""

    async def open(self) -> None:
        """Connect and prepare the schema; raises StoreError when the store is unusable."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release the back end; calling it twice is harmless."""
        ...

    async def load_settings(self) -> dict[str, RawSettings]:
        """Every persisted conversation's settings, keyed by conversation id.

        Values come back as stored, malformed ones included, so the core applies its
        defaults; a value that cannot be decoded into an object reads as ``{}``.
        """
        ...

    async def put_settings(self, conversation_id: str, enabled: bool, interval_ms: int) -> None:
        """Replace a conversation's settings; committed when this returns."""
        ...

    async def load_token(self) -> int:
        """The highest token persisted, 0 when none was."""
        ...

    async def put_token(self, token: int) -> None:
        """Persist ``max(stored, token)``; committed when this returns."""
        ...
