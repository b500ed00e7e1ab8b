"""The bare consumer ``bench.passthrough`` races the worker against: idiomatic aio-pika.

Run as its own process: ``python -m bench.bare_consumer AMQP_URL QUEUE EXCHANGE [PREFETCH]``.
For each delivery it decodes the JSON body, publishes one persistent message to
``EXCHANGE`` and awaits its confirm, then acknowledges the delivery. It runs until SIGTERM
or SIGINT, then closes the connection. It has no ``run()``: ``make bench`` skips it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

PREFETCH = 256  # the worker's default (WARMER_PREFETCH)


async def consume(url: str, queue_name: str, exchange_name: str, prefetch: int) -> None:
    """Consume ``queue_name`` until a signal; the queue and exchange must exist."""
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()  # publisher confirms on: aio-pika's default
    await channel.set_qos(prefetch_count=prefetch)
    exchange = await channel.get_exchange(exchange_name)
    queue = await channel.get_queue(queue_name)

    async def on_message(message: AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        out = aio_pika.Message(
            json.dumps(event).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(out, routing_key=event["type"])
        await message.ack()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await queue.consume(on_message)
    await stop.wait()
    await connection.close()


if __name__ == "__main__":
    url, queue_name, exchange_name, *rest = sys.argv[1:]
    asyncio.run(consume(url, queue_name, exchange_name, int(rest[0]) if rest else PREFETCH))
