"""Persisted state: the Store port, its back ends, and the URL that picks one.

``WARMER_STORE`` names the back end the way SQLAlchemy writes database URLs::

    store = open_store("sqlite:///var/warmer.db")
    await store.open()
    settings = await store.load_settings()
"""

from __future__ import annotations

from warmer.store.base import RawSettings, Store, StoreError
from warmer.store.memory import MemoryStore
from warmer.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "RawSettings", "SqliteStore", "Store", "StoreError", "open_store"]

_FORMS = "sqlite:///relative/path.db, sqlite:////absolute/path.db, or memory:// (tests only)"
_REDIS = "redis store arrives with the durability issue; use sqlite:///path.db"


def open_store(url: str) -> Store:
    """The store ``url`` names, not yet opened; ValueError for a URL of another form.

    ``sqlite:///relative/path.db`` is relative to the working directory,
    ``sqlite:////absolute/path.db`` absolute; ``memory://`` keeps nothing.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise ValueError(f"store URL has no scheme; use {_FORMS}")
    if scheme in ("redis", "rediss"):
        raise ValueError(_REDIS)
    if scheme == "memory" and not rest:
        return MemoryStore()
    if scheme == "sqlite":
        return SqliteStore(_sqlite_path(rest))
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
