"""The simulated session orchestrator of the warm-rate benchmarks, in a process of its own.

It binds an exclusive queue to ``{ns}.warm`` and answers every ``warm.requested`` at once
with a ``warm.completed`` carrying the same token and a full cache read (docs/contract.md).
It runs apart from the worker and from the benchmark so that its CPU is its own, and it
must never be what is measured, so it does as little per warm as it can:

- it consumes through aiormq directly (no aio-pika message objects, no acknowledgements:
  the queue is exclusive and dies with it);
- completions go out in batches: whatever is waiting when the sender wakes is written to
  the socket as **one** write of prebuilt frames (the method frame is a constant, the
  header frame a template with the conversation id and body size spliced in), on a
  publisher-confirm channel, and the batch's confirms are awaited together. aiormq's
  ``basic_publish`` marshals three frames per message through pamqp and takes the channel
  lock and a timer each: about half this process's CPU per warm before.

For each warm it keeps ``(conversationId, requestedAt, received ms, late ms)``: **late** is
the warm's ``requestedAt`` minus (the time this process wrote the conversation's previous
completion + the interval), i.e. against the ``nextWarmAt`` the worker sets when it applies
that completion (``now + interval``), computed from our side: the worker applies the
completion after we write it, so its ``nextWarmAt`` is no earlier and the figure is an
upper bound on the true lateness (it includes the completion's way to the worker and its
wait there). ``None`` for a conversation's first warm.

``python -m bench.orchestrator AMQP_URL NAMESPACE RECORDS [--held] [--interval-ms N]``. It
prints ``ready`` once bound (and consuming, unless ``--held``: then it consumes from the
line ``go`` on its stdin). On ``dump`` it writes the records kept since the last dump to
the file RECORDS (msgspec JSON, a list of records), forgets them and prints ``dumped N``.
On ``stop`` it writes the rest to RECORDS, prints a JSON summary line and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from pathlib import Path
from typing import Final

import aiormq
import aiormq.abc
import msgspec
import pamqp.commands
import pamqp.frame
import pamqp.header

from warmer.bus.topology import WARM_ROUTING_KEY, Names

Record = tuple[str, int, float, float | None]
"""conversationId, requestedAt (the worker's wall-clock ms), received (ours, ms), late ms."""

_COMPLETED_KEY: Final = "warm.completed"
_BODY_SIZE: Final = struct.Struct(">Q")
_BODY_HEAD: Final = struct.Struct(">BHI")
_FRAME_END: Final = b"\xce"


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


class Frames:
    """The three frames of a persistent JSON publish with a ``conversation-id`` header,
    from templates: marshalled by pamqp once per conversation-id length, then spliced."""

    def __init__(self, channel: int, exchange: str, routing_key: str) -> None:
        self._channel = channel
        publish = pamqp.commands.Basic.Publish(exchange=exchange, routing_key=routing_key)
        self._method = pamqp.frame.marshal(publish, channel)
        self._headers: dict[int, tuple[bytes, bytes, bytes]] = {}

    def _template(self, size: int) -> tuple[bytes, bytes, bytes]:
        marker = "~" * size
        properties = pamqp.commands.Basic.Properties(
            content_type="application/json", delivery_mode=2, headers={"conversation-id": marker}
        )
        frame = pamqp.frame.marshal(pamqp.header.ContentHeader(0, 0, properties), self._channel)
        at = frame.index(b"conversation-idS") + len(b"conversation-idS") + 4
        # type, channel, size, class, weight | body size | the rest up to the id | after it
        parts = (frame[:11], frame[19:at], frame[at + size :])
        self._headers[size] = parts
        return parts

    def publish(self, conversation: str, body: bytes) -> bytes:
        """The bytes of one publish: method, header and body frames."""
        cid = conversation.encode()
        head, middle, tail = self._headers.get(len(cid)) or self._template(len(cid))
        return b"".join(
            (
                self._method,
                head,
                _BODY_SIZE.pack(len(body)),
                middle,
                cid,
                tail,
                _BODY_HEAD.pack(3, self._channel, len(body)),
                body,
                _FRAME_END,
            )
        )


def write(
    channel: aiormq.Channel, frames: Frames, messages: list[tuple[str, bytes]]
) -> list[asyncio.Future[object]]:
    """Publish ``(conversationId, body)`` messages on ``channel`` (publisher confirms on)
    with one socket write; their confirmations, to await."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[object]] = []
    for _ in messages:
        channel.delivery_tag += 1
        future: asyncio.Future[object] = loop.create_future()
        channel.confirmations[channel.delivery_tag] = future
        futures.append(future)
    payload = b"".join(frames.publish(cid, body) for cid, body in messages)
    channel.connection.write_queue.put_nowait(
        aiormq.abc.ChannelFrame(payload=payload, should_close=False)
    )
    return futures


class Answerer:
    """Consumes warms, records them, publishes their completions in confirmed batches."""

    def __init__(self, names: Names, interval_ms: int) -> None:
        self._names = names
        self._interval_ms = interval_ms
        self.records: list[Record] = []
        self.received = 0
        self.completed = 0
        self.first_received_ms = 0.0
        self.last_completed_ms = 0.0
        self._sent_ms: dict[str, float] = {}
        self._outbox: list[_WarmBody] = []
        self._wake = asyncio.Event()
        self._confirming: set[asyncio.Future[None]] = set()
        self.failure: Exception | None = None

    async def bind(self, connection: aiormq.abc.AbstractConnection) -> str:
        """Declare the exchanges, bind a queue of our own; its name."""
        names = self._names
        listen = await connection.channel(publisher_confirms=False)
        await listen.basic_qos(prefetch_count=2000)
        publish = await connection.channel(publisher_confirms=True)
        assert isinstance(publish, aiormq.Channel)  # its delivery tags and confirmations
        # Publishers may declare exchanges with exactly the contract's arguments.
        await listen.exchange_declare(names.warm, exchange_type="topic", durable=True)
        await publish.exchange_declare(names.lifecycle, exchange_type="topic", durable=True)
        declared = await listen.queue_declare("", exclusive=True, auto_delete=True)
        assert declared.queue is not None
        await listen.queue_bind(declared.queue, names.warm, routing_key=WARM_ROUTING_KEY)
        self._listen = listen
        self._publish = publish
        self._frames = Frames(publish.number, names.lifecycle, _COMPLETED_KEY)
        return declared.queue

    async def consume(self, queue: str) -> None:
        """Start answering."""
        await self._listen.basic_consume(queue, self._on_warm, no_ack=True)

    async def _on_warm(self, message: aiormq.abc.DeliveredMessage) -> None:
        body = _decode_warm(message.body)
        now = time.time() * 1000
        if not self.received:
            self.first_received_ms = now
        self.received += 1
        sent = self._sent_ms.get(body.conversationId)
        late = None if sent is None else body.requestedAt - (sent + self._interval_ms)
        self.records.append((body.conversationId, body.requestedAt, now, late))
        self._outbox.append(body)
        self._wake.set()

    async def send_forever(self) -> None:
        """Write every waiting completion at once, await their confirms together, again."""
        channel = self._publish
        frames = self._frames
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._outbox = self._outbox, []
            now = time.time() * 1000
            sent = self._sent_ms
            for warm in batch:
                sent[warm.conversationId] = now
            futures = write(
                channel,
                frames,
                [(w.conversationId, completion(w.conversationId, w.token)) for w in batch],
            )
            # The next batch goes out while this one's confirms are on their way.
            confirming = asyncio.ensure_future(self._confirmed(futures))
            self._confirming.add(confirming)
            confirming.add_done_callback(self._confirming.discard)

    async def _confirmed(self, futures: list[asyncio.Future[object]]) -> None:
        for answer in await asyncio.gather(*futures):
            if not isinstance(answer, pamqp.commands.Basic.Ack):
                self.failure = RuntimeError(f"a completion was not confirmed: {answer!r}")
        self.completed += len(futures)
        self.last_completed_ms = time.time() * 1000


async def _lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _dump(answerer: Answerer, path: Path) -> int:
    records, answerer.records = answerer.records, []
    path.write_bytes(msgspec.json.encode(records))
    return len(records)


async def serve(
    amqp_url: str, namespace: str, records: Path, *, held: bool, interval_ms: int
) -> Summary:
    """Bind, answer until ``stop``; what was done."""
    connection = await aiormq.connect(amqp_url)
    answerer = Answerer(Names.of(namespace), interval_ms)
    try:
        queue = await answerer.bind(connection)
        sender = asyncio.create_task(answerer.send_forever())
        stdin = await _lines()
        if not held:
            await answerer.consume(queue)
        print("ready", flush=True)
        while (line := (await stdin.readline()).strip()) != b"stop":
            if sender.done():
                sender.result()  # what stopped it
            if answerer.failure is not None:
                raise answerer.failure
            if not line:
                raise RuntimeError("stdin closed before stop")
            if line == b"go":
                await answerer.consume(queue)
            elif line == b"dump":
                print(f"dumped {_dump(answerer, records)}", flush=True)
        await asyncio.sleep(0.2)  # the last completions' confirms
        if sender.done():
            sender.result()
        if answerer.failure is not None:
            raise answerer.failure
        sender.cancel()
    finally:
        await connection.close()
    _dump(answerer, records)
    done = answerer
    return Summary(done.received, done.completed, done.first_received_ms, done.last_completed_ms)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.orchestrator",
        description="Answer every warm.requested of NAMESPACE with a warm.completed "
        "(driven through stdin: go, dump, stop).",
    )
    parser.add_argument("amqp_url")
    parser.add_argument("namespace")
    parser.add_argument("records", type=Path, help="where dump and stop write the records")
    parser.add_argument("--held", action="store_true", help="consume only from 'go'")
    parser.add_argument("--interval-ms", type=int, default=1000, help="the warm interval")
    args = parser.parse_args(argv)
    summary = asyncio.run(
        serve(
            args.amqp_url,
            args.namespace,
            args.records,
            held=args.held,
            interval_ms=args.interval_ms,
        )
    )
    print(msgspec.json.encode(summary).decode(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
