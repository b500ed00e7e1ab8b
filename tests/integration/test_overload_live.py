"""Overload on the real broker (issue 17): one worker flooded with warms, briefly.

K conversations at the shortest interval (1 s, so a 1 s warm timeout), answered by a
simulated orchestrator in a process of its own (every ``warm.requested`` answered at once
with its token), more than the worker gets through; commands timed meanwhile. The worker falls
behind (that is checked: the test floods it), and still no warm fails with cause
``timeout``, no conversation is paused, no ``warms_failed`` warning is written, and every
command is answered. ``/readyz`` says how far behind on a line of its own and stays ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.probe import Probe
from tests.replicas.requester import Requester
from warmer.app import App
from warmer.worker import BEHIND_MIN_MS

pytestmark = pytest.mark.broker

K = 2_400
FLOOD_S = 10.0
INTERVAL_MS = 1_000


class Orchestrator:
    """The benchmark's simulated orchestrator (``python -m bench.orchestrator``) in a process
    of its own: it answers every warm request at once with a completion of its token, a
    batch at a time in one write, so it is never what falls behind (an orchestrator slower
    than the worker would time warms out for real: those are its failures)."""

    def __init__(self, amqp_url: str, namespace: str, records: Path) -> None:
        argv = [sys.executable, "-m", "bench.orchestrator", amqp_url, namespace, str(records)]
        argv += ["--interval-ms", str(INTERVAL_MS)]
        self._process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    async def start(self) -> None:
        assert self._process.stdout is not None
        line = await asyncio.to_thread(self._process.stdout.readline)
        assert line.strip() == "ready", line

    async def close(self) -> None:
        process = self._process
        if process.poll() is None and process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.write("stop\n")
                process.stdin.flush()
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


async def test_a_flooded_worker_falls_behind_without_failing_or_pausing_warms(
    amqp_url: str, namespace: str, probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    app: App = await start_worker(
        http="127.0.0.1:0", idle_max_warms=1_000_000, store="memory://", prefetch=256
    )
    orchestrator = Orchestrator(amqp_url, namespace, tmp_path / "records.json")
    await orchestrator.start()
    requester = await Requester.connect(amqp_url, namespace)
    ids = [f"flood-{n:05d}" for n in range(K)]
    took: list[float] = []
    behind: list[int] = []
    readyz: list[tuple[int, str]] = []
    try:
        await requester.opt_in(ids, INTERVAL_MS)
        until = time.monotonic() + FLOOD_S

        async def commands() -> None:
            n = 0
            while time.monotonic() < until:
                started = time.monotonic()
                cid = ids[n % K]
                (reply,) = await requester.commands(
                    [{"type": "get_state", "conversationId": cid}], timeout=10.0
                )
                assert reply["ok"] is True, reply
                took.append(time.monotonic() - started)
                n += 1
                await asyncio.sleep(0.1)

        async def watch(session: aiohttp.ClientSession) -> None:
            while time.monotonic() < until:
                behind.append(app.behind_ms())
                async with session.get(f"http://127.0.0.1:{app.http_port}/readyz") as response:
                    readyz.append((response.status, await response.text()))
                await asyncio.sleep(0.25)

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await asyncio.gather(commands(), watch(session))
        await asyncio.sleep(1.0)  # the completions of the last warms come in
        # Read before the orchestrator goes: the warms requested after it are returned
        # unroutable, real failures of their own (cause ``returned``), and summed.
        metrics = app.metrics
        completed = metrics.value("warmer_warms_completed_total")
        timeouts = metrics.value("warmer_warms_failed_total", cause="timeout")
        paused = metrics.value("warmer_conversations", status="paused")
        lines = app.failures.lines
    finally:
        await requester.close()
        await orchestrator.close()

    # It was flooded: behind by more than the threshold.
    assert max(behind) >= BEHIND_MIN_MS, behind
    assert any("\nbehind " in text for _, text in readyz), readyz[-3:]
    assert all(status == 200 for status, _ in readyz)  # a line, not a failure by default
    # And yet: no warm failed with cause timeout, none paused, no failure warning.
    assert completed > K, completed
    assert timeouts == 0
    assert paused == 0
    assert lines == 0
    # Commands answered all along (a person waits on each).
    assert len(took) >= FLOOD_S, len(took)  # one after the other, 0.1 s apart
    assert statistics.median(took) < 1.0, sorted(took)[-5:]


async def test_behind_fails_readiness_only_past_the_setting(start_worker: Any) -> None:
    app: App = await start_worker(behind_not_ready_s=2, store="memory://")
    assert app.readiness() is None
    assert "behind" not in app.about()  # keeping up: no third line
    app.behind_ms = lambda: 2_500  # type: ignore[method-assign]
    assert app.readiness() == "behind by 2.5 s (WARMER_BEHIND_NOT_READY_S 2)"
    assert app.about().splitlines()[1].startswith("behind 2.5 s")
    app.behind_ms = lambda: 2_000  # type: ignore[method-assign]
    assert app.readiness() is None  # at the limit: still ready, the line says it
    assert app.about().splitlines()[1].startswith("behind 2.0 s")
