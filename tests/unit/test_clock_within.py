"""``clock.within``: a deadline on the injected clock, so ManualClock drives it."""

from __future__ import annotations

import asyncio

import pytest

from warmer.clock import ManualClock, within

T0 = 1_760_000_000_000


async def test_what_ends_in_time_is_returned_and_its_alarm_cancelled() -> None:
    clock = ManualClock(T0)
    assert await within(clock, 1_000, asyncio.sleep(0, result="done")) == "done"
    assert clock.next_alarm_ms() is None


async def test_what_does_not_end_is_cancelled_exactly_at_the_deadline() -> None:
    clock = ManualClock(T0)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(within(clock, 1_000, never))
    await asyncio.sleep(0)
    clock.set(T0 + 999)
    await asyncio.sleep(0)
    assert not waiting.done()
    clock.set(T0 + 1_000)
    with pytest.raises(TimeoutError):
        await waiting
    assert never.cancelled()


async def test_a_cancelled_caller_is_cancelled_not_timed_out() -> None:
    clock = ManualClock(T0)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(within(clock, 1_000, never))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert never.cancelled()
    assert clock.next_alarm_ms() is None
