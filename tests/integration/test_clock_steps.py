"""The wall clock stepped under a running worker, over the real broker.

The worker's ``SystemClock`` reads a wall clock the test moves (10 minutes back, then
8 days ahead) while a conversation is warmed every second and its warms are answered.
Before: a step back stopped every warm until the wall came back; a step forward made
every conversation ``budget_exhausted``. Now warms go on at their cadence, no status
turns ``budget_exhausted`` or ``expired``, and each step is logged and counted.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.integration.probe import Listener, Probe
from warmer.app import App
from warmer.clock import SystemClock

pytestmark = pytest.mark.broker

TEN_MINUTES = 600_000
EIGHT_DAYS = 8 * 86_400_000
USAGE = {"inputTokens": 50_000, "cacheReadTokens": 49_000, "cacheWriteTokens": 1_000}


class SteppedWall:
    """The real wall clock, moved by ``offset_ms``."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def ns(self) -> int:
        return time.time_ns() + self.offset_ms * 1_000_000

    def ms(self) -> int:
        return self.ns() // 1_000_000


class Orchestrator:
    """Answers every warm request at once; notes when each came (monotonic seconds)."""

    def __init__(self, probe: Probe, warms: Listener) -> None:
        self.probe = probe
        self.warms = warms
        self.came: list[float] = []

    async def run(self) -> None:
        while True:
            body = await self.warms.next_body(30)
            self.came.append(time.monotonic())
            completion = {"type": "warm.completed", "conversationId": body["conversationId"]}
            await self.probe.event({**completion, "token": body["token"], "usage": USAGE})

    async def warms_after(self, count: int, timeout: float = 10.0) -> list[float]:
        """Wait for ``count`` more warms; the gaps between them and the one before."""
        start = len(self.came)
        deadline = time.monotonic() + timeout
        while len(self.came) < start + count:
            assert time.monotonic() < deadline, f"{len(self.came) - start} of {count} warms"
            await asyncio.sleep(0.05)
        times = self.came[max(start - 1, 0) : start + count]
        return [later - earlier for earlier, later in itertools.pairwise(times)]


async def steps_counted(app: App, count: int) -> None:
    deadline = time.monotonic() + 5
    while app.metrics.value("warmer_clock_steps_total") != count:
        assert time.monotonic() < deadline, "the step was not counted"
        await asyncio.sleep(0.05)


async def test_warms_keep_their_cadence_when_the_wall_clock_steps_back_and_forward(
    probe: Probe, start_worker: Any
) -> None:
    wall = SteppedWall()
    app = await start_worker(clock=SystemClock(wall_ns=wall.ns), idle_max_warms=1_000)
    warms = await probe.warms()
    surfaces = await probe.surfaces()
    orchestrator = Orchestrator(probe, warms)
    answering = asyncio.get_running_loop().create_task(orchestrator.run())

    async def settle(cid: str, **fields: Any) -> None:
        body = {"type": "turn.settled", "conversationId": cid, **fields}
        await probe.event({**body, "lastRequestAt": wall.ms() - 500})

    async def settle_with_a_known_lifetime() -> None:
        """Stamped on the stepped wall: its request 0.5 s ago, not 10 min (``expired``)."""
        await settle("t", cacheTtlS=300)
        update = await surfaces.until(lambda body: body["conversationId"] == "t")
        assert update["state"]["status"] == "armed"
        due = update["state"]["nextWarmAt"] - app.clock.now_ms()
        assert 230_000 < due <= 240_000  # the lifetime less the margin, from the request

    try:
        for command in (
            {"type": "set_enabled", "conversationId": "c", "enabled": True},
            {"type": "set_interval", "conversationId": "c", "intervalMs": 1_000},
            {"type": "set_enabled", "conversationId": "t", "enabled": True},
        ):
            assert (await probe.command(command))["ok"] is True
        await settle("c")
        await orchestrator.warms_after(2)
        with capture_logs() as logs:
            wall.offset_ms = -TEN_MINUTES
            gaps = await orchestrator.warms_after(3)
            await steps_counted(app, 1)
            await settle_with_a_known_lifetime()
            gaps += await orchestrator.warms_after(3)
            wall.offset_ms = EIGHT_DAYS
            gaps += await orchestrator.warms_after(3)
            await steps_counted(app, 2)
            await settle_with_a_known_lifetime()
            gaps += await orchestrator.warms_after(3)
    finally:
        answering.cancel()
    assert all(gap < 2.5 for gap in gaps), gaps  # every second, give or take a round trip
    stepped = [entry for entry in logs if entry["event"] == "clock_stepped"]
    assert [round(entry["step_ms"], -4) for entry in stepped] == [
        -TEN_MINUTES,
        EIGHT_DAYS + TEN_MINUTES,
    ]
    assert stepped[-1]["log_level"] == "warning"
    assert abs(app.metrics.value("warmer_clock_offset_seconds") - EIGHT_DAYS / 1000) < 2
    statuses = set()
    while True:
        try:
            statuses.add((await surfaces.next_body(0.2))["state"]["status"])
        except AssertionError:
            break
    assert statuses <= {"idle", "armed", "warming"}, statuses


async def test_a_restart_after_a_step_back_goes_on_from_the_stored_schedules(
    probe: Probe, start_worker: Any
) -> None:
    """The stored due times are on the stepped-over line, 10 min ahead of the wall: the next
    worker goes on from them (``clock_resumed``) instead of waiting 10 min for each."""
    wall = SteppedWall()
    first = await start_worker(clock=SystemClock(wall_ns=wall.ns), idle_max_warms=1_000)
    orchestrator = Orchestrator(probe, await probe.warms())
    answering = asyncio.get_running_loop().create_task(orchestrator.run())
    try:
        for command in (
            {"type": "set_enabled", "conversationId": "c", "enabled": True},
            {"type": "set_interval", "conversationId": "c", "intervalMs": 1_000},
        ):
            assert (await probe.command(command))["ok"] is True
        await probe.event({"type": "turn.settled", "conversationId": "c"})
        await orchestrator.warms_after(1)
        wall.offset_ms = -TEN_MINUTES
        await orchestrator.warms_after(2)
        await first.stop()
        with capture_logs() as logs:
            second = await start_worker(clock=SystemClock(wall_ns=wall.ns))
        gaps = await orchestrator.warms_after(3)
    finally:
        answering.cancel()
    assert all(gap < 3.5 for gap in gaps), gaps  # the first one across the restart
    resumed = [entry for entry in logs if entry["event"] == "clock_resumed"]
    assert len(resumed) == 1 and round(resumed[0]["ahead_ms"], -4) == TEN_MINUTES
    assert abs(second.clock.now_ms() - wall.ms() - TEN_MINUTES) < 1_000
