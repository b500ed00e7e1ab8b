"""Replicas: the highest sustained warm rate of one and of two replicas of a namespace.

Each case starts, in a namespace and a Redis prefix of its own (both deleted afterwards),
the simulated orchestrator (``bench.orchestrator``, its own process: it answers every
``warm.requested`` at once with a ``warm.completed`` with usage), then R replicas
``python -m warmer run`` with ``WARMER_SHARDS=4``, waits until they hold the four shards
between them (two each for two), and opts K conversations in at a 1 s interval:
``set_interval 1000`` then ``set_enabled`` (replies awaited), then ``turn.started`` and
``turn.settled``, the turns sent in ten slices 100 ms apart so the schedules spread over
the second. After a 10 s warm-up, a 20 s window counts:

- warms/s: the ``warm.requested`` the orchestrator received in the window, per second;
- lateness of a ``warm.requested``: its ``requestedAt`` minus the conversation's previous
  ``requestedAt`` plus the interval. The next warm is armed when the completion is applied,
  so this includes the warm's own round trip (orchestrator and back), as it would in
  production; p50 and p99 over the warms requested in the window;
- completions applied per second and warms timed out, by the replicas' ``/metrics``; past
  saturation the requests go on rising with K, but as retries of warms whose completion
  came back after the timeout (clamped to the 1 s interval), so the *sustained* rate of R
  replicas is the highest completions/s over the Ks;
- the CPU each party used in the window, in % of one core: the replicas, the orchestrator,
  this process (the requester), the broker (``beam.smp``), Redis, and the machine (all
  processes, from ``/proc/stat``).

First the orchestrator alone: 30,000 ``warm.requested`` queued for it before it consumes,
timed from its first receipt to its last confirmed completion (into a quorum queue, as in
the cases): its ceiling, to be well above the cases' rates.

``python -m bench.replicas [--runs N] [--ks 500,1000,2000] [--replicas 1,2]``: cases run in
the order run, K, R; each figure is the median over the runs. The conversation ids come
from a fixed seed per run. K stops at 2,000 by default: on two shared cores one replica no
longer follows K at 1,000, and at 2,000 most warms already time out (the warm timeout is
clamped to the 1 s interval), so a larger K only measures that collapse. With
``BENCH_PY_SPY=/tmp/replicas`` each replica is sampled by py-spy over the window (CPU
samples only, not stopping it) into ``/tmp/replicas-<namespace>-<replica>.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final, NamedTuple

import aio_pika
import aiohttp
import msgspec
import redis.asyncio

from bench.orchestrator import Record, Summary
from tests.replicas.requester import Requester
from warmer.bus.topology import WARM_ROUTING_KEY, Names, declare, delete

AMQP_URL: Final = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL: Final = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SHARDS: Final = 4
INTERVAL_MS: Final = 1_000
DEFAULT_INTERVAL_S: Final = 240
KS: Final = (500, 1_000, 2_000)
REPLICAS: Final = (1, 2)
RUNS: Final = 3
WARM_UP_S: Final = 10.0
WINDOW_S: Final = 20.0
CEILING_WARMS: Final = 30_000
_SLICES: Final = 10
_SEED: Final = 16
_DEADLINE_S: Final = 60.0
WATCHED: Final = {
    "requested": "warmer_warms_requested_total",
    "completed": "warmer_warms_completed_total",
    "timeouts": 'warmer_warms_failed_total{cause="timeout"',
    "timer_late_s": "warmer_timer_lateness_seconds_sum",
    "timers": "warmer_timer_lateness_seconds_count",
    "batch_inputs": "warmer_batch_size_sum",
    "batches": "warmer_batch_size_count",
    "commit_s": "warmer_commit_seconds_sum",
    "commits": "warmer_commit_seconds_count",
}
"""The replicas' own counts read around the window (``/metrics`` series, summed)."""


class Case(NamedTuple):
    """One measured window."""

    warms_per_s: float
    late_p50_ms: float
    late_p99_ms: float
    cpu_pct: dict[str, float]
    """Who used how much CPU in the window, in % of one core."""
    inside: dict[str, float]
    """The replicas' view of the window (``_inside``)."""


async def _scrape(replicas: list[Replica]) -> dict[str, float]:
    """Every replica's ``WATCHED`` series, summed."""
    total = dict.fromkeys(WATCHED, 0.0)
    async with aiohttp.ClientSession() as session:
        for replica in replicas:
            for key, value in (await replica.scrape(session)).items():
                total[key] += value
    return total


