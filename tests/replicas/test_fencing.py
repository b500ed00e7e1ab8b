"""Fencing: a replica cut from the broker while its store stays reachable lands nothing
once the others have taken its shards.

r3 reaches the broker through a TCP proxy; r1 and r2 directly; all share one Redis.

1. A silent partition: the proxy is blackholed (nothing forwarded, nothing closed). r3
   learns of it only from missed heartbeats (2 s here: about 3 heartbeats plus 3 s); it
   must then let its shards go, and the others must take them within a bound. No warm of
   r3's may come out after the takeover, and the store names the new owners.
2. A pause: r3 is stopped (SIGSTOP, as a long GC pause or a frozen VM) behind a blackholed
   proxy until the others have taken its shards, then woken with the path healed. It wakes
   believing it holds its shards, its timers overdue, its Redis reachable: what it commits
   then must be refused by the shard's epoch, what it publishes must not be a warm of a
   shard it does not hold, and it must come back as a fresh replica.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from msgspec.structs import replace

from tests.reliability.tcp_proxy import TcpProxy
from tests.replicas.conftest import (
    INTERVAL_MS,
    Fleet,
    Replica,
    latest_gains,
    shard_map,
    store_owners,
    wait_warmed,
)
from tests.replicas.orchestrator import Orchestrator
from tests.replicas.requester import Requester
from tests.replicas.schedules import doubles, outside_tenures

pytestmark = [pytest.mark.broker]

SHARDS = 6
TENURE_SLACK_MS = 250
PARTITION_TAKEOVER_BOUND_S = 25


async def owners_fence(store: str, shards: set[int], epochs: dict[int, int], cut: str) -> None:
    """The store names a replica other than ``cut`` as the owner of each of ``shards``,
    with an epoch above the one ``cut`` held it with."""
    owners = await store_owners(store)
    for shard in shards:
        assert owners[shard].replica != cut, owners[shard]
        assert owners[shard].epoch > epochs[shard], (owners[shard], epochs[shard])


def epochs_held(replica: Replica) -> dict[int, int]:
    """Shard -> the epoch of ``replica``'s last ``shard_gained`` for it."""
    gained = (e for e in replica.shard_lines() if e["event"] == "shard_gained")
    return {int(e["shard"]): int(e["epoch"]) for e in gained}


def lost(replica: Replica) -> list[dict[str, Any]]:
    """Its ``shard_lost`` lines so far."""
    return [e for e in replica.shard_lines() if e["event"] == "shard_lost"]


async def let_go(replica: Replica, since_ms: float, within_s: float) -> None:
    """Until ``replica`` holds no shard (its own lines say so)."""
    while held := replica.owned():
        assert time.time() * 1000 - since_ms < within_s * 1000, f"{replica.name} holds {held}"
        await asyncio.sleep(0.2)


async def test_a_replica_cut_from_the_broker_lands_nothing_after_the_takeover(
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

    # 1. A silent partition between r3 and the broker.
    held, epochs = r3.owned(), epochs_held(r3)
    proxy.blackhole()
    cut = time.time() * 1000
    await fleet.wait_owned([r1, r2], timeout=PARTITION_TAKEOVER_BOUND_S)
    takeover = time.time() * 1000
    await owners_fence(redis_store_url, held, epochs, "r3")
    assert r3.alive()
    await let_go(r3, cut, within_s=15)
    await wait_warmed(orchestrator, conversations, takeover, timeout=10)
    print(
        f"\npartition: r3's shards {sorted(held)} held by r1 and r2 "
        f"{(takeover - cut) / 1000:.1f} s after the cut; r3 let go: "
        f"{[(e['shard'], e['reason']) for e in lost(r3)]}"
    )
    proxy.restore()
    restored = time.time() * 1000
    await fleet.wait_owned([r1, r2, r3], timeout=30, least=1)

    # 2. r3 paused past the takeover, then woken with the path healed.
    held, epochs = r3.owned(), epochs_held(r3)
    lost_before = len(lost(r3))
    proxy.blackhole()
    r3.pause()
    paused = time.time() * 1000
    await fleet.wait_owned([r1, r2], timeout=PARTITION_TAKEOVER_BOUND_S)
    takeover = time.time() * 1000
    await owners_fence(redis_store_url, held, epochs, "r3")
    proxy.restore()
    r3.resume()
    # Balanced again (two shards each) before the clock starts: with one shard back, r3 may
    # still be taking its second from r1 or r2, a hand-over that takes seconds under load.
    await fleet.wait_owned([r1, r2, r3], timeout=30, least=SHARDS // 3)
    await wait_warmed(orchestrator, conversations, time.time() * 1000, timeout=10)
    woke = [(e["shard"], e["reason"]) for e in lost(r3)[lost_before:]]
    print(
        f"pause: r3's shards {sorted(held)} held by r1 and r2 "
        f"{(takeover - paused) / 1000:.1f} s after SIGSTOP; woken, r3 let go: {woke}"
    )
    assert {shard for shard, _ in woke} >= held

    # What r3 published into the partition never arrives, not even once the path healed.
    partitioned = [
        w for w in orchestrator.warms if w.replica == "r3" and cut < w.requested_at < restored
    ]
    assert partitioned == []
    assert [str(d) for d in doubles(orchestrator.warms, INTERVAL_MS)] == []
    # From its pause on, r3 held its old shards in name only: the others had taken them.
    tenures = [
        replace(t, end_ms=paused) if t.replica == "r3" and t.start_ms < paused < t.end_ms else t
        for t in fleet.tenures()
    ]
    shard_of = await shard_map(redis_store_url, SHARDS)
    assert outside_tenures(orchestrator.warms, tenures, shard_of, TENURE_SLACK_MS) == []
    owners = await store_owners(redis_store_url)
    assert {k: (o.replica, o.epoch) for k, o in owners.items()} == latest_gains(fleet.history)
