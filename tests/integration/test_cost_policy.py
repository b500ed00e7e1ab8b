"""The cost policy over the real broker (issue 11), on a hand-driven clock.

A 1-hour cache is warmed once an hour, not every 4 minutes; a warm that would land after
the cache expired is never requested.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.probe import Probe
from warmer.clock import ManualClock

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
