"""Fixtures for reliability tests: the integration fixtures, a cuttable proxy, a real process.

The broker fixtures (``amqp_url``, ``namespace``, ``probe``, ``start_worker``) are the
integration ones, imported so they apply here too (pytest forbids ``pytest_plugins``
outside the root conftest).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import (  # noqa: F401  (fixtures, used by name)
    amqp_url,
    namespace,
    probe,
    start_worker,
)
from tests.integration.probe import Probe
from tests.reliability.tcp_proxy import TcpProxy
from warmer.app import App

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[TcpProxy]:  # noqa: F811
    """A TCP proxy in front of the broker; ``proxy.url(amqp_url)`` goes through it."""
    proxy = await TcpProxy.to_broker(amqp_url)
    try:
        yield proxy
    finally:
        await proxy.close()


class WorkerProcess:
    """``warmer run`` in a child process; its output is collected line by line on threads."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "warmer", "run"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.process.stderr, self.process.stdout)
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines so far, decoded (other lines skipped)."""
        events = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    events.append(value)
        return events

    def named(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines whose ``event`` is ``event``."""
        return [e for e in self.events() if e.get("event") == event]

    async def wait_event(self, event: str, timeout: float = 15.0) -> dict[str, Any]:
        """Wait for the JSON log line whose ``event`` is ``event``; fail with the log."""
        deadline = time.monotonic() + timeout
        while not (found := self.named(event)):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.finish_reading()
                if found := self.named(event):
                    break
                raise AssertionError(
                    f"no {event!r} log line within {timeout} s "
                    f"(exit code {self.process.poll()}); log:\n{self.log()}"
                )
            await asyncio.sleep(0.05)
        return found[0]

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None when the process still runs after ``timeout`` s."""
        try:
            code = await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            return None
        self.finish_reading()
        return code

    def finish_reading(self) -> None:
        """After exit: wait until every line the process wrote has been read."""
        for reader in self._readers:
            reader.join(2)

    def sigterm(self) -> None:
        """Ask the worker to stop."""
        self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the process (nothing when it is gone already) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self.finish_reading()

    def log(self) -> str:
        """The last lines the process wrote, for failure messages."""
        return "\n".join(self.lines[-60:])


def worker_env(**settings: str) -> dict[str, str]:
    """The current environment without any ``WARMER_*`` variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


def worker_settings(broker: str, name: str, directory: Path, **more: str) -> dict[str, str]:
    """The settings of a worker process of a test: its broker, namespace and SQLite file
    in ``directory``, JSON logs; ``more`` adds or overrides settings."""
    return {
        "WARMER_AMQP_URL": broker,
        "WARMER_NAMESPACE": name,
        "WARMER_STORE": f"sqlite:///{directory / 'w.db'}",
        "WARMER_LOG_FORMAT": "json",
        **more,
    }


@pytest.fixture
def spawn_worker() -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``warmer run`` processes (``spawn_worker(WARMER_X=...)``); killed afterwards."""
    processes: list[WorkerProcess] = []

    def spawn(**settings: str) -> WorkerProcess:
        process = WorkerProcess(worker_env(**settings))
        processes.append(process)
        return process

    try:
        yield spawn
    finally:
        for process in processes:
            process.kill()


async def queue_depths(probe: Probe) -> tuple[int, int, int]:  # noqa: F811
    """(lifecycle messages ready, commands messages ready, consumers of both)."""
    channel = await probe.connection.channel()
    try:
        lifecycle = await channel.declare_queue(probe.names.lifecycle, passive=True)
        commands = await channel.declare_queue(probe.names.commands, passive=True)
        return (
            lifecycle.declaration_result.message_count or 0,
            commands.declaration_result.message_count or 0,
            (lifecycle.declaration_result.consumer_count or 0)
            + (commands.declaration_result.consumer_count or 0),
        )
    finally:
        await channel.close()


def completed(token: int, read: int, cid: str) -> dict[str, Any]:
    """A ``warm.completed`` for ``token`` whose cache read ``read`` of 1000 input tokens."""
    return {
        "type": "warm.completed",
        "conversationId": cid,
        "token": token,
        "usage": {"inputTokens": 1000, "cacheReadTokens": read, "cacheWriteTokens": 0},
    }


async def ready(session: aiohttp.ClientSession, app: App) -> tuple[int, str]:
    """What ``/readyz`` answers: (status, first line: ready or why not)."""
    async with session.get(f"http://127.0.0.1:{app.http_port}/readyz") as response:
        return response.status, (await response.text()).split("\n", 1)[0]


async def until(
    session: aiohttp.ClientSession, app: App, expected: tuple[int, str], timeout: float
) -> float:
    """Wait for ``/readyz`` to answer ``expected``; how long it took, in s."""
    started = time.monotonic()
    while (answer := await ready(session, app)) != expected:
        assert time.monotonic() - started < timeout, answer
        await asyncio.sleep(0.02)
    return time.monotonic() - started
