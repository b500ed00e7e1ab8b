"""What the broker benchmarks share: the worker and the orchestrator as processes of their
own, a lean client for commands and events, CPU and memory read from ``/proc``, clean-up.

Not a benchmark (its name starts with ``_``: ``python -m bench`` skips it).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Final

import aio_pika
import aiohttp
import aiormq
import aiormq.abc
import msgspec
import redis.asyncio

from bench.orchestrator import Record, Summary
from warmer.bus.topology import COMMAND_ROUTING_KEY, Names, delete

AMQP_URL: Final = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL: Final = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SHARDS: Final = 4
_DEADLINE_S: Final = 60.0
_LEVEL: Final = re.compile(rb'"level": ?"([a-z]+)"')

Body = dict[str, Any]


def conversation_ids(k: int, seed: int) -> list[str]:
    """K UUID-like ids, the same for the same seed (their shards follow from them)."""
    rng = random.Random(seed)
    return [f"{rng.getrandbits(128):032x}" for _ in range(k)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` now, in MB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle so far (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def service_pid(name: str) -> list[int]:
    """The oldest process whose command is ``name`` (the shared broker, the shared Redis):
    read, never touched. Other jobs' short-lived instances are younger."""
    found: list[tuple[int, int]] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    started = int((entry / "stat").read_text().rpartition(")")[2].split()[19])
                    found.append((started, int(entry.name)))
            except (OSError, ValueError, IndexError):
                continue
    return [min(found)[1]] if found else []


class Cpu:
    """CPU seconds of the parties, read at the window's start and end."""

    def __init__(self, parties: Mapping[str, list[int]]) -> None:
        self._parties = dict(parties)
        self._start = self._read()
        self._started = time.monotonic()

    def _read(self) -> dict[str, float]:
        used = {name: sum(cpu_s(pid) for pid in pids) for name, pids in self._parties.items()}
        used["machine"] = machine_busy_s()
        return used

    def pct(self) -> dict[str, float]:
        """Each party's CPU since the start, in % of one core."""
        end = self._read()
        seconds = time.monotonic() - self._started
        return {name: (end[name] - self._start[name]) / seconds * 100 for name in end}


class Orchestrator:
    """``python -m bench.orchestrator`` driven through its stdin and stdout."""

    def __init__(
        self, namespace: str, directory: Path, *, interval_ms: int = 1000, held: bool = False
    ) -> None:
        self.records_path = directory / f"{namespace}.records.json"
        argv = [sys.executable, "-m", "bench.orchestrator", AMQP_URL, namespace]
        argv += [str(self.records_path), "--interval-ms", str(interval_ms)]
        argv += ["--held"] if held else []
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._stdin: IO[str] = self.process.stdin  # type: ignore[assignment]
        self._stdout: IO[str] = self.process.stdout  # type: ignore[assignment]

    async def ready(self) -> None:
        line = await asyncio.to_thread(self._stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"the orchestrator did not start: {line!r}")

    def tell(self, word: str) -> None:
        self._stdin.write(word + "\n")
        self._stdin.flush()

    async def dump(self) -> list[Record]:
        """Every warm received since the last dump."""
        self.tell("dump")
        line = await asyncio.to_thread(self._stdout.readline)
        if not line.startswith("dumped"):
            raise RuntimeError(f"the orchestrator failed: {line!r}")
        return msgspec.json.decode(self.records_path.read_bytes(), type=list[Record])

    async def stop(self) -> tuple[Summary, list[Record]]:
        """Its summary and every warm received since the last dump."""
        self.tell("stop")
        out = await asyncio.to_thread(self._stdout.read)
        code = await asyncio.to_thread(self.process.wait, 30)
        if code != 0:
            raise RuntimeError(f"the orchestrator exited with {code}")
        summary = msgspec.json.decode(out.strip().splitlines()[-1], type=Summary)
        records = msgspec.json.decode(self.records_path.read_bytes(), type=list[Record])
        return summary, records

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Replica:
    """One ``python -m warmer run`` of the namespace, its log (stdout and stderr) in a file."""

    def __init__(
        self,
        name: str,
        namespace: str,
        store: str,
        directory: Path,
        *,
        shards: int = SHARDS,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log = directory / f"{namespace}.{name}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("WARMER_")}
        environ |= {
            "WARMER_AMQP_URL": AMQP_URL,
            "WARMER_NAMESPACE": namespace,
            "WARMER_STORE": store,
            "WARMER_SHARDS": str(shards),
            "WARMER_REPLICA_ID": name,
            "WARMER_HTTP": f"127.0.0.1:{self.port}",
            "WARMER_LOG_FORMAT": "json",
            "WARMER_LOG_LEVEL": "warning",  # info writes a line per warm
            "WARMER_IDLE_MAX_WARMS": "1000000",  # no idle budget runs out within a case
        }
        environ |= env or {}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "warmer", "run"],
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def owned(self, session: aiohttp.ClientSession) -> list[int] | None:
        """The shards it owns while ready (``/readyz``'s second line), else None."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
        try:
            async with session.get(f"http://127.0.0.1:{self.port}/readyz") as response:
                if response.status != 200:
                    return None
                found = re.search(r"owns shards \[([0-9, ]*)\]", await response.text())
        except aiohttp.ClientConnectionError:
            return None
        if found is None:  # one shard: ready is enough
            return [0]
        return [int(k) for k in found.group(1).split(",") if k.strip()]

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """Its ``/metrics``: every sample line, by series (name and labels)."""
        async with session.get(f"http://127.0.0.1:{self.port}/metrics") as response:
            text = await response.text()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                samples[series] = float(value)
        return samples

    def log_levels(self) -> dict[str, int]:
        """Lines of its log so far, by level (JSON lines; ``other`` for the rest)."""
        counts: dict[str, int] = {}
        with self.log.open("rb") as log:
            for line in log:
                found = _LEVEL.search(line)
                level = found.group(1).decode() if found else "other"
                counts[level] = counts.get(level, 0) + 1
        return counts

    def lines(self, level: str, limit: int = 3) -> list[str]:
        """The first ``limit`` lines of its log at ``level``."""
        found: list[str] = []
        with self.log.open("rb") as log:
            for line in log:
                match = _LEVEL.search(line)
                if match and match.group(1).decode() == level:
                    found.append(line.decode(errors="replace").rstrip())
                    if len(found) >= limit:
                        break
        return found

    def stop(self) -> None:
        """SIGTERM and a graceful exit expected; the log's tail in the error otherwise."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if code != 0:
            raise RuntimeError(f"{self.name} exited with {code}: {self.log.read_text()[-2000:]}")


