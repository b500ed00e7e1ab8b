"""Persisted state: the Store port, its back ends, and the URL that picks one.

``WARMER_STORE`` names the back end the way SQLAlchemy writes database URLs::

    store = open_store("sqlite:///var/warmer.db")
    await store.open()
    loaded = await store.load()
    await store.commit({"c-1": record, "c-2": None}, token=loaded.token + 1)
"""

from __future__ import annotations

from warmer.store.base import (
    Loaded,
    RawSettings,
    Store,
    StoreError,
    StoreLost,
    StoreOutcomeUnknown,
    StoreUnreachable,
)
from warmer.store.memory import MemoryStore
from warmer.store.redis import RedisStore
from warmer.store.sqlite import SqliteStore

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "Loaded",
    "MemoryStore",
    "RawSettings",
    "RedisStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreLost",
    "StoreOutcomeUnknown",
    "StoreUnreachable",
    "open_store",
]

DEFAULT_TIMEOUT_MS = 2000
"""How long a store call waits by default (``WARMER_STORE_TIMEOUT_MS``)."""

_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "redis://[[user]:password@]host[:port][/db][?prefix=name], rediss://... (TLS), "
    "or memory:// (tests only)"
)


def open_store(url: str, *, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> Store:
    """The store ``url`` names, not yet opened; ValueError for a URL of another form.

    ``sqlite:///relative/path.db`` is relative to the working directory,
    ``sqlite:////absolute/path.db`` absolute; ``redis://`` and ``rediss://`` (TLS) name a
    Redis database and the prefix of its keys (``warmer`` unless ``?prefix=`` says);
    ``memory://`` keeps nothing. No error shows the URL's password. ``timeout_ms``: how
    long a call waits for Redis to answer, or for SQLite's lock held by another process.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise ValueError(f"store URL has no scheme; use {_FORMS}")
    if scheme in ("redis", "rediss"):
        return RedisStore(url, connect_timeout=timeout_ms / 1000, timeout=timeout_ms / 1000)
    if scheme == "memory" and not rest:
        return MemoryStore()
    if scheme == "sqlite":
        return SqliteStore(_sqlite_path(rest), busy_timeout_ms=timeout_ms)
    # The URL itself may carry credentials: name only its scheme.
    raise ValueError(f"unsupported store URL scheme {scheme!r}; use {_FORMS}")


def _sqlite_path(rest: str) -> str:
    """The file path in what follows ``sqlite://``: an empty host, then the path."""
    if not rest.startswith("/"):
        raise ValueError(f"sqlite store URL has a host or no path; use {_FORMS}")
    path = rest[1:]
    if not path or path.endswith("/"):
        raise ValueError(f"sqlite store URL names no file; use {_FORMS}")
    if "?" in path:
        raise ValueError(f"sqlite store URL takes no query parameters; use {_FORMS}")
    return path
