"""open_store: WARMER_STORE URLs as SQLAlchemy writes them, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from warmer.store import MemoryStore, RedisStore, SqliteStore, open_store


def test_relative_sqlite_path() -> None:
    store = open_store("sqlite:///data/warmer.db")
    assert isinstance(store, SqliteStore)
    assert store.path == Path("data/warmer.db")
    assert not store.path.is_absolute()


def test_absolute_sqlite_path() -> None:
    store = open_store("sqlite:////var/lib/warmer/warmer.db")
    assert isinstance(store, SqliteStore)
    assert store.path == Path("/var/lib/warmer/warmer.db")


def test_memory_store() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)


def test_scheme_is_case_insensitive() -> None:
    assert isinstance(open_store("SQLite:///w.db"), SqliteStore)


@pytest.mark.parametrize(
    ("url", "prefix"),
    [
        ("redis://localhost:6379/0", "warmer"),
        ("rediss://cache:6380", "warmer"),
        ("REDIS://localhost", "warmer"),
        ("redis://localhost:6379/2?prefix=tenant-a", "tenant-a"),
        ("redis://:s3cret@localhost/0?prefix={warmer}", "{warmer}"),
    ],
)
def test_redis_store(url: str, prefix: str) -> None:
    store = open_store(url)
    assert isinstance(store, RedisStore)
    assert store.prefix == prefix
    assert store.records_key == f"{prefix}:conversations"
    assert store.token_key == f"{prefix}:token"


def test_redis_url_is_shown_with_its_password_masked() -> None:
    store = open_store("redis://warmer:s3cret@cache:6379/1?prefix=p")
    assert isinstance(store, RedisStore)
    assert store.url == "redis://warmer:***@cache:6379/1?prefix=p"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@/0",
        "redis://user:s3cret@cache:port/0",
        "redis://:s3cret@cache/zero",
        "redis://:s3cret@cache/0?socket_timeout=1",
        "redis://:s3cret@cache/0?prefix=",
        "redis://:s3cret@cache/0?prefix=a&prefix=b",
        "redis://:s3cret@cache/0?prefix=has space",
        "redis://:s3cret@cache/0#fragment",
    ],
)
def test_bad_redis_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        open_store(url)
    assert "s3cret" not in str(raised.value)
    assert "***" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "warmer.db",
        "/var/lib/warmer.db",
        "sqlite://",
        "sqlite:///",
        "sqlite:////var/lib/",
        "sqlite://localhost/warmer.db",
        "sqlite:///warmer.db?mode=ro",
        "memory://somewhere",
        "file:///warmer.db",
    ],
)
def test_other_forms_are_refused_naming_the_allowed_ones(url: str) -> None:
    with pytest.raises(ValueError, match=r"sqlite:///relative/path\.db") as raised:
        open_store(url)
    assert "memory://" in str(raised.value)
    assert "redis://[[user]:password@]host[:port][/db][?prefix=name]" in str(raised.value)
    assert "rediss://" in str(raised.value)


def test_refusal_does_not_echo_credentials() -> None:
    with pytest.raises(ValueError) as raised:
        open_store("mongodb://warmer:s3cret@db/warmer")
    assert "s3cret" not in str(raised.value)
    assert "mongodb" in str(raised.value)


async def test_relative_path_is_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///warmer.db")
    await store.open()
    try:
        await store.commit({"c-1": b"one"}, 1)
    finally:
        await store.close()
    assert (tmp_path / "warmer.db").is_file()
