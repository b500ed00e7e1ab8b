"""One shard a replica owns: its store view, core, timers, pipeline and consumers.

A replica runs a ``Runner`` per shard it owns; they share the broker connection and the
publisher, nothing else. The runner holds the shard's lock (an exclusive queue,
``warmer.bus.lock``) from before its store view is opened (which fences the previous
owner) until after the view is closed and its consumers' channels with it, so two
runners of one shard never hold state at once. ``release`` hands a shard over gracefully
(no new deliveries, what was delivered applied and acknowledged, timers dropped, view
closed, lock released); ``drop`` gives it up at once when the connection is gone or the
store fenced it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from warmer.bus.consumer import ShardConsumer
from warmer.bus.lock import ShardLock
from warmer.clock import Clock
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

    def __init__(self, shard: int, health: Health, clock: Clock | None = None) -> None:
        """``clock``: stamps the inputs as they arrive (how long they wait: how far behind)."""
        self.shard = shard
        self.health = health
        self.inputs = Inputs(clock)
        self.view: Store | None = None
        self.worker: Worker | None = None
        self.lock: ShardLock | None = None
        self.consumers: list[ShardConsumer] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.lost: str | None = None
        """Why the shard is no longer this replica's (None while it is)."""
        self.suspended = False
        """Its lock or a consumer went (the connection): consuming nothing until resumed."""

    @property
    def running(self) -> bool:
        """Taken and not lost: its pipeline and timers are this replica's to run."""
        return self.lost is None and self.worker is not None

    def suspend(self) -> None:
        """Forget the lock and the consumers (their channels are gone or going): the
        pipeline and timers go on, the broker gives what was unacknowledged to whoever
        consumes next."""
        self.suspended = True
        for consumer in self.consumers:
            consumer.abort()
        self.consumers = []
        if self.lock is not None:
            self.lock.abort()
            self.lock = None

    def trouble(self) -> str | None:
        """Why the shard does not make progress now, None when it does."""
        if self.suspended:
            return "consumers not restored"
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
        (within ``grace_s``), drop the timers, release the view, then the lock."""
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
        await self._close(check=True)

    async def _drained(self, worker: Worker) -> None:
        if self.tasks:
            await asyncio.wait([self.tasks[0]])  # the pipeline applies what was delivered
        await worker.settled()

    async def drop(self, connected: bool) -> None:
        """Give the shard up at once: nothing more applied, committed or published here.
        What was delivered and not acknowledged goes back to the queue with the channels
        (``connected``), or with the connection that is gone."""
        if not connected:
            for consumer in self.consumers:
                consumer.abort()
            if self.lock is not None:
                self.lock.abort()
        await self._close()

    async def _close(self, *, check: bool = False) -> None:
        """Stop the pipeline and timers, close the view, the consumers, the lock; with
        ``check``, first give a store that lost its data what the pipeline committed
        (nothing else would: the next owner starts from what the store holds)."""
        worker = self.worker
        if worker is not None:
            worker.abandon()
            await worker.scheduler.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if check and worker is not None and worker.fenced is None:
            await worker.check_before_close()
        if self.view is not None:
            with contextlib.suppress(Exception):
                await self.view.close()
        for consumer in self.consumers:  # the broker requeues what is unacknowledged
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.close(), CLOSE_TIMEOUT_S)
        if self.lock is not None and self.lock.held:  # last: the shard is free now
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.lock.release(), CLOSE_TIMEOUT_S)


__all__ = ["TOKEN_STRIDE", "Runner"]
