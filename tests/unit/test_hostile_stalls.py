"""Hostile: settings and flow-control edges of the broker connection, without a broker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiormq.connection
import msgspec
import pytest
import structlog
from pamqp import commands as spec

from warmer.app import App, StartupError, _amqp_url, run
from warmer.bus import flow
from warmer.config import Config


def config(tmp_path: Path, url: str) -> Config:
    return msgspec.convert(
        {"amqp_url": url, "store": f"sqlite:///{tmp_path / 'w.db'}", "http": "off"}, Config
    )


@pytest.mark.parametrize("given", ["0", "-1", "65535", "70000", "ten", "", "1.5", "٣"])
def test_a_url_heartbeat_aiormq_reads_as_off_is_refused(tmp_path: Path, given: str) -> None:
    # aiormq 7.2 reads each of these as 0, "no heartbeat", without a word: a path that
    # stops forwarding would go unnoticed for hours (the stall this issue is about). On
    # main the URL's heartbeat won whatever it said.
    url = f"amqp://guest:guest@127.0.0.1:5672/?heartbeat={given}"
    if given.isascii() and given.lstrip("-").isdigit():  # a number aiormq takes as off
        assert aiormq.connection.parse_heartbeat(given) == 0
    with pytest.raises(ValueError, match="would turn the heartbeat off"):
        _amqp_url(url, 10)
    with pytest.raises(StartupError, match=r"WARMER_AMQP_URL: heartbeat="):
        App(config(tmp_path, url))


def test_a_url_heartbeat_within_the_bounds_still_wins(tmp_path: Path) -> None:
    for given in ("1", "30", "3600"):
        url = _amqp_url(f"amqp://rabbit/?heartbeat={given}", 10)
        assert url.query["heartbeat"] == given
        assert aiormq.connection.parse_heartbeat(given) == int(given)


async def test_warmer_run_with_a_url_heartbeat_of_0_exits_2_at_once(tmp_path: Path) -> None:
    code = await asyncio.wait_for(
        run(config(tmp_path, "amqp://guest:guest@127.0.0.1:1/?heartbeat=0")), 5
    )
    assert code == 2


def test_a_flapping_alarm_costs_two_lines_a_flap_and_counts_each_block(
    tmp_path: Path,
) -> None:
    # A memory alarm flapping at the watermark: the worker says each change once, and
    # counts each block; nothing is kept per flap (Health holds one reason a part).
    app = App(config(tmp_path, "amqp://guest:guest@127.0.0.1:5672/"))
    underlay = object()
    app._connection = SimpleNamespace(transport=SimpleNamespace(connection=underlay))  # type: ignore[assignment]
    with structlog.testing.capture_logs() as logs:
        for _ in range(500):
            app._on_flow(underlay, "low on memory")
            app._on_flow(underlay, "low on memory")  # said twice: still one block
            app._on_flow(object(), None)  # another connection's unblock: not ours
            assert app.health.reason("broker_blocked") is not None
            app._on_flow(underlay, None)
    events = [entry["event"] for entry in logs]
    assert events.count("not_ready") == events.count("ready_again") == 500
    assert len(events) == 1000
    assert app.metrics.broker_blocked._value.get() == 500
    assert app.health.reasons() == []


def test_flow_listeners_see_each_frame_and_one_that_raises_costs_nothing() -> None:
    flow.install()
    seen: list[Any] = []
    calls = 0

    def failing(_connection: object, _reason: str | None) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a listener's bug")

    undo = [flow.subscribe(failing), flow.subscribe(lambda c, r: seen.append(r))]
    handler = getattr(aiormq.connection.Connection, flow._BLOCKED)
    unhandler = getattr(aiormq.connection.Connection, flow._UNBLOCKED)
    fake = SimpleNamespace(_Connection__connection_unblocked=asyncio.Event())
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(100):
                asyncio.run(handler(fake, spec.Connection.Blocked(reason="")))
                asyncio.run(unhandler(fake, spec.Connection.Unblocked()))
    finally:
        for unsubscribe in undo:
            unsubscribe()
    assert seen == ["no reason given", None] * 100
    assert calls == 200
    assert [e["event"] for e in logs] == ["flow_listener_failed"] * 200


@pytest.mark.parametrize("given", ["0", "-1", "abc", "inf", "1e3", "0.05", "3601", ""])
def test_a_url_reconnect_interval_aio_pika_reads_as_a_busy_loop_is_refused(
    tmp_path: Path, given: str
) -> None:
    # Over the real broker behind a refusing proxy, reconnect_interval=0 made 6,269
    # attempts in 3 s with 3.0 s of CPU (the loop starved); its two log lines hid it.
    if given in {"0", "abc", "inf", "1e3"}:
        assert aiormq.connection.parse_timeout(given) == 0  # aio-pika reads it so
    url = f"amqp://guest:guest@127.0.0.1:5672/?reconnect_interval={given}"
    with pytest.raises(ValueError, match="reconnect_interval="):
        _amqp_url(url, 10)
    with pytest.raises(StartupError, match=r"WARMER_AMQP_URL: reconnect_interval="):
        App(config(tmp_path, url))


def test_a_url_reconnect_interval_within_the_bounds_still_wins() -> None:
    for given in ("0.1", "0.5", "1", "30", "3600"):
        url = _amqp_url(f"amqp://rabbit/?reconnect_interval={given}", 10)
        assert url.query["reconnect_interval"] == given
        assert aiormq.connection.parse_timeout(given) == float(given)
