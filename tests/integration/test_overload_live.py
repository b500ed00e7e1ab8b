"""Overload on the real broker (issue 17): one worker flooded with warms, briefly.

K conversations at the shortest interval (1 s, so a 1 s warm timeout), answered by a
simulated orchestrator in this process (every ``warm.requested`` answered at once with its
token), more than the worker gets through while it shares this process and the machine
with the orchestrator and the requester; commands timed meanwhile. The worker falls
behind (that is checked: the test floods it), and still no warm fails with cause
``timeout``, no conversation is paused, no ``warms_failed`` warning is written, and every
command is answered. ``/readyz`` says how far behind on a line of its own and stays ready.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aio_pika
import aiohttp
import msgspec
import pytest

from tests.integration.probe import Probe
from tests.replicas.requester import Requester
from warmer.app import App
from warmer.bus.topology import WARM_ROUTING_KEY, Names
from warmer.worker import BEHIND_MIN_MS

pytestmark = pytest.mark.broker

K = 1_200
FLOOD_S = 10.0
INTERVAL_MS = 1_000


class Orchestrator:
    """Answers every warm request at once with a completion of its token."""

    def __init__(self) -> None:
        self.answered = 0
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def start(self, amqp_url: str, names: Names) -> None:
        self._connection = await aio_pika.connect(amqp_url)
        listen = await self._connection.channel()
        await listen.set_qos(prefetch_count=2_000)
        publish = await self._connection.channel(publisher_confirms=False)
        lifecycle = await publish.get_exchange(names.lifecycle)
        queue = await listen.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(names.warm, WARM_ROUTING_KEY)

        async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            warm = msgspec.json.decode(message.body)
            body = {
                "type": "warm.completed",
                "conversationId": warm["conversationId"],
                "token": warm["token"],
                "usage": {"inputTokens": 2000, "cacheReadTokens": 2000, "cacheWriteTokens": 0},
            }
            await lifecycle.publish(
                aio_pika.Message(
                    msgspec.json.encode(body),
                    content_type="application/json",
                    headers={"conversation-id": warm["conversationId"]},
                ),
                "warm.completed",
            )
            self.answered += 1

        await queue.consume(answer, no_ack=True)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


async def test_a_flooded_worker_falls_behind_without_failing_or_pausing_warms(
    amqp_url: str, namespace: str, probe: Probe, start_worker: Any
) -> None:
    app: App = await start_worker(
        http="127.0.0.1:0", idle_max_warms=1_000_000, store="memory://", prefetch=256
    )
    orchestrator = Orchestrator()
    await orchestrator.start(amqp_url, Names.of(namespace))
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
    finally:
        await requester.close()
        await orchestrator.close()

    metrics = app.metrics
    completed = metrics.value("warmer_warms_completed_total")
    # It was flooded: behind by more than the threshold, and not keeping the 1 s schedule.
    assert max(behind) >= BEHIND_MIN_MS, behind
    assert any("\nbehind " in text for _, text in readyz), readyz[-3:]
    assert all(status == 200 for status, _ in readyz)  # a line, not a failure by default
    assert completed < K * FLOOD_S * 0.9, completed
    # And yet: no warm failed with cause timeout, none paused, no failure warning.
    assert completed > K, completed
    assert metrics.value("warmer_warms_failed_total", cause="timeout") == 0
    assert metrics.value("warmer_conversations", status="paused") == 0
    assert app.failures.lines == 0
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
