"""Publishers that do not set the ``conversation-id`` header still reach the owner.

Commands, lifecycle events and the orchestrator's completions all go out without the
header; whichever replica consumes one reroutes it to its conversation's shard. If any
reached a replica that does not own the conversation, its replies would be that replica's
defaults (disabled, never warmed) and its completions would leave warms unanswered (a warm
timeout, then retries and a pause), so: every conversation keeps being warmed by one
replica, and ``get_state`` with and without the header gives the owner's state.
"""

from __future__ import annotations

import time

import pytest

from tests.replicas.conftest import INTERVAL_MS, Fleet, wait_warmed
from tests.replicas.orchestrator import Orchestrator
from tests.replicas.requester import Requester
from tests.replicas.schedules import between, doubles, owners

pytestmark = [pytest.mark.broker]

SHARDS = 6


async def test_messages_without_the_header_reach_the_owner(
    fleet: Fleet, redis_store_url: str, requester: Requester
) -> None:
    conversations = [f"c-{n:03d}" for n in range(60)]
    replicas = [fleet.start(name, store=redis_store_url, shards=SHARDS) for name in "abc"]
    await fleet.wait_owned(replicas, timeout=30, least=1)
    orchestrator = await Orchestrator.start(fleet.broker, fleet.namespace, headers=False)
    try:
        opted = time.time() * 1000
        await requester.opt_in(conversations, INTERVAL_MS, headers=False)
        await wait_warmed(orchestrator, conversations, opted, timeout=10)
        steady = time.time() * 1000
        # Three more rounds: each needed the completion before it to reach the owner.
        for _ in range(3):
            await wait_warmed(orchestrator, conversations, time.time() * 1000, timeout=5)
        window = between(orchestrator.warms, steady, time.time() * 1000)
        assert all(len(who) == 1 for who in owners(window).values()), owners(window)
        assert [str(d) for d in doubles(orchestrator.warms, INTERVAL_MS)] == []
        bare = await requester.states(conversations, headers=False)
        named = await requester.states(conversations, headers=True)
    finally:
        await orchestrator.close()
    for cid in conversations:
        for state in (bare[cid], named[cid]):
            assert (state["enabled"], state["intervalMs"]) == (True, INTERVAL_MS), (cid, state)
            assert state["lastWarmAt"] is not None, (cid, state)
            assert state["status"] in ("armed", "warming"), (cid, state)
        assert bare[cid]["lastWarmAt"] <= named[cid]["lastWarmAt"], cid
