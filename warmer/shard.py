"""One shard a replica owns: its store view, core, timers, pipeline and consumers.

A replica runs a ``Runner`` per shard it owns; they share the broker connection and the
publisher, nothing else. The runner holds the shard's lock (an exclusive consumer on its
lifecycle queue, ``warmer.bus.consumer``) from before its store view is opened (which
fences the previous owner) until after the view is closed, so two runners of one shard
never hold state at once. ``release`` hands a shard over gracefully (no new deliveries,
what was delivered applied and acknowledged, timers dropped, view closed, lock released);
``drop`` gives it up at once when the connection is gone or the store fenced it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from aio_pika.abc import AbstractRobustChannel

from warmer.bus.consumer import Consumer
from warmer.inputs import Inputs
from warmer.observe.health import Health
from warmer.observe.log import get_logger
from warmer.store import Store
from warmer.worker import Worker

log = get_logger(__name__)

CLOSE_TIMEOUT_S: Final = 2.0
TOKEN_STRIDE: Final = 256
"""Tokens of shard k are k modulo this (the most shards a namespace may have)."""


class Runner:
    """What one owned shard runs; built in steps by the app as it takes the shard."""

    def __init__(self, shard: int, health: Health) -> None:
        self.shard = shard
        self.health = health
        self.inputs = Inputs()
        self.view: Store | None = None
        self.worker: Worker | None = None
        self.consumers: list[Consumer] = []
        self.channels: list[AbstractRobustChannel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.lost: str | None = None
        """Why the shard is no longer this replica's (None while it is)."""

    @property
    def running(self) -> bool:
        """Taken and not lost: its pipeline and timers are this replica's to run."""
        return self.lost is None and self.worker is not None

    def trouble(self) -> str | None:
        """Why the shard does not make progress now, None when it does."""
        if any(not c.consuming for c in self.consumers):
            return "consumers not restored"
        for task in self.tasks:
            if task.done():
                return f"{task.get_name()} stopped"
        if self.worker is not None and not self.worker.scheduler.running:
            return "scheduler stopped"
        reasons = self.health.reasons()
        return "; ".join(reasons) if reasons else None

    async def release(self, grace_s: float) -> None:
        """Hand the shard over: consume no more, apply and acknowledge what was delivered
        (within ``grace_s``), drop the timers, release the view, close the channels."""
        for consumer in self.consumers:
            try:
                await asyncio.wait_for(consumer.cancel(), CLOSE_TIMEOUT_S)
            except Exception as exc:
                log.warning("consumer_cancel_failed", shard=self.shard, error=repr(exc)[:300])
        worker = self.worker
        if worker is not None:
            await worker.scheduler.stop()
            worker.inputs.close()
            try:
                await asyncio.wait_for(self._drained(worker), grace_s)
            except TimeoutError:
                log.warning("shard_release_grace_expired", shard=self.shard, grace_s=grace_s)
            else:  # a store that lost its data is given it back before the view goes
                await worker.check_before_close()
        await self._close()

    async def _drained(self, worker: Worker) -> None:
        if self.tasks:
            await asyncio.wait([self.tasks[0]])  # the pipeline applies what was delivered
        await worker.settled()

    async def drop(self) -> None:
        """Give the shard up at once: nothing more applied, committed or published here."""
        for consumer in self.consumers:
            consumer.abort()
        await self._close()

    async def _close(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.abandon()
            await worker.scheduler.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.view is not None:
            with contextlib.suppress(Exception):
                await self.view.close()
        for channel in self.channels:  # the lock goes with them: the broker requeues
            with contextlib.suppress(Exception):  # what was left unacknowledged
                await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT_S)


__all__ = ["TOKEN_STRIDE", "Runner"]
