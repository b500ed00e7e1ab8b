"""`python -m warmer.watch` in a pseudo-terminal, against a worker on the real broker.

The view binds a queue of its own to the surface exchange and draws every conversation
that changes; Ctrl-C ends it with exit code 0; with no broker it exits 69 and says why.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import pexpect  # type: ignore[import-untyped]
import pytest

from tests.integration.probe import Probe

pytestmark = pytest.mark.broker

WAIT_S = 10.0
StartWorker = Callable[..., Awaitable[object]]


def row(cid: str, status: str) -> str:
    """A pattern for one line of the table: the id, then (past escape codes) the status.

    No word boundary before the status: an escape code ending in a letter precedes it.
    """
    return rf"{re.escape(cid)}\s[^\r\n]*{re.escape(status)}\b"


@pytest.fixture
def spawn_watch(amqp_url: str, namespace: str) -> Iterator[Callable[[], pexpect.spawn]]:
    """Start the view in a 40x160 pty on the test's namespace; killed if still running."""
    children: list[pexpect.spawn] = []

    def spawn() -> pexpect.spawn:
        env = {
            **os.environ,
            "WARMER_AMQP_URL": amqp_url,
            "WARMER_NAMESPACE": namespace,
            "TERM": "xterm-256color",
            # The pty's size, also where a runner exported its own (pytest-xdist workers).
            "COLUMNS": "160",
            "LINES": "40",
        }
        child = pexpect.spawn(
            sys.executable,
            ["-m", "warmer.watch"],
            env=env,
            dimensions=(40, 160),
            encoding="utf-8",
            codec_errors="replace",  # the tty echoes ^C, maybe inside a multi-byte character
            timeout=WAIT_S,
            use_poll=True,  # select() fails past fd 1024, reached in a long-lived xdist worker
        )
        children.append(child)
        return child

    yield spawn
    for child in children:
        if child.isalive():
            child.terminate(force=True)


async def expect(child: pexpect.spawn, pattern: str) -> None:
    """``child.expect`` off the event loop, so the worker in this loop keeps running."""
    await asyncio.to_thread(child.expect, pattern)


async def test_the_view_draws_conversations_and_follows_their_changes(
    start_worker: StartWorker, probe: Probe, spawn_watch: Callable[[], pexpect.spawn]
) -> None:
    await start_worker()
    child = spawn_watch()
    await expect(child, r"0 conversations")  # drawn, so its queue is bound
    for cid in ("alpha", "beta", "gamma"):
        reply = await probe.command(
            {"type": "set_interval", "conversationId": cid, "intervalMs": 60_000}
        )
        assert reply["ok"] is True
    for cid in ("alpha", "beta", "gamma"):
        await expect(child, row(cid, "disabled"))
    await expect(child, r"3 conversations")

    reply = await probe.command({"type": "set_enabled", "conversationId": "beta", "enabled": True})
    assert reply["ok"] is True
    await expect(child, row("beta", "armed"))
    await expect(child, r"1 armed")

    child.sendintr()
    await asyncio.to_thread(child.expect, pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


async def test_the_view_shows_the_status_expired_and_why_it_is_not_warming(
    start_worker: StartWorker, probe: Probe, spawn_watch: Callable[[], pexpect.spawn]
) -> None:
    await start_worker()
    child = spawn_watch()
    await expect(child, r"0 conversations")
    for cid in ("small", "late"):
        reply = await probe.command({"type": "set_enabled", "conversationId": cid, "enabled": True})
        assert reply["ok"] is True
    await probe.event({"type": "turn.settled", "conversationId": "small", "prefixTokens": 100})
    # Its last request was 6 minutes ago: the 5-minute cache is gone before any warm.
    long_ago = int(time.time() * 1000) - 360_000
    await probe.event(
        {"type": "turn.settled", "conversationId": "late", "cacheTtlS": 300,
         "lastRequestAt": long_ago}
    )  # fmt: skip
    await expect(child, row("small", "idle") + r"[^\r\n]*prefix too small")
    await expect(child, row("late", "expired") + r"[^\r\n]*cache expired")
    await expect(child, r"2 conversations[^\r\n]*1 idle[^\r\n]*1 expired")

    child.sendintr()
    await asyncio.to_thread(child.expect, pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


async def test_without_a_broker_the_view_exits_69_and_says_why() -> None:
    env = {**os.environ, "WARMER_AMQP_URL": "amqp://guest:secret@127.0.0.1:1/"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "warmer.watch"],
        env=env,
        encoding="utf-8",
        timeout=WAIT_S,
        use_poll=True,
    )
    await asyncio.to_thread(child.expect, pexpect.EOF)
    child.close()
    assert child.exitstatus == 69
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in child.before
    assert "secret" not in child.before


async def test_a_namespace_without_a_worker_is_reported_not_created(
    spawn_watch: Callable[[], pexpect.spawn],
) -> None:
    child = spawn_watch()  # the test's own namespace: nothing declared there
    await asyncio.to_thread(child.expect, pexpect.EOF)
    child.close()
    assert child.exitstatus == 69
    assert "no exchange wt-" in child.before
    assert "start the worker" in child.before
