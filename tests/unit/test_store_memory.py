"""MemoryStore: the Store contract in dicts (see test_store_contract), and switches that fail it."""

from __future__ import annotations

import pytest

from warmer.store import (
    Loaded,
    MemoryShared,
    MemoryStore,
    RawSettings,
    Store,
    StoreError,
    StoreLost,
    StoreOutcomeUnknown,
)


def test_satisfies_the_store_protocol() -> None:
    store: Store = MemoryStore()
    assert isinstance(store, MemoryStore)


async def test_what_was_committed_is_visible_in_its_attributes() -> None:
    store = MemoryStore()
    await store.commit({"c-1": b"one", "c-2": b"two"}, 4)
    await store.commit({"c-2": None}, 2)
    assert store.records == {"c-1": b"one"}
    assert store.token == 4


async def test_seeded_state_loads_back() -> None:
    store = MemoryStore(
        {"old": {"enabled": "yes", "intervalMs": None}}, token=9, records={"c-1": b"one"}
    )
    assert await store.load() == Loaded(
        records={"c-1": b"one"},
        settings={"old": {"enabled": "yes", "intervalMs": None}},
        token=9,
    )


async def test_legacy_settings_load_only_for_ids_without_a_record() -> None:
    store = MemoryStore(
        {"both": {"enabled": True}, "old": {"enabled": False}}, records={"both": b"new"}
    )
    assert (await store.load()).settings == {"old": {"enabled": False}}


async def test_a_commit_for_an_id_removes_its_legacy_settings() -> None:
    store = MemoryStore({"put": {"enabled": True}, "deleted": {}, "kept": {}})
    await store.commit({"put": b"record", "deleted": None}, 1)
    assert store.settings == {"kept": {}}
    assert await store.load() == Loaded(records={"put": b"record"}, settings={"kept": {}}, token=1)


async def test_loaded_state_is_a_copy() -> None:
    seed: dict[str, RawSettings] = {"c-1": {"enabled": True, "intervalMs": 1000}}
    store = MemoryStore(seed, records={"c-2": b"two"})
    seed["c-1"]["enabled"] = False
    loaded = await store.load()
    loaded.settings["c-1"]["intervalMs"] = 1
    loaded.records["c-3"] = b"three"
    assert await store.load() == Loaded(
        records={"c-2": b"two"}, settings={"c-1": {"enabled": True, "intervalMs": 1000}}, token=0
    )


async def test_open_and_close_are_tracked() -> None:
    store = MemoryStore()
    assert not store.is_open
    await store.open()
    assert store.is_open
    await store.close()
    assert not store.is_open


async def test_fail_next_fails_that_many_calls_and_changes_nothing() -> None:
    store = MemoryStore({"old": {}}, token=3)
    await store.commit({"c-1": b"one"}, 3)
    store.fail_next = 2
    with pytest.raises(StoreError):
        await store.commit({"c-1": b"two", "old": b"new"}, 99)
    with pytest.raises(StoreError):
        await store.load()
    assert store.fail_next == 0
    assert await store.load() == Loaded(records={"c-1": b"one"}, settings={"old": {}}, token=3)


async def test_failing_fails_every_call_until_cleared() -> None:
    store = MemoryStore()
    store.failing = True
    with pytest.raises(StoreError):
        await store.open()
    with pytest.raises(StoreError):
        await store.load()
    with pytest.raises(StoreError):
        await store.commit({"c-1": b"one"}, 1)
    await store.close()  # closing never fails
    assert store.records == {}
    assert store.token == 0
    store.failing = False
    await store.commit({"c-1": b"one"}, 1)
    assert await store.load() == Loaded(records={"c-1": b"one"}, settings={}, token=1)


async def test_a_refused_commit_does_not_use_up_a_failure() -> None:
    store = MemoryStore()
    store.fail_next = 1
    with pytest.raises(ValueError):
        await store.commit({}, -1)
    assert store.fail_next == 1


async def test_a_view_of_a_shared_store_has_the_same_switches() -> None:
    shared = MemoryShared()
    view = shared.shard(2, "a")
    await view.open()
    await view.commit({"c-1": b"one"}, 1)
    view.fail_next = 1
    with pytest.raises(StoreError):
        await view.commit({"c-1": b"two"}, 2)
    view.unknown_next, view.unknown_lands = 1, False
    with pytest.raises(StoreOutcomeUnknown):
        await view.commit({"c-1": b"three"}, 3)
    assert await view.load() == Loaded(records={"c-1": b"one"}, settings={}, token=1)
    assert shared.views == [view]
    shared.lose()
    with pytest.raises(StoreLost):
        await view.check()


async def test_legacy_settings_belong_to_shard_0() -> None:
    store = MemoryStore({"old": {"enabled": True}})
    assert (await store.load()).settings == {"old": {"enabled": True}}
    other = MemoryStore(data=store._data, shard=1, replica="a")
    assert (await other.load()).settings == {}
