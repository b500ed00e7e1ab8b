"""Fixtures for replica tests: worker processes sharing a namespace and a store.

Each test gets a namespace of its own (``namespace``), a store of its own (a Redis key
prefix, ``redis_store_url``, or a PostgreSQL schema, ``postgres_store_url``), a simulated
orchestrator and a bulk requester; ``fleet`` starts ``warmer run`` processes on them. At the
end the processes are killed, then every queue and exchange of the namespace (sharded
topology included), the Redis keys and the schema are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from tests.integration.conftest import amqp_url, namespace  # noqa: F401  (fixtures)
from tests.reliability.conftest import (  # noqa: F401  (fixtures, used by name)
    WorkerProcess,
    proxy,
    spawn_worker,
    worker_settings,
)
from tests.replicas.orchestrator import Orchestrator
from tests.replicas.requester import Requester
from tests.replicas.schedules import Tenure, first_warms_after
from warmer.bus.topology import Names
from warmer.store.base import Owner

INTERVAL_MS = 1000


class Replica:
    """One ``warmer run`` process of a fleet, and the settings it was started with."""

    def __init__(self, name: str, settings: dict[str, str], process: WorkerProcess) -> None:
        self.name = name
        self.settings = settings
        self.process = process
        self.ended_ms: float | None = None
        """When the test killed it (wall-clock ms): what it held, it held until then."""
        self._read = 0
        self._shard_lines: list[dict[str, Any]] = []

    def owned(self) -> set[int]:
        """The shards this replica holds now, by its ``shard_gained``/``shard_lost`` lines."""
        return {tenure.shard for tenure in self.tenures() if tenure.end_ms == math.inf}

    def tenures(self) -> list[Tenure]:
        """Each time it held a shard, from its ``shard_gained`` line to its ``shard_lost``
        (or its kill; still open: to infinity)."""
        opened: dict[int, float] = {}
        found = []
        for event in self.shard_lines():
            shard, at = int(event["shard"]), _epoch_ms(event["timestamp"])
            start = opened.pop(shard, None)
            if event["event"] == "shard_gained":
                opened[shard] = at
            elif start is not None:
                found.append(Tenure(self.name, shard, start, at))
        end = math.inf if self.ended_ms is None else self.ended_ms
        found.extend(Tenure(self.name, shard, start, end) for shard, start in opened.items())
        return found

    def shard_lines(self) -> list[dict[str, Any]]:
        """Its ``shard_gained`` and ``shard_lost`` lines so far, decoded once each: a replica
        writes a line per warm, and these are read several times a second."""
        lines = self.process.lines
        for line in lines[self._read : len(lines)]:
            if '"shard_' in line:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") in ("shard_gained", "shard_lost"):
                        self._shard_lines.append(event)
            self._read += 1
        return self._shard_lines

    def kill(self) -> None:
        """SIGKILL, noting when."""
        self.process.kill()
        self.ended_ms = time.time() * 1000

    def pause(self) -> None:
        """SIGSTOP: the process stands still (a long GC pause, a frozen VM)."""
        os.kill(self.process.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        os.kill(self.process.process.pid, signal.SIGCONT)

    def alive(self) -> bool:
        return self.process.process.poll() is None

    async def http_port(self) -> int:
        """The port its ``/readyz`` is served on (its ``http_serving`` line)."""
        return int((await self.process.wait_event("http_serving", timeout=30))["port"])

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until ``/readyz`` answers 200."""
        url = f"http://127.0.0.1:{await self.http_port()}/readyz"
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
                    answer = await response.text()
                if time.monotonic() > deadline or not self.alive():
                    raise AssertionError(f"{self.name} not ready: {answer}\n{self.process.log()}")
                await asyncio.sleep(0.1)


