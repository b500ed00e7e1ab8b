"""Another process holding an SQLite file's exclusive lock, for store and worker tests."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

_LOCKER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
connection.close()
"""


class Locker:
    """A child process that holds ``BEGIN EXCLUSIVE`` on a file until ``release``."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def hold(cls, path: Path) -> Locker:
        """Start the child and return once it holds the lock."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _LOCKER,
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        assert await process.stdout.readline() == b"locked\n"
        return cls(process)

    async def release(self) -> int:
        """Let the lock go; the child's exit code (0: it rolled back and closed cleanly)."""
        process = self._process
        if process.returncode is None and process.stdin is not None:
            process.stdin.write(b"release\n")
            await process.stdin.drain()
        return await process.wait()

    async def kill(self) -> None:
        """End the child whatever it is doing (cleanup after a failed test)."""
        if self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
