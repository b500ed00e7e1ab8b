"""A worker whose connection to the broker is cut, through a proxy; the probe stays connected.

RabbitMQ 3.10 counts every connection cut toward a quorum queue's delivery limit (20)
for the messages unacknowledged at that moment, so each test cuts once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aio_pika
import msgspec
import pytest

from tests.integration.probe import Listener, Probe
from tests.reliability.conftest import completed
from tests.reliability.tcp_proxy import BASIC_ACK, TcpProxy
from warmer.bus.topology import Names, delete

pytestmark = pytest.mark.broker

CID = "c-reconnect"
REFUSE_S = 2.5  # long enough for the 1 s timer to fall due while disconnected
RECONNECT_S = 15.0  # aio-pika's robust connection retries every 5 s


def now_ms() -> int:
    return int(time.time() * 1000)


async def drain(listener: Listener, quiet: float = 0.05) -> list[dict[str, Any]]:
    """Every body already waiting (or arriving within ``quiet`` s of the last)."""
    bodies = []
    while True:
        try:
            bodies.append(await listener.next_body(quiet))
        except AssertionError:
            return bodies


async def reply_queue(probe: Probe) -> tuple[str, Listener]:
    """An exclusive queue of the test's own for replies, kept for the whole test."""
    queue = await probe.channel.declare_queue(exclusive=True, auto_delete=True)
    listener = Listener(queue)
    await listener.start()
    return queue.name, listener


async def warm_once(probe: Probe, warms: Listener, surfaces: Listener) -> dict[str, Any]:
    """Enable CID at a 1 s interval, settle it, take its first warm and complete it (50 %)."""
    reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    assert reply["ok"] is True
    reply = await probe.command({"type": "set_interval", "conversationId": CID, "intervalMs": 1000})
    assert reply["settings"] == {"enabled": True, "intervalMs": 1000}
    await probe.event({"type": "turn.settled", "conversationId": CID, "cwd": "/repo"})
    first = await warms.next_body(5)
    assert first["conversationId"] == CID
    await probe.event(completed(first["token"], 500, CID))
    update = await surfaces.until(lambda b: b["state"]["lastPct"] == 50, 5)
    assert update["state"]["status"] == "armed"
    return first


async def test_a_warm_that_fell_due_while_cut_off_goes_out_after_the_reconnection(
    proxy: TcpProxy, amqp_url: str, probe: Probe, start_worker: Any
) -> None:
    await start_worker(amqp_url=proxy.url(amqp_url))
    warms = await probe.warms()
    surfaces = await probe.surfaces()
    first = await warm_once(probe, warms, surfaces)

    # The next warm is due 1 s from now: cut the worker off for longer than that.
    cut_at = now_ms()
    assert proxy.cut(refuse_for=REFUSE_S) == 1
    # A command sent while the worker is away waits in its queue and is answered later.
    replies_name, replies = await reply_queue(probe)
    await probe.send_command(
        {"type": "get_state", "conversationId": CID},
        reply_to=replies_name,
        correlation_id="during-the-cut",
    )
    await warms.nothing(within=REFUSE_S - 0.3)
    resumed_at = now_ms()

    # Not lost: the warm that fell due during the cut goes out after the reconnection
    # (or, if its attempt timed out meanwhile, the retry that replaced it does).
    late = await warms.next_body(RECONNECT_S)
    received_at = now_ms()
    assert late["conversationId"] == CID
    assert late["token"] > first["token"]
    assert cut_at + 900 <= late["requestedAt"], (cut_at, late, resumed_at)
    assert received_at >= resumed_at
    assert proxy.accepted == 2, "the worker reconnected through the proxy once"

    # The command sent during the cut is answered once the worker consumes again.
    message = await replies.next(10)
    assert message.correlation_id == "during-the-cut"
    answer = msgspec.json.decode(message.body)
    assert answer["ok"] is True and answer["state"]["enabled"] is True

    # Complete the newest outstanding warm with its token until one is the current one
    # (requests for attempts that timed out during the cut are stale and dropped).
    candidates = [late, *await drain(warms)]
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        newest = max(candidates, key=lambda b: b["token"])
        await probe.event(completed(newest["token"], 730, CID))
        try:
            update = await surfaces.until(lambda b: b["state"]["lastPct"] == 73, 1.5)
            break
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            candidates = [await warms.next_body(5), *await drain(warms)]
    state = update["state"]
    assert state["status"] == "armed", state
    assert state["failures"] == 0 and state["lastError"] is None, state
    assert state["nextWarmAt"] > update["at"], state

    # Warming continues: the next regular warm carries a greater token.
    following = await warms.until(lambda b: b["token"] > newest["token"], 5)
    assert following["conversationId"] == CID
    assert following["requestedAt"] >= update["at"] + 900

    # Commands are still answered, through the new connection.
    reply = await probe.command({"type": "get_state", "conversationId": CID})
    assert reply["ok"] is True
    assert reply["state"]["lastPct"] == 73 and reply["state"]["intervalMs"] == 1000
    reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": False})
    assert reply == {"ok": True, "settings": {"enabled": False, "intervalMs": 1000}}


