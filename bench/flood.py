"""Overload, briefly: one replica, K conversations at a 1 s interval, commands timed.

A short reproduction of the overload target of issue 17 (not ``make bench``'s module):
the simulated orchestrator of ``bench.replicas`` answers every warm, one replica
(``WARMER_SHARDS=1``, SQLite) warms K conversations at 1 s for ``--seconds``, while a
person-sized stream of commands (``get_state`` and a no-op ``set_enabled true``, 50 a
second, open loop) is timed reply by reply. Printed: warms requested and completed, warms
failed by cause, conversations paused, the replica's warning lines (by event), the
commands' p50/p99/max, and the worker's behind gauge at the end.

``python -m bench.flood [--k 3000] [--seconds 60]``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import tempfile
import time
from pathlib import Path

import aio_pika
import aiohttp

import bench.replicas as replicas
from tests.replicas.requester import Requester
from warmer.bus.topology import Names

COMMANDS_PER_S = 50


async def _metrics(port: int) -> dict[str, float]:
    found: dict[str, float] = {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        for line in (await response.text()).splitlines():
            if line.startswith("warmer_") and " " in line:
                name, value = line.rsplit(" ", 1)
                found[name] = float(value)
    return found


async def _probe(requester: Requester, ids: list[str], until: float, took: list[float]) -> int:
    """Commands, open loop, each timed alone; how many were not answered in 30 s."""
    rng = random.Random(7)
    tasks: list[asyncio.Task[None]] = []
    missing = 0

    async def one(body: dict[str, object]) -> None:
        nonlocal missing
        started = time.monotonic()
        try:
            await requester.commands([body], timeout=30.0)
        except AssertionError:
            missing += 1
            return
        took.append(time.monotonic() - started)

    while time.monotonic() < until:
        cid = rng.choice(ids)
        body: dict[str, object] = (
            {"type": "get_state", "conversationId": cid}
            if rng.random() < 0.5
            else {"type": "set_enabled", "conversationId": cid, "enabled": True}
        )
        tasks.append(asyncio.create_task(one(body)))
        await asyncio.sleep(1 / COMMANDS_PER_S)
    await asyncio.gather(*tasks)
    return missing


async def _depths(namespace: str, until: float) -> list[int]:
    """The worker's lifecycle queue's ready messages, sampled every 0.5 s."""
    found: list[int] = []
    connection = await aio_pika.connect(replicas.AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = Names.of(namespace).shard_queues(0)[0]
        while time.monotonic() < until:
            declared = await channel.declare_queue(queue, passive=True)
            found.append(declared.declaration_result.message_count or 0)
            await asyncio.sleep(0.5)
    return found


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def flood(k: int, seconds: float) -> dict[str, object]:
    replicas.SHARDS = 1  # type: ignore[misc]  # one shard: the whole load on one pipeline
    namespace = f"bench-flood-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as name:
        directory = Path(name)
        # SQLite (one replica): the shared Redis of this machine is other benches' too.
        store = f"sqlite:///{directory / 'flood.db'}"
        orchestrator = replicas.Orchestrator(namespace, directory)
        replica: replicas.Replica | None = None
        try:
            await orchestrator.ready()
            replica = replicas.Replica("r1", namespace, store, directory)
            await replicas._balanced([replica])
            requester = await Requester.connect(replicas.AMQP_URL, namespace)
            ids = replicas.conversation_ids(k, 1)
            try:
                await replicas.opt_in(requester, ids)
                lines_before = len(replica.log.read_text().splitlines())
                before = await _metrics(replica.port)
                took: list[float] = []
                until = time.monotonic() + seconds
                depths = asyncio.create_task(_depths(namespace, until))
                missing = await _probe(requester, ids, until, took)
                depth = await depths
                after = await _metrics(replica.port)
            finally:
                await requester.close()
            lines = replica.log.read_text().splitlines()[lines_before:]
            events: collections.Counter[str] = collections.Counter()
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    events["(not json)"] += 1
                    continue
                if record.get("level") in ("warning", "error", "critical"):
                    events[str(record.get("event"))] += 1
            d = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
            return {
                "k": k,
                "seconds": seconds,
                "warms_requested": d.get("warmer_warms_requested_total", 0),
                "warms_completed": d.get("warmer_warms_completed_total", 0),
                "warms_failed": {
                    key.split('"')[1]: value
                    for key, value in d.items()
                    if key.startswith("warmer_warms_failed_total{") and value
                },
                "timeouts_extended": d.get("warmer_warm_timeouts_extended_total", 0),
                "lifecycle_queue_depth_max": max(depth, default=0),
                "lifecycle_queue_depth_mean": round(sum(depth) / max(len(depth), 1)),
                "paused_at_end": after.get('warmer_conversations{status="paused"}', 0),
                "warning_lines": sum(events.values()),
                "warning_lines_by_event": dict(events.most_common()),
                "commands": len(took) + missing,
                "commands_unanswered": missing,
                "command_p50_s": round(_pct(took, 0.5), 3),
                "command_p99_s": round(_pct(took, 0.99), 3),
                "command_max_s": round(max(took, default=float("nan")), 3),
                "behind_s_at_end": after.get("warmer_behind_seconds", float("nan")),
                "timer_late_mean_ms": round(
                    d.get("warmer_timer_lateness_seconds_sum", 0)
                    / max(d.get("warmer_timer_lateness_seconds_count", 0), 1)
                    * 1000,
                    1,
                ),
            }
        finally:
            orchestrator.kill()
            if replica is not None:
                replica.stop()
            await replicas._clean(namespace)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flood")
    parser.add_argument("--k", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(flood(args.k, args.seconds)), indent=1))


if __name__ == "__main__":
    main()
