"""``/readyz`` while the broker connection is cut (through the proxy), and once it heals."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.integration.probe import Probe
from tests.reliability.conftest import ready, until
from tests.reliability.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker

REFUSE_S = 2.0
RECONNECT_S = 15.0


async def test_readyz_is_503_while_the_broker_is_cut_off_and_200_once_healed(
    proxy: TcpProxy, amqp_url: str, probe: Probe, start_worker: Any
) -> None:
    app = await start_worker(amqp_url=proxy.url(amqp_url), http="127.0.0.1:0")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await ready(session, app) == (200, "ready")

        assert proxy.cut(refuse_for=REFUSE_S) == 1
        await until(session, app, (503, "broker connection lost"), 5)
        async with session.get(f"http://127.0.0.1:{app.http_port}/healthz") as response:
            assert response.status == 200  # alive all along: only not ready

        await until(session, app, (200, "ready"), RECONNECT_S)
        assert proxy.accepted == 2
        # Ready means consuming: a command sent now is answered.
        reply = await probe.command({"type": "get_state", "conversationId": "r"})
        assert reply["ok"] is True

        port = app.http_port
        await app.stop()
        # Stopped: nothing listens any more.
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/healthz")


async def test_readyz_says_stopping_during_a_graceful_stop(
    amqp_url: str, probe: Probe, start_worker: Any
) -> None:
    app = await start_worker(http="127.0.0.1:0")
    assert app.worker is not None
    # Hold the stop where it waits for the warms under way, to ask meanwhile.
    release = asyncio.Event()
    settled = app.worker.settled

    async def held() -> None:
        await release.wait()
        await settled()

    app.worker.settled = held
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await ready(session, app) == (200, "ready")
        stopping = asyncio.get_running_loop().create_task(app.stop())
        await until(session, app, (503, "stopping"), 5)
        async with session.get(f"http://127.0.0.1:{app.http_port}/healthz") as response:
            assert response.status == 200
        release.set()
        await stopping