class Fleet:
    """Starts replicas of one namespace; knows what to delete afterwards."""

    def __init__(
        self, broker: str, name: str, directory: Path, spawn: Callable[..., WorkerProcess]
    ) -> None:
        self.broker = broker
        self.namespace = name
        self.directory = directory
        self._spawn = spawn
        self.replicas: list[Replica] = []
        """The current process of each replica."""
        self.history: list[Replica] = []
        """Every process started, killed ones too."""
        self.shards = 1

    def start(self, name: str, store: str, shards: int | None = None, **more: str) -> Replica:
        """Start replica ``name`` on ``store``; ``shards=None`` leaves WARMER_SHARDS unset and
        gives no WARMER_REPLICA_ID (today's single worker)."""
        extra = dict(more)
        if shards is not None:
            self.shards = max(self.shards, shards)
            extra.setdefault("WARMER_SHARDS", str(shards))
            extra.setdefault("WARMER_REPLICA_ID", name)
        settings = worker_settings(
            self.broker,
            self.namespace,
            self.directory,
            WARMER_STORE=store,
            WARMER_HTTP="127.0.0.1:0",
            # Long enough that no conversation runs out of its idle budget within a test.
            WARMER_IDLE_MAX_WARMS="100000",
            **extra,
        )
        return self.restart(Replica(name, settings, self._spawn(**settings)))

    def restart(self, replica: Replica) -> Replica:
        """The same replica again (same settings) in a new process, replacing the old one."""
        if replica in self.replicas:
            if replica.ended_ms is None:
                replica.kill()
            replica = Replica(replica.name, replica.settings, self._spawn(**replica.settings))
        self.replicas = [r for r in self.replicas if r.name != replica.name] + [replica]
        self.history.append(replica)
        return replica

    def tenures(self) -> list[Tenure]:
        """Every shard tenure of every process started so far."""
        return [tenure for replica in self.history for tenure in replica.tenures()]

    async def wait_owned(
        self, replicas: list[Replica], timeout: float = 30, *, least: int = 0
    ) -> float:
        """Until ``replicas`` hold every shard between them, each shard once, and each at
        least ``least`` shards; how long it took, in s."""
        started = time.monotonic()
        while True:
            held = [r.owned() for r in replicas]
            union = set().union(*held)
            if (
                union == set(range(self.shards))
                and sum(map(len, held)) == self.shards
                and min(map(len, held)) >= least
            ):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                shown = {r.name: sorted(h) for r, h in zip(replicas, held, strict=True)}
                raise AssertionError(f"shards not all held once within {timeout} s: {shown}")
            await asyncio.sleep(0.2)

    def kill_all(self) -> None:
        for replica in self.history:
            replica.process.kill()  # SIGKILL ends a stopped (paused) process too

    async def delete_topology(self) -> None:
        """Every queue and exchange the namespace may have: today's and the sharded ones."""
        names = Names.of(self.namespace)
        ns = self.namespace
        queues = [q for q, _ in names.queues()] + [f"{ns}.embedded"]
        exchanges = [e for e, _ in names.exchanges()]
        for kind in ("lifecycle", "commands"):
            exchanges.append(f"{ns}.{kind}.shards")
            queues.extend(f"{ns}.{kind}.shard.{k:03d}" for k in range(self.shards))
        connection = await aio_pika.connect(self.broker)
        async with connection:
            channel = await connection.channel()
            for queue in queues:
                await channel.queue_delete(queue)
            for exchange in exchanges:
                await channel.exchange_delete(exchange)


async def store_owners(url: str) -> dict[int, Owner]:
    """Who the store says took each shard last."""
    shared = await _open_shared(url)
    try:
        return {owner.shard: owner for owner in await shared.owners()}
    finally:
        await shared.close()


async def shard_map(url: str, shards: int) -> dict[str, int]:
    """Conversation -> the shard the store keeps its record in."""
    shared = await _open_shared(url)
    try:
        return {cid: shard for shard in range(shards) for cid in await shared.ids(shard)}
    finally:
        await shared.close()


async def _open_shared(url: str) -> Any:
    # Imported here: open_shared lands with the sharded worker, and the replica tests must
    # still be collected (and skipped) before it does.
    from warmer.store import open_shared  # type: ignore[attr-defined,unused-ignore]

    shared = open_shared(url, timeout_ms=2000)
    await shared.open()
    return shared


def latest_gains(replicas: list[Replica]) -> dict[int, tuple[str, int]]:
    """Shard -> (replica, epoch) of the ``shard_gained`` line with the highest epoch."""
    latest: dict[int, tuple[str, int]] = {}
    for replica in replicas:
        for event in replica.shard_lines():
            if event["event"] != "shard_gained":
                continue
            shard, epoch = int(event["shard"]), int(event["epoch"])
            if shard not in latest or epoch > latest[shard][1]:
                latest[shard] = (replica.name, epoch)
    return latest


def _epoch_ms(timestamp: str) -> float:
    """A log line's ISO 8601 UTC ``timestamp`` as wall-clock ms."""
    return datetime.fromisoformat(timestamp).timestamp() * 1000


@pytest.fixture
async def fleet(
    amqp_url: str,  # noqa: F811
    namespace: str,  # noqa: F811
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],  # noqa: F811
) -> AsyncIterator[Fleet]:
    """Replicas of this test's namespace; killed, then their topology deleted."""
    fleet = Fleet(amqp_url, namespace, tmp_path, spawn_worker)
    try:
        yield fleet
    finally:
        fleet.kill_all()
        await fleet.delete_topology()


@pytest.fixture
async def orchestrator(amqp_url: str, namespace: str) -> AsyncIterator[Orchestrator]:  # noqa: F811
    """Answers every warm of the namespace at once, and records them."""
    orchestrator = await Orchestrator.start(amqp_url, namespace)
    try:
        yield orchestrator
    finally:
        await orchestrator.close()


@pytest.fixture
async def requester(amqp_url: str, namespace: str) -> AsyncIterator[Requester]:  # noqa: F811
    """Sends the namespace commands and events in bulk."""
    requester = await Requester.connect(amqp_url, namespace)
    try:
        yield requester
    finally:
        await requester.close()


async def wait_warmed(
    orchestrator: Orchestrator, conversations: list[str], after_ms: float, timeout: float
) -> float:
    """Until each conversation has a warm published after ``after_ms``; how long it took, in s.

    Fails with how many are still missing, and the orchestrator's own failure first.
    """
    started = time.monotonic()
    while True:
        orchestrator.check()
        missing = set(conversations) - set(
            first_warms_after(orchestrator.warms, conversations, after_ms)
        )
        if not missing:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{len(missing)} conversations not warmed within {timeout} s")
        await asyncio.sleep(0.1)