def total(samples: Iterable[Mapping[str, float]], series: str) -> float:
    """The sum over replicas of every sample of ``series`` (a name, or a name and the start
    of its labels such as ``warmer_warms_failed_total{cause="timeout"``)."""
    found = 0.0
    for one in samples:
        for key, value in one.items():
            if key.startswith(series) and key[len(series) : len(series) + 1] in ("", "{", ",", "}"):
                found += value
    return found


def by_label(samples: Iterable[Mapping[str, float]], name: str, label: str) -> dict[str, float]:
    """``name``'s samples summed over replicas, by the value of ``label``."""
    pattern = re.compile(rf'{label}="([^"]*)"')
    found: dict[str, float] = {}
    for one in samples:
        for key, value in one.items():
            if key.startswith(name + "{"):
                match = pattern.search(key)
                if match:
                    found[match.group(1)] = found.get(match.group(1), 0.0) + value
    return found


async def scrape(replicas: Iterable[Replica]) -> list[dict[str, float]]:
    """Every replica's ``/metrics``."""
    async with aiohttp.ClientSession() as session:
        return [await replica.metrics(session) for replica in replicas]


async def balanced(replicas: list[Replica], shards: int = SHARDS) -> None:
    """Until every replica is ready and they hold the shards between them, evenly."""
    deadline = time.monotonic() + _DEADLINE_S
    async with aiohttp.ClientSession() as session:
        while True:
            held = [await r.owned(session) for r in replicas]
            if all(h is not None for h in held):
                counts = sorted(len(h or []) for h in held)
                union = sorted(k for h in held for k in h or [])
                if union == list(range(shards)) and counts[-1] - counts[0] <= 1:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"shards not balanced within {_DEADLINE_S} s: {held}")
            await asyncio.sleep(0.2)


