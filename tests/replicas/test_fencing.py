"""Fencing: a replica whose broker path goes silent while its store stays reachable commits
nothing once the others have taken its shards.

Its connection goes through a TCP proxy that is blackholed: nothing is forwarded and
nothing is closed, so the replica learns of it only from missed heartbeats (2 s here,
noticed within about 3 heartbeats plus 3 s), while the broker drops the connection after
its own missed heartbeats and with it the replica's exclusive consumers. Between the two
the replica still runs its shards' timers against a Redis it still reaches: the store's
epoch must refuse what it commits then, and no warm of its may come out after the takeover.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.reliability.tcp_proxy import TcpProxy
from tests.replicas.conftest import INTERVAL_MS, Fleet, wait_warmed
from tests.replicas.orchestrator import Orchestrator
from tests.replicas.requester import Requester
from tests.replicas.schedules import doubles
from warmer.store.base import Owner

pytestmark = [pytest.mark.broker, pytest.mark.skip(reason="needs the sharded worker")]

SHARDS = 6


async def store_owners(url: str) -> dict[int, Owner]:
    """Who the store says took each shard last."""
    # Imported here: open_shared lands with the sharded worker, and this module must still
    # be collected (and skipped) before it does.
    from warmer.store import open_shared  # type: ignore[attr-defined,unused-ignore]

    shared = open_shared(url, timeout_ms=2000)
    await shared.open()
    try:
        return {owner.shard: owner for owner in await shared.owners()}
    finally:
        await shared.close()


async def test_a_replica_cut_from_the_broker_commits_nothing_after_the_takeover(
    fleet: Fleet,
    redis_store_url: str,
    proxy: TcpProxy,
    orchestrator: Orchestrator,
    requester: Requester,
) -> None:
    conversations = [f"c-{n:03d}" for n in range(150)]
    r1 = fleet.start("r1", store=redis_store_url, shards=SHARDS)
    r2 = fleet.start("r2", store=redis_store_url, shards=SHARDS)
    r3 = fleet.start(
        "r3",
        store=redis_store_url,
        shards=SHARDS,
        WARMER_AMQP_URL=proxy.url(fleet.broker),
        WARMER_HEARTBEAT_S="2",
    )
    await fleet.wait_owned([r1, r2, r3], timeout=30, least=1)
    opted = time.time() * 1000
    await requester.opt_in(conversations, INTERVAL_MS)
    await wait_warmed(orchestrator, conversations, opted, timeout=10)
    await wait_warmed(orchestrator, conversations, time.time() * 1000, timeout=10)
    cut_shards = r3.owned()
    r3_epochs = {int(e["shard"]): int(e["epoch"]) for e in r3.process.named("shard_gained")}
    r3_conversations = {w.conversation for w in orchestrator.warms if w.replica == "r3"}
    assert r3_conversations

    proxy.blackhole()
    cut = time.time() * 1000
    await fleet.wait_owned([r1, r2], timeout=40)
    takeover = time.time() * 1000
    owners = await store_owners(redis_store_url)
    for shard in cut_shards:
        assert owners[shard].replica in ("r1", "r2"), owners[shard]
        assert owners[shard].epoch > r3_epochs[shard], (owners[shard], r3_epochs[shard])

    # r3 lives on and reaches Redis: whatever its timers fire now must land nowhere.
    assert r3.alive()
    await wait_warmed(orchestrator, sorted(r3_conversations), takeover, timeout=10)
    await asyncio.sleep(3 * INTERVAL_MS / 1000)
    late = [w for w in orchestrator.warms if w.replica == "r3" and w.received_ms > takeover]
    assert late == []
    assert await store_owners(redis_store_url) == owners
    while r3.owned():  # it learns of the cut from its heartbeats, and lets go
        assert time.time() * 1000 - cut < 20_000, f"r3 still holds {r3.owned()}"
        await asyncio.sleep(0.2)
    fenced = [e for e in r3.process.events() if "fenced" in str(e.get("event"))]
    print(
        f"\nblackholed r3 (shards {sorted(cut_shards)}): held by r1 and r2 after "
        f"{(takeover - cut) / 1000:.1f} s; r3 let go: "
        f"{[(e['shard'], e['reason']) for e in r3.process.named('shard_lost')]}; "
        f"fenced lines of r3: {len(fenced)}"
    )
    assert [str(d) for d in doubles(orchestrator.warms, INTERVAL_MS)] == []
