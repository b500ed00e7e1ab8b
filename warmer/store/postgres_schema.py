"""The PostgreSQL store's URL and tables: what ``warmer.store.postgres`` connects to and finds.

One schema holds a namespace (``?schema=``, ``warmer`` by default):

- ``conversations (id, shard, record)``: one row per conversation, on the shard its events
  arrive on (ids compared byte by byte, ``COLLATE "C"``: Python's order, and fast);
- ``models (shard, record)``: each shard's gap model (``MODEL_KEY``), written by its owner;
- ``token (shard, value)``: the highest token each shard committed; the store's is their
  max (a row per shard: commits of different shards never wait for one another);
- ``shards (shard, epoch, replica, since_ms, released)``: who took each shard last;
- ``writers (writer, sequence)``: each open view's entry (``warmer.store.base``);
- ``replicas (id, info, seen_ms, expires_ms)``: presence;
- ``meta (key, value)``: the schema version and the layout.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import asyncpg

from warmer.store.base import StoreError

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "warmer"
CHUNK = 10_000
"""Rows one statement reads or writes at most: each stays well within the call timeout, and
a restore or load of a million goes statement by statement."""
NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
"""The server's wall clock in milliseconds, as SQL."""

_FORM = "postgresql://[user[:password]@]host[:port]/database[?schema=name][&sslmode=mode]"
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}", re.ASCII)
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TABLES = ("conversations", "models", "token", "shards", "writers", "replicas", "meta")
_CREATE = """
CREATE TABLE IF NOT EXISTS {s}.conversations (
  id text COLLATE "C" PRIMARY KEY, shard integer NOT NULL, record bytea NOT NULL);
CREATE INDEX IF NOT EXISTS conversations_by_shard ON {s}.conversations (shard, id);
CREATE TABLE IF NOT EXISTS {s}.models (shard integer PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.token (
  shard integer PRIMARY KEY, value bigint NOT NULL CHECK (value >= 0));
CREATE TABLE IF NOT EXISTS {s}.shards (
  shard integer PRIMARY KEY, epoch bigint NOT NULL, replica text NOT NULL,
  since_ms bigint NOT NULL, released boolean NOT NULL DEFAULT false);
CREATE TABLE IF NOT EXISTS {s}.writers (writer text PRIMARY KEY, sequence bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.replicas (
  id text COLLATE "C" PRIMARY KEY, info text NOT NULL, seen_ms bigint NOT NULL,
  expires_ms bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value bigint NOT NULL);
"""


class Target(NamedTuple):
    """Where a store URL points."""

    connect: dict[str, Any]
    """asyncpg.connect's keyword arguments (the password among them)."""
    schema: str
    masked: str
    """The URL with its password masked."""
    secrets: tuple[str, ...]
    """What an error message must never show."""


def parse_url(url: str) -> Target:
    """What ``url`` names; ValueError, never showing the password, when it is malformed."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"malformed postgresql store URL; use {_FORM}") from None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    masked_netloc = f"{user}:***@{hostport}" if colon else parts.netloc
    secrets = tuple(sorted({password, unquote(password)} - {""}, key=len, reverse=True))
    masked = urlunsplit((parts.scheme, masked_netloc, parts.path, parts.query, ""))
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql store URL: {masked}; use {_FORM}")
    try:
        host, port = parts.hostname, parts.port  # .port raises on a port that is no number
    except ValueError:
        raise ValueError(f"postgresql store URL has a bad port: {masked}; use {_FORM}") from None
    if not host:
        raise ValueError(f"postgresql store URL names no host: {masked}; use {_FORM}")
    database = unquote(parts.path[1:])
    if not database or "/" in database:
        raise ValueError(f"postgresql store URL names no database: {masked}; use {_FORM}")
    if parts.fragment:
        raise ValueError(f"postgresql store URL has a fragment: {masked}")
    query = parse_qs(parts.query, keep_blank_values=True)
    if set(query) - {"schema", "sslmode"} or any(len(v) != 1 for v in query.values()):
        raise ValueError(f"postgresql store URL takes only ?schema=name&sslmode=mode: {masked}")
    schema = query.get("schema", [DEFAULT_SCHEMA])[0]
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(
            f"postgresql store URL schema must be 1 to 63 of a-z, 0-9, _ (not first a digit): "
            f"{masked}"
        )
    connect: dict[str, Any] = {"host": host, "port": port or 5432, "database": database}
    if user:
        connect["user"] = unquote(user)
    if colon:
        connect["password"] = unquote(password)
    if "sslmode" in query:
        if query["sslmode"][0] not in _SSLMODES:
            raise ValueError(f"postgresql store URL sslmode is one of {', '.join(_SSLMODES)}")
        connect["ssl"] = query["sslmode"][0]
    return Target(connect, schema, masked, secrets)


async def prepare(conn: Connection, schema: str, timeout: float) -> None:
    """Create what is missing of the schema, inside the caller's transaction; StoreError for
    a schema a newer warmer wrote. Replicas starting together take turns (an advisory lock):
    CREATE ... IF NOT EXISTS races with itself."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))", f"warmer:{schema}", timeout=timeout
    )
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = ANY($2::text[])",
        schema,
        list(_TABLES),
        timeout=timeout,
    )
    quoted = f'"{schema}"'
    if found < len(_TABLES):
        # Only what is missing: a schema a DBA made leaves this user without CREATE rights.
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
        ):
            await conn.execute(f"CREATE SCHEMA {quoted}", timeout=timeout)
        await conn.execute(_CREATE.format(s=quoted), timeout=timeout)
    version = await conn.fetchval(
        f"SELECT value FROM {quoted}.meta WHERE key = 'schema_version'", timeout=timeout
    )
    if version is None:
        await conn.execute(
            f"INSERT INTO {quoted}.meta (key, value) VALUES ('schema_version', $1)",
            SCHEMA_VERSION,
            timeout=timeout,
        )
    elif version > SCHEMA_VERSION:
        raise StoreError(
            f"postgresql schema {schema} has version {version}; this warmer reads up to "
            f"{SCHEMA_VERSION}"
        )
