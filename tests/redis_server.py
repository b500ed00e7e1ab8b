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


class HoldingProxy:
    """A TCP proxy in front of a Redis that can hold what clients send, like a network
    path that stops forwarding and delivers the bytes late (a retransmission after a
    partition heals), after the client has given up and moved to a new connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[_HeldLink] = []

    @property
    def url(self) -> str:
        """The database URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        """From now on keep what the clients of the open connections send (new ones pass)."""
        for link in self._links:
            link.holding = True

    async def release(self) -> None:
        """Deliver what was held, late, then close those connections."""
        for link in [link for link in self._links if link.holding]:
            link.holding = False
            link.upstream.write(bytes(link.held))
            await link.upstream.drain()
        await asyncio.sleep(0.2)  # Redis reads and runs it

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for link in self._links:
            link.upstream.close()
            link.client.close()
        for link in self._links:
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        link = _HeldLink(writer, up_writer)
        self._links.append(link)
        loop = asyncio.get_running_loop()
        link.tasks = [
            loop.create_task(link.to_upstream(reader)),
            loop.create_task(link.to_client(up_reader)),
        ]


class _HeldLink:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.holding = False
        self.held = bytearray()
        self.tasks: list[asyncio.Task[None]] = []

    async def to_upstream(self, reader: asyncio.StreamReader) -> None:
        # Once held, the upstream side stays open after the client goes: the bytes come late.
        while data := await reader.read(65536):
            if self.holding:
                self.held += data
            else:
                self.upstream.write(data)
                await self.upstream.drain()

    async def to_client(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if not self.client.is_closing():
                    self.client.write(data)
