"""The stall watchdog: inputs waiting while the pipeline takes none is a stall, idle is not."""

from __future__ import annotations

import asyncio

from warmer.clock import ManualClock
from warmer.observe.health import Health
from warmer.observe.stall import Watchdog

AFTER_MS = 10_000


class Queue:
    def __init__(self) -> None:
        self.waiting = 0
        self.taken = 0

    def __len__(self) -> int:
        return self.waiting


def rig() -> tuple[ManualClock, Health, Queue, Watchdog, list[int]]:
    clock, health, queue, counted = ManualClock(0), Health(), Queue(), [0]

    def count() -> None:
        counted[0] += 1

    return clock, health, queue, Watchdog(clock, health, queue, AFTER_MS, count), counted


def test_inputs_waiting_with_none_taken_for_the_limit_is_a_stall_until_one_is_taken() -> None:
    clock, health, queue, dog, counted = rig()
    queue.waiting = 3
    clock.advance(AFTER_MS - 1)
    dog.check()
    assert health.reason("stall") is None  # not yet: one ms short
    clock.advance(1)
    dog.check()
    assert health.reason("stall") == "3 inputs waiting, none taken for 10 s"
    clock.advance(5000)
    dog.check()
    assert health.reason("stall") == "3 inputs waiting, none taken for 15 s"
    assert counted == [1]  # one stall, counted once

    queue.taken += 1  # the pipeline moves
    dog.check()
    assert health.reason("stall") is None
    clock.advance(AFTER_MS - 1)  # the limit counts again from the move
    dog.check()
    assert health.reason("stall") is None
    clock.advance(1)
    dog.check()
    assert health.reason("stall") is not None
    assert counted == [2]


def test_an_idle_pipeline_is_never_stalled() -> None:
    clock, health, queue, dog, counted = rig()
    for _ in range(5):
        clock.advance(AFTER_MS)
        dog.check()
    assert health.reasons() == [] and counted == [0]
    # Work that arrives after a long idle time is not stalled at once.
    queue.waiting = 1
    clock.advance(AFTER_MS - 1)
    dog.check()
    assert health.reason("stall") is None


def test_a_stall_clears_when_the_inputs_are_gone() -> None:
    clock, health, queue, dog, _ = rig()
    queue.waiting = 1
    clock.advance(AFTER_MS)
    dog.check()
    assert health.reason("stall") is not None
    queue.waiting = 0
    dog.check()
    assert health.reason("stall") is None


async def test_it_runs_on_the_injected_clock() -> None:
    clock, health, queue, dog, _ = rig()
    assert dog.check_ms == 1000
    task = asyncio.get_running_loop().create_task(dog.run())
    try:
        queue.waiting = 2
        for _ in range(AFTER_MS // dog.check_ms):
            await asyncio.sleep(0)
            clock.advance(dog.check_ms)
        await asyncio.sleep(0)
        assert health.reasons() == ["stall: 2 inputs waiting, none taken for 10 s"]
    finally:
        task.cancel()
