"""The FastStream contender ``bench.passthrough`` races the worker against: idiomatic FastStream.

Run as its own process: ``python -m bench.faststream_consumer AMQP_URL QUEUE EXCHANGE
DLX [PREFETCH]``. A ``RabbitBroker`` whose default channel has the prefetch (publisher
confirms on, FastStream's default), one ``@broker.subscriber`` on ``QUEUE`` declared as
the bench declared it (quorum, the worker's inbound arguments with ``DLX``: an equal
declaration, so it is checked, not changed), the handler taking the JSON body decoded
(FastStream decodes ``application/json`` itself) and publishing one persistent message
(the event, encoded by FastStream) to ``EXCHANGE`` with its confirm awaited; FastStream
acknowledges the delivery once the handler returns (its default acknowledgement policy).
Its per-message access log is off (``logger=None``), as the worker runs at ``warning``.
Runs until SIGTERM or SIGINT (``FastStream.run``), then closes. No ``run()``: ``make
bench`` skips it. FastStream comes with the ``dev`` extra.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from faststream import FastStream
from faststream.rabbit import (
    Channel,
    ExchangeType,
    QueueType,
    RabbitBroker,
    RabbitExchange,
    RabbitQueue,
)

from warmer.bus.topology import inbound_queue_arguments

PREFETCH = 256  # the worker's default (WARMER_PREFETCH)


def app(url: str, queue_name: str, exchange_name: str, dlx: str, prefetch: int) -> FastStream:
    """The application: one subscriber that publishes one message per event."""
    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=prefetch), logger=None)
    arguments: Any = {k: v for k, v in inbound_queue_arguments(dlx).items() if k != "x-queue-type"}
    queue = RabbitQueue(queue_name, queue_type=QueueType.QUORUM, durable=True, arguments=arguments)
    out = RabbitExchange(exchange_name, type=ExchangeType.TOPIC, durable=True)

    @broker.subscriber(queue)
    async def on_event(event: dict[str, Any]) -> None:
        await broker.publish(event, exchange=out, routing_key=event["type"], persist=True)

    return FastStream(broker, logger=None)


if __name__ == "__main__":
    url, queue_name, exchange_name, dlx, *rest = sys.argv[1:]
    prefetch = int(rest[0]) if rest else PREFETCH
    asyncio.run(app(url, queue_name, exchange_name, dlx, prefetch).run())
