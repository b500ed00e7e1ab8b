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

BATCH_MAX: Final = 1024

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
    """What the pipeline has yet to apply, in arrival order; consumers and timers add to it."""

    def __init__(self) -> None:
        self._items: deque[Input] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self.taken = 0
        """How many batches the pipeline has taken: the stall watchdog's sign of progress."""
        self.idle = False
        """True while the pipeline waits in ``take`` for input: idle, not stalled."""

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Input) -> None:
        """Add one input at the end."""
        self._items.append(item)
        self._ready.set()

    def put_back(self, items: Iterable[Input]) -> None:
        """Put inputs of an abandoned batch back at the front, in their order."""
        self._items.extendleft(reversed(list(items)))
        if self._items:
            self._ready.set()

    async def lifecycle(self, delivery: Delivery) -> None:
        """The lifecycle consumer's callback."""
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
        if not any(isinstance(item, Received) and item.queue == "commands" for item in self._items):
            return []
        commands: list[Input] = []
        rest: deque[Input] = deque()
        for item in self._items:
            is_command = isinstance(item, Received) and item.queue == "commands"
            (commands if is_command else rest).append(item)
        self._items = rest
        return commands

    async def arrived(self) -> None:
        """Wait until the next input is put; once closed, wait until cancelled."""
        self._ready.clear()
        await self._ready.wait()
        if self._closed:
            await asyncio.Event().wait()

    async def take(self, limit: int = BATCH_MAX) -> list[Input] | None:
        """Wait for at least one input, then take every one there is (at most ``limit``)."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            self.idle = True
            try:
                await self._ready.wait()
            finally:
                self.idle = False
        count = min(limit, len(self._items))
        self.taken += 1
        return [self._items.popleft() for _ in range(count)]


__all__ = ["BATCH_MAX", "Fired", "Input", "Inputs", "Prune", "Queue", "Received", "Returned"]
