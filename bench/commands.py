"""Commands: how many a worker answers per second when idle, and how fast it answers them
under a warm flood.

One replica (``WARMER_SHARDS=4``, Redis store, log level warning, as ``bench.replicas``),
the orchestrator of ``bench.orchestrator`` and this process as the requester, each in its
own process, in a namespace and Redis prefix of their own (deleted afterwards).

1. **Idle**: 1,000 conversations are created (a ``set_interval`` each, not enabled: no warm
   falls due). Then ``--requesters`` concurrent requesters (default 16, one connection,
   one reply queue) each send a command and await its reply, again, for ``--seconds``
   (after 1 s untimed): every other command a ``get_state``, the others a
   ``set_interval`` that changes the interval (a commit and a surface each).
   ``idle_commands_per_s`` = replies / seconds; latency (publish to reply) p50/p99/max.
2. **Flood**: then K conversations more are opted in at a 1 s interval, K past capacity
   (``--flood-k``; default twice the sustained rate ``bench.replicas`` measured in the same
   ``python -m bench``, else 2,400: twice one replica's on this machine), and after a
   4 s warm-up commands are sent at a steady ``--rate`` (default 20/s, the same mix on
   the idle conversations and the warming ones) for ``--seconds``, each awaited up to 10 s
   (``flood_unanswered`` otherwise): latency p50/p99/max, and the warms/s of the flood.

The conversation ids and the command mix come from fixed seeds. Each figure is the median
over ``--runs`` (default 3) windows, the flood ones over as many consecutive windows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from bench._harness import Body, Client, Cpu, Deployment, conversation_ids
from bench.stats import percentile

IDLE_CONVERSATIONS: Final = 1_000
REQUESTERS: Final = 16
SECONDS: Final = 8.0
RUNS: Final = 3
RATE: Final = 20.0
INTERVAL_MS: Final = 1_000
DEFAULT_FLOOD_K: Final = 2_400
COMMAND_TIMEOUT_S: Final = 10.0
ESTIMATE_S: Final = 90.0
"""About what ``run()`` takes with the defaults (for ``python -m bench``'s budget)."""
_SEED: Final = 17
_WARM_UP_S: Final = 4.0


def command(n: int, idle: list[str], busy: list[str], rng: random.Random) -> Body:
    """The ``n``-th command of the mix: ``get_state`` (even n) on a busy conversation (an
    idle one if there are none), ``set_interval`` (odd n) on an idle one, its interval
    changed each time."""
    if n % 2 == 0:
        return {"type": "get_state", "conversationId": rng.choice(busy or idle)}
    interval = 300_000 + 1_000 * (n % 60)
    return {"type": "set_interval", "conversationId": rng.choice(idle), "intervalMs": interval}


async def closed_loop(
    client: Client, idle: list[str], requesters: int, seconds: float, seed: int
) -> list[float]:
    """``requesters`` concurrent requesters, each awaiting every reply; the latencies (s)
    of the commands answered within ``seconds``."""
    rng = random.Random(seed)
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    latencies: list[float] = []

    async def requester() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            reply = await client.command(command(next(counter), idle, [], rng))
            if reply.get("ok") is not True:
                raise RuntimeError(f"command refused: {reply}")
            if time.monotonic() < deadline:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(requester() for _ in range(requesters)))
    return latencies


async def open_loop(
    client: Client, idle: list[str], busy: list[str], rate: float, seconds: float, seed: int
) -> tuple[list[float], int]:
    """Commands at a steady ``rate`` per second for ``seconds``; the latencies (s) of those
    answered within ``COMMAND_TIMEOUT_S``, and how many were not."""
    rng = random.Random(seed)
    latencies: list[float] = []
    unanswered = 0

    async def one(body: Body) -> None:
        nonlocal unanswered
        started = time.perf_counter()
        try:
            reply = await client.command(body, COMMAND_TIMEOUT_S)
        except TimeoutError:
            unanswered += 1
            return
        if reply.get("ok") is not True:
            raise RuntimeError(f"command refused: {reply}")
        latencies.append(time.perf_counter() - started)

    sent: list[asyncio.Task[None]] = []
    began = time.monotonic()
    n = 0
    while (due := began + n / rate) < began + seconds:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        sent.append(asyncio.create_task(one(command(n, idle, busy, rng))))
        n += 1
    await asyncio.gather(*sent)
    return latencies, unanswered


def _ms(latencies: list[float]) -> tuple[float, float, float]:
    return tuple(percentile(latencies, q) * 1000 for q in (0.5, 0.99, 1.0))  # type: ignore[return-value]


