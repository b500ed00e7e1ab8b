"""A broker outage costs a bounded number of log lines: one when lost, one when back.

A real ``warmer run`` process behind the proxy, warming every second so publishes wait
through the outage; the proxy refuses every reconnection for a few seconds, so aio-pika
tries about once a second.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.integration.probe import Probe
from tests.reliability.conftest import worker_settings
from tests.reliability.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker

CID = "c-noise"
OUTAGE_S = 5.0


async def test_an_outage_is_two_lines_with_the_attempts_and_the_time_between(
    proxy: TcpProxy,
    amqp_url: str,
    namespace: str,
    probe: Probe,
    spawn_worker: Any,
    tmp_path: Path,
) -> None:
    worker = spawn_worker(
        **worker_settings(proxy.url(amqp_url), namespace, tmp_path, WARMER_LOG_LEVEL="info")
    )
    await worker.wait_event("worker_started")
    warms = await probe.warms()
    reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    assert reply["ok"] is True
    reply = await probe.command({"type": "set_interval", "conversationId": CID, "intervalMs": 1000})
    assert reply["ok"] is True
    await probe.event({"type": "turn.settled", "conversationId": CID, "cwd": "/repo"})
    await warms.next_body(5)  # warming every second: publishes will wait in the outage

    before = len(worker.lines)
    proxy.cut(refuse_for=OUTAGE_S)
    await asyncio.sleep(OUTAGE_S)
    back = await worker.wait_event("broker_reconnected", 15)
    await asyncio.sleep(0.5)
    during = worker.lines[before:]
    events = [e["event"] for e in worker.events()[-len(during) :]] if during else []
    print(f"{len(during)} lines over a {OUTAGE_S} s outage: {events}")

    assert events.count("broker_connection_lost") == 1, "\n".join(during)
    assert events.count("broker_reconnected") == 1, "\n".join(during)
    assert events.count("publish_waiting_for_connection") == 1, "\n".join(during)
    # The rest is the work's own (warms failing, re-sent) and one line a consumer back.
    about_the_connection = [e for e in events if not e.startswith(("warm_", "warms_"))]
    assert len(about_the_connection) <= 5, "\n".join(during)
    assert back["attempts"] >= 3  # about one a second while refused
    assert OUTAGE_S - 1 <= back["lost_for_s"] <= OUTAGE_S + 5
    assert not [e for e in worker.events() if e.get("logger", "").startswith(("aio", "aiormq"))]
