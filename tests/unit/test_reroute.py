"""needs_reroute: which deliveries the broker hashed without their conversation's id."""

from __future__ import annotations

from typing import Any

import pytest

from warmer.bus.lenient import UNREADABLE, Unreadable
from warmer.bus.memory import MemoryChannel
from warmer.bus.reroute import needs_reroute
from warmer.contract import MAX_BODY_BYTES

EVENT = {"type": "turn.settled", "conversationId": "c-1"}
COMMAND = {"type": "get_state", "conversationId": "c-1"}


def _needs(body: dict[str, Any] | bytes, **properties: Any) -> str | None:
    return needs_reroute(MemoryChannel().deliver(body, **properties))


@pytest.mark.parametrize("body", [EVENT, COMMAND])
def test_the_header_of_the_body_id_is_on_its_shard(body: dict[str, Any]) -> None:
    assert _needs(body, headers={"conversation-id": "c-1"}) is None


@pytest.mark.parametrize("body", [EVENT, COMMAND])
@pytest.mark.parametrize(
    "header",
    [
        None,  # missing
        "c-2",  # another conversation's
        "",
        7,  # an integer: hashed with its type tag
        bytearray(b"c-1"),  # a byte array ("x"): not the long string "S" the broker hashed
        "c-1 ",
        "x" * 45_000,  # huge
    ],
)
def test_any_other_header_is_rerouted_with_the_body_id(body: dict[str, Any], header: Any) -> None:
    headers = {} if header is None else {"conversation-id": header}
    assert _needs(body, headers=headers) == "c-1"


def test_the_last_of_a_duplicated_id_wins_as_for_the_pipeline() -> None:
    body = b'{"type": "turn.started", "conversationId": "a", "conversationId": "b"}'
    assert _needs(body) == "b"
    assert _needs(body, headers={"conversation-id": "b"}) is None


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "turn.started"}',
        b'{"type": "turn.started", "conversationId": 5}',
        b'{"type": "turn.started", "conversationId": null}',
        b'{"type": "turn.started", "conversationId": ""}',
        b'{"type": "turn.started", "conversationId": "a\\u0007b"}',
        b'{"type": "turn.started", "conversationId": "\xff"}',
        b'{"type": "turn.started", "conversationId": "c-1", "pad": "'
        + b"x" * MAX_BODY_BYTES
        + b'"}',
    ],
)
def test_a_body_whose_id_cannot_be_read_is_left_to_the_pipeline(body: bytes) -> None:
    assert _needs(body) is None


@pytest.mark.parametrize(
    ("content_type", "content_encoding"),
    [("text/plain", None), ("application/json", "gzip")],
)
def test_a_body_the_pipeline_does_not_read_is_left_to_it(
    content_type: str, content_encoding: str | None
) -> None:
    assert _needs(EVENT, content_type=content_type, content_encoding=content_encoding) is None


def test_json_with_parameters_and_utf_8_encoding_is_read() -> None:
    assert _needs(EVENT, content_type="application/json; charset=utf-8") == "c-1"
    assert _needs(EVENT, content_type=None, content_encoding="UTF-8") == "c-1"


def test_unreadable_properties_decide_first() -> None:
    # A non-UTF-8 header (the conversation-id itself, say) is invalid_properties wherever
    # it landed: the pipeline dead-letters it, nothing reroutes it.
    problems = Unreadable()
    problems.note("headers.conversation-id: not UTF-8")
    headers = {"conversation-id": b"\xff\xfe", UNREADABLE: problems}
    assert _needs(EVENT, headers=headers) is None
