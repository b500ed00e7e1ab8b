"""Re-routing a message the broker hashed without its conversation's id (S > 1).

The ``.shards`` exchanges hash the ``conversation-id`` header; a publisher that does not
set it (or sets another value, or a byte array: the broker hashes the type tag too) puts
the message on a shard chosen by something else, whose owner is not the conversation's.
Whichever replica consumes such a message publishes it again to the ``.shards`` exchange
with the header set to the body's ``conversationId`` (body and other properties kept),
waits for the broker's confirm, and only then acknowledges the original: at least once,
never lost. Ordering cost: the re-published message goes behind whatever its shard
already holds. A message whose id cannot be read, or whose properties cannot be, is left
to the pipeline, which dead-letters it wherever it landed.
"""

from __future__ import annotations

from typing import Final

import aiormq
import msgspec
from aiormq.abc import AbstractChannel
from pamqp import commands as spec

from warmer.bus.consumer import AmqpDelivery
from warmer.bus.deadletter import ORIGINAL_USER_ID
from warmer.bus.lenient import unreadable
from warmer.bus.port import ChannelGone, ConfirmOverdue, Delivery
from warmer.bus.topology import SHARD_HEADER
from warmer.clock import Clock, within
from warmer.contract import MAX_BODY_BYTES, ConversationId, is_json_content_type

DELIVERY_COUNT: Final = "x-delivery-count"
"""The quorum queue's count of the original's deliveries: the shard queue counts anew."""


class _Addressed(msgspec.Struct, rename="camel"):
    """What every lifecycle event and command has at its top level (docs/contract.md)."""

    conversation_id: ConversationId


_DECODER: Final = msgspec.json.Decoder(_Addressed)


def needs_reroute(delivery: Delivery) -> str | None:
    """The body's ``conversationId`` when the header does not carry exactly it; None when
    the message is on its shard, or when its id or its properties cannot be read (the
    pipeline says why). One small decode: cheap enough for every delivery."""
    headers = delivery.headers
    if unreadable(headers) is not None or len(delivery.body) > MAX_BODY_BYTES:
        return None
    if not is_json_content_type(delivery.content_type):
        return None
    encoding = delivery.content_encoding
    if encoding and encoding.strip().lower() not in ("identity", "utf-8"):
        return None
    try:
        # A key given twice: the last wins, as for the pipeline's decoder (JSON.parse).
        found = _DECODER.decode(delivery.body).conversation_id
    except msgspec.DecodeError:  # ValidationError included
        return None
    header = headers.get(SHARD_HEADER) if isinstance(headers, dict) else None
    if isinstance(header, str) and header == found:
        return None
    return found


async def reroute(
    delivery: AmqpDelivery,
    channel: AbstractChannel,
    exchange: str,
    conversation_id: str,
    clock: Clock,
    timeout_ms: int,
) -> bool:
    """Publish ``delivery`` again to ``exchange`` (a ``.shards`` one) with its header set
    to ``conversation_id``, mandatory, on ``channel`` (publisher confirms); acknowledge the
    original once confirmed. True when rerouted; False when the broker refused or returned
    it, the original then rejected with requeue (tried again later).

    ConfirmOverdue when no confirm comes within ``timeout_ms``, ChannelGone when the
    channel goes: the original stays unacknowledged, for the broker to deliver again.
    """
    properties = _moved(delivery.properties, conversation_id)
    publish = channel.basic_publish(
        delivery.body,
        exchange=exchange,
        routing_key=delivery.routing_key or "",
        properties=properties,
        mandatory=True,
    )
    try:
        confirm = await within(clock, timeout_ms, publish)
    except aiormq.exceptions.DeliveryError:
        confirm = None
    except TimeoutError as exc:
        raise ConfirmOverdue(f"no confirm of a reroute within {timeout_ms} ms") from exc
    except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
        raise ChannelGone(f"reroute cut: {exc!r}"[:300]) from exc
    # Returned unroutable, the confirm is the returned message (aiormq); refused, a nack.
    rerouted = isinstance(confirm, spec.Basic.Ack)
    try:
        if rerouted:
            await delivery.ack()
        else:
            await delivery.reject(requeue=True)
    except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
        # Delivered again by the broker: rerouted twice at worst (at least once).
        raise ChannelGone(f"reroute not settled: {exc!r}"[:300]) from exc
    return rerouted


def _moved(properties: spec.Basic.Properties, conversation_id: str) -> spec.Basic.Properties:
    """The original's properties with the shard header set: without ``user_id`` (the
    broker accepts it only from the user it names; kept as a header, as a dead letter's)
    and without the quorum queue's delivery count."""
    headers = dict(properties.headers or {})
    headers.pop(DELIVERY_COUNT, None)
    if properties.user_id:
        headers[ORIGINAL_USER_ID] = properties.user_id
    headers[SHARD_HEADER] = conversation_id
    return spec.Basic.Properties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=headers,
        delivery_mode=properties.delivery_mode,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        expiration=properties.expiration,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        message_type=properties.message_type,
        app_id=properties.app_id,
        cluster_id=properties.cluster_id,
    )


__all__ = ["needs_reroute", "reroute"]
