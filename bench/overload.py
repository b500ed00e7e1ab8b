"""Overload: twice the worker's measured capacity for a while, and how it degrades.

One replica (``WARMER_SHARDS=4``, Redis store, ``WARMER_LOG_LEVEL=warning``, JSON logs, as
``bench.replicas``) and the orchestrator of ``bench.orchestrator``, each in its own
process, in a namespace and Redis prefix of their own (deleted afterwards). K
conversations are opted in at a 1 s interval, K = twice the sustained warm rate of one
replica (``--capacity``; by default the figure ``bench.replicas`` measured earlier in the
same ``python -m bench``, else 1,200/s, this machine's), so the warms due are twice what
it sustains; 200 more are created, not enabled, for the commands. From the end of the
opt-in, for ``--duration`` seconds (default 60 in ``make bench``; the issue's figure is
300: ``python -m bench.overload --duration 300``):

- commands at a steady 20/s (every other one a ``get_state`` of a warming conversation,
  the others a ``set_interval`` of an idle one), each awaited up to 10 s: latency
  p50/p99/max, and how many went unanswered;
- from the worker's ``/metrics`` at the start and the end: warms requested, completed,
  failed by cause (``warms_failed_<cause>``), stale completions; at the end the
  conversations by status (``paused`` above all);
- warning (and error) lines the worker wrote in that time (its log, a JSON line each);
- the worker's RSS, sampled every second (max and at the end), and its CPU, the
  broker's, the orchestrator's and the machine's, in % of one core;
- lateness of the warms the orchestrator received (as in ``bench.replicas``: against the
  previous completion + the interval), p50/p99/max, their delivery (received minus
  ``requestedAt``) p50/p99, and the warms/s it received.

One run (a long one); the conversation ids and the command mix come from fixed seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from bench._harness import (
    Cpu,
    Deployment,
    by_label,
    conversation_ids,
    rss_mb,
    scrape,
    total,
)
from bench.commands import open_loop
from bench.stats import percentile

INTERVAL_MS: Final = 1_000
DEFAULT_CAPACITY: Final = 1_200.0
DURATION_S: Final = 60.0
RATE: Final = 20.0
OVERLOAD: Final = 2.0
IDLE_CONVERSATIONS: Final = 200
ESTIMATE_S: Final = DURATION_S + 30.0
"""About what ``run()`` takes with the defaults (for ``python -m bench``'s budget)."""
_SEED: Final = 18


def capacity_from(previous: Mapping[str, float] | None) -> float:
    """One replica's sustained warms/s measured earlier in the same run, else the default."""
    return (previous or {}).get("replicas.r1_sustained_warms_per_s") or DEFAULT_CAPACITY


async def _rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(rss_mb(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def measure(capacity: float, duration: float, rate: float) -> dict[str, float]:
    namespace = f"bench-overload-{os.getpid()}"
    k = round(OVERLOAD * capacity * INTERVAL_MS / 1000)
    busy = conversation_ids(k, _SEED * 1000)
    idle = conversation_ids(IDLE_CONVERSATIONS, _SEED * 1000 + 1)
    figures: dict[str, float] = {"capacity_warms_per_s": capacity, "k": float(k)}
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as name:
        async with Deployment(namespace, Path(name), interval_ms=INTERVAL_MS) as deployment:
            client = deployment.client
            worker = deployment.replicas[0]
            await client.commands(
                {"type": "set_interval", "conversationId": cid, "intervalMs": 600_000}
                for cid in idle
            )
            await client.opt_in(busy, INTERVAL_MS)
            await deployment.orchestrator.dump()
            levels = worker.log_levels()
            before = await scrape(deployment.replicas)
            cpu = Cpu(deployment.parties())
            began = time.time() * 1000
            rss: list[float] = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(_rss(worker.process.pid, rss, stop))
            latencies, unanswered = await open_loop(client, idle, busy, rate, duration, 1)
            ended = time.time() * 1000
            used = cpu.pct()
            stop.set()
            await sampler
            after = await scrape(deployment.replicas)
            final = worker.log_levels()
            for level in ("error", "warning"):
                for line in worker.lines(level):
                    print(f"worker {level}: {line[:300]}", file=sys.stderr)
            records = await deployment.orchestrator.dump()

    inside = [r for r in records if began <= r[2] < ended]
    late = [r[3] for r in inside if r[3] is not None]
    delivery = [r[2] - r[1] for r in inside]
    seconds = (ended - began) / 1000
    figures["duration_s"] = seconds
    figures["warms_per_s"] = len(inside) / seconds
    for what, series in (
        ("requested", "warmer_warms_requested_total"),
        ("completed", "warmer_warms_completed_total"),
        ("failed", "warmer_warms_failed_total"),
        ("stale", "warmer_warms_stale_total"),
    ):
        figures[f"warms_{what}"] = total(after, series) - total(before, series)
    failed_before = by_label(before, "warmer_warms_failed_total", "cause")
    for cause, value in sorted(by_label(after, "warmer_warms_failed_total", "cause").items()):
        figures[f"warms_failed_{cause}"] = value - failed_before.get(cause, 0.0)
    for status, value in sorted(by_label(after, "warmer_conversations", "status").items()):
        figures[f"conversations_{status}"] = value
    figures.setdefault("conversations_paused", 0.0)
    for level in ("warning", "error"):
        figures[f"log_{level}_lines"] = float(final.get(level, 0) - levels.get(level, 0))
    figures["log_warning_lines_per_min"] = figures["log_warning_lines"] / seconds * 60
    ms = [x * 1000 for x in latencies]
    figures["commands_sent"] = float(len(latencies) + unanswered)
    figures["commands_unanswered"] = float(unanswered)
    figures["commands_p50_ms"] = percentile(ms, 0.5)
    figures["commands_p99_ms"] = percentile(ms, 0.99)
    figures["commands_max_ms"] = percentile(ms, 1.0)
    figures["late_p50_ms"] = percentile(late, 0.5)
    figures["late_p99_ms"] = percentile(late, 0.99)
    figures["late_max_ms"] = percentile(late, 1.0)
    figures["delivery_p50_ms"] = percentile(delivery, 0.5)
    figures["delivery_p99_ms"] = percentile(delivery, 0.99)
    figures["worker_rss_max_mb"] = max(rss, default=0.0)
    figures["worker_rss_end_mb"] = rss[-1] if rss else 0.0
    for who in ("worker", "broker", "orchestrator", "machine"):
        figures[f"cpu_{who}_pct"] = used[who]
    return figures


def run(
    capacity: float | None = None,
    duration: float = DURATION_S,
    rate: float = RATE,
    previous: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The figures above, on the local broker and Redis."""
    return asyncio.run(measure(capacity or capacity_from(previous), duration, rate))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overload",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--capacity",
        type=float,
        default=DEFAULT_CAPACITY,
        help="one replica's sustained warms/s (bench.replicas' r1_sustained_warms_per_s)",
    )
    parser.add_argument("--duration", type=float, default=DURATION_S, help="seconds")
    parser.add_argument("--rate", type=float, default=RATE, help="commands per second")
    args = parser.parse_args(argv)
    for metric, value in run(args.capacity, args.duration, args.rate).items():
        print(f"{metric:<28} {value:>12,.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
