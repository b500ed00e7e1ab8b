"""`warmer reshard` on a real broker: from today's single queues to shards, nothing lost.

The namespace starts in the topology of S = 1 with lifecycle events and commands queued
(headers right, wrong and missing) and a store whose records are all on shard 0. After
the reshard, each message must sit on the shard queue that the real ``.shards`` exchange
routes its conversation to, and each record must carry that same shard: both checked by
publishing to the real exchange here, not by the probe under test.

The store is a small in-test ``Shared`` (ids, assign, layout): the back ends implement
that API on their own branch (h-stores) and have their own contract tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import aio_pika
import msgspec
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

import warmer.bus.reshard
from warmer.bus.deadletter import REASON
from warmer.bus.reshard import CONVERSATION_HEADER, MAX_SHARDS, Refused, streams
from warmer.bus.topology import COMMAND_ROUTING_KEY, Names, declare, delete
from warmer.core.gaps import MODEL_KEY
from warmer.reshard import reshard
from warmer.store.base import Shared

pytestmark = pytest.mark.broker

CONVERSATIONS = [f"conv-{i:03d}" for i in range(40)]
SHARDS = 4


class Records:
    """The part of ``Shared`` a reshard uses: which shard holds each record."""

    def __init__(self, shard_of: Mapping[str, int], layout: int | None) -> None:
        self.shard_of = dict(shard_of)
        self.laid_out = layout
        self.assigned: list[dict[str, int]] = []
        self.models: set[int] = set()
        """Shards holding a gap model: ``ids`` lists its key among theirs, as stores do."""

    async def layout(self) -> int | None:
        return self.laid_out

    async def set_layout(self, shards: int) -> None:
        self.laid_out = shards

    async def ids(self, shard: int) -> list[str]:
        model = [MODEL_KEY] if shard in self.models else []
        return [c for c, s in self.shard_of.items() if s == shard] + model

    async def assign(self, moves: Mapping[str, int]) -> None:
        assert MODEL_KEY not in moves, "the gap model is never moved"
        self.assigned.append(dict(moves))
        self.shard_of.update({c: s for c, s in moves.items() if c in self.shard_of})


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    async with await aio_pika.connect(amqp_url) as connection:
        yield connection


@pytest.fixture
async def channel(connection: AbstractConnection, namespace: str) -> AsyncIterator[AbstractChannel]:
    """A channel on the namespace, in today's topology; everything deleted afterwards."""
    channel = await connection.channel(publisher_confirms=True)
    await declare(channel, Names.of(namespace))
    try:
        yield channel
    finally:
        cleanup = await connection.channel()
        for stream in streams(namespace):
            for shard in range(MAX_SHARDS):
                await cleanup.queue_delete(stream.shard_queue(shard))
            await cleanup.exchange_delete(stream.shards_exchange)
        await delete(cleanup, Names.of(namespace))


async def _event(channel: AbstractChannel, ns: str, body: Any, headers: dict[str, Any]) -> None:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    exchange = await channel.get_exchange(f"{ns}.lifecycle")
    kind = body.get("type", "unknown") if isinstance(body, dict) else "unknown"
    message = aio_pika.Message(raw, content_type="application/json", headers=headers)
    await exchange.publish(message, kind)


async def _command(channel: AbstractChannel, ns: str, body: Any, headers: dict[str, Any]) -> None:
    exchange = await channel.get_exchange(f"{ns}.commands")
    message = aio_pika.Message(
        msgspec.json.encode(body), content_type="application/json", headers=headers
    )
    await exchange.publish(message, COMMAND_ROUTING_KEY)


async def _queued(channel: AbstractChannel, ns: str) -> list[tuple[str, dict[str, Any]]]:
    """Queue the old topology's traffic: (stream, body) of each message that must move."""
    sent: list[tuple[str, dict[str, Any]]] = []
    for i, conversation in enumerate(CONVERSATIONS):
        # Right, wrong, missing and non-string headers: the body decides.
        headers: list[dict[str, Any]] = [
            {CONVERSATION_HEADER: conversation},
            {CONVERSATION_HEADER: "someone-else"},
            {},
            {CONVERSATION_HEADER: 7},
        ]
        event = {"type": "turn.started", "conversationId": conversation, "n": i}
        await _event(channel, ns, event, headers[i % 4])
        sent.append(("lifecycle", event))
        command = {"type": "set_enabled", "conversationId": conversation, "enabled": True}
        await _command(channel, ns, command, headers[(i + 1) % 4])
        sent.append(("commands", command))
    # Not a known type, but addressed: it goes to its owner, which ignores it as today.
    odd = {"type": "turn.paused", "conversationId": CONVERSATIONS[0]}
    await _event(channel, ns, odd, {})
    sent.append(("lifecycle", odd))
    return sent


