"""The raw AMQP publisher works against the real broker (see raw_amqp.py for the findings)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from tests.integration.raw_amqp import (
    RawPublisher,
    RawPublishRefused,
    props,
    short_bytes,
    table,
)

pytestmark = pytest.mark.broker

ROUTING_KEY = "raw.case"


@pytest.fixture
async def topology(amqp_url: str) -> AsyncIterator[tuple[str, aio_pika.abc.AbstractQueue]]:
    """A uniquely named topic exchange and a quorum queue bound to it, deleted afterwards."""
    name = f"wt-raw-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC)
        try:
            queue = await channel.declare_queue(
                f"{name}.q", durable=True, arguments={"x-queue-type": "quorum"}
            )
            try:
                await queue.bind(exchange, "#")
                yield name, queue
            finally:
                await queue.delete(if_unused=False, if_empty=False)
        finally:
            await exchange.delete()
    finally:
        await connection.close()


@pytest.fixture
async def publisher(amqp_url: str) -> AsyncIterator[RawPublisher]:
    publisher = await RawPublisher.connect(amqp_url)
    try:
        yield publisher
    finally:
        await publisher.close()


async def test_normal_publish_is_confirmed_and_read_back_by_aio_pika(
    publisher: RawPublisher, topology: tuple[str, aio_pika.abc.AbstractQueue]
) -> None:
    exchange, queue = topology
    flags, properties = props(
        content_type="application/json",
        delivery_mode=2,
        message_id="m-1",
        timestamp=1_700_000_000,
        headers={"kind": "test", "n": 7},
    )
    body = b'{"hello": "world"}' * 10_000  # several body frames
    await publisher.publish(exchange, ROUTING_KEY, body, properties, flags=flags)

    message = await queue.get(no_ack=True, timeout=5)
    assert message.body == body
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == "m-1"
    assert message.timestamp is not None and message.timestamp.timestamp() == 1_700_000_000
    assert message.headers["kind"] == "test"
    assert message.headers["n"] == 7


async def test_non_utf8_message_id_is_accepted_and_delivered_verbatim(
    publisher: RawPublisher, topology: tuple[str, aio_pika.abc.AbstractQueue]
) -> None:
    exchange, queue = topology
    flags, properties = props(message_id=short_bytes(b"id-\xff\xfe"))
    await publisher.publish(exchange, ROUTING_KEY, b"{}", properties, flags=flags)

    message = await publisher.get(queue.name)
    assert message is not None
    assert message.body == b"{}"
    assert message.flags & 0x0080
    assert b"\x05id-\xff\xfe" in message.properties


async def test_user_id_of_another_user_is_refused_with_406(
    publisher: RawPublisher, topology: tuple[str, aio_pika.abc.AbstractQueue]
) -> None:
    exchange, queue = topology
    flags, properties = props(user_id=f"not-guest-{uuid.uuid4().hex[:6]}")
    with pytest.raises(RawPublishRefused) as refused:
        await publisher.publish(exchange, ROUTING_KEY, b"{}", properties, flags=flags)
    assert refused.value.code == 406
    assert refused.value.source == "channel.close"
    assert "user_id property set to" in refused.value.text

    # The channel was reopened: the publisher keeps working.
    flags, properties = props(content_type="text/plain")
    await publisher.publish(exchange, ROUTING_KEY, b"after", properties, flags=flags)
    message = await publisher.get(queue.name)
    assert message is not None and message.body == b"after"


async def test_unknown_header_type_tag_closes_the_connection(
    amqp_url: str, topology: tuple[str, aio_pika.abc.AbstractQueue]
) -> None:
    exchange, _ = topology
    publisher = await RawPublisher.connect(amqp_url)
    try:
        flags, properties = props(headers=table((b"k", b"z", b"abcd")))
        with pytest.raises(RawPublishRefused) as refused:
            await asyncio.wait_for(
                publisher.publish(exchange, ROUTING_KEY, b"{}", properties, flags=flags), 10
            )
        assert refused.value.code == 541
        assert refused.value.source == "connection.close"
    finally:
        await publisher.close()
