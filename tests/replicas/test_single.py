"""The replica harness against today's worker: one process, WARMER_SHARDS unset, Redis.

300 conversations warmed every second by one worker; SIGKILL it and start it again: each
conversation is warmed again within a bound, no schedule twice, no setting lost. This is
the replica tests' measure of a takeover with nobody to take over but the restart.
"""

from __future__ import annotations

import time

import pytest

from tests.replicas.conftest import INTERVAL_MS, Fleet, wait_warmed
from tests.replicas.orchestrator import Orchestrator
from tests.replicas.requester import Requester
from tests.replicas.schedules import between, doubles, first_warms_after

pytestmark = pytest.mark.broker

CONVERSATIONS = [f"c-{n:03d}" for n in range(300)]


async def test_a_killed_worker_restarted_warms_every_schedule_again_once(
    fleet: Fleet, redis_store_url: str, orchestrator: Orchestrator, requester: Requester
) -> None:
    worker = fleet.start("w1", store=redis_store_url)
    await worker.wait_ready()
    opted = time.time() * 1000
    await requester.opt_in(CONVERSATIONS, INTERVAL_MS)
    first = await wait_warmed(orchestrator, CONVERSATIONS, opted, timeout=10)
    steady = time.time() * 1000
    await wait_warmed(orchestrator, CONVERSATIONS, steady + INTERVAL_MS, timeout=10)

    worker.kill()
    killed = time.time() * 1000
    fleet.restart(worker)
    await wait_warmed(orchestrator, CONVERSATIONS, killed, timeout=20)
    after = first_warms_after(orchestrator.warms, CONVERSATIONS, killed)
    delays = sorted(w.received_ms - killed for w in after.values())
    worst = delays[-1]
    rate = len(between(orchestrator.warms, steady, killed)) / (killed - steady) * 1000
    print(
        f"\nfirst warms {first:.1f} s after opt-in; {rate:.0f} warms/s steady; after SIGKILL "
        f"and a restart at once, warmed again after {delays[0] / 1000:.1f} s (first), "
        f"{delays[len(delays) // 2] / 1000:.1f} s (median), {worst / 1000:.1f} s (worst)"
    )
    assert worst <= 15_000

    await wait_warmed(orchestrator, CONVERSATIONS, time.time() * 1000, timeout=10)
    assert [str(d) for d in doubles(orchestrator.warms, INTERVAL_MS)] == []
    states = await requester.states(CONVERSATIONS)
    assert {(s["enabled"], s["intervalMs"]) for s in states.values()} == {(True, INTERVAL_MS)}
