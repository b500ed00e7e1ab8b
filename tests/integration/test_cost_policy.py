"""The cost policy over the real broker (issue 11), on a hand-driven clock.

A 1-hour cache is warmed once an hour, not every 4 minutes; a warm that would land after
the cache expired is never requested.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.probe import Probe
from warmer.clock import ManualClock
from warmer.core import MODEL_KEY, GapModel
from warmer.core.gaps import PRIOR_ABANDONED, PRIOR_GAPS
from warmer.store import open_store

pytestmark = pytest.mark.broker

MINUTE = 60_000
HOUR = 60 * MINUTE


async def test_a_one_hour_cache_is_warmed_once_an_hour_and_a_dead_one_never(
    probe: Probe, start_worker: Any
) -> None:
    clock = ManualClock(time.time_ns() // 1_000_000)
    # A three-hour idle budget: the 45-minute default ends before the hour does.
    await start_worker(clock=clock, idle_max_ms=3 * HOUR)
    warms = await probe.warms()
    surfaces = await probe.surfaces()
    t0 = clock.now_ms()
    for cid in ("hour", "dead", "late"):
        await probe.command({"type": "set_enabled", "conversationId": cid, "enabled": True})
        await surfaces.until(lambda b, cid=cid: b["conversationId"] == cid)  # armed at 240 s

    # The hour: armed for 59 minutes (the 1-minute margin), whatever the 240 s interval.
    await probe.event(
        {"type": "turn.settled", "conversationId": "hour", "cacheTtlS": 3600, "lastRequestAt": t0}
    )
    hour = await surfaces.until(lambda b: b["conversationId"] == "hour")
    assert hour["state"]["status"] == "armed"
    assert hour["state"]["nextWarmAt"] == t0 + HOUR - MINUTE
    shown = {f["label"]: f["value"] for f in hour["spec"]["fields"] if f["kind"] == "stat"}
    assert shown["Effective interval"] == "59 min (for the 1 h cache)"

    # The dead: its last request 400 s ago, its cache 300 s long: expired, never warmed.
    await probe.event(
        {
            "type": "turn.settled",
            "conversationId": "dead",
            "cacheTtlS": 300,
            "lastRequestAt": t0 - 400_000,
        }
    )
    dead = await surfaces.until(lambda b: b["conversationId"] == "dead")
    assert (dead["state"]["status"], dead["state"]["nextWarmAt"]) == ("expired", None)

    # The late: armed at 240 s; its timer fires only at 400 s (a stalled host).
    await probe.event(
        {"type": "turn.settled", "conversationId": "late", "cacheTtlS": 300, "lastRequestAt": t0}
    )
    late = await surfaces.until(lambda b: b["conversationId"] == "late")
    assert late["state"]["nextWarmAt"] == t0 + 4 * MINUTE

    # Four-minute steps through the hour: the late one expires, nobody is warmed.
    clock.set(t0 + 400_000)
    late = await surfaces.until(lambda b: b["conversationId"] == "late")
    assert late["state"]["status"] == "expired"
    for minutes in range(8, 57, 4):
        clock.set(t0 + minutes * MINUTE)
    await warms.nothing(within=1.0)

    # At 59 minutes the hour's one warm goes out.
    clock.set(t0 + HOUR - MINUTE)
    warm = await warms.next_body(5)
    assert warm["conversationId"] == "hour" and warm["requestedAt"] == t0 + HOUR - MINUTE
    await warms.nothing(within=0.5)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each back end in turn: a SQLite file of its own, or a Redis prefix of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'learned.db'}"
    return str(request.getfixturevalue("redis_store_url"))


async def _stored_model(url: str) -> GapModel | None:
    store = open_store(url)
    await store.open()
    try:
        raw = (await store.load()).records.get(MODEL_KEY)
    finally:
        await store.close()
    return None if raw is None else GapModel.decode(raw)


async def test_what_the_worker_learned_of_idle_gaps_survives_a_restart(
    probe: Probe, start_worker: Any, store_url: str
) -> None:
    async def gap(cid: str) -> None:
        await probe.event({"type": "turn.settled", "conversationId": cid})
        await probe.event({"type": "turn.started", "conversationId": cid})
        await surfaces.until(lambda b: b["conversationId"] == cid and b["state"]["active"])

    surfaces = await probe.surfaces()
    app = await start_worker(store=store_url)
    await gap("a")
    await probe.event({"type": "turn.settled", "conversationId": "b"})
    await probe.event({"type": "conversation.closed", "conversationId": "b"})  # abandoned
    await surfaces.until(lambda b: b["conversationId"] == "b" and not b["state"]["enabled"])
    await app.stop()
    learned = await _stored_model(store_url)
    assert learned is not None and learned.seen == 2
    # One gap came back, one was abandoned (the close): both are in the stored model.
    assert learned.abandoned_share == pytest.approx(
        (PRIOR_GAPS * PRIOR_ABANDONED + 1) / (PRIOR_GAPS + 2)
    )
    assert learned.survival(60_000) < GapModel().survival(60_000)

    app = await start_worker(store=store_url)  # learns on from there
    await gap("c")
    await app.stop()
    again = await _stored_model(store_url)
    assert again is not None and again.seen == 3
