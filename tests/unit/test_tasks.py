"""A watched task that fails is logged at once, with its traceback, never "never retrieved"."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from structlog.testing import capture_logs

from warmer.observe.tasks import watch


async def test_a_failing_task_is_logged_with_its_exception() -> None:
    unretrieved: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unretrieved.append(ctx))

    async def fail() -> None:
        raise RuntimeError("boom")

    with capture_logs() as logs:
        task = watch(asyncio.get_running_loop().create_task(fail(), name="failing"))
        await asyncio.wait([task])
        await asyncio.sleep(0)
    del task
    gc.collect()
    assert [(e["event"], e["task"]) for e in logs] == [("task_failed", "failing")]
    assert isinstance(logs[0]["exc_info"], RuntimeError)
    assert unretrieved == []


async def test_a_task_that_ends_well_or_is_cancelled_logs_nothing() -> None:
    async def wait() -> None:
        await asyncio.sleep(10)

    with capture_logs() as logs:
        done = watch(asyncio.get_running_loop().create_task(asyncio.sleep(0)))
        cancelled = watch(asyncio.get_running_loop().create_task(wait()))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.wait([done, cancelled])
        await asyncio.sleep(0)
    assert logs == []
