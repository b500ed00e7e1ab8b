"""``/metrics`` at 300,000 conversations: what a scrape costs the event loop, and what a
flood of scrapes does to a command.

A core holds 300,000 conversations (the mix of ``bench.recovery``: armed, warming, paused,
disabled), their gauges registered as ``App.start`` does. Figures:

- ``render_ms``: one ``generate_latest`` of the registry, best of 20 (what the loop spends
  when it renders a scrape; ``render_after_changes_ms`` the same after 1,000 inputs);
- ``get_state_ms_*``: the time a ``get_state`` takes to be answered on the worker's loop
  (one loop turn to be scheduled, as a delivery is, then ``plan_command``), p50 and p99
  over ~4 s, alone (``_idle``) and while 20 clients in another process scrape
  ``/metrics`` over HTTP as fast as they are answered (``_scraped``), with the scrapes
  answered per second in that time.

``python -m bench scrape``; ``python -m bench.scrape 300000`` for another size.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Final

from prometheus_client import generate_latest

from bench.recovery import _conversation_id, _record
from warmer.contract import GetState, SetEnabled, TurnSettled
from warmer.core import Policy, Warmer
from warmer.core.commands import SettingsChange
from warmer.observe.http import HttpEndpoint
from warmer.observe.metrics import CostGauges, Metrics, StateGauges

CONVERSATIONS: Final = 300_000
SCRAPERS: Final = 20
MEASURE_S: Final = 4.0
_NOW: Final = 1_760_000_000_000

_SCRAPER: Final = textwrap.dedent(
    """
    import asyncio, sys, time
    import aiohttp

    async def main(url, clients, seconds):
        done = 0
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + seconds
            async def scrape():
                nonlocal done
                while time.monotonic() < deadline:
                    async with session.get(url) as response:
                        await response.read()
                    done += 1
            await asyncio.gather(*(scrape() for _ in range(clients)))
        print(done)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
    """
)


def _core(size: int) -> Warmer:
    records = {_conversation_id(i): _record(i, _NOW) for i in range(size)}
    return Warmer(Policy(), records=records, adopt=True)


def _metrics(core: Warmer) -> Metrics:
    metrics = Metrics()
    metrics.registry.register(StateGauges(core.statuses, lambda: len(core)))
    metrics.registry.register(CostGauges(core.economy, core.savings))
    return metrics


def _render_ms(metrics: Metrics) -> float:
    best = float("inf")
    for _ in range(20):
        started = time.perf_counter()
        generate_latest(metrics.registry)
        best = min(best, time.perf_counter() - started)
    return best * 1000


def _change(core: Warmer, count: int) -> None:
    """``count`` inputs in committed batches of 10, as the pipeline applies them."""
    for start in range(0, count, 10):
        core.begin()
        for i in range(start, start + 10):
            cid = _conversation_id(i)
            core.apply_event(_NOW + 1000, TurnSettled(conversation_id=cid))
            change = core.plan_command(_NOW + 1000, SetEnabled(conversation_id=cid, enabled=True))
            if isinstance(change, SettingsChange):
                core.commit(_NOW + 1000, change)
        core.touched()
        core.end()


async def _get_state_ms(core: Warmer, seconds: float) -> list[float]:
    """Latencies of get_state answered on this loop, one every 10 ms for ``seconds``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    command = GetState(conversation_id=_conversation_id(7))
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        await asyncio.sleep(0)  # queued behind whatever the loop has ready, as a delivery
        core.plan_command(_NOW, command)
        latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.01)
    return latencies


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49], cuts[98]


async def _under_scrapes(core: Warmer, metrics: Metrics) -> dict[str, float]:
    http = HttpEndpoint("127.0.0.1", 0, lambda: None, metrics.registry)
    await http.start()
    try:
        idle = _percentiles(await _get_state_ms(core, MEASURE_S / 2))
        url = f"http://127.0.0.1:{http.port}/metrics"
        scrapers = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SCRAPER,
            url,
            str(SCRAPERS),
            str(MEASURE_S + 1),
            stdout=subprocess.PIPE,
        )
        await asyncio.sleep(0.5)  # the clients connected and scraping
        scraped = _percentiles(await _get_state_ms(core, MEASURE_S))
        out, _ = await scrapers.communicate()
        scrapes = int(out.decode().strip() or 0)
    finally:
        await http.stop()
    return {
        "get_state_ms_p50_idle": idle[0],
        "get_state_ms_p99_idle": idle[1],
        "get_state_ms_p50_scraped": scraped[0],
        "get_state_ms_p99_scraped": scraped[1],
        "scrapes_per_s": scrapes / (MEASURE_S + 1),
    }


def run(size: int = CONVERSATIONS) -> dict[str, float]:
    """The figures above, for ``size`` conversations."""
    core = _core(size)
    metrics = _metrics(core)
    figures = {"conversations": float(size), "render_ms": _render_ms(metrics)}
    _change(core, 1000)
    figures["render_after_changes_ms"] = _render_ms(metrics)
    figures |= asyncio.run(_under_scrapes(core, metrics))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.scrape", description="/metrics: a scrape's cost, and commands."
    )
    parser.add_argument("size", nargs="?", type=int, default=CONVERSATIONS, help="conversations")
    result = run(parser.parse_args().size)
    for name, value in result.items():
        print(f"{name:28} {value:12,.2f}")
