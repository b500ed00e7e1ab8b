"""Persisted state: the Store port, its back ends, and the URL that picks one.

``WARMER_STORE`` names the back end the way SQLAlchemy writes database URLs::

    store = open_store("sqlite:///var/warmer.db")
    await store.open()
    loaded = await store.load()
    await store.commit({"c-1": record, "c-2": None}, token=loaded.token + 1)

With shards, ``open_shared`` gives the back end every replica shares, and its views::

    shared = open_shared("redis://localhost/0?prefix=prod", timeout_ms=2000)
    await shared.open()
    view = shared.shard(3, replica="pod-a")
    await view.open()  # takes shard 3: the view that held it is fenced from now on
"""

from __future__ import annotations

from warmer.store.base import (
    Loaded,
    Owner,
    RawSettings,
    Replica,
    Shared,
    Store,
    StoreError,
    StoreFenced,
    StoreLost,
    StoreOutcomeUnknown,
    StoreUnreachable,
)
from warmer.store.memory import MemoryShared, MemoryStore
from warmer.store.redis import RedisStore
from warmer.store.redis_shared import RedisShared
from warmer.store.sqlite import SqliteStore
from warmer.store.sqlite_shared import SqliteShared

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "Loaded",
    "MemoryShared",
    "MemoryStore",
    "Owner",
    "RawSettings",
    "RedisShared",
    "RedisStore",
    "Replica",
    "Shared",
    "SqliteShared",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreFenced",
    "StoreLost",
    "StoreOutcomeUnknown",
    "StoreUnreachable",
    "open_shared",
    "open_store",
]

DEFAULT_TIMEOUT_MS = 2000
"""How long a store call waits by default (``WARMER_STORE_TIMEOUT_MS``)."""

_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "redis://[[user]:password@]host[:port][/db][?prefix=name], rediss://... (TLS), "
    "postgresql://user[:password]@host[:port]/db[?schema=name] (also postgres://), "
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
    if scheme in ("postgresql", "postgres"):
        from warmer.store.postgres import PostgresStore  # asyncpg, only when named

        return PostgresStore(url, timeout_ms=timeout_ms)
    # The URL itself may carry credentials: name only its scheme.
    raise ValueError(f"unsupported store URL scheme {scheme!r}; use {_FORMS}")


def open_shared(url: str, *, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> Shared:
    """The shared store ``url`` names, not yet opened (the forms of ``open_store``);
    ValueError for a URL of another form. ``memory://`` gives a new, empty one each call.

    Shard 0 of a store laid out for one shard is what ``open_store`` reads and writes: a
    store written before shards loads unchanged through either.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise ValueError(f"store URL has no scheme; use {_FORMS}")
    if scheme in ("redis", "rediss"):
        return RedisShared(url, connect_timeout=timeout_ms / 1000, timeout=timeout_ms / 1000)
    if scheme == "memory" and not rest:
        return MemoryShared()
    if scheme == "sqlite":
        return SqliteShared(_sqlite_path(rest), busy_timeout_ms=timeout_ms)
    if scheme in ("postgresql", "postgres"):
        from warmer.store.postgres import PostgresShared  # asyncpg, only when named

        return PostgresShared(url, timeout_ms=timeout_ms)
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
