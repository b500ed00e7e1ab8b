"""The dead letter of an invalid message: publishable whatever the original carried.

docs/contract.md, "Dead letters": the body, properties and headers are kept, with the reason
headers added, except what the broker or the client would refuse on the way back out:

- ``user_id``: the broker accepts it only from the user it names, so it moves to the
  header ``x-warmer-original-user-id``;
- ``expiration``: a dead letter waits for an operator;
- header values the client cannot encode: a long string that was not UTF-8 is kept as a
  byte array, a value that could not be decoded at all as its raw bytes, and what the
  lenient reader noted is described in ``x-warmer-unreadable``;
- a header table too large for one frame once the reason headers are added: the largest
  original headers are cut until it fits, and ``x-warmer-headers-cut`` names them.

``build`` is pure; ``Publisher.dead_letter`` publishes what it returns.
"""

from __future__ import annotations

from typing import Any, Final

from aio_pika import DeliveryMode, Message
from aio_pika.abc import AbstractIncomingMessage
from pamqp import encode
from pamqp.header import ContentHeader

from warmer.bus.lenient import UNREADABLE, Undecodable, unreadable
from warmer.contract import MAX_ERROR_CHARS, Rejection

REASON: Final = "x-warmer-reason"
ERROR: Final = "x-warmer-error"
ORIGINAL_EXCHANGE: Final = "x-warmer-original-exchange"
ORIGINAL_ROUTING_KEY: Final = "x-warmer-original-routing-key"
ORIGINAL_USER_ID: Final = "x-warmer-original-user-id"
ORIGINAL_PROPERTIES: Final = "x-warmer-original-properties"
HEADERS_CUT: Final = "x-warmer-headers-cut"
# Frame header (7 bytes) and end (1), and the message_id aiormq adds when there is none.
_FRAME_OVERHEAD: Final = 8 + 1 + 32
_UNLIMITED_FRAME: Final = 131072  # frame_max 0 means "no limit"; RabbitMQ's own default
_MAX_CUT_NAMES: Final = 20
_MAX_DEPTH: Final = 32


class DeadLetterUnfit(Exception):
    """Even without its original headers, the dead letter does not fit a frame."""


def build(incoming: AbstractIncomingMessage, rejection: Rejection, frame_max: int) -> Message:
    """The dead letter of ``incoming``: fits ``frame_max``, encodable, publishable by us.

    Raises DeadLetterUnfit when even the reasons alone do not fit; the caller then
    rejects the original so the queue's own dead-lettering takes it.
    """
    limit = frame_max or _UNLIMITED_FRAME
    original = dict(incoming.headers or {})
    notes = unreadable(original)
    if notes is not None:
        del original[UNREADABLE]
    kept = {key: _encodable(value, 0) for key, value in original.items()}
    added: dict[str, Any] = {
        REASON: rejection.code,
        ERROR: rejection.error[:MAX_ERROR_CHARS],
        ORIGINAL_EXCHANGE: incoming.exchange or "",
        ORIGINAL_ROUTING_KEY: incoming.routing_key or "",
    }
    if incoming.user_id:
        added[ORIGINAL_USER_ID] = incoming.user_id
    if notes is not None:
        added[UNREADABLE] = notes.describe()[:MAX_ERROR_CHARS]
        if notes.raw:
            added[ORIGINAL_PROPERTIES] = {
                name: bytearray(raw) if isinstance(raw, bytes) else str(raw)
                for name, raw in notes.raw.items()
            }
    message = republished(incoming, {**kept, **added})
    if _header_frame_size(message) <= limit:
        return message
    cut: list[str] = []
    for key in sorted(kept, key=lambda name: _value_size(kept[name]), reverse=True):
        del kept[key]
        cut.append(key)
        added[HEADERS_CUT] = _names(cut)
        message = republished(incoming, {**kept, **added})
        if _header_frame_size(message) <= limit:
            return message
    raise DeadLetterUnfit(f"the reasons alone need {_header_frame_size(message)} bytes")


def republished(incoming: AbstractIncomingMessage, headers: dict[str, Any]) -> Message:
    """``incoming``'s body and properties with ``headers``, persistent, publishable by us.

    No ``user_id`` (the broker accepts it only from the user it names) and no
    ``expiration``: for a dead letter, and for a dead letter replayed (``warmer dead``).
    """
    return Message(
        incoming.body,
        headers=headers,
        content_type=incoming.content_type,
        content_encoding=incoming.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        priority=incoming.priority,
        correlation_id=incoming.correlation_id,
        reply_to=incoming.reply_to,
        message_id=incoming.message_id,
        timestamp=incoming.timestamp,
        type=incoming.type,
        app_id=incoming.app_id,
    )


def _header_frame_size(message: Message) -> int:
    header = ContentHeader(body_size=len(message.body), properties=message.properties)
    return len(header.marshal()) + _FRAME_OVERHEAD


def _value_size(value: object) -> int:
    try:
        return len(encode.encode_table_value(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _encodable(value: object, depth: int) -> object:
    """``value`` as something pamqp can encode again, keeping raw bytes as a byte array."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, Undecodable):
        return bytearray(value.raw)
    if depth >= _MAX_DEPTH:
        return repr(value)[:MAX_ERROR_CHARS]
    if isinstance(value, dict):
        return {str(key): _encodable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_encodable(item, depth + 1) for item in value]
    try:
        encode.encode_table_value(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return repr(value)[:MAX_ERROR_CHARS]
    return value


def _names(cut: list[str]) -> str:
    shown = ", ".join(name[:64] for name in cut[:_MAX_CUT_NAMES])
    more = len(cut) - _MAX_CUT_NAMES
    return f"{shown} (and {more} more)" if more > 0 else shown


__all__ = ["DeadLetterUnfit", "build", "republished"]