def _inside(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Warms requested and completed per second, timeouts, and per batch of the pipeline:
    inputs, commit ms; mean timer lateness (fire minus due) ms, over the window."""
    d = {key: after[key] - before[key] for key in WATCHED}
    return {
        "requested_per_s": d["requested"] / WINDOW_S,
        "completed_per_s": d["completed"] / WINDOW_S,
        "timeouts": d["timeouts"],
        "timer_late_ms": d["timer_late_s"] / max(d["timers"], 1) * 1000,
        "batch_inputs": d["batch_inputs"] / max(d["batches"], 1),
        "commit_ms": d["commit_s"] / max(d["commits"], 1) * 1000,
    }


def conversation_ids(k: int, run: int) -> list[str]:
    """K UUID-like ids, the same for the same run (their shards follow from them)."""
    rng = random.Random(_SEED * 1000 + run)
    return [f"{rng.getrandbits(128):032x}" for _ in range(k)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds all cores spent not idle so far (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _service_pid(name: str) -> list[int]:
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


class Orchestrator:
    """``python -m bench.orchestrator`` driven through its stdin and stdout."""

    def __init__(self, namespace: str, directory: Path, *, held: bool = False) -> None:
        self.records_path = directory / f"{namespace}.records.json"
        argv = [sys.executable, "-m", "bench.orchestrator", AMQP_URL, namespace]
        argv += [str(self.records_path), *(["--held"] if held else [])]
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

    async def stop(self) -> tuple[Summary, list[Record]]:
        """Its summary and every warm it received."""
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
    """One ``python -m warmer run`` of the namespace, its log in a file."""

    def __init__(self, name: str, namespace: str, store: str, directory: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.log = directory / f"{namespace}.{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARMER_")}
        env |= {
            "WARMER_AMQP_URL": AMQP_URL,
            "WARMER_NAMESPACE": namespace,
            "WARMER_STORE": store,
            "WARMER_SHARDS": str(SHARDS),
            "WARMER_REPLICA_ID": name,
            "WARMER_HTTP": f"127.0.0.1:{self.port}",
            "WARMER_LOG_FORMAT": "json",
            "WARMER_LOG_LEVEL": "warning",  # info writes a line per warm
            "WARMER_IDLE_MAX_WARMS": "100000",  # no idle budget runs out within a case
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "warmer", "run"],
                env=env,
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
        return [int(k) for k in found.group(1).split(",") if k.strip()] if found else None

    async def scrape(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """The ``WATCHED`` series of its ``/metrics``, each summed over its label sets."""
        found = dict.fromkeys(WATCHED, 0.0)
        async with session.get(f"http://127.0.0.1:{self.port}/metrics") as response:
            for line in (await response.text()).splitlines():
                for key, series in WATCHED.items():
                    if line.startswith(series) and line[len(series)] in " {,}":
                        found[key] += float(line.rsplit(" ", 1)[1])
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


def _py_spy(pid: int, output: str) -> subprocess.Popen[bytes]:
    """Sample ``pid`` over the window (py-spy's raw stacks, CPU only, not stopping it)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [py_spy, "record", "--pid", str(pid), "--output", output, "--format", "raw"]
    argv += ["--rate", "100", "--nonblocking", "--duration", str(int(WINDOW_S))]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _balanced(replicas: list[Replica]) -> None:
    """Until every replica is ready and they hold the shards between them, evenly."""
    deadline = time.monotonic() + _DEADLINE_S
    async with aiohttp.ClientSession() as session:
        while True:
            held = [await r.owned(session) for r in replicas]
            if all(h is not None for h in held):
                counts = sorted(len(h or []) for h in held)
                union = sorted(k for h in held for k in h or [])
                if union == list(range(SHARDS)) and counts[-1] - counts[0] <= 1:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"shards not balanced within {_DEADLINE_S} s: {held}")
            await asyncio.sleep(0.2)


async def opt_in(requester: Requester, ids: list[str]) -> None:
    """Interval, then enable (replies checked), then a turn each, in slices 100 ms apart."""
    intervals = await requester.commands(
        {"type": "set_interval", "conversationId": cid, "intervalMs": INTERVAL_MS} for cid in ids
    )
    enables = await requester.commands(
        {"type": "set_enabled", "conversationId": cid, "enabled": True} for cid in ids
    )
    refused = [reply for reply in intervals + enables if reply.get("ok") is not True]
    if refused:
        raise RuntimeError(f"{len(refused)} opt-in commands refused, e.g. {refused[0]}")
    size = -(-len(ids) // _SLICES)
    for start in range(0, len(ids), size):
        began = time.monotonic()
        await requester.events(
            event
            for cid in ids[start : start + size]
            for event in (
                {"type": "turn.started", "conversationId": cid, "seq": 1},
                {"type": "turn.settled", "conversationId": cid, "seq": 2},
            )
        )
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - began)))


