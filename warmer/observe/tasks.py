"""Background tasks that never fail unseen: a failure is logged with its traceback at once.

asyncio only reports a task's exception when the task is garbage-collected ("Task
exception was never retrieved"), if ever. ``watch`` retrieves it as soon as the task ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from warmer.observe.log import get_logger

log = get_logger(__name__)


def watch(task: asyncio.Task[Any]) -> asyncio.Task[Any]:
    """Log ``task``'s exception (with its traceback) when it ends with one; returns it."""
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task_failed", task=task.get_name(), exc_info=exc)


__all__ = ["watch"]
