"""The stall watchdog: a busy pipeline that takes no input is a stall; an idle one is not."""

from __future__ import annotations

import asyncio

from warmer.clock import ManualClock
from warmer.inputs import Inputs, Prune
from warmer.observe.health import Health
from warmer.observe.stall import Watchdog

AFTER_MS = 10_000


class Queue:
    def __init__(self) -> None:
        self.waiting = 0
        self.taken = 0
        self.idle = False

    def __len__(self) -> int:
        return self.waiting


def rig() -> tuple[ManualClock, Health, Queue, Watchdog, list[int]]:
    clock, health, queue, counted = ManualClock(0), Health(), Queue(), [0]

    def count() -> None:
        counted[0] += 1

    return clock, health, queue, Watchdog(clock, health, queue, AFTER_MS, count), counted


def test_a_busy_pipeline_taking_nothing_for_the_limit_stalls_until_it_takes_again() -> None:
    clock, health, queue, dog, counted = rig()
    queue.waiting = 3
    clock.advance(AFTER_MS - 1)
    dog.check()
    assert health.reason("stall") is None  # not yet: one ms short
    clock.advance(1)
    dog.check()
    assert health.reason("stall") == "the pipeline took no input for 10 s (3 waiting)"
    clock.advance(5000)
    dog.check()
    assert health.reason("stall") == "the pipeline took no input for 15 s (3 waiting)"
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


def test_a_batch_held_with_nothing_behind_it_is_a_stall_too() -> None:
    clock, health, _, dog, _ = rig()
    clock.advance(AFTER_MS)
    dog.check()
    assert health.reason("stall") == "the pipeline took no input for 10 s (0 waiting)"


def test_an_idle_pipeline_is_never_stalled_and_clears_a_stall() -> None:
    clock, health, queue, dog, counted = rig()
    queue.idle = True
    for _ in range(5):
        clock.advance(AFTER_MS)
        dog.check()
    assert health.reasons() == [] and counted == [0]
    # Busy after a long idle time: not stalled at once.
    queue.idle = False
    clock.advance(AFTER_MS - 1)
    dog.check()
    assert health.reason("stall") is None
    clock.advance(1)
    dog.check()
    assert health.reason("stall") is not None
    queue.idle = True  # done, back for input
    dog.check()
    assert health.reason("stall") is None


async def test_inputs_say_when_the_pipeline_waits_and_what_it_took() -> None:
    inputs = Inputs()
    assert (inputs.idle, inputs.taken) == (False, 0)
    taking = asyncio.get_running_loop().create_task(inputs.take())
    await asyncio.sleep(0)
    assert inputs.idle
    inputs.put(Prune())
    assert await taking == [Prune()]
    assert (inputs.idle, inputs.taken) == (False, 1)


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
        assert health.reasons() == ["stall: the pipeline took no input for 10 s (2 waiting)"]
    finally:
        task.cancel()