def lateness(records: list[Record], start_ms: float, end_ms: float) -> list[float]:
    """Each warm requested in the window: its requestedAt against the conversation's
    previous one plus the interval, in ms."""
    by_conversation: dict[str, list[int]] = defaultdict(list)
    for cid, requested_at, _ in records:
        by_conversation[cid].append(requested_at)
    late: list[float] = []
    for times in by_conversation.values():
        times.sort()
        late.extend(
            float(now - before - INTERVAL_MS)
            for before, now in itertools.pairwise(times)
            if start_ms <= now < end_ms
        )
    return late


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class _Cpu:
    """CPU seconds of the parties, read at the window's start and end."""

    def __init__(self, parties: dict[str, list[int]]) -> None:
        self._parties = parties
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        used = {name: sum(_cpu_s(pid) for pid in pids) for name, pids in self._parties.items()}
        used["machine"] = _machine_busy_s()
        return used

    def pct(self, seconds: float) -> dict[str, float]:
        end = self._read()
        return {name: (end[name] - self._start[name]) / seconds * 100 for name in end}


async def case(k: int, count: int, run: int, directory: Path) -> Case:
    """One namespace, ``count`` replicas, ``k`` conversations: the window's figures."""
    namespace = f"bench-replicas-{os.getpid()}-{run}-{k}-{count}"
    store = f"{REDIS_URL}?prefix={namespace}"
    orchestrator = Orchestrator(namespace, directory)
    replicas: list[Replica] = []
    try:
        await orchestrator.ready()
        replicas = [Replica(f"r{n}", namespace, store, directory) for n in range(1, count + 1)]
        await _balanced(replicas)
        requester = await Requester.connect(AMQP_URL, namespace)
        try:
            await opt_in(requester, conversation_ids(k, run))
        finally:
            await requester.close()
        await asyncio.sleep(WARM_UP_S)
        cpu = _Cpu(
            {
                "replicas": [r.process.pid for r in replicas],
                "orchestrator": [orchestrator.process.pid],
                "requester": [os.getpid()],
                "broker": _service_pid("beam.smp"),
                "redis": _service_pid("redis-server"),
            }
        )
        before = await _scrape(replicas)
        start_ms = time.time() * 1000
        profile = os.environ.get("BENCH_PY_SPY")
        spies = [
            _py_spy(r.process.pid, f"{profile}-{namespace}-{r.name}.txt")
            for r in (replicas if profile else [])
        ]
        await asyncio.sleep(WINDOW_S)
        end_ms = time.time() * 1000
        used = cpu.pct(WINDOW_S)
        for spy in spies:
            await asyncio.to_thread(spy.wait, 30)
        inside = _inside(before, await _scrape(replicas))
        await asyncio.sleep(1.0)  # what was requested in the window has arrived
        _, records = await orchestrator.stop()
        received = sum(1 for _, _, at in records if start_ms <= at < end_ms)
        late = lateness(records, start_ms, end_ms)
        p50, p99 = _percentile(late, 0.5), _percentile(late, 0.99)
        return Case(received / WINDOW_S, p50, p99, used, inside)
    finally:
        orchestrator.kill()
        failed = None
        for replica in replicas:
            try:
                replica.stop()
            except RuntimeError as exc:
                failed = exc
        await _clean(namespace)
        if failed is not None:
            raise failed


