"""The worker's start against a store that loses its data between load and first commit."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from structlog.testing import capture_logs

from warmer.app import RECOVERY_CHUNK, RESTORE_AT_START_PAUSE_MS, App
from warmer.clock import ManualClock
from warmer.config import Config
from warmer.core.gaps import MODEL_KEY
from warmer.core.records import decode_record, encode_record
from warmer.core.state import Conversation, Record, Settings
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


async def test_a_large_recovery_is_committed_in_chunks_each_sent_again_until_known() -> None:
    # After a long pause recovery touches every record: in one commit, Redis would run one
    # script past WARMER_STORE_TIMEOUT_MS and the start would fail at every start.
    count = 2 * RECOVERY_CHUNK + 5
    paused = Record(
        settings=Settings(enabled=True),
        state=Conversation(
            enabled=True, interval_ms=240_000, last_input_at=1_000, idle_since=1_000
        ),
    )
    store = MemoryStore(records={f"c-{n}": encode_record(paused) for n in range(count)})
    sizes: list[int] = []
    commit = store.commit

    async def noted(changes: Mapping[str, bytes | None], token: int) -> None:
        sizes.append(len(changes))
        await commit(changes, token)

    store.commit = noted  # type: ignore[method-assign]
    store.unknown_next, store.unknown_lands = 1, False  # the first chunk's answer is lost
    clock = ManualClock(10 * 3_600_000)
    app = App(Config(store="memory://"), clock=clock)
    app.store = store
    with capture_logs() as logs:
        recovering = asyncio.ensure_future(app._recovered_core())
        while not recovering.done():  # the pause before the chunk is sent again
            await asyncio.sleep(0)
            clock.advance(RESTORE_AT_START_PAUSE_MS)
        await recovering
    assert max(sizes) == RECOVERY_CHUNK
    assert sizes[0] == sizes[1] == RECOVERY_CHUNK  # the first chunk sent again
    assert sum(sizes) - sizes[0] >= count  # every record was committed
    assert [log["event"] for log in logs].count("recovery_commit_retrying") == 1
    state = decode_record(store.records["c-0"]).state
    assert state is not None and state.last_input_at is not None
    assert state.last_input_at > 1_000  # the pause was written (decision 83)
