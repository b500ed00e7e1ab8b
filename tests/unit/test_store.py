"""open_store: WARMER_STORE URLs as SQLAlchemy writes them, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from warmer.store import MemoryStore, SqliteStore, open_store


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


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://cache:6380"])
def test_redis_is_not_yet_available(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        open_store(url)
    assert str(raised.value) == (
        "redis store arrives with the durability issue; use sqlite:///path.db"
    )


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


def test_refusal_does_not_echo_credentials() -> None:
    with pytest.raises(ValueError) as raised:
        open_store("postgresql://warmer:s3cret@db/warmer")
    assert "s3cret" not in str(raised.value)
    assert "postgresql" in str(raised.value)


async def test_relative_path_is_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///warmer.db")
    await store.open()
    try:
        await store.put_token(1)
    finally:
        await store.close()
    assert (tmp_path / "warmer.db").is_file()
