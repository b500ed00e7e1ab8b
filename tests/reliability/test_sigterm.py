"""The real `warmer run` process: a graceful stop in mid-burst, and refusing to start."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import pytest

from tests.integration.probe import Listener, Probe
from tests.reliability.conftest import queue_depths, worker_settings
from tests.reliability.tcp_proxy import TcpProxy
from warmer.bus.topology import COMMAND_ROUTING_KEY

pytestmark = pytest.mark.broker

EVENT_CONVERSATIONS = 10
EVENTS_EACH = 20  # turn.started and turn.settled in turns, seq 1..20: 200 events
COMMAND_CONVERSATIONS = 5
COMMANDS_EACH = 10  # set_interval, with replies: 50 commands
SIGTERM_AFTER = 100  # messages published before the signal
STOP_WITHIN_S = 5.0


def burst(reply_to: str) -> list[tuple[str, dict[str, Any], str | None]]:
    """(kind, body, correlation id): events and commands for distinct conversations, mixed."""
    events = [
        (
            "event",
            {
                "type": "turn.started" if seq % 2 else "turn.settled",
                "conversationId": f"ev-{c}",
                "seq": seq,
            },
            None,
        )
        for seq in range(1, EVENTS_EACH + 1)
        for c in range(EVENT_CONVERSATIONS)
    ]
    commands = [
        (
            "command",
            {"type": "set_interval", "conversationId": f"cmd-{c}", "intervalMs": interval(c, i)},
            f"{reply_to}:{c}:{i}",
        )
        for i in range(COMMANDS_EACH)
        for c in range(COMMAND_CONVERSATIONS)
    ]
    mixed: list[tuple[str, dict[str, Any], str | None]] = []
    for n, event in enumerate(events):
        mixed.append(event)
        if n % 4 == 3 and commands:
            mixed.append(commands.pop(0))
    return mixed + commands


def interval(conversation: int, index: int) -> int:
    return 1000 * (conversation + 2) + 10 * index


async def settled_counts(probe: Probe) -> tuple[int, int]:
    """Queue depths once no consumer is left and they stop moving."""
    previous = None
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        lifecycle, commands, consumers = await queue_depths(probe)
        if consumers == 0 and (lifecycle, commands) == previous:
            return lifecycle, commands
        previous = (lifecycle, commands)
        await asyncio.sleep(0.3)
    raise AssertionError(f"queue depths never settled: {previous}")


async def publisher(probe: Probe, reply_to: str) -> Any:
    """A function publishing one message of ``burst`` with confirms; call it in order."""
    lifecycle = await probe.channel.get_exchange(probe.names.lifecycle)
    commands = await probe.channel.get_exchange(probe.names.commands)

    async def publish(item: tuple[str, dict[str, Any], str | None]) -> None:
        kind, body, correlation_id = item
        raw = msgspec.json.encode(body)
        if kind == "event":
            headers = {"conversation-id": body["conversationId"]}
            message = aio_pika.Message(raw, content_type="application/json", headers=headers)
            await lifecycle.publish(message, body["type"])
        else:
            message = aio_pika.Message(
                raw,
                content_type="application/json",
                reply_to=reply_to,
                correlation_id=correlation_id,
            )
            await commands.publish(message, COMMAND_ROUTING_KEY)

    return publish


class Outputs:
    """What came out of the workers: replies by correlation id, surfaces per conversation."""

    def __init__(self, replies: Listener, surfaces: Listener) -> None:
        self.replies = replies
        self.surfaces = surfaces
        self.reply_bodies: dict[str, list[dict[str, Any]]] = {}
        self.surface_counts: Counter[str] = Counter()

    async def collect(self, quiet: float = 0.5) -> None:
        """Take everything that arrives until ``quiet`` s pass without anything."""
        while True:
            got = False
            try:
                message = await self.replies.next(quiet)
                body = msgspec.json.decode(message.body)
                self.reply_bodies.setdefault(message.correlation_id or "", []).append(body)
                got = True
            except AssertionError:
                pass
            try:
                while True:
                    body = await self.surfaces.next_body(0.01)
                    self.surface_counts[body["conversationId"]] += 1
                    got = True
            except AssertionError:
                pass
            if not got:
                return

    async def wait_applied(self, events: int, timeout: float = 5.0) -> None:
        """Wait until the surfaces say ``events`` events were applied."""
        async with asyncio.timeout(timeout):
            while self.event_surfaces < events:
                body = await self.surfaces.next_body(timeout)
                self.surface_counts[body["conversationId"]] += 1

    @property
    def event_surfaces(self) -> int:
        return sum(n for cid, n in self.surface_counts.items() if cid.startswith("ev-"))

    @property
    def answered(self) -> int:
        return sum(len(bodies) for bodies in self.reply_bodies.values())


async def test_sigterm_in_mid_burst_exits_0_and_loses_nothing(
    amqp_url: str, namespace: str, probe: Probe, spawn_worker: Any, tmp_path: Path
) -> None:
    env = worker_settings(amqp_url, namespace, tmp_path)
    worker = spawn_worker(**env)
    started = await worker.wait_event("worker_started")
    assert started["namespace"] == namespace

    replies_queue = await probe.channel.declare_queue(exclusive=True, auto_delete=True)
    replies = Listener(replies_queue)
    await replies.start()
    outputs = Outputs(replies, await probe.surfaces())
    messages = burst(replies_queue.name)
    total_events = sum(1 for kind, _, _ in messages if kind == "event")
    total_commands = len(messages) - total_events
    assert (total_events, total_commands) == (200, 50)

    # Published in order, without waiting for each confirm, so the worker has a backlog
    # when the signal comes; SIGTERM goes out while the second part is still flowing.
    publish = await publisher(probe, replies_queue.name)
    first_part = [asyncio.create_task(publish(m)) for m in messages[:SIGTERM_AFTER]]
    await outputs.wait_applied(10)
    worker.sigterm()
    signalled_at = time.monotonic()
    rest = [asyncio.create_task(publish(m)) for m in messages[SIGTERM_AFTER:]]
    await asyncio.gather(*first_part, *rest)
    code = await worker.wait_exit(signalled_at + STOP_WITHIN_S - time.monotonic())
    assert code == 0, f"exit code {code} (None: still running); log:\n{worker.log()}"
    assert worker.named("worker_stopped"), worker.log()
    errors = [e for e in worker.events() if e.get("level") in ("error", "critical")]
    assert errors == [], errors

    # The first worker's part: what it answered and applied was acknowledged, the rest
    # waits in the queues, exactly.
    await outputs.collect()
    answered_first = outputs.answered
    applied_first = outputs.event_surfaces
    lifecycle_left, commands_left = await settled_counts(probe)
    assert 0 < applied_first < total_events, "SIGTERM came while events were flowing"
    assert lifecycle_left == total_events - applied_first, (lifecycle_left, applied_first)
    assert commands_left == total_commands - answered_first, (commands_left, answered_first)

    # A second worker (same store) takes the rest: nothing was lost, nothing applied twice.
    second = spawn_worker(**env)
    await second.wait_event("worker_started")
    deadline = asyncio.get_running_loop().time() + 15
    while outputs.answered < total_commands or outputs.event_surfaces < total_events:
        assert asyncio.get_running_loop().time() < deadline, (
            outputs.answered,
            outputs.event_surfaces,
        )
        await outputs.collect(quiet=0.2)
    await outputs.collect(quiet=0.5)
    assert outputs.event_surfaces == total_events
    assert all(n == EVENTS_EACH for cid, n in outputs.surface_counts.items() if "ev-" in cid)
    expected_ids = {cid for kind, _, cid in messages if kind == "command"}
    assert set(outputs.reply_bodies) == expected_ids
    assert outputs.answered == total_commands, "a command was answered twice"
    for correlation_id, bodies in outputs.reply_bodies.items():
        _, conversation, index = correlation_id.rsplit(":", 2)
        assert bodies[0]["settings"]["intervalMs"] == interval(int(conversation), int(index))

    # The state is the last of everything: the interval of the last set_interval, and
    # every event conversation idle after its last turn.settled.
    for c in range(COMMAND_CONVERSATIONS):
        reply = await probe.command({"type": "get_state", "conversationId": f"cmd-{c}"})
        assert reply["state"]["intervalMs"] == interval(c, COMMANDS_EACH - 1)
    for c in range(EVENT_CONVERSATIONS):
        reply = await probe.command({"type": "get_state", "conversationId": f"ev-{c}"})
        assert reply["state"]["active"] is False
    assert await queue_depths(probe) == (0, 0, 2)

    second.sigterm()
    assert await second.wait_exit(STOP_WITHIN_S) == 0, second.log()


async def test_unreachable_broker_exits_quickly_with_advice_and_no_password(
    namespace: str, spawn_worker: Any, tmp_path: Path
) -> None:
    url = "amqp://guest:secret@127.0.0.1:1/"
    worker = spawn_worker(**worker_settings(url, namespace, tmp_path, WARMER_STARTUP_WAIT_S="0"))
    started = time.monotonic()
    code = await worker.wait_exit(15)
    elapsed = time.monotonic() - started
    assert code is not None, f"still running after 15 s; log:\n{worker.log()}"
    assert code != 0
    assert elapsed < 15
    output = "\n".join(worker.lines)
    assert "secret" not in output, output
    naming = [line for line in worker.lines if "amqp://guest:***@127.0.0.1:1/" in line]
    assert naming, output
    assert any(re.search(r"start a broker|rabbitmq-server", line) for line in naming), output
    assert not worker.named("worker_started")


async def test_a_bad_setting_exits_2_with_one_line_naming_it(
    amqp_url: str, namespace: str, spawn_worker: Any, tmp_path: Path
) -> None:
    worker = spawn_worker(**worker_settings(amqp_url, namespace, tmp_path, WARMER_PREFETCH="abc"))
    code = await worker.wait_exit(15)
    assert code == 2, f"exit code {code}; log:\n{worker.log()}"
    lines = [line for line in worker.lines if line.strip()]
    assert len(lines) == 1, lines
    assert "WARMER_PREFETCH" in lines[0] and "abc" in lines[0]


async def test_sigterm_while_the_broker_is_unreachable_still_stops(
    proxy: TcpProxy,
    amqp_url: str,
    namespace: str,
    probe: Probe,
    spawn_worker: Any,
    tmp_path: Path,
) -> None:
    worker = spawn_worker(**worker_settings(proxy.url(amqp_url), namespace, tmp_path))
    await worker.wait_event("worker_started")
    await proxy.wait_connected(5)
    reply = await probe.command({"type": "set_enabled", "conversationId": "c", "enabled": True})
    assert reply["ok"] is True

    proxy.cut(refuse_for=60)
    await worker.wait_event("broker_connection_lost", 5)
    # A command arrives while the worker is away: it stays queued for the next worker.
    await probe.send_command(
        {"type": "set_interval", "conversationId": "c", "intervalMs": 5000},
        reply_to="nobody",
        correlation_id=uuid.uuid4().hex,
    )
    worker.sigterm()
    code = await worker.wait_exit(10)
    assert worker.named("worker_stopping"), worker.log()
    assert code is not None, f"still running 10 s after SIGTERM; log:\n{worker.log()}"
    # Nothing was taken from the queue while the worker was away.
    _, commands_left, consumers = await queue_depths(probe)
    assert (commands_left, consumers) == (1, 0)
