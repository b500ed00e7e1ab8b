"""Hostile, over the real broker: confirms that come late but come, resets in a row.

A confirm overdue drops the connection (``Outbound.reset``); the broker then delivers again
everything not acknowledged, and a quorum queue counts each such delivery toward its
``x-delivery-limit`` (20). A broker slow but alive must not be dropped again and again:
that makes no progress and ends with good messages dead-lettered as ``delivery_limit``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.integration.probe import Probe
from warmer.contract import WarmRequested

pytestmark = pytest.mark.broker


@pytest.fixture
async def unretrieved() -> AsyncIterator[list[dict[str, Any]]]:
    """Every exception the event loop saw no one retrieve; must stay empty."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: seen.append(context))
    yield seen
    loop.set_exception_handler(previous)


@pytest.fixture
async def app(start_worker: Any) -> Any:
    """A worker in this loop, on the memory store, with a 1 s confirm deadline."""
    return await start_worker(store="memory://", confirm_timeout_ms=1_000)


def assert_no_task_failed(logs: Sequence[Mapping[str, Any]], unretrieved: list[Any]) -> None:
    failed = [entry for entry in logs if entry["event"] == "task_failed"]
    assert failed == [], failed
    assert unretrieved == []


async def _depth(probe: Probe, name: str) -> int:
    queue = await probe.channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count or 0


async def test_confirms_late_but_coming_cost_one_reset_not_the_delivery_limit(
    probe: Probe, app: Any, unretrieved: list[dict[str, Any]]
) -> None:
    # Every surface confirm reaches the pipeline 1.5 s after the broker gave it, with a
    # 1 s deadline. Before: a reset at every deadline, the events delivered again and
    # again and never acknowledged (dead-lettered as delivery_limit after 20 resets).
    publisher = app.worker.outbound
    surface = publisher.surface

    async def late(update: Any) -> None:
        await surface(update)
        await asyncio.sleep(1.5)

    publisher.surface = late
    surfaces = await probe.surfaces()
    started = time.monotonic()
    with capture_logs() as logs:
        for i in range(20):
            await probe.event({"type": "turn.started", "conversationId": f"c{i}", "seq": 1})
        seen: set[str] = set()
        while len(seen) < 20:  # each at least once (the attempts cut by the reset, twice)
            seen.add((await surfaces.next_body(10))["conversationId"])
        took = time.monotonic() - started
        for _ in range(100):
            if app.readiness() is None:
                break
            await asyncio.sleep(0.05)
        await app.stop()  # graceful: waits for the confirms under way, then acknowledges
    events = [entry["event"] for entry in logs]
    assert await _depth(probe, probe.names.lifecycle) == 0  # none left to come again
    assert events.count("connection_reset") == 1, events
    assert await probe.dead_count() == 0
    assert_no_task_failed(logs, unretrieved)
    assert took < 8


async def test_resets_asked_together_or_while_reconnecting_fail_no_task(
    probe: Probe, app: Any, unretrieved: list[dict[str, Any]]
) -> None:
    # The port's reset called three times at once, then again while aio-pika reconnects:
    # the worker comes back once, consumes, and no task fails unseen.
    publisher = app.worker.outbound
    surfaces = await probe.surfaces()
    with capture_logs() as logs:
        for _ in range(3):
            await publisher.reset("hostile: together")
        await asyncio.sleep(0.05)
        await publisher.reset("hostile: while reconnecting")
        for _ in range(200):
            if app.reconnections >= 1 and app.readiness() is None:
                break
            await asyncio.sleep(0.05)
        await probe.event({"type": "turn.started", "conversationId": "c", "seq": 1})
        assert (await surfaces.next_body(10))["conversationId"] == "c"
        await app.stop()
    assert app.reconnections >= 1
    assert_no_task_failed(logs, unretrieved)
    assert await _depth(probe, probe.names.lifecycle) == 0


async def test_a_reset_while_a_warm_request_is_out_sends_it_on_the_new_connection(
    probe: Probe, app: Any, unretrieved: list[dict[str, Any]]
) -> None:
    # Five rounds: the frame is cut at a different point each time (on main, about one
    # round in six failed the warm with aiormq's bare Exception instead of sending it again).
    publisher = app.worker.outbound
    warms = await probe.warms()
    received = []
    with capture_logs() as logs:
        for token in range(5):
            request = WarmRequested(
                conversation_id="w", token=token, requested_at=app.clock.now_ms()
            )
            sending = asyncio.ensure_future(publisher.warm(request, 30_000, lambda: True))
            for _ in range(token % 3):
                await asyncio.sleep(0)  # the publish on its way: now the connection goes
            await publisher.reset("hostile: a warm request is out")
            assert await asyncio.wait_for(sending, 10) is True  # routed, confirmed
            while token not in received:  # at least once: a cut one may come twice
                received.append((await warms.next_body(10))["token"])
        await app.stop()
    assert set(received) == set(range(5))
    assert_no_task_failed(logs, unretrieved)


async def test_a_reset_while_a_dead_letter_is_out_dead_letters_it_once_acknowledged(
    probe: Probe, app: Any, unretrieved: list[dict[str, Any]]
) -> None:
    publisher = app.worker.outbound
    dead_letter = publisher.dead_letter
    resets = 0

    async def reset_midway(incoming: Any, rejection: Any) -> None:
        nonlocal resets
        sending = asyncio.ensure_future(dead_letter(incoming, rejection))
        if resets == 0:
            resets += 1
            await asyncio.sleep(0)
            await publisher.reset("hostile: a dead letter is out")
        await sending

    publisher.dead_letter = reset_midway
    with capture_logs() as logs:
        await probe.event(b"{not json")
        dead = await probe.dead_letter(10)
        for _ in range(100):  # delivered again after the reset: dead-lettered again, acked
            if app.readiness() is None and app.reconnections >= 1:
                break
            await asyncio.sleep(0.05)
        await app.stop()
    assert dead.body == b"{not json"
    assert await _depth(probe, probe.names.lifecycle) == 0
    assert_no_task_failed(logs, unretrieved)


async def test_a_reset_while_stopping_stops_in_time_and_fails_no_task(
    probe: Probe, app: Any, unretrieved: list[dict[str, Any]]
) -> None:
    surfaces = await probe.surfaces()
    await probe.event({"type": "turn.started", "conversationId": "c", "seq": 1})
    await surfaces.next_body(10)
    started = time.monotonic()
    with capture_logs() as logs:
        await app.worker.outbound.reset("hostile: while stopping")
        await asyncio.wait_for(app.stop(), 15)
    assert time.monotonic() - started < 5
    assert_no_task_failed(logs, unretrieved)
    assert await _depth(probe, probe.names.lifecycle) == 0
