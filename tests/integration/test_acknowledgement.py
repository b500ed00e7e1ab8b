"""Acknowledgement: an event whose effects are not durable stays unacknowledged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.integration.probe import Probe, header
from tests.sqlite_lock import Locker
from warmer.core.records import decode_record
from warmer.store import MemoryStore, SqliteStore

pytestmark = pytest.mark.broker


async def _queue_depth(probe: Probe, name: str) -> int:
    queue = await probe.channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count or 0


async def test_close_during_store_outage_is_acked_once_persisted(
    probe: Probe, start_worker: Any
) -> None:
    app = await start_worker(store="memory://")
    store = app.store
    assert isinstance(store, MemoryStore)
    surfaces = await probe.surfaces()
    reply = await probe.command({"type": "set_enabled", "conversationId": "c", "enabled": True})
    assert reply["ok"] is True
    await surfaces.next_body()

    store.failing = True
    await probe.event({"type": "conversation.closed", "conversationId": "c", "seq": 1})
    for _ in range(100):  # the worker retries the commit in place; still failing
        if app.metrics.value("warmer_store_errors_total") >= 2:
            break
        await asyncio.sleep(0.05)
    assert app.metrics.value("warmer_store_errors_total") >= 2
    assert committed(store, "c").settings.enabled is True  # not persisted yet
    await surfaces.nothing(0.2)  # nothing is published before it is committed

    store.failing = False
    update = await surfaces.next_body()
    assert update["state"]["enabled"] is False
    assert committed(store, "c").settings.enabled is False
    await asyncio.sleep(0.2)  # let the acknowledgement reach the broker
    await app.stop()
    # An unacknowledged event would be back in the queue once the worker is gone.
    assert await _queue_depth(probe, probe.names.lifecycle) == 0
    assert await probe.dead_count() == 0


def committed(store: MemoryStore, cid: str) -> Any:
    return decode_record(store.records[cid])


async def test_store_error_on_command_is_answered_and_changes_nothing(
    probe: Probe, start_worker: Any
) -> None:
    app = await start_worker(store="memory://")
    surfaces = await probe.surfaces()
    app.store.failing = True
    reply = await probe.command({"type": "set_enabled", "conversationId": "c", "enabled": True})
    assert reply["ok"] is False and reply["code"] == "store_error"
    await surfaces.nothing(0.3)
    app.store.failing = False
    state = await probe.command({"type": "get_state", "conversationId": "c"})
    assert state["state"]["enabled"] is False
    assert await _queue_depth(probe, probe.names.commands) == 0


async def test_a_delivery_the_worker_fails_on_is_dead_lettered_at_the_delivery_limit(
    probe: Probe, start_worker: Any
) -> None:
    app = await start_worker()
    apply_event = app.worker.core.apply_event

    def crash_on_poison(now: int, event: Any) -> Any:
        if event.conversation_id == "poison":
            raise RuntimeError("a bug in the worker")
        return apply_event(now, event)

    app.worker.core.apply_event = crash_on_poison
    surfaces = await probe.surfaces()
    await probe.event({"type": "turn.started", "conversationId": "poison"})
    dead = await probe.dead_letter(20)
    assert dead.body == b'{"type":"turn.started","conversationId":"poison"}'
    deaths = header(dead, "x-death")
    assert deaths[0]["reason"] == "delivery_limit"
    assert "x-warmer-reason" not in dead.headers  # the broker dead-lettered it, not the worker
    # The queue keeps flowing: a good event is applied.
    await probe.event({"type": "turn.started", "conversationId": "good"})
    update = await surfaces.until(lambda b: b["conversationId"] == "good")
    assert update["state"]["active"] is True


async def test_a_close_with_seq_while_sqlite_is_locked_is_persisted_once_the_lock_goes(
    probe: Probe, start_worker: Any, tmp_path: Path
) -> None:
    app = await start_worker(store=f"sqlite:///{tmp_path / 'locked.db'}")
    store = app.store
    assert isinstance(store, SqliteStore)
    surfaces = await probe.surfaces()
    reply = await probe.command({"type": "set_enabled", "conversationId": "c", "enabled": True})
    assert reply["ok"] is True
    await surfaces.next_body()
    locker = await Locker.hold(store.path)
    try:
        await probe.event({"type": "conversation.closed", "conversationId": "c", "seq": 5})
        for _ in range(200):  # SQLite waits out its busy timeout (5 s), then fails
            if app.metrics.value("warmer_store_errors_total") >= 1:
                break
            await asyncio.sleep(0.05)
        assert app.metrics.value("warmer_store_errors_total") >= 1  # held past the busy timeout
        await surfaces.nothing(0.1)
    finally:
        await locker.release()
    update = await surfaces.next_body()
    assert update["state"]["enabled"] is False
    await app.stop()
    reopened = SqliteStore(store.path)
    await reopened.open()
    try:
        record = decode_record((await reopened.load()).records["c"])
    finally:
        await reopened.close()
    assert record.settings.enabled is False
    assert record.state is not None and record.state.last_seq == 5
    assert await _queue_depth(probe, probe.names.lifecycle) == 0


async def test_confirms_held_back_drop_the_connection_and_the_event_comes_again(
    probe: Probe, start_worker: Any
) -> None:
    # A publish whose confirm never comes (held back at the port, as on a path that
    # stopped forwarding): past the deadline the worker reports it, drops the connection,
    # aio-pika connects again, the broker delivers the unacknowledged event again, and the
    # output goes out on the new connection.
    app = await start_worker(store="memory://", confirm_timeout_ms=1_000)
    publisher = app.worker.outbound
    surface = publisher.surface
    held = 0

    async def first_confirm_held_back(update: Any) -> None:
        nonlocal held
        held += 1
        if held == 1:
            await asyncio.get_running_loop().create_future()
        await surface(update)

    publisher.surface = first_confirm_held_back
    surfaces = await probe.surfaces()
    await probe.event({"type": "turn.started", "conversationId": "c"})
    for _ in range(100):
        if app.health.reason("confirms") is not None:
            break
        await asyncio.sleep(0.05)
    assert app.health.reason("confirms") is not None
    assert app.readiness() is not None  # not ready: confirms overdue, then reconnecting
    update = await surfaces.next_body(10)
    assert update["conversationId"] == "c" and update["state"]["active"] is True
    for _ in range(200):  # the redelivery applied and acknowledged, confirms back
        consumed = app.metrics.value("warmer_events_consumed_total", type="turn.started")
        if consumed == 2 and app.readiness() is None:
            break
        await asyncio.sleep(0.05)
    assert app.reconnections >= 1
    assert app.metrics.value("warmer_events_consumed_total", type="turn.started") == 2
    assert app.health.reason("confirms") is None
    assert app.readiness() is None
    await app.stop()
    assert await _queue_depth(probe, probe.names.lifecycle) == 0
