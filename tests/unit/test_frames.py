"""Frames from templates are pamqp's bytes exactly (what aiormq would have written)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pamqp.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from warmer.bus.frames import (
    FRAME_OVERHEAD,
    PROPERTY_FLAGS,
    KeyedTable,
    Properties,
    method_frame,
    publish_frames,
    table,
)

FRAME_MAX = 131_072
SHORT: tuple[str, ...] = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "expiration",
)
SHORT += ("message_id", "message_type", "user_id", "app_id")  # cluster_id: pamqp refuses it


def pamqp_bytes(
    channel: int,
    frame_max: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: dict[str, Any],
    body: bytes,
) -> bytes:
    """What aiormq's ``basic_publish`` puts on the write queue for the same publish."""
    given_ = dict(properties)
    if given_.get("timestamp") is not None:
        given_["timestamp"] = datetime.fromtimestamp(given_["timestamp"], tz=UTC)
    frames: list[Any] = [
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(body_size=len(body), properties=spec.Basic.Properties(**given_)),
    ]
    size = frame_max - FRAME_OVERHEAD
    frames += [ContentBody(body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(pamqp.frame.marshal(frame, channel) for frame in frames)


def ours(
    channel: int,
    frame_max: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: dict[str, Any],
    body: bytes,
    varying: tuple[str, ...],
) -> bytes:
    fixed = {k: v for k, v in properties.items() if k not in varying}
    template = Properties(fixed, varying)
    encoded = template.encode(*(properties.get(name) for name in template.varying))
    method = method_frame(channel, exchange, routing_key, mandatory=mandatory)
    return publish_frames(channel, frame_max - FRAME_OVERHEAD, method, encoded, body)


texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=0, max_size=60)
ids = st.one_of(texts, st.text(alphabet="aé€😀-:", min_size=50, max_size=63))  # <= 252 bytes
header_values = st.one_of(
    st.text(max_size=300), st.integers(-(2**40), 2**40), st.booleans(), st.none()
)
header_tables = st.dictionaries(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_é", min_size=1, max_size=20),
    header_values,
    max_size=4,
)


@st.composite
def property_sets(draw: st.DrawFn) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name in SHORT:
        if draw(st.booleans()):
            properties[name] = draw(ids)
    if draw(st.booleans()):
        properties["headers"] = draw(header_tables)
    if draw(st.booleans()):
        properties["delivery_mode"] = draw(st.sampled_from([1, 2]))
    if draw(st.booleans()):
        properties["priority"] = draw(st.integers(0, 9))
    if draw(st.booleans()):
        properties["timestamp"] = draw(st.integers(0, 2**33))
    return properties


@settings(max_examples=400, deadline=None)
@given(
    channel=st.integers(1, 2047),
    frame_max=st.sampled_from([4096, 8192, FRAME_MAX]),
    exchange=st.sampled_from(["", "ns.surface", "warmer.warm"]),
    routing_key=st.one_of(st.sampled_from(["surface.changed", "warm.requested"]), ids),
    mandatory=st.booleans(),
    properties=property_sets(),
    body=st.one_of(st.binary(max_size=300), st.binary(min_size=4000, max_size=20_000)),
    varying=st.sets(st.sampled_from(sorted(set(PROPERTY_FLAGS) - {"cluster_id"}))),
)
def test_the_bytes_are_pamqps_for_any_property_set(
    channel: int,
    frame_max: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: dict[str, Any],
    body: bytes,
    varying: set[str],
) -> None:
    args = (channel, frame_max, exchange, routing_key, mandatory, properties, body)
    assert ours(*args, tuple(varying)) == pamqp_bytes(*args)


@pytest.mark.parametrize("size", [0, 1, 131_063, 131_064, 131_065, 262_128, 262_129, 500_000])
def test_bodies_split_at_frame_max_as_aiormq_splits_them(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    properties = {"content_type": "application/json", "delivery_mode": 2}
    args = (7, FRAME_MAX, "x", "k", False, properties, body)
    frames = ours(*args, ("delivery_mode",))
    assert frames == pamqp_bytes(*args)
    assert len(frames) <= FRAME_MAX * (size // (FRAME_MAX - FRAME_OVERHEAD) + 3)


def test_the_publishers_kinds_with_non_ascii_ids_and_long_strings() -> None:
    cid = "conv-ü-" + "€" * 80  # 247 bytes: a long string header, a long message id
    surface = {
        "content_type": "application/json",
        "delivery_mode": 1,
        "headers": {"x-warmer-replica": "r-1", "conversation-id": cid},
        "message_id": "warmer-18446744073709551616",
    }
    warm = {
        "content_type": "application/json",
        "delivery_mode": 2,
        "headers": {"conversation-id": cid},
        "message_id": f"{cid[:200]}:12",
        "expiration": "59999",
        "timestamp": 1_760_000_000,
    }
    reply = {
        "content_type": "application/json",
        "delivery_mode": 1,
        "correlation_id": "ü" * 127,
        "message_id": "warmer-1",
    }
    for properties, varying in [
        (surface, ("headers", "message_id")),
        (warm, ("headers", "expiration", "message_id", "timestamp")),
        (reply, ("correlation_id", "message_id")),
        ({**reply, "correlation_id": None}, ("correlation_id", "message_id")),
        ({**reply, "correlation_id": ""}, ("correlation_id", "message_id")),
    ]:
        args = (1, FRAME_MAX, "ns.surface", "amq.gen-ü", True, properties, b'{"a":1}')
        assert ours(*args, varying) == pamqp_bytes(*args)


def test_strings_too_long_for_a_shortstr_are_refused_as_pamqp_refuses_them() -> None:
    with pytest.raises(TypeError, match="255"):
        Properties({}, ("message_id",)).encode("é" * 128)
    with pytest.raises(ValueError, match="Routing key"):
        method_frame(1, "", "k" * 256, mandatory=False)


def test_a_header_table_of_strings_is_pamqps_and_others_go_through_pamqp() -> None:
    from pamqp import encode

    values: list[dict[str, Any]] = [{}, {"b": "2", "a": "1"}, {"k": 1, "s": "x"}]
    for value in [*values, {"k" * 130: "long key"}]:
        assert table(value) == encode.field_table(value)


def test_varying_values_must_match_the_varying_properties() -> None:
    template = Properties({"content_type": "a"}, ("message_id",))
    with pytest.raises(TypeError):
        template.encode("m", "extra")
    with pytest.raises(ValueError):
        Properties({"message_id": "m"}, ("message_id",))
    with pytest.raises(ValueError):
        Properties({"colour": "blue"})


@pytest.mark.parametrize(
    "fixed", [{}, {"x-warmer-replica": "r-ü"}, {"a": "1", "x-warmer-replica": "r"}]
)
@pytest.mark.parametrize("value", ["", "c", "conv-€-" + "é" * 100])
def test_a_keyed_table_is_the_whole_tables_bytes(fixed: dict[str, str], value: str) -> None:
    keyed = KeyedTable("conversation-id", fixed)
    assert keyed.encode(value) == table({"conversation-id": value, **fixed})
    assert Properties({}, ("headers",)).encode(keyed.encode(value)) == Properties(
        {}, ("headers",)
    ).encode({"conversation-id": value, **fixed})
