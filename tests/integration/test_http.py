"""Health and metrics over HTTP, on a worker running against the real broker."""

from __future__ import annotations

import asyncio
import platform
import socket
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import make_config
from tests.integration.probe import Probe
from warmer.app import App, StartupError
from warmer.observe import http as observe_http
from warmer.observe.metrics import NAMES

pytestmark = pytest.mark.broker

HISTOGRAMS = frozenset(
    {
        "warmer_timer_lateness_seconds",
        "warmer_batch_size",
        "warmer_commit_seconds",
        "warmer_warm_cache_ratio",
        "warmer_shard_takeover_seconds",
        "warmer_shard_handover_seconds",
    }
)
# Shown once the gap model has seen 100 idle gaps (``Economy.advice``): not on a new worker.
ADVICE = frozenset({"warmer_cache_cost_per_gap", "warmer_ttl_1h_cheaper"})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get(session: aiohttp.ClientSession, app: App, path: str) -> tuple[int, str, str]:
    """Status, body and content type of ``GET path`` on the worker."""
    async with session.get(f"http://127.0.0.1:{app.http_port}{path}") as response:
        return response.status, await response.text(), response.headers["Content-Type"]


async def samples(session: aiohttp.ClientSession, app: App) -> dict[tuple[str, Any], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    status, text, _ = await get(session, app, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait until the awaitable ``check()`` returns true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.05)


async def test_healthz_and_readyz_answer_when_running(
    start_worker: Any, http: aiohttp.ClientSession
) -> None:
    app = await start_worker(http="127.0.0.1:0")
    assert app.http_port
    assert await get(http, app, "/healthz") == (200, "ok", "text/plain; charset=utf-8")
    status, text, kind = await get(http, app, "/readyz")
    assert (status, kind) == (200, "text/plain; charset=utf-8")
    assert text == f"ready\nreplica {app.replica} owns shards [0] of 1"
    status, _, _ = await get(http, app, "/nothing-here")
    assert status == 404


async def test_metrics_show_every_metric_and_move_with_events_and_commands(
    start_worker: Any, http: aiohttp.ClientSession, probe: Probe
) -> None:
    app = await start_worker(http="127.0.0.1:0")
    status, text, content_type = await get(http, app, "/metrics")
    assert status == 200 and content_type == CONTENT_TYPE_LATEST
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for name in NAMES:
        if name not in ADVICE:
            assert (f"{name}_count" if name in HISTOGRAMS else name) in names, name
    assert "process_resident_memory_bytes" in names
    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert scraped[("warmer_broker_connected", ())] == 1
    assert [key for key in scraped if key[0] == "warmer_build_info"] == [
        (
            "warmer_build_info",
            (("python", platform.python_version()), ("version", version("warmer"))),
        )
    ]
    assert not [name for name in names if name.endswith("_created")]

    surfaces = await probe.surfaces()
    reply = await probe.command({"type": "set_enabled", "conversationId": "h", "enabled": True})
    assert reply["ok"] is True
    await probe.event({"type": "turn.settled", "conversationId": "h", "cwd": "/srv"})
    await surfaces.next_body()
    await surfaces.next_body()

    settled = ("warmer_events_consumed_total", (("type", "turn.settled"),))
    enabled = ("warmer_commands_total", (("outcome", "applied"), ("type", "set_enabled")))
    armed = ("warmer_conversations", (("status", "armed"),))

    async def moved() -> bool:
        now = await samples(http, app)
        return (
            now[settled] == 1
            and now[enabled] == 1
            and now[("warmer_surface_updates_total", ())] == 2
            and now[armed] == 1
            and now[("warmer_timers_armed", ())] == 1
            and now[("warmer_batch_size_count", ())] >= 1
            and now[("warmer_commit_seconds_count", ())] >= 2
        )

    await eventually(moved)


async def test_http_is_off_by_default_and_stops_with_the_worker(
    start_worker: Any, amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    off = await start_worker(store="memory://")
    assert off.http_port is None

    # A second replica of the namespace (a standby: the first holds the only shard).
    config = make_config(amqp_url, namespace, tmp_path / "second", http="127.0.0.1:0")
    app = App(msgspec.structs.replace(config, store="memory://"))
    (tmp_path / "second").mkdir()
    await app.start()
    port = app.http_port
    assert port
    await app.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
        pass


async def test_a_port_in_use_stops_start_up_with_one_line(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = App(make_config(amqp_url, namespace, tmp_path, http=f"127.0.0.1:{port}"))
        try:
            with pytest.raises(StartupError) as raised:
                await app.start()
        finally:
            await app.close_store()
    text = str(raised.value)
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in text and "WARMER_HTTP" in text
    assert "\n" not in text


async def test_scrapes_within_a_second_share_one_rendering(
    start_worker: Any, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of scrapes renders the registry once per METRICS_FRESH_S, not per scrape."""
    seconds = [1000.0]
    monkeypatch.setattr(observe_http, "_monotonic", lambda: seconds[0])
    app = await start_worker(http="127.0.0.1:0")
    stale = ("warmer_warms_stale_total", ())
    assert (await samples(http, app))[stale] == 0
    app.metrics.warms_stale.inc()
    seconds[0] += observe_http.METRICS_FRESH_S - 0.01
    assert (await samples(http, app))[stale] == 0  # the same rendering
    seconds[0] += 0.01
    assert (await samples(http, app))[stale] == 1