async def test_no_warm_request_goes_out_after_its_own_timeout(
    proxy: TcpProxy, amqp_url: str, probe: Probe, start_worker: Any
) -> None:
    await start_worker(amqp_url=proxy.url(amqp_url))
    warms = await probe.warms()
    surfaces = await probe.surfaces()
    await warm_once(probe, warms, surfaces)

    assert proxy.cut(refuse_for=REFUSE_S) == 1
    await asyncio.sleep(REFUSE_S)
    # Every request published within 1.5 s of the reconnection, with when it arrived.
    arrivals = [(await warms.next(RECONNECT_S), now_ms())]
    deadline = asyncio.get_running_loop().time() + 1.5
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            arrivals.append((await warms.next(left), now_ms()))
        except AssertionError:
            break
    late = []
    for message, received_at in arrivals:
        body = msgspec.json.decode(message.body)
        timeout_ms = 1000  # the warm timeout: never more than the 1 s interval
        if received_at > body["requestedAt"] + timeout_ms + 200:  # 200 ms of slack
            late.append((body["token"], body["requestedAt"], received_at))
    assert late == [], (
        f"{len(late)} of {len(arrivals)} warm requests were published after their own "
        f"warm timeout had passed (token, requestedAt, received): {late}"
    )


async def test_a_command_whose_ack_was_lost_is_answered_again_and_harmlessly(
    proxy: TcpProxy, amqp_url: str, probe: Probe, start_worker: Any
) -> None:
    await start_worker(amqp_url=proxy.url(amqp_url))
    surfaces = await probe.surfaces()
    reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    assert reply["ok"] is True
    await surfaces.until(lambda b: b["conversationId"] == CID)

    # The worker answers, then its ack is swallowed and the connection cut: the broker
    # still holds the command, unacknowledged, and delivers it again after the reconnection.
    cut = proxy.cut_on_client_method(BASIC_ACK)
    replies_name, replies = await reply_queue(probe)
    correlation_id = uuid.uuid4().hex
    await probe.send_command(
        {"type": "set_interval", "conversationId": CID, "intervalMs": 5000},
        reply_to=replies_name,
        correlation_id=correlation_id,
    )
    await asyncio.wait_for(cut, 10)
    first = await replies.next(5)
    second = await replies.next(RECONNECT_S)
    await replies.nothing(within=1.0)

    # Both answers carry the request's correlation id and say the same: keeping the
    # first, as requesters do, loses nothing.
    assert first.correlation_id == second.correlation_id == correlation_id
    assert first.body == second.body
    assert msgspec.json.decode(first.body) == {
        "ok": True,
        "settings": {"enabled": True, "intervalMs": 5000},
    }
    assert proxy.accepted == 2

    # Nothing broke: the command is settled, the state is right, commands are answered.
    commands = await probe.channel.declare_queue(probe.names.commands, passive=True)
    assert commands.declaration_result.message_count == 0
    assert commands.declaration_result.consumer_count == 1
    reply = await probe.command({"type": "get_state", "conversationId": CID})
    assert reply["state"]["intervalMs"] == 5000 and reply["state"]["enabled"] is True
    # Enabling armed it; the redelivered set_interval re-armed it: still one schedule.
    assert reply["state"]["status"] == "armed"
    assert 0 < reply["state"]["nextWarmAt"] - now_ms() <= 5000
    reply = await probe.command({"type": "set_interval", "conversationId": CID, "intervalMs": 7000})
    assert reply["settings"] == {"enabled": True, "intervalMs": 7000}


async def test_a_topology_lost_while_cut_off_is_declared_again(
    proxy: TcpProxy, amqp_url: str, probe: Probe, start_worker: Any
) -> None:
    """A broker that comes back without the namespace's exchanges and queues (a fresh node)."""
    await start_worker(amqp_url=proxy.url(amqp_url))
    reply = await probe.command({"type": "get_state", "conversationId": CID})
    assert reply["ok"] is True

    assert proxy.cut(refuse_for=1.0) == 1
    names = Names.of(probe.names.lifecycle.rsplit(".", 1)[0])
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await delete(await connection.channel(), names)

        # The worker declares everything again on its own (the probe declares nothing).
        async def declared() -> bool:
            channel = await connection.channel()
            try:
                for name, kind in names.exchanges():
                    await channel.declare_exchange(name, kind, passive=True)
                for name, _ in names.queues():
                    queue = await channel.declare_queue(name, passive=True)
                    if name != names.dead and queue.declaration_result.consumer_count != 1:
                        return False
                return True
            except aio_pika.exceptions.ChannelClosed:
                return False
            finally:
                if not channel.is_closed:
                    await channel.close()

        deadline = asyncio.get_running_loop().time() + RECONNECT_S
        while not await declared():
            assert asyncio.get_running_loop().time() < deadline, "topology not declared again"
            await asyncio.sleep(0.2)

    # The bindings are back too: commands and events reach the worker, warms come out.
    warms = await probe.warms()
    reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    assert reply == {"ok": True, "settings": {"enabled": True, "intervalMs": 240000}}
    reply = await probe.command({"type": "set_interval", "conversationId": CID, "intervalMs": 1000})
    assert reply["settings"]["intervalMs"] == 1000
    await probe.event({"type": "turn.settled", "conversationId": CID})
    warm = await warms.next_body(5)
    assert warm["conversationId"] == CID
    await probe.event(completed(warm["token"], 900, CID))
    reply = await probe.command({"type": "get_state", "conversationId": CID})
    assert reply["state"]["lastPct"] == 90
    # Invalid events are dead-lettered through the re-declared dlx.
    await probe.event(b"not json", routing_key="turn.settled")
    dead = await probe.dead_letter(5)
    assert dead.headers["x-warmer-reason"] == "invalid_json"
