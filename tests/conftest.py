"""Fixtures every test tree shares: the Redis and the PostgreSQL the store tests talk to.

The Redis: ``WARMER_TEST_REDIS_URL`` if set, else the local one on 127.0.0.1:6379, db 0.
The PostgreSQL: ``WARMER_TEST_POSTGRES_URL`` if set (without ``?schema=``), else the local
one, ``postgresql://postgres@127.0.0.1:5432/postgres``. When one does not answer the tests
that need it fail if ``WARMER_REQUIRE_BROKER=1`` (CI sets it) and are skipped, with the
reason, otherwise. Each test gets a key prefix (a schema) of its own, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis every store test talks to (no ``?prefix=``: see ``redis_store_url``)."""
    url = os.environ.get("WARMER_TEST_REDIS_URL") or LOCAL_REDIS_URL
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as client:
            client.ping()
    except (redis.RedisError, OSError) as exc:
        masked = _masked(url)
        reason = (
            f"no Redis at {masked} ({type(exc).__name__}): set WARMER_TEST_REDIS_URL "
            "or start one on 127.0.0.1:6379 (`redis-server --daemonize yes`)"
        )
        if os.environ.get("WARMER_REQUIRE_BROKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    # Synchronous, so that an async fixture may ask for it with getfixturevalue.
    prefix = f"warmer-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
def redis_store_url(redis_url: str, redis_prefix: str) -> str:
    """``redis_url`` with this test's own ``?prefix=``."""
    separator = "&" if "?" in redis_url else "?"
    return f"{redis_url}{separator}prefix={redis_prefix}"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL every store test talks to (no ``?schema=``: see ``postgres_store_url``)."""
    url = os.environ.get("WARMER_TEST_POSTGRES_URL") or LOCAL_POSTGRES_URL
    try:
        _in_thread(lambda: _postgres(url, "SELECT 1"))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        reason = (
            f"no PostgreSQL at {_masked(url)} ({type(exc).__name__}): set "
            "WARMER_TEST_POSTGRES_URL or start one on 127.0.0.1:5432 "
            "(`pg_ctlcluster 15 main start`)"
        )
        if os.environ.get("WARMER_REQUIRE_BROKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return url


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A schema of this test's own, dropped (with all it holds) afterwards."""
    schema = f"warmer_test_{uuid.uuid4().hex[:12]}"
    yield schema
    drop = f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'
    for attempt in range(10):  # a worker process still committing can deadlock the drop
        try:
            _in_thread(lambda: _postgres(postgres_url, drop))
            return
        except asyncpg.DeadlockDetectedError:
            if attempt == 9:
                raise
            time.sleep(0.3)


@pytest.fixture
def postgres_store_url(postgres_url: str, postgres_schema: str) -> str:
    """``postgres_url`` with this test's own ``?schema=``."""
    separator = "&" if "?" in postgres_url else "?"
    return f"{postgres_url}{separator}schema={postgres_schema}"


async def _postgres(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url, timeout=2)
    try:
        await conn.execute(statement, timeout=5)
    finally:
        await conn.close()


def _in_thread(work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work`` on an event loop of its own: a sync fixture may be set up while the
    test's loop runs (``getfixturevalue`` from an async fixture)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, work()).result()  # type: ignore[arg-type]


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
