"""S = 1 fails over too: of two replicas one holds the only shard, the other stands by and
takes over within seconds of a SIGKILL, warming every schedule again once, losing none.
"""

from __future__ import annotations

import time

import pytest

from tests.replicas.conftest import INTERVAL_MS, Fleet, wait_warmed
from tests.replicas.orchestrator import Orchestrator
from tests.replicas.requester import Requester
from tests.replicas.schedules import doubles, first_warms_after, overlaps

pytestmark = [pytest.mark.broker]

TAKEOVER_BOUND_MS = 10_000


async def test_a_hot_standby_takes_over_the_only_shard(
    fleet: Fleet, redis_store_url: str, orchestrator: Orchestrator, requester: Requester
) -> None:
    conversations = [f"c-{n:03d}" for n in range(100)]
    active = fleet.start("active", store=redis_store_url, shards=1)
    await fleet.wait_owned([active], timeout=30)
    standby = fleet.start("standby", store=redis_store_url, shards=1)
    await standby.wait_ready()
    assert standby.owned() == set(), "the standby took the shard its peer holds"
    opted = time.time() * 1000
    await requester.opt_in(conversations, INTERVAL_MS)
    await wait_warmed(orchestrator, conversations, opted, timeout=10)
    assert {w.replica for w in orchestrator.warms} == {"active"}

    active.kill()
    killed = time.time() * 1000
    await fleet.wait_owned([standby], timeout=20)
    await wait_warmed(orchestrator, conversations, killed, timeout=20)
    first = first_warms_after(orchestrator.warms, conversations, killed)
    delays = sorted(w.received_ms - killed for w in first.values())
    print(
        f"\nS = 1, SIGKILL of the active replica: the standby warmed its conversations again "
        f"after {delays[0] / 1000:.1f} s (first), {delays[-1] / 1000:.1f} s (worst)"
    )
    assert {w.replica for w in first.values()} == {"standby"}
    assert delays[-1] <= TAKEOVER_BOUND_MS
    assert [str(d) for d in doubles(orchestrator.warms, INTERVAL_MS)] == []
    assert overlaps(fleet.tenures(), slack_ms=250) == []
    states = await requester.states(conversations)
    assert {(s["enabled"], s["intervalMs"]) for s in states.values()} == {(True, INTERVAL_MS)}
