"""``warmer reshard --shards S``: move a namespace to S shards, losing nothing queued.

From today's single queues (S = 1) to S shards, from S shards to S', or back to one. It
runs while no worker runs in the namespace (it refuses when a queue has a consumer), and
is safe to run again after a crash at any step: each step either finds its work done or
does it again, and a message is acknowledged only once its copy is confirmed. The steps:

1. declare the topology of S and route new messages to it: the publishers' exchanges
   bound to the ``.shards`` exchanges (or, for S = 1, the single queues bound again), the
   old queues unbound, shards beyond S removed from the ring, highest first;
2. drain every old queue (the single queues, the shards beyond S, and the kept shards
   too whenever the store's layout is not S yet): each message republished with its
   ``conversation-id`` header, confirmed, then acknowledged; one without a readable id
   dead-lettered. Kept shards are drained too because a larger ring moves some of their
   conversations to the new shards, and a run stopped half-way may have left messages
   routed by a ring of another size; republished, each lands where the ring of S puts it;
3. delete the emptied old queues;
4. give every stored conversation the shard the broker routes it to, found by probing
   (``warmer.bus.reshard``), then record the layout: the last step, so a crash before
   it makes the next run redo the moves.

A message published during step 1 may reach both the old and the new queue (the new
binding is made before the old one is removed: a copy rather than a loss). Moving costs
order: what is moved goes behind what publishers sent meanwhile.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from typing import Final

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from warmer.bus import lenient
from warmer.bus.reshard import MAX_SHARDS, Broker, Moved, Refused, Stream, streams
from warmer.bus.topology import Names
from warmer.core.gaps import MODEL_KEY
from warmer.store.base import Shared

__all__ = ["PROGRESS_EVERY_S", "Summary", "reshard"]

PROGRESS_EVERY_S: Final = 10.0


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """What a reshard did."""

    namespace: str
    shards: int
    previous: int | None
    """The store's layout before (None: a store never laid out)."""
    moved: dict[str, int]
    """Queue drained -> messages moved out of it."""
    dead: int
    """Messages with no readable id, dead-lettered."""
    deleted: list[str]
    """Old queues deleted."""
    records: list[int]
    """Records per shard afterwards, shard 0 first."""
    reassigned: int
    """Records whose shard changed."""
    seconds: float


class _Progress:
    """Says where the reshard is, at most every ``every_s`` seconds."""

    def __init__(self, say: Callable[[str], None], now: Callable[[], float], every_s: float):
        self._say, self._now, self._every_s = say, now, every_s
        self._last = now()

    def __call__(self, line: Callable[[], str]) -> None:
        if self._now() - self._last >= self._every_s:
            self._last = self._now()
            self._say(line())


async def reshard(
    amqp_url: str,
    namespace: str,
    shards: int,
    shared: Shared,
    *,
    say: Callable[[str], None],
    now: Callable[[], float] = time.monotonic,
    every_s: float = PROGRESS_EVERY_S,
) -> Summary:
    """Move ``namespace`` to ``shards`` shards on the broker and in ``shared`` (opened).

    ``say`` gets a progress line every ``every_s`` seconds. Raises Refused when a queue
    of the namespace has a consumer, PluginMissing without the consistent-hash exchange.
    """
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be 1..{MAX_SHARDS}, not {shards}")
    started = now()
    progress = _Progress(say, now, every_s)
    lenient.install()  # messages may carry properties pamqp cannot decode: move them too
    connection = await aio_pika.connect(
        amqp_url, client_properties={"connection_name": f"warmer reshard {namespace}"}
    )
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        broker = Broker(connection, channel)
        names = Names.of(namespace)
        dlx = names.dlx
        before = await _idle(broker, namespace)
        await broker.declare_dead(names.dlx, names.dead)
        previous = await shared.layout()
        moved: dict[str, int] = {}
        dead = 0
        deleted: list[str] = []
        for stream in streams(namespace):
            old = [name for name in before if name.startswith(f"{stream.exchange}.shard.")]
            destination, old_queues = await _route(broker, stream, shards, old, dlx)
            if previous != shards:  # the ring changed: kept shards hold conversations to move
                old_queues += [q for q in old if q not in old_queues]
            if stream.exchange in before and shards > 1:
                old_queues.insert(0, stream.exchange)
            for queue in old_queues:
                done = await _drain(broker, queue, destination, stream, shards, dlx, progress)
                moved[queue], dead = done.moved, dead + done.dead
            deleted += await _delete_old(broker, stream, shards, before)
        await _idle(broker, namespace)  # a worker started meanwhile must not see the moves
        records, reassigned = await _assign(broker, shared, namespace, shards, say, progress)
        await shared.set_layout(shards)
    finally:
        with suppress(aiormq.exceptions.AMQPError, OSError):
            await connection.close()
    return Summary(
        namespace=namespace,
        shards=shards,
        previous=previous,
        moved=moved,
        dead=dead,
        deleted=deleted,
        records=records,
        reassigned=reassigned,
        seconds=round(now() - started, 3),
    )


