"""Fixtures every test tree shares: the Redis the store tests talk to.

The Redis: ``WARMER_TEST_REDIS_URL`` if set, else the local one on 127.0.0.1:6379, db 0.
When it does not answer the tests that need it fail if ``WARMER_REQUIRE_BROKER=1`` (CI
sets it) and are skipped, with the reason, otherwise. Each test gets a key prefix of its
own and its keys are deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


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


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
