"""A store that cannot be shared is not split: a second worker in the namespace of one on
SQLite is refused at start with one clear line and a nonzero exit, and the first runs on.

The first holds the exclusive queue ``{ns}.embedded``; another on SQLite is refused it
(RESOURCE_LOCKED), and one on a shareable store checks it and refuses too.
"""

from __future__ import annotations

import pytest

from tests.replicas.conftest import Fleet, Replica

pytestmark = [pytest.mark.broker]

LEVELS = ("error", "critical")


async def refused(replica: Replica) -> str:
    """The one line ``replica`` was refused with, once it exited nonzero within 20 s."""
    code = await replica.process.wait_exit(20)
    assert code not in (None, 0), f"exit {code}:\n{replica.process.log()}"
    errors = [e for e in replica.process.events() if e.get("level") in LEVELS]
    assert len(errors) == 1, replica.process.log()
    assert not any("Traceback" in line for line in replica.process.lines)
    return str(errors[0])


async def test_a_second_worker_beside_one_on_sqlite_is_refused(
    fleet: Fleet, redis_store_url: str
) -> None:
    first = fleet.start("first", store=f"sqlite:///{fleet.directory / 'first.db'}")
    await first.wait_ready()

    second = fleet.start("second", store=f"sqlite:///{fleet.directory / 'second.db'}")
    line = (await refused(second)).lower()
    assert "sqlite" in line or "embedded" in line, line
    assert fleet.namespace in line, line

    shared = fleet.start("shared", store=redis_store_url, shards=2)
    line = (await refused(shared)).lower()
    assert "sqlite" in line or "embedded" in line, line

    assert first.alive()
    await first.wait_ready(timeout=5)
