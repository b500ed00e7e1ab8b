"""MemoryStore: the same contract in a dict, and a switch that makes it fail."""

from __future__ import annotations

import pytest

from warmer.store import MemoryStore, RawSettings, Store, StoreError


def test_satisfies_the_store_protocol() -> None:
    store: Store = MemoryStore()
    assert isinstance(store, MemoryStore)


async def test_settings_round_trip_and_overwrite() -> None:
    store = MemoryStore()
    await store.put_settings("c-1", True, 60000)
    await store.put_settings("c-2", True, 1000)
    await store.put_settings("c-1", False, 5000)
    assert await store.load_settings() == {
        "c-1": {"enabled": False, "intervalMs": 5000},
        "c-2": {"enabled": True, "intervalMs": 1000},
    }


async def test_seeded_malformed_settings_read_back_raw() -> None:
    store = MemoryStore(settings={"c-1": {"enabled": "yes", "intervalMs": None}})
    assert await store.load_settings() == {"c-1": {"enabled": "yes", "intervalMs": None}}


async def test_loaded_settings_are_a_copy() -> None:
    seed: dict[str, RawSettings] = {"c-1": {"enabled": True, "intervalMs": 1000}}
    store = MemoryStore(settings=seed)
    seed["c-1"]["enabled"] = False
    loaded = await store.load_settings()
    loaded["c-1"]["intervalMs"] = 1
    assert await store.load_settings() == {"c-1": {"enabled": True, "intervalMs": 1000}}


async def test_token_keeps_the_maximum() -> None:
    store = MemoryStore(token=10)
    assert await store.load_token() == 10
    await store.put_token(4)
    assert await store.load_token() == 10
    await store.put_token(12)
    assert await store.load_token() == 12


async def test_open_and_close_are_tracked() -> None:
    store = MemoryStore()
    assert not store.is_open
    await store.open()
    assert store.is_open
    await store.close()
    assert not store.is_open


async def test_fail_next_fails_that_many_calls_and_changes_nothing() -> None:
    store = MemoryStore(token=3)
    await store.put_settings("c-1", True, 1000)
    store.fail_next = 2
    with pytest.raises(StoreError):
        await store.put_settings("c-1", False, 9000)
    with pytest.raises(StoreError):
        await store.put_token(99)
    assert store.fail_next == 0
    assert await store.load_settings() == {"c-1": {"enabled": True, "intervalMs": 1000}}
    assert await store.load_token() == 3


async def test_failing_fails_every_call_until_cleared() -> None:
    store = MemoryStore()
    store.failing = True
    with pytest.raises(StoreError):
        await store.open()
    with pytest.raises(StoreError):
        await store.load_settings()
    with pytest.raises(StoreError):
        await store.load_token()
    with pytest.raises(StoreError):
        await store.put_settings("c-1", True, 1000)
    await store.close()  # closing never fails
    store.failing = False
    await store.put_settings("c-1", True, 1000)
    assert await store.load_settings() == {"c-1": {"enabled": True, "intervalMs": 1000}}
