"""The dead letter of an invalid message is publishable whatever the original carried."""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Any, cast

import pytest
from aio_pika import DeliveryMode, IncomingMessage
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands
from pamqp.header import ContentHeader

from warmer.bus import deadletter
from warmer.bus.lenient import UNREADABLE, Undecodable, Unreadable
from warmer.contract import Rejection

FRAME_MAX = 131072
REJECTION = Rejection("invalid_json", "body is not JSON")


def incoming(body: bytes = b"{oops", **properties: Any) -> IncomingMessage:
    """A delivered message with ``properties`` (pamqp names), as aio-pika hands it over."""
    header = ContentHeader(body_size=len(body), properties=commands.Basic.Properties(**properties))
    deliver = commands.Basic.Deliver(
        consumer_tag="c",
        delivery_tag=1,
        redelivered=False,
        exchange="ns.lifecycle",
        routing_key="turn.started",
    )
    # No channel: a no_ack message is never settled, so aio-pika never reaches for one.
    no_channel = cast(AbstractChannel, None)
    delivered = DeliveredMessage(delivery=deliver, header=header, body=body, channel=no_channel)
    return IncomingMessage(delivered, no_ack=True)


def frame_size(message: Any) -> int:
    """The content header frame the client will send for ``message``; raises if unencodable."""
    header = ContentHeader(body_size=len(message.body), properties=message.properties)
    return len(header.marshal()) + 8


def test_keeps_body_properties_and_headers_and_adds_the_reasons() -> None:
    stamp = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    original = incoming(
        content_type="application/json",
        content_encoding="utf-8",
        headers={"conversation-id": "c1", "n": 5, "when": stamp, "price": Decimal("1.5")},
        priority=3,
        correlation_id="corr",
        reply_to="replies",
        message_id="m-1",
        timestamp=stamp,
        message_type="t",
        app_id="orchestrator",
    )
    letter = deadletter.build(original, REJECTION, FRAME_MAX)
    assert letter.body == b"{oops"
    assert letter.delivery_mode == DeliveryMode.PERSISTENT
    assert (letter.content_type, letter.content_encoding) == ("application/json", "utf-8")
    assert (letter.priority, letter.correlation_id, letter.reply_to) == (3, "corr", "replies")
    assert (letter.message_id, letter.type, letter.app_id) == ("m-1", "t", "orchestrator")
    assert letter.timestamp == stamp
    assert letter.headers == {
        "conversation-id": "c1",
        "n": 5,
        "when": stamp,
        "price": Decimal("1.5"),
        "x-warmer-reason": "invalid_json",
        "x-warmer-error": "body is not JSON",
        "x-warmer-original-exchange": "ns.lifecycle",
        "x-warmer-original-routing-key": "turn.started",
    }
    assert frame_size(letter) < FRAME_MAX


def test_user_id_moves_to_a_header_and_expiration_is_dropped() -> None:
    letter = deadletter.build(
        incoming(user_id="another-team", expiration="60000"), REJECTION, FRAME_MAX
    )
    assert letter.user_id is None
    assert letter.expiration is None
    assert letter.headers["x-warmer-original-user-id"] == "another-team"


def test_values_the_client_cannot_encode_are_kept_as_bytes() -> None:
    notes = Unreadable()
    notes.note("headers.trace: not UTF-8")
    notes.raw["message_id"] = b"\xff"
    notes.raw["timestamp"] = 2**64 - 1
    headers = {
        "trace": b"\xc3\x28",
        "odd": Undecodable(b"z\x00\x01", "unknown field type b'z'"),
        "nested": {"list": [b"\xff", 1]},
        UNREADABLE: notes,
    }
    letter = deadletter.build(incoming(headers=headers), REJECTION, FRAME_MAX)
    assert letter.headers["trace"] == bytearray(b"\xc3\x28")
    assert letter.headers["odd"] == bytearray(b"z\x00\x01")
    assert letter.headers["nested"] == {"list": [bytearray(b"\xff"), 1]}
    assert letter.headers[UNREADABLE] == "headers.trace: not UTF-8"
    assert letter.headers["x-warmer-original-properties"] == {
        "message_id": bytearray(b"\xff"),
        "timestamp": str(2**64 - 1),
    }
    frame_size(letter)  # encodes


def test_headers_that_no_longer_fit_a_frame_are_cut_largest_first() -> None:
    headers = {"big": "x" * 45_000, "medium": "y" * 20_000, "small": "s", "id": "c1"}
    error = "invalid_field: " + "e" * 600
    letter = deadletter.build(
        incoming(body=b"b" * 60_000, headers=headers), Rejection("invalid_field", error), 50_000
    )
    assert frame_size(letter) <= 50_000
    assert "big" not in letter.headers
    assert letter.headers["medium"] == "y" * 20_000
    assert letter.headers["small"] == "s"
    assert letter.headers["x-warmer-headers-cut"] == "big"
    noted = letter.headers["x-warmer-error"]
    assert isinstance(noted, str) and len(noted) == 500


def test_cut_names_are_bounded() -> None:
    headers = {f"h{i:03}": "v" * 1000 for i in range(200)}
    letter = deadletter.build(incoming(headers=headers), REJECTION, 8192)
    assert frame_size(letter) <= 8192
    cut = letter.headers["x-warmer-headers-cut"]
    assert isinstance(cut, str)
    assert cut.endswith("more)")
    assert len(cut) < 600


def test_reasons_alone_too_large_for_the_frame_is_unfit() -> None:
    with pytest.raises(deadletter.DeadLetterUnfit):
        deadletter.build(incoming(headers={"a": "b"}), Rejection("invalid_json", "e" * 500), 300)
