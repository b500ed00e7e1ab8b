"""The timers: one per conversation, one asyncio task over one heap, built for a million.

Arming pushes `(due, seq, key, token)` onto a heap and records that very tuple as the
key's live timer. Re-arming or cancelling leaves the old tuple in the heap, dead: an
entry is live only while it *is* the tuple recorded for its key (identity, not equality,
since a warm timeout re-arms with the same token and can even reuse the due time). Dead
entries are dropped as they surface, and the heap is rebuilt from the live ones when
they outnumber half of them, so churn cannot grow memory without bound.

One task sleeps until the earliest due time through a single clock alarm; arming an
earlier timer wakes it to sleep again on the new earliest. Each fire tells ``lateness``
(if given) how late it came, in seconds: the scheduler is the one part that still knows
the due time then.

Spreading: with ``room`` (how many more timers the pipeline takes now), timers fall due no
faster than the pipeline applies and publishes them: at most ``room()`` fire per turn, the
rest stay in the heap, due times kept, oldest first, until ``nudge()`` says there is room
again. How late the oldest due timer is (``behind_ms``) is then how far behind the worker
is on its schedule. A timer armed as a ``check`` (a warm's timeout: it publishes nothing)
is never held back: checks have a heap of their own and fire whatever the room.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Iterable

from warmer.clock import Alarm, Clock
from warmer.observe.log import get_logger
from warmer.observe.tasks import watch

__all__ = ["Lateness", "OnFire", "Room", "Scheduler"]

log = get_logger(__name__)

OnFire = Callable[[str, int], None]
"""What a fired timer calls: `on_fire(key, token)`."""

Room = Callable[[], int]
"""How many more timers may fire now (the pipeline's room); at most 0 holds them back."""

Lateness = Callable[[float], None]
"""Told, for each fire, the fire time minus the due time in seconds (a histogram's observe)."""

# due (epoch ms), arm sequence (breaks due ties in arm order), key, token.
_Entry = tuple[int, int, str, int]

# Below this many dead entries the heap is never rebuilt: small heaps are cheap anyway.
_COMPACT_MIN_DEAD = 1024

# Held back (no room), timers due: looked at again this soon even without a nudge.
_HELD_RECHECK_MS = 50


class Scheduler:
    """One pending timer per key; fires `on_fire(key, token)` when its due time comes."""

    def __init__(
        self,
        clock: Clock,
        on_fire: OnFire,
        *,
        lateness: Lateness | None = None,
        room: Room | None = None,
    ) -> None:
        self.room = room
        """How many timers may fire now (spreading); None: every timer that falls due."""
        self._clock = clock
        self._on_fire = on_fire
        self._lateness = lateness
        self._heap: list[_Entry] = []
        self._checks: list[_Entry] = []
        """The checks' heap: never held back by the room."""
        self._live: dict[str, _Entry] = {}
        self._dead = 0
        self._seq = 0
        self._firing = False
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sleeping_until: int | None = None

    def __len__(self) -> int:
        """Return how many timers are armed."""
        return len(self._live)

    def arm(self, key: str, due_at_ms: int, token: int, *, check: bool = False) -> None:
        """Arm the timer of `key` for `due_at_ms`, replacing any pending one; a `check`
        fires even while the room holds the others back."""
        seq = self._seq
        self._seq = seq + 1
        pending = self._live.get(key)
        if pending is not None:
            self._dead += 1
            # The key object the timer holds already: an equal copy (each decoded message
            # brings its own) is not kept as well, a million timers long.
            key = pending[2]
        entry = (due_at_ms, seq, key, token)
        self._live[key] = entry
        heapq.heappush(self._checks if check else self._heap, entry)
        if self._waiter is not None and (
            self._sleeping_until is None or due_at_ms < self._sleeping_until
        ):
            self._wake()
        self._compact_if_mostly_dead()

    def arm_many(self, timers: Iterable[tuple[str, int, int]], *, check: bool = False) -> None:
        """Arm each `(key, due_at_ms, token)` in turn, as many `arm` calls would (all of them
        checks with `check`), with one heap build at the end instead of a push each (a
        million timers at start-up)."""
        live, heap = self._live, self._checks if check else self._heap
        seq = self._seq
        dead = 0
        for key, due_at_ms, token in timers:
            pending = live.get(key)
            if pending is not None:
                dead += 1
                key = pending[2]
            entry = (due_at_ms, seq, key, token)
            seq += 1
            live[key] = entry
            heap.append(entry)
        if seq == self._seq:
            return
        self._seq = seq
        self._dead += dead
        heapq.heapify(heap)
        self._wake()
        self._compact_if_mostly_dead()

    def cancel(self, key: str) -> None:
        """Disarm the timer of `key`; no-op when none is pending."""
        if self._live.pop(key, None) is not None:
            self._dead += 1
            self._compact_if_mostly_dead()

    def pending(self, key: str) -> tuple[int, int] | None:
        """Return `(due_at_ms, token)` of the timer pending for `key`, or None."""
        entry = self._live.get(key)
        return None if entry is None else (entry[0], entry[3])

    def behind_ms(self, now_ms: int) -> int:
        """How late the oldest timer due and not yet fired is at `now_ms`; 0 when none,
        or when the task is not running (stopped, it is not behind: nothing fires)."""
        if not self.running:
            return 0
        next_due = self._next_due()
        return now_ms - next_due if next_due is not None and next_due < now_ms else 0

    def nudge(self) -> None:
        """The pipeline has room again: fire what is held back."""
        self._wake()

    def fire_due(self, now_ms: int, limit: int | None = None) -> int:
        """Fire every timer due at or before `now_ms` (at most `limit` of them), in due
        order, ties in arm order.

        Each timer is disarmed before its `on_fire` runs, so the callback may re-arm or
        cancel any key. A timer armed by a callback never fires within the same call,
        even if already due, so a callback that keeps re-arming in the past cannot spin
        forever; it fires on the next call. Returns how many timers fired, counting
        those whose callback raised (logged as `timer_fire_failed`). Checks due fire
        first, and `limit` does not count them.
        """
        first_new_seq = self._seq
        self._firing = True
        try:
            checked = self._fire_from(self._checks, now_ms, None, first_new_seq)
            return checked + self._fire_from(self._heap, now_ms, limit, first_new_seq)
        finally:
            self._firing = False
            self._compact_if_mostly_dead()

    def _fire_from(
        self, heap: list[_Entry], now_ms: int, limit: int | None, first_new_seq: int
    ) -> int:
        """Fire what is due in one heap (at most ``limit``); see ``fire_due``."""
        deferred: list[_Entry] = []
        fired = 0
        lateness = self._lateness
        try:
            while heap and heap[0][0] <= now_ms:
                if limit is not None and fired >= limit:
                    break
                entry = heapq.heappop(heap)
                _, seq, key, token = entry
                if self._live.get(key) is not entry:
                    self._dead -= 1
                elif seq >= first_new_seq:
                    deferred.append(entry)
                else:
                    del self._live[key]
                    fired += 1
                    if lateness is not None:
                        lateness((now_ms - entry[0]) / 1000)
                    try:
                        self._on_fire(key, token)
                    except Exception:
                        log.exception("timer_fire_failed", key=key, token=token)
        finally:
            for entry in deferred:
                # Dead or alive, it goes back: `_dead` counted it as a heap entry.
                heapq.heappush(heap, entry)
        return fired

    async def run(self) -> None:
        """Fire timers as they fall due, forever; cancel the task (or `stop()`) to end."""
        loop = asyncio.get_running_loop()
        while True:
            room = None if self.room is None else max(0, self.room())
            self.fire_due(self._clock.now_ms(), room)
            held = self.room is not None and self.room() <= 0
            next_due = self._next_due(self._checks) if held else self._next_due()
            if next_due is not None and next_due <= self._clock.now_ms():
                # Armed by a callback already due, or more due than fit in one turn:
                # fire it after letting others run.
                await asyncio.sleep(0)
                continue
            if held and (waiting := self._next_due(self._heap)) is not None:
                # Held back with timers due: ``nudge`` (room again) wakes it, or at the
                # latest a look again a moment later (a nudge never missed for long).
                now = self._clock.now_ms()
                again = now + _HELD_RECHECK_MS if waiting <= now else waiting
                next_due = again if next_due is None else min(next_due, again)
            alarm: Alarm | None = None
            self._waiter = loop.create_future()
            self._sleeping_until = next_due
            try:
                if next_due is not None:
                    alarm = self._clock.call_at(next_due, self._wake)
                await self._waiter
            finally:
                self._waiter = None
                if alarm is not None:
                    alarm.cancel()

    @property
    def running(self) -> bool:
        """True while the task `start()` made runs: not before, after `stop()`, or once
        it failed (a bug, logged as `task_failed`)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start `run()` as a task on the running loop."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("scheduler already started")
        self._task = watch(asyncio.get_running_loop().create_task(self.run(), name="scheduler"))

    async def stop(self) -> None:
        """Stop the task `start()` made, firing nothing; armed timers stay queryable."""
        task, self._task = self._task, None
        if task is None or task.done():  # one that failed was logged (``watch``) already
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # Swallow the cancellation we caused, not one aimed at our caller.
            caller = asyncio.current_task()
            if caller is not None and caller.cancelling():
                raise

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _next_due(self, heap: list[_Entry] | None = None) -> int | None:
        """The earliest due time of ``heap`` (both heaps when None), dead tops dropped."""
        if heap is None:
            check, due = self._next_due(self._checks), self._next_due(self._heap)
            return due if check is None else check if due is None else min(check, due)
        while heap and self._live.get(heap[0][2]) is not heap[0]:
            heapq.heappop(heap)
            self._dead -= 1
        return heap[0][0] if heap else None

    def _compact_if_mostly_dead(self) -> None:
        # Not while fire_due runs: it holds popped entries that are still live.
        if self._firing:
            return
        if self._dead > _COMPACT_MIN_DEAD and self._dead * 2 > len(self._live):
            live = self._live
            self._heap = [entry for entry in self._heap if live.get(entry[2]) is entry]
            self._checks = [entry for entry in self._checks if live.get(entry[2]) is entry]
            heapq.heapify(self._heap)
            heapq.heapify(self._checks)
            self._dead = 0