async def measure(
    flood_k: int, requesters: int, seconds: float, rate: float, runs: int
) -> dict[str, float]:
    figures: dict[str, float] = {}
    namespace = f"bench-commands-{os.getpid()}"
    idle = conversation_ids(IDLE_CONVERSATIONS, _SEED * 1000)
    busy = conversation_ids(flood_k, _SEED * 1000 + 1)
    with tempfile.TemporaryDirectory(prefix="bench-commands-") as name:
        async with Deployment(namespace, Path(name), interval_ms=INTERVAL_MS) as deployment:
            client = deployment.client
            await client.commands(
                {"type": "set_interval", "conversationId": cid, "intervalMs": 600_000}
                for cid in idle
            )
            await closed_loop(client, idle, requesters, 1.0, 0)  # untimed
            rates, p50s, p99s, maxes, cpus = [], [], [], [], []
            for n in range(runs):
                cpu = Cpu(deployment.parties())
                latencies = await closed_loop(client, idle, requesters, seconds, n + 1)
                used = cpu.pct()
                rates.append(len(latencies) / seconds)
                p50, p99, top = _ms(latencies)
                p50s.append(p50)
                p99s.append(p99)
                maxes.append(top)
                cpus.append(used)
                print(
                    f"idle run {n + 1}: {rates[-1]:.0f} commands/s, p50/p99/max "
                    f"{p50:.1f}/{p99:.1f}/{top:.1f} ms, worker CPU {used['worker']:.0f}%, "
                    f"requester {used['requester']:.0f}%",
                    file=sys.stderr,
                    flush=True,
                )
            figures["idle_commands_per_s"] = statistics.median(rates)
            figures["idle_latency_p50_ms"] = statistics.median(p50s)
            figures["idle_latency_p99_ms"] = statistics.median(p99s)
            figures["idle_latency_max_ms"] = statistics.median(maxes)
            figures["idle_cpu_worker_pct"] = statistics.median(c["worker"] for c in cpus)
            figures["idle_cpu_requester_pct"] = statistics.median(c["requester"] for c in cpus)

            await client.opt_in(busy, INTERVAL_MS)
            await asyncio.sleep(_WARM_UP_S)
            p50s, p99s, maxes, warms, lost = [], [], [], [], []
            for n in range(runs):
                await deployment.orchestrator.dump()
                began = time.time() * 1000
                latencies, unanswered = await open_loop(client, idle, busy, rate, seconds, 100 + n)
                ended = time.time() * 1000
                received = [r for r in await deployment.orchestrator.dump() if r[2] < ended]
                warms.append(sum(1 for r in received if r[2] >= began) / seconds)
                p50, p99, top = _ms(latencies)
                p50s.append(p50)
                p99s.append(p99)
                maxes.append(top)
                lost.append(unanswered)
                print(
                    f"flood run {n + 1} (K {flood_k}): {warms[-1]:.0f} warms/s, commands "
                    f"p50/p99/max {p50:.0f}/{p99:.0f}/{top:.0f} ms, {unanswered} unanswered",
                    file=sys.stderr,
                    flush=True,
                )
            figures["flood_k"] = float(flood_k)
            figures["flood_warms_per_s"] = statistics.median(warms)
            figures["flood_latency_p50_ms"] = statistics.median(p50s)
            figures["flood_latency_p99_ms"] = statistics.median(p99s)
            figures["flood_latency_max_ms"] = statistics.median(maxes)
            figures["flood_unanswered"] = float(sum(lost))
            figures["flood_commands_per_s"] = rate
    return figures


def flood_k_from(previous: Mapping[str, float] | None) -> int:
    """Twice the sustained rate of one replica measured earlier in the same run, else the
    default, as K at the 1 s interval."""
    rate = (previous or {}).get("replicas.r1_sustained_warms_per_s")
    return DEFAULT_FLOOD_K if not rate else round(2 * rate * INTERVAL_MS / 1000)


def run(
    flood_k: int | None = None,
    requesters: int = REQUESTERS,
    seconds: float = SECONDS,
    rate: float = RATE,
    runs: int = RUNS,
    previous: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The figures above, on the local broker and Redis."""
    k = flood_k or flood_k_from(previous)
    return asyncio.run(measure(k, requesters, seconds, rate, runs))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.commands",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--flood-k", type=int, default=DEFAULT_FLOOD_K, help="at a 1 s interval")
    parser.add_argument("--requesters", type=int, default=REQUESTERS, help="idle: concurrent")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="each window")
    parser.add_argument("--rate", type=float, default=RATE, help="flood: commands per second")
    parser.add_argument("--runs", type=int, default=RUNS, help="windows of each kind")
    args = parser.parse_args(argv)
    figures = run(args.flood_k, args.requesters, args.seconds, args.rate, args.runs)
    for metric, value in figures.items():
        print(f"{metric:<28} {value:>12,.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