async def clean(namespace: str, shards: int = SHARDS) -> None:
    """The namespace's queues and exchanges, and the Redis prefix's keys."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await delete(await connection.channel(), Names.of(namespace, shards))
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


class Client:
    """Commands (replies matched by correlation id on one exclusive reply queue) and
    lifecycle events, through aiormq directly so that the client costs little."""

    def __init__(self, connection: aiormq.abc.AbstractConnection, names: Names) -> None:
        self._connection = connection
        self._names = names
        self._pending: dict[str, tuple[asyncio.Future[Body], float]] = {}
        self._ids = itertools.count(1)
        self.latencies: list[float] = []
        """Seconds from publish to reply of every command answered, in order."""

    @classmethod
    async def connect(cls, namespace: str) -> Client:
        client = cls(await aiormq.connect(AMQP_URL), Names.of(namespace))
        await client._declare()
        return client

    async def _declare(self) -> None:
        names = self._names
        self._commands = await self._connection.channel(publisher_confirms=False)
        self._events = await self._connection.channel(publisher_confirms=True)
        # Publishers may declare exchanges with exactly the contract's arguments.
        await self._commands.exchange_declare(names.commands, exchange_type="direct", durable=True)
        await self._events.exchange_declare(names.lifecycle, exchange_type="topic", durable=True)
        declared = await self._commands.queue_declare("", exclusive=True, auto_delete=True)
        assert declared.queue is not None
        self._reply_to = declared.queue
        await self._commands.basic_consume(declared.queue, self._on_reply, no_ack=True)

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        pending = self._pending.pop(message.header.properties.correlation_id or "", None)
        if pending is not None and not pending[0].done():
            self.latencies.append(time.perf_counter() - pending[1])
            pending[0].set_result(msgspec.json.decode(message.body))

    async def command(self, body: Body, timeout: float = 10.0) -> Body:
        """Send one command; its reply (TimeoutError after ``timeout`` s)."""
        correlation_id = str(next(self._ids))
        future: asyncio.Future[Body] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = (future, time.perf_counter())
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            reply_to=self._reply_to,
            correlation_id=correlation_id,
            message_id=correlation_id,
            headers={"conversation-id": body["conversationId"]},
        )
        await self._commands.basic_publish(
            msgspec.json.encode(body),
            exchange=self._names.commands,
            routing_key=COMMAND_ROUTING_KEY,
            properties=properties,
        )
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(correlation_id, None)

    async def commands(self, bodies: Iterable[Body], in_flight: int = 500) -> list[Body]:
        """Every command, ``in_flight`` at a time; their replies, refused ones raising."""
        gate = asyncio.Semaphore(in_flight)

        async def one(body: Body) -> Body:
            async with gate:
                reply = await self.command(body, timeout=60.0)
            if reply.get("ok") is not True:
                raise RuntimeError(f"command refused: {body} -> {reply}")
            return reply

        return list(await asyncio.gather(*(one(body) for body in bodies)))

    async def events(self, bodies: Iterable[Body]) -> None:
        """Publish lifecycle events (routing key = their type), persistent, confirmed."""
        sends = []
        for body in bodies:
            properties = aiormq.spec.Basic.Properties(
                content_type="application/json",
                delivery_mode=2,
                message_id=str(next(self._ids)),
                headers={"conversation-id": body["conversationId"]},
            )
            sends.append(
                self._events.basic_publish(
                    msgspec.json.encode(body),
                    exchange=self._names.lifecycle,
                    routing_key=body["type"],
                    properties=properties,
                )
            )
        await asyncio.gather(*sends)

    async def opt_in(
        self, ids: list[str], interval_ms: int, turn: int = 0, slices: int = 10
    ) -> None:
        """Interval, then enable (replies checked), then a turn each (``turn`` numbers its
        ``seq``: a later turn must have a larger one), in ``slices`` spread over the
        interval so that the schedules spread over it."""
        await self.commands(
            {"type": "set_interval", "conversationId": cid, "intervalMs": interval_ms}
            for cid in ids
        )
        await self.commands(
            {"type": "set_enabled", "conversationId": cid, "enabled": True} for cid in ids
        )
        await self.turns(ids, interval_ms, turn, slices)

    async def turns(self, ids: list[str], interval_ms: int, turn: int, slices: int = 10) -> None:
        """A turn that starts and settles for each, in slices spread over the interval."""
        size = max(1, -(-len(ids) // slices))
        gap = interval_ms / 1000 / slices
        for start in range(0, len(ids), size):
            began = time.monotonic()
            await self.events(
                event
                for cid in ids[start : start + size]
                for event in (
                    {"type": "turn.started", "conversationId": cid, "seq": 2 * turn + 1},
                    {"type": "turn.settled", "conversationId": cid, "seq": 2 * turn + 2},
                )
            )
            await asyncio.sleep(max(0.0, gap - (time.monotonic() - began)))

    async def close(self) -> None:
        await self._connection.close()


class Deployment:
    """An orchestrator, ``count`` replicas holding the shards, and a client, in a namespace
    and Redis prefix of their own; ``async with`` cleans every one of them up."""

    def __init__(
        self,
        namespace: str,
        directory: Path,
        *,
        count: int = 1,
        interval_ms: int = 1000,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.namespace = namespace
        self._directory = directory
        self._count = count
        self._interval_ms = interval_ms
        self._env = env
        self.replicas: list[Replica] = []

    async def __aenter__(self) -> Deployment:
        self.orchestrator = Orchestrator(
            self.namespace, self._directory, interval_ms=self._interval_ms
        )
        try:
            await self.orchestrator.ready()
            store = f"{REDIS_URL}?prefix={self.namespace}"
            self.replicas = [
                Replica(f"r{n}", self.namespace, store, self._directory, env=self._env)
                for n in range(1, self._count + 1)
            ]
            await balanced(self.replicas)
            self.client = await Client.connect(self.namespace)
        except BaseException:
            await self._down()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self._down()

    async def _down(self) -> None:
        self.orchestrator.kill()
        failed = None
        for replica in self.replicas:
            try:
                replica.stop()
            except RuntimeError as err:
                failed = err
        await clean(self.namespace)
        if failed is not None:
            raise failed

    def parties(self) -> dict[str, list[int]]:
        """The processes whose CPU a benchmark reports, by name."""
        return {
            "worker": [r.process.pid for r in self.replicas],
            "orchestrator": [self.orchestrator.process.pid],
            "requester": [os.getpid()],
            "broker": service_pid("beam.smp"),
            "redis": service_pid("redis-server"),
        }
