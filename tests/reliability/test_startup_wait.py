"""``warmer run`` with no broker: tried again with backoff, one line an attempt, then 69.

The worker is a real process (``warmer run``), so its exit code and its log lines are what
an operator would see; the broker is a port nothing listens on.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import worker_settings

pytestmark = pytest.mark.broker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def absent(namespace: str, tmp_path: Path, **more: str) -> dict[str, str]:
    """A worker's environment naming a broker nobody listens for (password shown masked)."""
    url = f"amqp://guest:s3cr3t@127.0.0.1:{free_port()}/"
    return worker_settings(url, namespace, tmp_path, **more)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode().split("\n", 1)[0]
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().split("\n", 1)[0]


async def test_start_up_tries_with_backoff_then_exits_69(
    namespace: str, spawn_worker: Any, tmp_path: Path
) -> None:
    started = time.monotonic()
    worker = spawn_worker(**absent(namespace, tmp_path, WARMER_STARTUP_WAIT_S="4"))
    code = await worker.wait_exit(20)
    elapsed = time.monotonic() - started
    assert code == 69, worker.log()
    assert 4 <= elapsed < 12, elapsed
    attempts = worker.named("broker_unreachable")
    # Attempts at about 0, 1, 3 s (pauses 1, 2, then 1 left of the 4): one line each, and
    # a last attempt at 4 s that fails for good (startup_failed).
    assert [a["attempt"] for a in attempts] == [1, 2, 3], worker.log()
    pauses = [a["retry_in_s"] for a in attempts]
    assert pauses[:2] == [1.0, 2.0] and 0 < pauses[2] <= 1.0, pauses
    assert all("cannot reach RabbitMQ at amqp://guest:***@" in a["error"] for a in attempts)
    (failure,) = worker.named("startup_failed")
    assert "start a broker" in failure["error"]
    output = "\n".join(worker.lines)
    assert "s3cr3t" not in output
    # Nothing else: no line from the clients per attempt.
    events = [e["event"] for e in worker.events()]
    assert len(worker.lines) == len(events) <= 8, worker.log()


async def test_while_waiting_it_is_alive_not_ready_and_stops_on_sigterm(
    namespace: str, spawn_worker: Any, tmp_path: Path
) -> None:
    port = free_port()
    worker = spawn_worker(
        **absent(namespace, tmp_path, WARMER_STARTUP_WAIT_S="300", WARMER_HTTP=f"127.0.0.1:{port}")
    )
    await worker.wait_event("http_serving")
    await worker.wait_event("broker_unreachable")
    assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok")
    assert get(f"http://127.0.0.1:{port}/readyz") == (503, "connecting to the broker")
    worker.sigterm()
    assert await worker.wait_exit(5) == 0, worker.log()
    assert worker.named("worker_stopped")
    assert not worker.named("startup_failed")
