"""Warm-rate capacity: the highest warm rate one and two replicas sustain, found by raising K.

First the simulated orchestrator alone (``bench.orchestrator``, its own process): 20,000
``warm.requested`` queued for it before it consumes, timed from its first receipt to its
last confirmed completion (persistent, into a quorum queue, as in the cases): its
ceiling, to be well above what the worker sustains, the median of ``--ceiling-runs``.

Then, for each run and each replica count R, a **search**, in a namespace and a Redis
prefix of its own (both deleted afterwards): the orchestrator starts, then R replicas
``python -m warmer run`` (``WARMER_SHARDS=4``, Redis store, log level warning), and once
they hold the four shards between them K conversations are opted in at a short interval
(1 s: ``set_interval``, ``set_enabled``, replies awaited, then ``turn.started`` +
``turn.settled``, in ten slices spread over the interval so that the schedules spread).
After a warm-up, a window is measured; if the worker kept up, K is multiplied by the step
(1.25; the conversations added to the running replicas, the same way), until the first K
at which it **falls behind** (``bench.stats.behind``): in the window, p99 lateness > 250 ms,
or completions applied < 95% of warms requested, or failed warms > 1% of them.

- **lateness** of a ``warm.requested``: its ``requestedAt`` minus (the time the orchestrator
  wrote that conversation's previous completion + the interval): against the
  ``nextWarmAt`` the worker sets when it applies the completion, computed from the
  orchestrator's side (an upper bound: the worker applies it after it was written);
  p50, p99 and max over the warms the orchestrator received in the window;
- **warms/s**: the ``warm.requested`` the orchestrator received in the window, per second;
  **delivery**: a warm's way out, received by the orchestrator minus ``requestedAt``
  (p50, p99); completed/s, failed, and the mean lateness of the worker's timers (fire minus due, its
  own view of the same lateness without the publish) from the replicas' ``/metrics``
  around the window;
- the **sustained** rate of a run: the warms/s of the highest K that kept up; the figure
  is the median over the runs, with its K, its lateness and its CPU; times 240 s, the
  conversations one worker carries at the default interval;
- CPU of each party over the window in % of one core: the replicas, the orchestrator,
  this process (the requester), the broker (``beam.smp``), Redis, the machine.

The search goes down instead (conversations disabled, a new turn for the rest, a double
warm-up) while every K so far fell behind, at most three times, and stops at the first K
that keeps up then (``bench.stats.search_next``). Run 1 of R = 1 starts at ``--start-k``; every
other search starts at the highest K the previous search (the previous run of the same R,
or for R = 2's first run, R = 1's) kept up at, so it measures about two windows: that K
and the next one up. ``--ks 1000,2000`` measures exactly those Ks instead
(ascending, in one deployment, whether it keeps up or not). The conversation ids come from
a fixed seed per run. With ``BENCH_PY_SPY=/tmp/replicas`` each replica is sampled by
py-spy over every window into ``/tmp/replicas-<namespace>-<replica>-<K>.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NamedTuple

import aio_pika
import aiormq
import msgspec

from bench._harness import (
    AMQP_URL,
    REDIS_URL,
    Client,
    Cpu,
    Orchestrator,
    Replica,
    balanced,
    clean,
    conversation_ids,
    cpu_s,
    scrape,
    service_pid,
    total,
)
from bench.orchestrator import Frames, write
from bench.stats import Window, behind, first_k, percentile, search_next
from warmer.bus.topology import WARM_ROUTING_KEY, Names, declare, delete

INTERVAL_MS: Final = 1_000
DEFAULT_INTERVAL_S: Final = 240
REPLICAS: Final = (1, 2)
RUNS: Final = 3
START_K: Final = 800
STEP: Final = 1.25
MAX_K: Final = 20_000
WARM_UP_S: Final = 4.0
WINDOW_S: Final = 8.0
CEILING_WARMS: Final = 20_000
CEILING_RUNS: Final = 3
ESTIMATE_S: Final = 330.0
"""About what ``run()`` takes with the defaults (for ``python -m bench``'s budget)."""
_SEED: Final = 16
_DEADLINE_S: Final = 60.0
_DOWN_STEPS: Final = 3


class Step(NamedTuple):
    """One K's measured window."""

    k: int
    warms_per_s: float
    completed_per_s: float
    failed: float
    late_p50_ms: float
    late_p99_ms: float
    late_max_ms: float
    delivery_p50_ms: float
    delivery_p99_ms: float
    """A warm's way to the orchestrator: received minus ``requestedAt``."""
    timer_late_ms: float
    """The worker's own mean lateness of its timers (fire minus due = ``nextWarmAt``)."""
    cpu_pct: dict[str, float]
    behind: str | None


class Settings(NamedTuple):
    """How a search is run."""

    interval_ms: int = INTERVAL_MS
    step: float = STEP
    max_k: int = MAX_K
    warm_up_s: float = WARM_UP_S
    window_s: float = WINDOW_S
    ks: tuple[int, ...] = ()
    """Instead of a search: exactly these Ks, ascending, whether the worker keeps up or not."""


def _py_spy(pid: int, output: str, seconds: float) -> subprocess.Popen[bytes]:
    """Sample ``pid`` over the window (py-spy's raw stacks, CPU only, not stopping it)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [py_spy, "record", "--pid", str(pid), "--output", output, "--format", "raw"]
    argv += ["--rate", "100", "--nonblocking", "--duration", str(int(seconds))]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure_window(
    orchestrator: Orchestrator,
    replicas: list[Replica],
    k: int,
    window_s: float,
    tag: str = "",
) -> Step:
    """The warms of one window of ``window_s`` seconds, from now."""
    await orchestrator.dump()  # what came before the window
    cpu = Cpu(
        {
            "replicas": [r.process.pid for r in replicas],
            "orchestrator": [orchestrator.process.pid],
            "requester": [os.getpid()],
            "broker": service_pid("beam.smp"),
            "redis": service_pid("redis-server"),
        }
    )
    before = await scrape(replicas)
    start_ms = time.time() * 1000
    profile = os.environ.get("BENCH_PY_SPY")
    spies = [
        _py_spy(r.process.pid, f"{profile}-{tag}-{r.name}-{k}.txt", window_s)
        for r in (replicas if profile else [])
    ]
    await asyncio.sleep(window_s)
    end_ms = time.time() * 1000
    used = cpu.pct()
    after = await scrape(replicas)
    for spy in spies:
        await asyncio.to_thread(spy.wait, 30)
    records = await orchestrator.dump()
    inside = [r for r in records if start_ms <= r[2] < end_ms]
    late = [r[3] for r in inside if r[3] is not None]
    delivery = [r[2] - r[1] for r in inside]
    requested = total(after, "warmer_warms_requested_total") - total(
        before, "warmer_warms_requested_total"
    )
    completed = total(after, "warmer_warms_completed_total") - total(
        before, "warmer_warms_completed_total"
    )
    failed = total(after, "warmer_warms_failed_total") - total(before, "warmer_warms_failed_total")
    p99 = percentile(late, 0.99)
    timers = total(after, "warmer_timer_lateness_seconds_count") - total(
        before, "warmer_timer_lateness_seconds_count"
    )
    timer_s = total(after, "warmer_timer_lateness_seconds_sum") - total(
        before, "warmer_timer_lateness_seconds_sum"
    )
    why = behind(Window(requested, completed, failed, p99))
    return Step(
        k=k,
        warms_per_s=len(inside) / window_s,
        completed_per_s=completed / window_s,
        failed=failed,
        late_p50_ms=percentile(late, 0.5),
        late_p99_ms=p99,
        late_max_ms=percentile(late, 1.0),
        delivery_p50_ms=percentile(delivery, 0.5),
        delivery_p99_ms=percentile(delivery, 0.99),
        timer_late_ms=timer_s / timers * 1000 if timers else float("nan"),
        cpu_pct=used,
        behind=why,
    )


async def search(
    count: int, run: int, start_k: int, settings: Settings, directory: Path
) -> list[Step]:
    """R = ``count`` replicas, K raised from ``start_k`` until they fall behind."""
    namespace = f"bench-replicas-{os.getpid()}-{run}-{count}"
    store = f"{REDIS_URL}?prefix={namespace}"
    orchestrator = Orchestrator(namespace, directory, interval_ms=settings.interval_ms)
    replicas: list[Replica] = []
    steps: list[Step] = []
    ids = conversation_ids(settings.max_k, _SEED * 1000 + run)
    try:
        await orchestrator.ready()
        replicas = [Replica(f"r{n}", namespace, store, directory) for n in range(1, count + 1)]
        await balanced(replicas)
        client = await Client.connect(namespace)
        try:
            added, k, turn = 0, min(start_k, settings.max_k), 0
            while True:
                warm_up = settings.warm_up_s
                if k > added:
                    await client.opt_in(ids[added:k], settings.interval_ms)
                else:  # down after falling behind: fewer, and a new turn for the rest
                    await client.commands(
                        {"type": "set_enabled", "conversationId": cid, "enabled": False}
                        for cid in ids[k:added]
                    )
                    turn += 1
                    await client.turns(ids[:k], settings.interval_ms, turn)
                    warm_up *= 2  # the backlog drained too
                added = k
                await asyncio.sleep(warm_up)
                step = await measure_window(orchestrator, replicas, k, settings.window_s, namespace)
                steps.append(step)
                print(f"run {run} R {count} {_line(step)}", file=sys.stderr, flush=True)
                history = [(s.k, s.behind is None) for s in steps]
                if settings.ks:
                    later = [n for n in settings.ks if n > k]
                    following = later[0] if later else None
                else:
                    following = search_next(history, settings.step, settings.max_k, _DOWN_STEPS)
                if following is None:
                    break
                k = following
        finally:
            await client.close()
        await orchestrator.stop()
        return steps
    finally:
        orchestrator.kill()
        failed = None
        for replica in replicas:
            try:
                replica.stop()
            except RuntimeError as exc:
                failed = exc
        await clean(namespace)
        if failed is not None:
            raise failed


def _line(step: Step) -> str:
    cpu = " ".join(f"{who} {pct:.0f}%" for who, pct in step.cpu_pct.items())
    return (
        f"K {step.k}: {step.warms_per_s:.0f} warms/s, {step.completed_per_s:.0f} completed/s, "
        f"{step.failed:.0f} failed, late p50/p99/max {step.late_p50_ms:.0f}/"
        f"{step.late_p99_ms:.0f}/{step.late_max_ms:.0f} ms (timers {step.timer_late_ms:.0f} "
        f"ms late on average, delivery p50/p99 {step.delivery_p50_ms:.0f}/"
        f"{step.delivery_p99_ms:.0f} ms); CPU {cpu}; "
        f"{step.behind or 'kept up'}"
    )


async def ceiling(directory: Path, warms: int = CEILING_WARMS) -> tuple[float, float]:
    """Completions per second the orchestrator alone answers, from a full queue, and the
    CPU it used per warm (ms)."""
    namespace = f"bench-replicas-{os.getpid()}-ceiling"
    names = Names.of(namespace)
    orchestrator = Orchestrator(namespace, directory, held=True)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    try:
        await declare(channel, names)  # completions land in {ns}.lifecycle
        await orchestrator.ready()
        publisher = await aiormq.connect(AMQP_URL)
        try:
            out = await publisher.channel(publisher_confirms=True)
            assert isinstance(out, aiormq.Channel)
            frames = Frames(out.number, names.warm, WARM_ROUTING_KEY)
            now = int(time.time() * 1000)
            for start in range(0, warms, 2000):
                batch = [
                    (
                        f"c-{n:06d}",
                        msgspec.json.encode(
                            {
                                "type": "warm.requested",
                                "conversationId": f"c-{n:06d}",
                                "token": n + 1,
                                "requestedAt": now,
                            }
                        ),
                    )
                    for n in range(start, min(start + 2000, warms))
                ]
                await asyncio.gather(*write(out, frames, batch))
        finally:
            await publisher.close()
        used = cpu_s(orchestrator.process.pid)
        orchestrator.tell("go")
        deadline = time.monotonic() + _DEADLINE_S
        while True:
            queue = await channel.declare_queue(names.lifecycle, passive=True)
            if (queue.declaration_result.message_count or 0) >= warms:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the orchestrator did not answer every warm in time")
            await asyncio.sleep(0.05)
        used = cpu_s(orchestrator.process.pid) - used
        summary, _ = await orchestrator.stop()
        rate = summary.completed / (summary.last_completed_ms - summary.first_received_ms) * 1000
        return rate, used * 1000 / summary.completed
    finally:
        orchestrator.kill()
        await delete(channel, names)
        await connection.close()


def summarize(searches: dict[int, list[list[Step]]]) -> dict[str, float]:
    """Per replica count: the median over the runs of the sustained rate and its figures."""
    figures: dict[str, float] = {}
    for count, runs in searches.items():
        tag = f"r{count}"
        best: list[Step] = []
        for n, steps in enumerate(runs, 1):
            kept = [s for s in steps if s.behind is None]
            top = max(kept, key=lambda s: s.warms_per_s) if kept else None
            figures[f"{tag}_run{n}_sustained_warms_per_s"] = top.warms_per_s if top else 0.0
            if top is not None:
                best.append(top)
            fell = [s.k for s in steps if s.behind is not None]
            if fell:
                figures[f"{tag}_run{n}_behind_at_k"] = float(fell[0])
        if not best:
            figures[f"{tag}_sustained_warms_per_s"] = 0.0
            continue
        # The median run, by its rate (an odd count of runs: an actual run).
        middle = sorted(best, key=lambda s: s.warms_per_s)[(len(best) - 1) // 2]
        rate = statistics.median(s.warms_per_s for s in best)
        figures[f"{tag}_sustained_warms_per_s"] = rate
        figures[f"{tag}_sustained_at_k"] = statistics.median(s.k for s in best)
        figures[f"{tag}_completed_per_s"] = statistics.median(s.completed_per_s for s in best)
        figures[f"{tag}_late_p50_ms"] = statistics.median(s.late_p50_ms for s in best)
        figures[f"{tag}_late_p99_ms"] = statistics.median(s.late_p99_ms for s in best)
        figures[f"{tag}_late_max_ms"] = statistics.median(s.late_max_ms for s in best)
        figures[f"{tag}_delivery_p50_ms"] = statistics.median(s.delivery_p50_ms for s in best)
        figures[f"{tag}_delivery_p99_ms"] = statistics.median(s.delivery_p99_ms for s in best)
        figures[f"{tag}_timer_late_mean_ms"] = statistics.median(s.timer_late_ms for s in best)
        figures[f"{tag}_runs_kept_up"] = float(len(best))
        figures[f"{tag}_conversations_at_{DEFAULT_INTERVAL_S}s"] = rate * DEFAULT_INTERVAL_S
        for who in ("replicas", "broker", "orchestrator", "redis", "machine"):
            figures[f"{tag}_cpu_{who}_pct"] = middle.cpu_pct[who]
        figures[f"{tag}_replicas_cpu_ms_per_warm"] = statistics.median(
            s.cpu_pct["replicas"] * 10 / s.warms_per_s for s in best
        )
        figures[f"{tag}_orchestrator_cpu_ms_per_warm"] = statistics.median(
            s.cpu_pct["orchestrator"] * 10 / s.warms_per_s for s in best
        )
    return figures


async def measure(
    runs: int,
    counts: Sequence[int],
    start_k: int,
    settings: Settings,
    ceiling_runs: int = CEILING_RUNS,
) -> dict[str, float]:
    """The ceiling, then the searches; the figures."""
    figures: dict[str, float] = {}
    searches: dict[int, list[list[Step]]] = {count: [] for count in counts}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as name:
        directory = Path(name)
        if ceiling_runs:
            ceilings = [await ceiling(directory) for _ in range(ceiling_runs)]
            figures["orchestrator_ceiling_warms_per_s"] = statistics.median(c for c, _ in ceilings)
            figures["orchestrator_ceiling_cpu_ms_per_warm"] = statistics.median(
                ms for _, ms in ceilings
            )
            shown = ", ".join(f"{c:.0f} ({ms:.2f} ms CPU each)" for c, ms in ceilings)
            print(f"orchestrator ceiling {shown} warms/s", file=sys.stderr, flush=True)
        previous: dict[int, list[tuple[int, bool]]] = {count: [] for count in counts}
        latest: list[tuple[int, bool]] = []
        for run in range(1, runs + 1):
            for count in counts:
                # R = 2's first search starts where R = 1's ended: on shared cores the
                # second replica moves the capacity little (issue 16), so steps are saved.
                history = previous[count] or latest
                start = (
                    min(settings.ks) if settings.ks else first_k(history, start_k, settings.step)
                )
                steps = await search(count, run, start, settings, directory)
                searches[count].append(steps)
                previous[count] = latest = [(s.k, s.behind is None) for s in steps]
    figures |= summarize(searches)
    figures["runs"] = float(runs)
    figures["interval_ms"] = float(settings.interval_ms)
    return figures


def run(
    runs: int = RUNS,
    counts: Sequence[int] = REPLICAS,
    start_k: int = START_K,
    settings: Settings | None = None,
    ceiling_runs: int = CEILING_RUNS,
) -> dict[str, float]:
    """Ceiling and searches on the local broker and Redis (``BENCH_AMQP_URL``,
    ``BENCH_REDIS_URL``)."""
    return asyncio.run(measure(runs, counts, start_k, settings or Settings(), ceiling_runs))


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replicas",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--runs", type=int, default=RUNS, help="searches per replica count")
    parser.add_argument("--replicas", type=_ints, default=list(REPLICAS), help="e.g. 1,2")
    parser.add_argument("--start-k", type=int, default=START_K, help="the first run's first K")
    parser.add_argument("--step", type=float, default=STEP, help="K's factor between windows")
    parser.add_argument("--max-k", type=int, default=MAX_K, help="K never goes above this")
    parser.add_argument("--interval-ms", type=int, default=INTERVAL_MS)
    parser.add_argument("--warm-up", type=float, default=WARM_UP_S, help="seconds")
    parser.add_argument("--window", type=float, default=WINDOW_S, help="seconds")
    parser.add_argument(
        "--ks", type=_ints, default=[], help="e.g. 1000,2000: exactly these Ks, no search"
    )
    parser.add_argument("--ceiling-runs", type=int, default=CEILING_RUNS, help="0: none")
    args = parser.parse_args(argv)
    settings = Settings(
        args.interval_ms, args.step, args.max_k, args.warm_up, args.window, tuple(sorted(args.ks))
    )
    figures = run(args.runs, args.replicas, args.start_k, settings, args.ceiling_runs)
    for metric, value in figures.items():
        print(f"{metric:<44} {value:>12,.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
