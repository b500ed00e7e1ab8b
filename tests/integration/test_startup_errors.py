"""Start-up errors name their cause: refused credentials, a missing vhost, no broker.

Refused credentials and a missing vhost fail at once, whatever ``WARMER_STARTUP_WAIT_S``;
an unreachable broker is tried again with backoff until it answers or the wait is over.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.integration.conftest import make_config
from tests.integration.probe import Probe
from tests.reliability.tcp_proxy import TcpProxy
from warmer.app import App, StartupError
from warmer.store import SqliteStore

pytestmark = pytest.mark.broker


async def start_with(url: str, namespace: str, tmp_path: Path, **overrides: object) -> str:
    """The one line start-up fails with (within 5 s); the password never in it."""
    app = App(make_config(url, namespace, tmp_path, **overrides))
    started = time.monotonic()
    try:
        with pytest.raises(StartupError) as raised:
            await app.start()
    finally:
        await app.close_store()
    assert time.monotonic() - started < 5
    text = str(raised.value)
    assert "\n" not in text
    assert "s3cr3t" not in text
    return text


async def test_refused_credentials_say_so_at_once(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    url = str(URL(amqp_url).with_password("s3cr3t"))
    text = await start_with(url, namespace, tmp_path, startup_wait_s=300)
    assert "refused the credentials of user 'guest'" in text
    assert "start a broker" not in text


async def test_a_missing_vhost_says_so_at_once(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    url = str(URL(amqp_url).with_path("/no-such-vhost-here"))
    text = await start_with(url, namespace, tmp_path, startup_wait_s=300)
    assert "virtual host 'no-such-vhost-here'" in text


async def test_an_unreachable_host_says_so(namespace: str, tmp_path: Path) -> None:
    text = await start_with(
        "amqp://guest:s3cr3t@127.0.0.1:1/", namespace, tmp_path, startup_wait_s=0
    )
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in text
    assert "start a broker" in text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_start_up_waits_for_a_broker_that_appears_late(
    amqp_url: str, namespace: str, tmp_path: Path, probe: Probe
) -> None:
    port = free_port()
    upstream = URL(amqp_url)
    broker = TcpProxy(upstream.host or "127.0.0.1", upstream.port or 5672)  # not listening yet
    late_url = str(upstream.with_host("127.0.0.1").with_port(port))
    app = App(make_config(late_url, namespace, tmp_path, http="127.0.0.1:0", startup_wait_s=60))
    starting = asyncio.get_running_loop().create_task(app.start())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await asyncio.sleep(1.5)  # the first attempt, the 1 s pause, the second
            assert app.http_port is not None  # served before connecting
            base = f"http://127.0.0.1:{app.http_port}"
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200  # alive while waiting
            async with session.get(f"{base}/readyz") as response:
                assert (response.status, (await response.text()).split("\n")[0]) == (
                    503,
                    "connecting to the broker",
                )
            assert not starting.done()

            await broker.start(port)  # the broker appears
            await asyncio.wait_for(starting, 10)  # within the next pause (2 s)
            async with session.get(f"{base}/readyz") as response:
                assert (response.status, (await response.text()).split("\n")[0]) == (200, "ready")
            assert broker.accepted == 1
            reply = await probe.command({"type": "get_state", "conversationId": "late"})
            assert reply["ok"] is True
    finally:
        if not starting.done():
            starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await app.stop()
        await broker.close()


async def test_an_unreadable_record_stops_start_up_naming_the_conversation(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    # Read when its shard is taken, so with the broker there (the lock is the broker's).
    path = tmp_path / "unreadable.db"
    store = SqliteStore(str(path))
    await store.open()
    await store.commit({"conv-7": b"\xc1 not msgpack"}, 5)
    await store.close()
    text = await start_with(amqp_url, namespace, tmp_path, store=f"sqlite:///{path}")
    assert "conv-7" in text and "unreadable record" in text
    store = SqliteStore(str(path))
    await store.open()
    try:
        assert (await store.load()).records["conv-7"] == b"\xc1 not msgpack"  # left as it was
    finally:
        await store.close()