async def _clean(namespace: str) -> None:
    """The namespace's queues and exchanges, and the Redis prefix's keys."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await delete(await connection.channel(), Names.of(namespace, SHARDS))
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


async def ceiling(directory: Path) -> float:
    """Completions per second the orchestrator alone answers, from a full queue."""
    namespace = f"bench-replicas-{os.getpid()}-ceiling"
    names = Names.of(namespace)
    orchestrator = Orchestrator(namespace, directory, held=True)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    try:
        topology = await declare(channel, names)  # completions land in {ns}.lifecycle
        await orchestrator.ready()
        warm = topology.exchanges[names.warm]
        now = int(time.time() * 1000)
        for start in range(0, CEILING_WARMS, 500):
            await asyncio.gather(
                *(
                    warm.publish(
                        aio_pika.Message(
                            msgspec.json.encode(
                                {
                                    "type": "warm.requested",
                                    "conversationId": f"c-{n:06d}",
                                    "token": n + 1,
                                    "requestedAt": now,
                                }
                            )
                        ),
                        WARM_ROUTING_KEY,
                    )
                    for n in range(start, min(start + 500, CEILING_WARMS))
                )
            )
        orchestrator.tell("go")
        deadline = time.monotonic() + _DEADLINE_S
        while True:
            queue = await channel.declare_queue(names.lifecycle, passive=True)
            if (queue.declaration_result.message_count or 0) >= CEILING_WARMS:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the orchestrator did not answer every warm in time")
            await asyncio.sleep(0.05)
        summary, _ = await orchestrator.stop()
        return summary.completed / (summary.last_completed_ms - summary.first_received_ms) * 1000
    finally:
        orchestrator.kill()
        await delete(channel, names)
        await connection.close()


async def measure(runs: int, ks: Sequence[int], counts: Sequence[int]) -> dict[str, float]:
    """The ceiling, then every case ``runs`` times; each run's figures and the medians."""
    figures: dict[str, float] = {}
    cases: dict[tuple[int, int], list[Case]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as name:
        directory = Path(name)
        figures["orchestrator_ceiling_warms_per_s"] = await ceiling(directory)
        print(f"ceiling {figures['orchestrator_ceiling_warms_per_s']:.0f}/s", file=sys.stderr)
        for run in range(1, runs + 1):
            for k in ks:
                for count in counts:
                    one = await case(k, count, run, directory)
                    cases[k, count].append(one)
                    print(f"run {run} K {k} R {count}: {one}", file=sys.stderr, flush=True)
    for (k, count), got in cases.items():
        tag = f"r{count}_k{k}"
        figures[f"{tag}_warms_per_s"] = statistics.median(c.warms_per_s for c in got)
        figures[f"{tag}_late_p50_ms"] = statistics.median(c.late_p50_ms for c in got)
        figures[f"{tag}_late_p99_ms"] = statistics.median(c.late_p99_ms for c in got)
        for what in got[0].inside:
            figures[f"{tag}_{what}"] = statistics.median(c.inside[what] for c in got)
        for who in got[0].cpu_pct:
            figures[f"{tag}_cpu_{who}_pct"] = statistics.median(c.cpu_pct[who] for c in got)
        for who in ("replicas", "broker", "orchestrator"):
            figures[f"{tag}_{who}_cpu_ms_per_warm"] = statistics.median(
                c.cpu_pct[who] * 10 / c.warms_per_s for c in got
            )
    for count in counts:
        # Sustained: warms whose completion came back in time. Past saturation the
        # requests go on rising with K, but as retries of warms that timed out.
        k = max(ks, key=lambda k: figures[f"r{count}_k{k}_completed_per_s"])
        sustained = figures[f"r{count}_k{k}_completed_per_s"]
        figures[f"r{count}_sustained_at_k"] = float(k)
        figures[f"r{count}_sustained_warms_per_s"] = sustained
        figures[f"r{count}_conversations_at_{DEFAULT_INTERVAL_S}s"] = sustained * DEFAULT_INTERVAL_S
    figures["runs"] = float(runs)
    return figures


def run(
    runs: int = RUNS, ks: Sequence[int] = KS, counts: Sequence[int] = REPLICAS
) -> dict[str, float]:
    """Ceiling and cases on the local broker and Redis (``BENCH_AMQP_URL``, ``BENCH_REDIS_URL``)."""
    return asyncio.run(measure(runs, ks, counts))


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.replicas")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--ks", type=_ints, default=list(KS))
    parser.add_argument("--replicas", type=_ints, default=list(REPLICAS))
    args = parser.parse_args()
    for metric, value in run(args.runs, args.ks, args.replicas).items():
        print(f"{metric:<44} {value:>12,.2f}")
