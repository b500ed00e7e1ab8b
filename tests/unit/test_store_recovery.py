"""The worker's start against a store that loses its data between load and first commit."""

from __future__ import annotations

from structlog.testing import capture_logs

from warmer.app import App
from warmer.config import Config
from warmer.core.gaps import MODEL_KEY
from warmer.core.records import decode_record, encode_record
from warmer.core.state import Record, Settings
from warmer.store import Loaded, MemoryStore


async def test_a_store_lost_after_it_was_read_is_given_everything_again_at_start() -> None:
    enabled = Record(settings=Settings(enabled=True))
    store = MemoryStore(records={cid: encode_record(enabled) for cid in ("a", "b")}, token=9)
    app = App(Config(store="memory://"))
    app.store = store
    read = store.load

    async def read_then_lose() -> Loaded:
        loaded = await read()
        store.lose()  # Redis restarted right after the worker read it
        return loaded

    store.load = read_then_lose  # type: ignore[method-assign]
    with capture_logs() as logs:
        core = await app._recovered_core()
    assert [log["event"] for log in logs].count("store_data_lost") == 1
    assert app.metrics.value("warmer_store_data_lost_total") == 1
    assert set(store.records) == {"a", "b", MODEL_KEY}
    assert decode_record(store.records["a"]).settings.enabled is True
    assert store.token == core.last_token >= 9
    await store.check()  # this writer's entry is there again
