"""The simulated session orchestrator of ``bench.replicas``, in a process of its own.

It binds an exclusive queue to ``{ns}.warm`` and answers every ``warm.requested`` at once
with a ``warm.completed`` carrying the same token and a full cache read (docs/contract.md),
and keeps ``(conversationId, requestedAt, received ms)`` of each. It runs apart from the
replicas and from the benchmark so that its CPU is its own, and it talks to the broker
through aiormq directly (no aio-pika message objects): it must never be what is measured.
Completions go out in batches: whatever is waiting when the sender wakes is published at
once and the confirms are awaited together.

``python -m bench.orchestrator AMQP_URL NAMESPACE RECORDS [--held]``. It prints ``ready``
once bound (and consuming, unless ``--held``: then it consumes from the line ``go`` on its
stdin). On ``stop`` it writes the records to the file RECORDS (msgspec JSON, a list of
``[conversationId, requestedAt, receivedMs]``), prints a JSON summary line and exits.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Final

import aiormq
import aiormq.abc
import msgspec

from warmer.bus.topology import WARM_ROUTING_KEY, Names

Record = tuple[str, int, float]
"""conversationId, requestedAt (the worker's wall-clock ms), received (ours, ms)."""

_COMPLETED_KEY: Final = "warm.completed"


class Summary(msgspec.Struct):
    """What the orchestrator did, printed as its last line."""

    received: int
    completed: int
    first_received_ms: float
    last_completed_ms: float


class _WarmBody(msgspec.Struct):
    conversationId: str
    token: int
    requestedAt: int


_decode_warm: Final = msgspec.json.Decoder(_WarmBody).decode
_encode: Final = msgspec.json.Encoder().encode


def completion(conversation: str, token: int) -> bytes:
    """The ``warm.completed`` of a warm whose whole prefix was read from the cache."""
    return _encode(
        {
            "type": "warm.completed",
            "conversationId": conversation,
            "token": token,
            "usage": {"inputTokens": 2000, "cacheReadTokens": 2000, "cacheWriteTokens": 0},
        }
    )


class Answerer:
    """Consumes warms, records them, publishes their completions in confirmed batches."""

    def __init__(self, names: Names) -> None:
        self._names = names
        self.records: list[Record] = []
        self.completed = 0
        self.last_completed_ms = 0.0
        self._outbox: list[_WarmBody] = []
        self._wake = asyncio.Event()
        self._next_id = 0

    async def bind(self, connection: aiormq.abc.AbstractConnection) -> str:
        """Declare the exchanges, bind a queue of our own; its name."""
        names = self._names
        listen = await connection.channel(publisher_confirms=False)
        await listen.basic_qos(prefetch_count=2000)
        publish = await connection.channel(publisher_confirms=True)
        # Publishers may declare exchanges with exactly the contract's arguments.
        await listen.exchange_declare(names.warm, exchange_type="topic", durable=True)
        await publish.exchange_declare(names.lifecycle, exchange_type="topic", durable=True)
        declared = await listen.queue_declare("", exclusive=True, auto_delete=True)
        assert declared.queue is not None
        await listen.queue_bind(declared.queue, names.warm, routing_key=WARM_ROUTING_KEY)
        self._listen = listen
        self._publish = publish
        return declared.queue

    async def consume(self, queue: str) -> None:
        """Start answering (no acknowledgements: the queue is ours and dies with us)."""
        await self._listen.basic_consume(queue, self._on_warm, no_ack=True)

    async def _on_warm(self, message: aiormq.abc.DeliveredMessage) -> None:
        body = _decode_warm(message.body)
        self.records.append((body.conversationId, body.requestedAt, time.time() * 1000))
        self._outbox.append(body)
        self._wake.set()

    async def send_forever(self) -> None:
        """Publish every waiting completion, await their confirms together, again."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._outbox = self._outbox, []
            await asyncio.gather(*(self._complete(warm) for warm in batch))
            self.completed += len(batch)
            self.last_completed_ms = time.time() * 1000

    async def _complete(self, warm: _WarmBody) -> None:
        self._next_id += 1
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            headers={"conversation-id": warm.conversationId},
            message_id=str(self._next_id),
        )
        await self._publish.basic_publish(
            completion(warm.conversationId, warm.token),
            exchange=self._names.lifecycle,
            routing_key=_COMPLETED_KEY,
            properties=properties,
        )


async def _lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(amqp_url: str, namespace: str, *, held: bool) -> tuple[Summary, list[Record]]:
    """Bind, answer until ``stop``; what was done, and the records."""
    connection = await aiormq.connect(amqp_url)
    answerer = Answerer(Names.of(namespace))
    try:
        queue = await answerer.bind(connection)
        sender = asyncio.create_task(answerer.send_forever())
        stdin = await _lines()
        if not held:
            await answerer.consume(queue)
        print("ready", flush=True)
        while (line := (await stdin.readline()).strip()) != b"stop":
            if not line:
                raise RuntimeError("stdin closed before stop")
            if line == b"go":
                await answerer.consume(queue)
        await asyncio.sleep(0.2)  # the last completions' confirms
        if sender.done():
            sender.result()  # what stopped it
        sender.cancel()
    finally:
        await connection.close()
    first = answerer.records[0][2] if answerer.records else 0.0
    done = Summary(len(answerer.records), answerer.completed, first, answerer.last_completed_ms)
    return done, answerer.records


if __name__ == "__main__":
    url, ns, path, *flags = sys.argv[1:]
    summary, records = asyncio.run(serve(url, ns, held="--held" in flags))
    Path(path).write_bytes(msgspec.json.encode(records))
    print(msgspec.json.encode(summary).decode(), flush=True)