async def _idle(broker: Broker, namespace: str) -> dict[str, tuple[int, int]]:
    """Every inbound queue of the namespace -> (ready, consumers); Refused when one has a
    consumer or a shard's lock (the exclusive queue ``<ns>.lock.NNN`` its owner holds) is
    held: a worker runs."""
    names = [
        name
        for stream in streams(namespace)
        for name in (stream.exchange, *(stream.shard_queue(k) for k in range(MAX_SHARDS)))
    ]
    found = await broker.existing(names)
    busy = [f"{name} ({consumers})" for name, (_, consumers) in found.items() if consumers]
    locks = await broker.held([f"{namespace}.lock.{k:03d}" for k in range(MAX_SHARDS)])
    if busy or locks:
        what = [f"consumers on {', '.join(busy)}"] if busy else []
        what += [f"shard locks held: {', '.join(locks)}"] if locks else []
        raise Refused(
            f"a worker of namespace {namespace!r} runs ({'; '.join(what)}): stop every "
            "worker of the namespace first (reshard runs while none does)"
        )
    return found


async def _route(
    broker: Broker, stream: Stream, shards: int, old: list[str], dlx: str
) -> tuple[AbstractExchange, list[str]]:
    """Step 1 for ``stream``: where moved messages go, and the shard queues to empty."""
    if shards == 1:
        await broker.declare_single(stream, dlx)
        await broker.drop_shards_exchange(stream)
        return await broker.default_exchange(), list(old)
    exchange = await broker.declare_shards(stream, shards, dlx)
    await broker.unbind_single(stream)
    beyond = [int(q.rpartition(".")[2]) for q in old if int(q.rpartition(".")[2]) >= shards]
    await broker.unbind_shards(stream, beyond)
    return exchange, [stream.shard_queue(k) for k in sorted(beyond)]


async def _drain(
    broker: Broker,
    queue: str,
    destination: AbstractExchange,
    stream: Stream,
    shards: int,
    dlx: str,
    progress: _Progress,
) -> Moved:
    def routing_key(message: AbstractIncomingMessage) -> str:
        # One shard: the default exchange, to the single queue by name. Several: the
        # `.shards` exchange hashes the header and ignores the key (kept for the record).
        return stream.exchange if shards == 1 else message.routing_key or ""

    def report(done: Moved) -> None:
        progress(lambda: f"moving {done.queue}: {done.moved} moved, {done.dead} dead-lettered")

    return await broker.drain(
        queue,
        destination,
        routing_key,
        commands=stream.routing_key != "#",
        dlx=dlx,
        progress=report,
    )


async def _delete_old(
    broker: Broker, stream: Stream, shards: int, before: dict[str, tuple[int, int]]
) -> list[str]:
    """Step 3: delete the old queues of ``stream`` that existed, once empty.

    Nothing routes to them any more, so one still holding messages means a step was
    missed: refused, to be run again.
    """
    old = [
        name
        for name in before
        if name.startswith(f"{stream.exchange}.shard.")
        and (shards == 1 or int(name.rpartition(".")[2]) >= shards)
    ]
    if shards > 1 and stream.exchange in before:
        old.append(stream.exchange)
    deleted: list[str] = []
    for queue in sorted(old, reverse=True):
        if not await broker.delete_if_empty(queue):
            raise Refused(f"{queue} still holds messages after it was drained: run again")
        deleted.append(queue)
    return deleted


async def _assign(
    broker: Broker,
    shared: Shared,
    namespace: str,
    shards: int,
    say: Callable[[str], None],
    progress: _Progress,
) -> tuple[list[int], int]:
    """Step 4: every record on the shard the broker routes its conversation to.

    Every shard the store may hold is read (not only the old layout's): a run that
    crashed after moving records to shards of another S finds them too. The gap model
    each shard keeps under ``MODEL_KEY`` stays where it is: a new shard learns its own.
    """
    held: dict[str, int] = {}
    for shard in range(MAX_SHARDS):
        held.update(dict.fromkeys(await shared.ids(shard), shard))
        held.pop(MODEL_KEY, None)  # each shard's own gap model, never moved
        progress(lambda: f"reading the stored conversations: {len(held)} so far")
    ids = sorted(held)
    if shards == 1:
        routed = dict.fromkeys(ids, 0)
    else:
        say(f"probing the shard of {len(ids)} stored conversations")
        name = f"{namespace}.reshard.probe.{uuid.uuid4().hex[:12]}"

        def probed(count: int) -> None:
            progress(lambda: f"probed {count} of {len(ids)} stored conversations")

        routed = await broker.probe(name, shards, ids, probed)
    moves = {id_: routed[id_] for id_ in ids if routed[id_] != held[id_]}
    if moves:
        say(f"assigning {len(moves)} records to their new shards")
        await shared.assign(moves)
    counts = Counter(routed.values())
    return [counts.get(k, 0) for k in range(shards)], len(moves)
