"""The publisher's warm request after a lost connection: real publish time, time left;
its confirm deadline, on the injected clock."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from warmer.bus.port import ConfirmOverdue, PublishWithdrawn
from warmer.bus.publisher import Publisher
from warmer.bus.topology import Names, Topology
from warmer.clock import ManualClock
from warmer.contract import WarmRequested

T0 = 1_760_000_000_000


class Channel:
    """A robust channel that is always ready again."""

    async def ready(self) -> None:
        return None


class Exchange:
    """Fails the first ``cuts`` publishes as a lost connection would, moving the clock."""

    def __init__(self, clock: ManualClock, cuts: int, outage_ms: int) -> None:
        self.clock = clock
        self.cuts = cuts
        self.outage_ms = outage_ms
        self.published: list[Any] = []
        self.silent = False
        """No confirm ever comes (a connection that stopped forwarding)."""

    async def publish(self, message: Any, routing_key: str, **_: Any) -> None:
        if self.cuts:
            self.cuts -= 1
            self.clock.advance(self.outage_ms)
            raise ConnectionError("connection lost")
        if self.silent:
            await asyncio.get_running_loop().create_future()
        self.published.append(message)


def publisher(clock: ManualClock, exchange: Exchange, confirm_ms: int = 10_000) -> Publisher:
    names = Names.of("ns")
    exchanges: dict[str, Any] = {name: exchange for name, _ in names.exchanges()}
    topology = Topology(names=names, exchanges=exchanges, queues={})
    channel: Any = Channel()
    return Publisher(channel, topology, channel, exchange, clock, confirm_ms)  # type: ignore[arg-type]


def request(at: int) -> WarmRequested:
    return WarmRequested(conversation_id="c", token=7, requested_at=at, cwd="/srv")


async def test_a_warm_request_published_at_once_keeps_its_whole_timeout() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    assert await publisher(clock, exchange).warm(request(T0), 60_000, lambda: True)
    (message,) = exchange.published
    assert message.expiration == timedelta(milliseconds=60_000)
    assert msgspec.json.decode(message.body)["requestedAt"] == T0
    assert message.message_id == "c:7"


async def test_republished_after_a_reconnection_it_carries_its_real_time_whole_timeout() -> None:
    # Issue 17: the warm timeout waits for a worker (or broker) that sent it late, so the
    # request is good for its whole timeout from when it really goes out.
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=2, outage_ms=10_000)
    await publisher(clock, exchange).warm(request(T0), 60_000, lambda: True)
    (message,) = exchange.published
    assert msgspec.json.decode(message.body)["requestedAt"] == T0 + 20_000
    assert message.expiration == timedelta(milliseconds=60_000)


async def test_sent_late_but_still_wanted_it_goes_out_with_its_whole_timeout() -> None:
    # Before issue 17 a request whose timeout had passed during an outage was withdrawn;
    # now only one no longer wanted is (its warm failed: the retry has a new token).
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=1, outage_ms=61_000)
    await publisher(clock, exchange).warm(request(T0), 60_000, lambda: True)
    (message,) = exchange.published
    assert msgspec.json.decode(message.body)["requestedAt"] == T0 + 61_000
    assert message.expiration == timedelta(milliseconds=60_000)


async def test_withdrawn_when_no_longer_wanted() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=1, outage_ms=1_000)
    with pytest.raises(PublishWithdrawn):
        await publisher(clock, exchange).warm(request(T0), 60_000, lambda: False)
    assert exchange.published == []


async def test_a_confirm_that_does_not_come_is_overdue_at_the_deadline_on_the_clock() -> None:
    clock = ManualClock(T0)
    exchange = Exchange(clock, cuts=0, outage_ms=0)
    exchange.silent = True
    warm = asyncio.ensure_future(
        publisher(clock, exchange, confirm_ms=2_000).warm(request(T0), 60_000, lambda: True)
    )
    await asyncio.sleep(0)
    clock.advance(1_999)
    await asyncio.sleep(0)
    assert not warm.done()
    clock.advance(1)
    with pytest.raises(ConfirmOverdue, match="2000 ms"):
        await warm
