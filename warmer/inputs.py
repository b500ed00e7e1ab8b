"""What the pipeline applies, in arrival order: deliveries, timers that fell due, returns.

Consumers and the scheduler only add to ``Inputs``; the pipeline takes a batch at a time
(everything there is, never waiting for a batch to fill). Handing data over this way means
no callback re-enters the scheduler or the pipeline while they are working.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Final, Literal

import msgspec

from warmer.bus.port import Delivery
from warmer.clock import Clock

BATCH_MAX: Final = 1024
BATCH_NEAR_COMMANDS: Final = 256
"""The most inputs of a batch (commands aside) while commands are coming (one within
``COMMANDS_RECENT_MS``): a command that arrives while a batch is applied waits for it."""
COMMANDS_RECENT_MS: Final = 1_000

Queue = Literal["lifecycle", "commands"]


class Received(msgspec.Struct, frozen=True):
    """A delivery from one of the two inbound queues."""

    queue: Queue
    delivery: Delivery


class Fired(msgspec.Struct, frozen=True, gc=False):
    """A timer fell due: a regular warm, a retry or a warm timeout."""

    conversation_id: str
    token: int


class Returned(msgspec.Struct, frozen=True, gc=False):
    """The broker returned a warm request as unroutable."""

    conversation_id: str
    token: int


class Prune(msgspec.Struct, frozen=True, gc=False):
    """Time to forget conversations past the retention time."""


Input = Received | Fired | Returned | Prune


class Inputs:
    """What the pipeline has yet to apply; consumers and timers add to it.

    Commands come first: a person waits on each, and they are few, so a batch is made of
    the commands waiting, when there are any, before the rest (deliveries, timers that fell
    due, returns) in arrival order; but not twice in a row while the rest waits, so a
    steady stream of commands (a dashboard polling, a hostile publisher) cannot starve it.
    With a clock, the rest is stamped as it arrives, so the pipeline can tell how long its
    inputs wait (``waited_ms``, ``oldest_ms``): part of how far behind the worker is.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self._commands: deque[Input] = deque()
        self._items: deque[Input] = deque()
        # [arrival ms, how many arrived then], oldest first, over ``_items`` in order.
        self._stamps: deque[list[int]] = deque()
        self._clock = clock
        self._ready = asyncio.Event()
        self._closed = False
        self.taken = 0
        """How many batches the pipeline has taken: the stall watchdog's sign of progress."""
        self.idle = False
        """True while the pipeline waits in ``take`` for input."""
        self._command_at: int | None = None
        self._commands_last = False
        # The last batch taken was commands: the rest, when any waits, goes next (commands
        # first, not commands only: a steady stream of them must not starve the rest).
        self.delivered = 0
        """How many lifecycle deliveries arrived so far (how fast the worker takes them)."""
        self.fired_waiting = 0
        """Timers fired and not yet through the pipeline (``fires_through``)."""
        self.waited_ms = 0
        """How long the oldest input of the last batch taken (commands aside) had waited."""
        self.taken_since_ms: int | None = None
        """When the oldest input of the last batch taken arrived (None without a clock)."""

    def __len__(self) -> int:
        return len(self._items) + len(self._commands)

    def put(self, item: Input) -> None:
        """Add one input at the end (of the commands when it is one)."""
        if isinstance(item, Received) and item.queue == "commands":
            self._commands.append(item)
            if self._clock is not None:
                self._command_at = self._clock.now_ms()
        else:
            self._items.append(item)
            self._stamp(1)
            if type(item) is Fired:
                self.fired_waiting += 1
        self._ready.set()

    def _stamp(self, count: int) -> None:
        if self._clock is None:
            return
        now = self._clock.now_ms()
        stamps = self._stamps
        if stamps and stamps[-1][0] == now:
            stamps[-1][1] += count
        else:
            stamps.append([now, count])

    def put_back(self, items: Iterable[Input]) -> None:
        """Put inputs of an abandoned batch back at the front, in their order."""
        back = list(items)
        commands = [i for i in back if isinstance(i, Received) and i.queue == "commands"]
        rest = [i for i in back if not (isinstance(i, Received) and i.queue == "commands")]
        self.fired_waiting += sum(type(i) is Fired for i in rest)
        self._commands.extendleft(reversed(commands))
        self._items.extendleft(reversed(rest))
        if rest and self._clock is not None:
            oldest = self._stamps[0][0] if self._stamps else self._clock.now_ms()
            self._stamps.appendleft([oldest, len(rest)])
        if self._items or self._commands:
            self._ready.set()

    def fires_through(self, count: int) -> None:
        """``count`` fired timers taken were applied (or put back, which counts them again)."""
        self.fired_waiting -= count

    def oldest_ms(self, now: int) -> int:
        """How long the oldest input waiting (commands aside) has waited; 0 when none."""
        return now - self._stamps[0][0] if self._stamps else 0

    async def lifecycle(self, delivery: Delivery) -> None:
        """The lifecycle consumer's callback."""
        self.delivered += 1
        self.put(Received("lifecycle", delivery))

    async def command(self, delivery: Delivery) -> None:
        """The commands consumer's callback."""
        self.put(Received("commands", delivery))

    def fired(self, conversation_id: str, token: int) -> None:
        """The scheduler's callback: hands back what fell due, never re-enters it."""
        self.put(Fired(conversation_id, token))

    def close(self) -> None:
        """No more inputs will come: ``take`` returns what is left, then None."""
        self._closed = True
        self._ready.set()

    def take_commands(self) -> list[Input]:
        """Take out every command delivery waiting, in order, leaving the rest in theirs
        (answered at once while the store fails, not held behind a batch being retried)."""
        commands = list(self._commands)
        self._commands.clear()
        return commands

    async def arrived(self) -> None:
        """Wait until the next input is put; once closed, wait until cancelled."""
        self._ready.clear()
        await self._ready.wait()
        if self._closed:
            await asyncio.Event().wait()

    async def take(self, limit: int = BATCH_MAX) -> list[Input] | None:
        """Wait for at least one input, then take the commands waiting, if any (at most
        ``limit``), else every other input there is (at most ``limit``, and at most
        ``BATCH_NEAR_COMMANDS`` while commands are coming: a batch takes less long).
        After a commands batch the rest goes first when it waits: a command waits at most
        one other batch, and a steady stream of commands cannot starve the rest."""
        while not self._items and not self._commands:
            if self._closed:
                return None
            self._ready.clear()
            self.idle = True
            try:
                await self._ready.wait()
            finally:
                self.idle = False
        self.taken += 1
        if self._commands and not (self._commands_last and self._items):
            self._commands_last = True
            count = min(limit, len(self._commands))
            if self._clock is not None:
                self.taken_since_ms = self._clock.now_ms()
            return [self._commands.popleft() for _ in range(count)]
        self._commands_last = False
        at, clock = self._command_at, self._clock
        if at is not None and clock is not None and clock.now_ms() - at < COMMANDS_RECENT_MS:
            limit = min(limit, BATCH_NEAR_COMMANDS)
        count = min(limit, len(self._items))
        self._unstamp(count)
        return [self._items.popleft() for _ in range(count)]

    def _unstamp(self, count: int) -> None:
        """Forget the stamps of the ``count`` oldest inputs, noting how long they waited."""
        stamps = self._stamps
        if self._clock is None or not stamps:
            return
        self.taken_since_ms = stamps[0][0]
        self.waited_ms = self._clock.now_ms() - stamps[0][0]
        while count and stamps:
            first = stamps[0]
            if first[1] > count:
                first[1] -= count
                return
            count -= first[1]
            stamps.popleft()


__all__ = [
    "BATCH_MAX",
    "BATCH_NEAR_COMMANDS",
    "COMMANDS_RECENT_MS",
    "Fired",
    "Input",
    "Inputs",
    "Prune",
    "Queue",
    "Received",
    "Returned",
]
