"""Stalls the network hides: a path that stops forwarding, a broker that blocks publishing.

Both through the proxy (``tcp_proxy.py``) between the worker and the real broker: the
blackhole stops forwarding without a FIN or RST; the broker's ``connection.blocked`` is
simulated at the port (the proxy sends the frame), since a memory alarm on the shared
broker would stop every other test.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, TypeVar

import aiohttp
import pytest
from pamqp import commands as spec
from pamqp import frame

from tests.integration.probe import Probe
from tests.reliability.conftest import ready, until
from tests.reliability.tcp_proxy import TcpProxy
from warmer.app import App

pytestmark = pytest.mark.broker

M = TypeVar("M")

CID = "c-stall"
HEARTBEAT_S = 2
# aiormq gives up on a connection with no frame for (heartbeat + 1) * 3 s, checked every
# heartbeat / 2 s: 9 to 10 s here; the rest is slack for a loaded machine.
NOTICED_WITHIN_S = 15.0
RECONNECT_S = 15.0


async def until_match(
    session: aiohttp.ClientSession, app: App, status: int, pattern: str, timeout: float
) -> tuple[float, str]:
    """Wait for ``/readyz`` to answer ``status`` with text matching ``pattern``."""
    started = time.monotonic()
    while True:
        answer = await ready(session, app)
        if answer[0] == status and re.fullmatch(pattern, answer[1]):
            return time.monotonic() - started, answer[1]
        assert time.monotonic() - started < timeout, answer
        await asyncio.sleep(0.05)


async def metric(session: aiohttp.ClientSession, app: App, name: str) -> float:
    async with session.get(f"http://127.0.0.1:{app.http_port}/metrics") as response:
        text = await response.text()
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


async def test_a_blackholed_path_is_noticed_and_nothing_sent_meanwhile_is_lost(
    proxy: TcpProxy, amqp_url: str, probe: Probe, start_worker: Any
) -> None:
    app = await start_worker(
        amqp_url=proxy.url(amqp_url), http="127.0.0.1:0", heartbeat_s=HEARTBEAT_S
    )
    surfaces = await probe.surfaces()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await ready(session, app) == (200, "ready")
        assert client_methods(proxy, spec.Connection.TuneOk)[0].heartbeat == HEARTBEAT_S
        reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
        assert reply["ok"] is True  # acknowledged before the path dies

        proxy.blackhole()
        # Sent while the worker cannot hear: the broker keeps it (or takes it back from
        # the dead connection) for the worker's next connection.
        await probe.event({"type": "turn.settled", "conversationId": CID, "cwd": "/repo"})
        noticed_s = await until(session, app, (503, "broker connection lost"), NOTICED_WITHIN_S)
        async with session.get(f"http://127.0.0.1:{app.http_port}/healthz") as response:
            assert response.status == 200  # the process is fine: only not ready
        assert app.reconnections == 0

        proxy.restore()
        await until(session, app, (200, "ready"), RECONNECT_S)
        assert app.reconnections == 1
        assert await metric(session, app, "warmer_broker_reconnections_total") == 1

        update = await surfaces.until(
            lambda b: b["conversationId"] == CID and b["state"]["status"] == "armed", 10
        )
        assert update["state"]["enabled"] is True
        reply = await probe.command({"type": "get_state", "conversationId": CID})
        assert reply["state"]["enabled"] is True and reply["state"]["status"] == "armed"
    print(f"blackhole noticed after {noticed_s:.1f} s (heartbeat {HEARTBEAT_S} s)")


def client_methods(proxy: TcpProxy, kind: type[M]) -> list[M]:
    """The channel-0 methods of type ``kind`` the clients sent through ``proxy``."""
    methods = (frame.unmarshal(raw)[2] for raw in proxy.client_control)
    return [method for method in methods if isinstance(method, kind)]


def blocked(reason: str) -> bytes:
    return bytes(frame.marshal(spec.Connection.Blocked(reason=reason), 0))


def unblocked() -> bytes:
    return bytes(frame.marshal(spec.Connection.Unblocked(), 0))


async def test_a_blocked_connection_is_not_ready_with_the_broker_reason_until_unblocked(
    proxy: TcpProxy, amqp_url: str, probe: Probe, start_worker: Any
) -> None:
    app = await start_worker(amqp_url=proxy.url(amqp_url), http="127.0.0.1:0")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await ready(session, app) == (200, "ready")
        # The worker told the broker it understands connection.blocked.
        (start_ok,) = client_methods(proxy, spec.Connection.StartOk)
        capabilities = (start_ok.client_properties or {})["capabilities"]
        assert isinstance(capabilities, dict)
        assert capabilities["connection.blocked"] is True

        assert proxy.to_clients(blocked("low on memory")) == 1
        reason = "broker_blocked: the broker blocked publishing: low on memory"
        await until(session, app, (503, reason), 5)
        assert await metric(session, app, "warmer_broker_blocked_total") == 1
        async with session.get(f"http://127.0.0.1:{app.http_port}/healthz") as response:
            assert response.status == 200

        proxy.to_clients(unblocked())
        await until(session, app, (200, "ready"), 5)
        assert await metric(session, app, "warmer_broker_blocked_total") == 1
        # The connection works on: a command is answered.
        reply = await probe.command({"type": "get_state", "conversationId": CID})
        assert reply["ok"] is True


async def test_a_stall_the_heartbeat_has_not_noticed_yet_shows_and_clears(
    proxy: TcpProxy, amqp_url: str, probe: Probe, start_worker: Any
) -> None:
    # aiormq's default heartbeat (60 s) would take minutes; the watchdog sees the pipeline
    # hold up as soon as warms fall due with their publishes unconfirmed.
    app = await start_worker(
        amqp_url=proxy.url(amqp_url), http="127.0.0.1:0", heartbeat_s=60, stall_s=2
    )
    warms = await probe.warms()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for command in (
            {"type": "set_enabled", "conversationId": CID, "enabled": True},
            {"type": "set_interval", "conversationId": CID, "intervalMs": 1000},
        ):
            assert (await probe.command(command))["ok"] is True
        await probe.event({"type": "turn.settled", "conversationId": CID, "cwd": "/repo"})
        await warms.next_body(5)
        assert await ready(session, app) == (200, "ready")

        proxy.blackhole()
        seen_s, reason = await until_match(
            session, app, 503, r"stall: the pipeline took no input for \d+ s \(\d+ waiting\)", 10
        )
        assert await metric(session, app, "warmer_stalls_total") == 1

        proxy.restore()  # what waited goes through: the confirms come, the pipeline moves
        await until(session, app, (200, "ready"), 15)
        assert app.reconnections == 0  # the connection never died
        await warms.until(lambda b: b["conversationId"] == CID, 5)
    print(f"stall seen {seen_s:.1f} s after the blackhole: {reason}")
