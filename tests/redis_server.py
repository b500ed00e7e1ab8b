"""A redis-server of a test's own, on a free port: to restart empty, freeze and thaw.

The shared Redis (tests/conftest.py) must never be restarted or stopped; faults are tried
on one of these instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process, without persistence unless told, in its own directory."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.port = _free_port()
        self.directory = directory
        self.appendonly = appendonly
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The database URL, without a prefix."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start the server (on the same port as before) and wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        arguments = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        arguments += ["--dir", str(self.directory), "--save", ""]
        arguments += ["--appendonly", "yes" if self.appendonly else "no"]
        self._process = await asyncio.create_subprocess_exec(
            *arguments, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return
        pytest.fail(f"redis-server on port {self.port} did not start")

    async def stop(self) -> None:
        """Kill the server (SIGKILL: nothing is saved) and wait for it to go."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    async def restart(self) -> None:
        """Kill the server and start it again: empty, unless it appends to a file."""
        await self.stop()
        await self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: the server goes on with what it had received."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def redis_server(directory: Path, *, appendonly: bool = False) -> AsyncIterator[RedisServer]:
    """A started RedisServer, killed afterwards."""
    server = RedisServer(directory, appendonly=appendonly)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