async def _drained(channel: AbstractChannel, queue: str) -> list[AbstractIncomingMessage]:
    declared = await channel.declare_queue(queue, passive=True)
    messages = []
    while (message := await declared.get(no_ack=False, fail=False)) is not None:
        await message.ack()
        messages.append(message)
    return messages


async def _routed_by_the_exchange(
    channel: AbstractChannel, ns: str, conversations: list[str]
) -> dict[str, int]:
    """Where the real exchange routes each conversation: one message each, then read."""
    lifecycle = streams(ns)[0]
    for conversation in conversations:
        await _event(
            channel,
            ns,
            {"type": "turn.started", "conversationId": conversation},
            {CONVERSATION_HEADER: conversation},
        )
    routed: dict[str, int] = {}
    for shard in range(SHARDS):
        for message in await _drained(channel, lifecycle.shard_queue(shard)):
            routed[msgspec.json.decode(message.body)["conversationId"]] = shard
    return routed


async def _exists(connection: AbstractConnection, queue: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


def _say(lines: list[str]) -> Any:
    return lines.append


async def test_a_reshard_to_four_loses_nothing_and_puts_each_message_on_its_shard(
    amqp_url: str, namespace: str, connection: AbstractConnection, channel: AbstractChannel
) -> None:
    sent = await _queued(channel, namespace)
    await _event(channel, namespace, b"not json at all", {CONVERSATION_HEADER: "x"})
    records = Records(dict.fromkeys(CONVERSATIONS, 0), layout=1)
    records.models = {0}
    lines: list[str] = []

    summary = await reshard(
        amqp_url, namespace, SHARDS, cast(Shared, records), say=_say(lines), every_s=0.0
    )

    assert sum(summary.moved.values()) == len(sent)
    assert summary.dead == 1
    assert set(summary.deleted) == {f"{namespace}.lifecycle", f"{namespace}.commands"}
    assert lines, "progress lines were said"
    # Every message, on its shard's queue, with the header its body names.
    found: list[tuple[str, dict[str, Any]]] = []
    shard_of_message: dict[str, set[int]] = {}
    for stream, kind in zip(streams(namespace), ("lifecycle", "commands"), strict=True):
        for shard in range(SHARDS):
            for message in await _drained(channel, stream.shard_queue(shard)):
                body = msgspec.json.decode(message.body)
                assert message.headers[CONVERSATION_HEADER] == body["conversationId"]
                found.append((kind, body))
                shard_of_message.setdefault(body["conversationId"], set()).add(shard)
    key = msgspec.json.encode
    assert Counter(key(item) for item in found) == Counter(key(item) for item in sent)
    routed = await _routed_by_the_exchange(channel, namespace, CONVERSATIONS)
    assert {c: {s} for c, s in routed.items()} == shard_of_message
    assert len(set(routed.values())) > 1, "40 conversations spread over several shards"
    # The records are where the exchange routes their conversations.
    assert records.shard_of == routed
    assert records.laid_out == SHARDS
    assert summary.records == [Counter(routed.values())[k] for k in range(SHARDS)]
    # The unreadable one is dead, as the worker would have left it.
    (letter,) = await _drained(channel, f"{namespace}.dead")
    assert letter.body == b"not json at all"
    assert letter.headers[REASON] == "invalid_json"
    # The old queues are gone: publishers now reach only the shards.
    for old in (f"{namespace}.lifecycle", f"{namespace}.commands"):
        assert not await _exists(connection, old)


async def test_running_it_again_moves_nothing_and_shrinking_empties_the_top_shards(
    amqp_url: str, namespace: str, channel: AbstractChannel
) -> None:
    sent = await _queued(channel, namespace)
    records = Records(dict.fromkeys(CONVERSATIONS, 0), layout=1)
    shared = cast(Shared, records)
    await reshard(amqp_url, namespace, SHARDS, shared, say=_say([]))

    again = await reshard(amqp_url, namespace, SHARDS, shared, say=_say([]))
    assert again.moved == {} and again.deleted == [] and again.reassigned == 0

    two = await reshard(amqp_url, namespace, 2, shared, say=_say([]))
    lifecycle, commands = streams(namespace)
    assert set(two.deleted) == {s.shard_queue(k) for s in (lifecycle, commands) for k in (2, 3)}
    bodies: list[dict[str, Any]] = []
    for stream in (lifecycle, commands):
        for shard in range(2):
            for message in await _drained(channel, stream.shard_queue(shard)):
                body = msgspec.json.decode(message.body)
                assert records.shard_of[body["conversationId"]] == shard
                bodies.append(body)
    assert len(bodies) == len(sent)
    assert set(records.shard_of.values()) == {0, 1}


async def test_back_to_one_shard_puts_everything_on_the_single_queues(
    amqp_url: str, namespace: str, connection: AbstractConnection, channel: AbstractChannel
) -> None:
    sent = await _queued(channel, namespace)
    records = Records(dict.fromkeys(CONVERSATIONS, 0), layout=None)
    shared = cast(Shared, records)
    await reshard(amqp_url, namespace, SHARDS, shared, say=_say([]))

    one = await reshard(amqp_url, namespace, 1, shared, say=_say([]))

    assert sum(one.moved.values()) == len(sent)
    lifecycle, commands = streams(namespace)
    for stream in (lifecycle, commands):
        for shard in range(SHARDS):
            assert not await _exists(connection, stream.shard_queue(shard))
    found = [
        (kind, msgspec.json.decode(message.body))
        for kind in ("lifecycle", "commands")
        for message in await _drained(channel, f"{namespace}.{kind}")
    ]
    key = msgspec.json.encode
    assert Counter(key(item) for item in found) == Counter(key(item) for item in sent)
    assert set(records.shard_of.values()) == {0} and records.laid_out == 1
    # Publishers reach the single queue again, not a `.shards` exchange.
    await _event(channel, namespace, {"type": "turn.started", "conversationId": "c"}, {})
    (late,) = await _drained(channel, f"{namespace}.lifecycle")
    assert msgspec.json.decode(late.body)["conversationId"] == "c"


async def test_a_reshard_stopped_half_way_finishes_when_run_again(
    amqp_url: str,
    namespace: str,
    channel: AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = await _queued(channel, namespace)
    records = Records(dict.fromkeys(CONVERSATIONS, 0), layout=1)
    shared = cast(Shared, records)
    monkeypatch.setattr(warmer.bus.reshard, "_BATCH", 10)

    def crash(line: str) -> None:
        raise KeyboardInterrupt  # as Ctrl-C would, after the first 10 moved

    with pytest.raises(KeyboardInterrupt):
        await reshard(amqp_url, namespace, SHARDS, shared, say=crash, every_s=0.0)
    assert records.laid_out == 1 and records.assigned == []

    again = await reshard(amqp_url, namespace, SHARDS, shared, say=_say([]))

    # The rest of the single queue, then (the ring having changed since the store's
    # layout) the shards again, those 10 included: moved twice, held once.
    assert again.moved[f"{namespace}.lifecycle"] == len(CONVERSATIONS) + 1 - 10
    found: list[dict[str, Any]] = []
    for stream in streams(namespace):
        for shard in range(SHARDS):
            for message in await _drained(channel, stream.shard_queue(shard)):
                body = msgspec.json.decode(message.body)
                assert records.shard_of[body["conversationId"]] == shard
                found.append(body)
    key = msgspec.json.encode
    assert Counter(key(body) for body in found) == Counter(key(body) for _, body in sent)
    assert records.laid_out == SHARDS


async def test_a_worker_still_consuming_is_refused_and_nothing_moves(
    amqp_url: str,
    namespace: str,
    connection: AbstractConnection,
    channel: AbstractChannel,
    start_worker: Any,
) -> None:
    await _queued(channel, namespace)
    await start_worker()
    records = Records(dict.fromkeys(CONVERSATIONS, 0), layout=1)

    with pytest.raises(Refused, match=rf"consumers on {namespace}\.lifecycle \(1\)"):
        await reshard(amqp_url, namespace, SHARDS, cast(Shared, records), say=_say([]))

    assert records.laid_out == 1 and records.assigned == []
    assert not await _exists(connection, streams(namespace)[0].shard_queue(0))


async def test_a_shard_lock_held_by_another_connection_is_refused(
    amqp_url: str, namespace: str, connection: AbstractConnection, channel: AbstractChannel
) -> None:
    # The owner of a shard holds the exclusive queue <ns>.lock.NNN (h-topology's lock),
    # also between its consumers: a reshard must see it.
    lock = await channel.declare_queue(f"{namespace}.lock.002", exclusive=True)
    records = Records({}, layout=1)
    try:
        with pytest.raises(Refused, match=rf"shard locks held: {namespace}\.lock\.002"):
            await reshard(amqp_url, namespace, SHARDS, cast(Shared, records), say=_say([]))
    finally:
        await lock.delete()
    assert records.laid_out == 1


async def test_the_probe_leaves_nothing_behind(
    namespace: str, connection: AbstractConnection, channel: AbstractChannel
) -> None:
    broker = warmer.bus.reshard.Broker(connection, channel)
    name = f"{namespace}.reshard.probe.test"
    counts: list[int] = []

    routed = await broker.probe(name, SHARDS, CONVERSATIONS, counts.append)

    assert set(routed) == set(CONVERSATIONS) and set(routed.values()) <= set(range(SHARDS))
    assert counts == [len(CONVERSATIONS)]
    for shard in range(SHARDS):
        assert not await _exists(connection, f"{name}.{shard:03d}")
    probe = await connection.channel()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await probe.get_exchange(name, ensure=True)
