"""The wire contract (docs/contract.md): decoding every inbound kind and error code, encodings."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import UNSET

from warmer import contract
from warmer.contract import (
    ENCODING_CODES,
    MAX_DEPTH,
    MAX_ERROR_CHARS,
    ConversationClosed,
    ErrorReply,
    GetState,
    Rejection,
    SetEnabled,
    SetInterval,
    SettingsReply,
    SettingsView,
    StateReply,
    StateView,
    SurfaceAction,
    SurfaceChanged,
    TurnSettled,
    TurnStarted,
    UnknownType,
    Usage,
    WarmCompleted,
    WarmRequested,
    decode_command,
    decode_event,
    encode,
)
from warmer.core import DEFAULT_PANEL, build_panel
from warmer.core.rules import clamp_interval, seconds_to_interval

MAX_SAFE = 2**53 - 1
USAGE = {"inputTokens": 1000, "cacheReadTokens": 800, "cacheWriteTokens": 200}


def body(**fields: Any) -> bytes:
    """A JSON body (UTF-8, not ASCII-escaped) with the given fields."""
    return msgspec.json.encode(fields)


def event(kind: str, **fields: Any) -> bytes:
    return body(type=kind, **fields)


def started(**fields: Any) -> bytes:
    return event("turn.started", conversationId="c", **fields)


def completed(**fields: Any) -> bytes:
    fields.setdefault("conversationId", "c")
    return event("warm.completed", **fields)


def command(kind: str, **fields: Any) -> bytes:
    fields.setdefault("conversationId", "c")
    return body(type=kind, **fields)


def rejected(result: object, code: str) -> Rejection:
    assert isinstance(result, Rejection), result
    assert result.code == code, result
    assert result.error
    return result


def invalid_field(result: object, names: str | None = None) -> Rejection:
    rejection = rejected(result, "invalid_field")
    if names is not None:
        assert names in rejection.error, rejection.error
    assert not rejection.dead_letter_always
    return rejection


def as_json(value: msgspec.Struct) -> Any:
    return msgspec.json.decode(encode(value))


# -- lifecycle events -------------------------------------------------------------------------


def test_turn_started() -> None:
    assert decode_event(started()) == TurnStarted(conversation_id="c")
    assert decode_event(started(seq=3, at=1_760_000_000_000)) == TurnStarted(
        conversation_id="c", seq=3, at=1_760_000_000_000
    )


def test_turn_settled_with_every_field() -> None:
    decoded = decode_event(
        event(
            "turn.settled",
            conversationId="conv-1",
            cwd="/home/u/repo",
            modelName="claude-sonnet",
            lastRequestAt=1_760_000_000_000,
            seq=7,
            at=1_760_000_090_000,
            usage={**USAGE, "outputTokens": 5, "cacheWrite5mTokens": 150, "cacheWrite1hTokens": 50},
            cacheTtlS=300,
            prefixTokens=900,
        )
    )
    assert isinstance(decoded, TurnSettled)
    assert decoded.conversation_id == "conv-1"
    assert (decoded.cwd, decoded.model_name) == ("/home/u/repo", "claude-sonnet")
    assert (decoded.last_request_at, decoded.seq, decoded.at) == (
        1_760_000_000_000,
        7,
        1_760_000_090_000,
    )
    assert decoded.usage == Usage(
        input_tokens=1000,
        cache_read_tokens=800,
        cache_write_tokens=200,
        output_tokens=5,
        cache_write_5m_tokens=150,
        cache_write_1h_tokens=50,
    )
    assert (decoded.cache_ttl_s, decoded.prefix_tokens) == (300, 900)


def test_turn_settled_with_only_an_id() -> None:
    assert decode_event(event("turn.settled", conversationId="c")) == TurnSettled(
        conversation_id="c"
    )


def test_warm_completed_with_usage() -> None:
    decoded = decode_event(completed(token=42, usage=USAGE, at=5))
    assert decoded == WarmCompleted(
        conversation_id="c",
        token=42,
        usage=Usage(input_tokens=1000, cache_read_tokens=800, cache_write_tokens=200),
        at=5,
    )


def test_warm_completed_by_hand_has_no_token() -> None:
    decoded = decode_event(completed(error="no history"))
    assert decoded == WarmCompleted(conversation_id="c", error="no history")


def test_warm_completed_with_both_keeps_the_error() -> None:
    decoded = decode_event(completed(token=1, usage=USAGE, error="boom"))
    assert isinstance(decoded, WarmCompleted) and decoded.error == "boom"


def test_conversation_closed() -> None:
    assert decode_event(event("conversation.closed", conversationId="c", seq=0)) == (
        ConversationClosed(conversation_id="c", seq=0)
    )


def test_unknown_fields_are_ignored() -> None:
    decoded = decode_event(started(seq=1, newField={"x": [1, 2]}, another=None))
    assert decoded == TurnStarted(conversation_id="c", seq=1)
    usage = {**USAGE, "cacheWrite30mTokens": 3}
    assert isinstance(decode_event(completed(usage=usage)), WarmCompleted)


def test_field_names_are_camel_case() -> None:
    invalid_field(decode_event(event("turn.started", conversation_id="c")), "conversationId")
    decoded = decode_event(event("turn.settled", conversationId="c", model_name="m", cwd="/w"))
    assert isinstance(decoded, TurnSettled) and decoded.model_name is None


@pytest.mark.parametrize("kind", ["turn.paused", "TURN.STARTED", "warm.requested", "set_enabled"])
def test_an_unknown_event_type_is_unknown_not_invalid(kind: str) -> None:
    assert decode_event(event(kind, conversationId="c", whatever=1)) == UnknownType(kind)


def test_an_unknown_event_type_with_odd_fields_is_still_only_unknown() -> None:
    assert decode_event(body(type="turn.paused")) == UnknownType("turn.paused")
    assert decode_event(body(type="turn.paused", conversationId=5, seq=-1)) == UnknownType(
        "turn.paused"
    )


# -- commands ---------------------------------------------------------------------------------


def test_set_enabled() -> None:
    assert decode_command(command("set_enabled", enabled=True)) == SetEnabled(
        conversation_id="c", enabled=True
    )
    assert decode_command(command("set_enabled", enabled=False)) == SetEnabled(
        conversation_id="c", enabled=False
    )


@pytest.mark.parametrize("interval", [5000, 1500.5, 0, -5, 500, 86_400_001, 1e15, 10**30, -1e308])
def test_set_interval_takes_any_json_number(interval: float) -> None:
    # Clamped by the core, never refused by the decoder.
    decoded = decode_command(command("set_interval", intervalMs=interval))
    assert decoded == SetInterval(conversation_id="c", interval_ms=interval)


def test_get_state() -> None:
    assert decode_command(command("get_state")) == GetState(conversation_id="c")


@pytest.mark.parametrize("payload", [30, 1.5, {"value": True}, {"value": 30}, "x", None, [1], {}])
def test_surface_action_carries_its_payload_as_given(payload: Any) -> None:
    decoded = decode_command(command("surface.action", actionId="cache-warming/x", payload=payload))
    assert decoded == SurfaceAction(
        conversation_id="c", action_id="cache-warming/x", payload=payload
    )


def test_surface_action_without_payload() -> None:
    decoded = decode_command(command("surface.action", actionId="cache-warming/toggle"))
    assert isinstance(decoded, SurfaceAction) and decoded.payload is UNSET


@pytest.mark.parametrize("kind", ["set_paused", "turn.started", "Set_Enabled"])
def test_an_unknown_command_type(kind: str) -> None:
    assert decode_command(command(kind, enabled=True)) == UnknownType(kind)


# -- content type, size, JSON ---------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "APPLICATION/JSON; CHARSET=UTF-8",
        "Application/Json",
    ],
)
def test_json_content_types_are_accepted(content_type: str | None) -> None:
    assert decode_event(started(), content_type) == TurnStarted(conversation_id="c")
    assert decode_command(command("get_state"), content_type) == GetState(conversation_id="c")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/json", "application/xml", "application/jsonx", "application/x-json"],
)
def test_other_content_types_are_invalid(content_type: str) -> None:
    for decode, good in ((decode_event, started()), (decode_command, command("get_state"))):
        rejection = rejected(decode(good, content_type), "invalid_content_type")
        assert rejection.dead_letter_always


def test_a_body_of_64_kib_is_accepted_and_one_byte_more_is_too_large() -> None:
    empty = started(pad="")
    exact = started(pad="x" * (64 * 1024 - len(empty)))
    assert len(exact) == 64 * 1024
    assert decode_event(exact) == TurnStarted(conversation_id="c")
    over = started(pad="x" * (64 * 1024 - len(empty) + 1))
    for decode in (decode_event, decode_command):
        rejection = rejected(decode(over), "too_large")
        assert rejection.dead_letter_always


def test_too_large_does_not_need_to_be_json() -> None:
    rejected(decode_event(b"\xff" * (64 * 1024 + 1)), "too_large")


@pytest.mark.parametrize(
    "kind",
    ["turn.started", "set_enabled"],
)
@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"type": "%s", "conversationId": "c"',
        b'{"type": "%s", "conversationId": "c", "enabled": true} trailing',
        b"{'type': '%s'}",
        b'{"type": "%s", "conversationId": "\xff"}',  # not UTF-8
        b'{"type": "%s", "conversationId": "\xc3"}',  # a cut multi-byte character
        b"\xfe\xff\x00{",
    ],
)
def test_what_is_not_utf8_json_is_invalid_json(raw: bytes, kind: str) -> None:
    raw = raw.replace(b"%s", kind.encode())
    decode = decode_event if kind == "turn.started" else decode_command
    rejection = rejected(decode(raw), "invalid_json")
    assert rejection.dead_letter_always


@pytest.mark.parametrize(
    "raw", [b"[]", b'[{"type": "turn.started"}]', b'"x"', b"42", b"null", b"true"]
)
def test_json_that_is_not_an_object_is_invalid_json(raw: bytes) -> None:
    for decode in (decode_event, decode_command):
        rejected(decode(raw), "invalid_json")


@pytest.mark.parametrize(
    "raw", [b"{}", b'{"type": null}', b'{"conversationId": "c"}', b'{"type": 5}']
)
def test_no_type_is_invalid_field(raw: bytes) -> None:
    for decode in (decode_event, decode_command):
        invalid_field(decode(raw), "type")


# -- a known type with a bad field ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (event("turn.started"), "conversationId"),
        (event("turn.started", conversationId=None), "conversationId"),
        (event("turn.started", conversationId=5), "conversationId"),
        (event("turn.started", conversationId=["c"]), "conversationId"),
        (started(seq="1"), "seq"),
        (started(seq=1.0), "seq"),
        (started(seq=1.5), "seq"),
        (started(seq=True), "seq"),
        (started(at="2025-01-01"), "at"),
        (event("turn.settled", conversationId="c", cwd=5), "cwd"),
        (event("turn.settled", conversationId="c", modelName=True), "modelName"),
        (event("turn.settled", conversationId="c", lastRequestAt=1.5), "lastRequestAt"),
        (event("conversation.closed", seq="x", conversationId="c"), "seq"),
        (event("conversation.closed"), "conversationId"),
        (completed(token="1", usage=USAGE), "token"),
        (completed(token=1.0, usage=USAGE), "token"),
        (completed(usage=5), "usage"),
        (completed(usage={"inputTokens": 1, "cacheReadTokens": 0}), "cacheWriteTokens"),
        (completed(usage={"cacheReadTokens": 0, "cacheWriteTokens": 0}), "inputTokens"),
        (completed(usage={**USAGE, "inputTokens": None}), "inputTokens"),
        (completed(usage={**USAGE, "cacheReadTokens": 1.5}), "cacheReadTokens"),
        (completed(error=5), "error"),
        (completed(error=["boom"]), "error"),
    ],
)
def test_a_missing_null_or_mistyped_event_field(raw: bytes, name: str) -> None:
    invalid_field(decode_event(raw), name)


def test_warm_completed_needs_usage_or_error() -> None:
    invalid_field(decode_event(completed()))
    invalid_field(decode_event(completed(token=3)))
    invalid_field(decode_event(completed(usage=None, error=None)))


def test_warm_completed_error_must_not_be_empty() -> None:
    invalid_field(decode_event(completed(error="")), "error")
    invalid_field(decode_event(completed(error="", usage=USAGE)), "error")


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (command("set_enabled"), "enabled"),
        (command("set_enabled", enabled=None), "enabled"),
        (command("set_enabled", enabled="true"), "enabled"),
        (command("set_enabled", enabled=1), "enabled"),
        (command("set_interval"), "intervalMs"),
        (command("set_interval", intervalMs=None), "intervalMs"),
        (command("set_interval", intervalMs="5000"), "intervalMs"),
        (command("set_interval", intervalMs=True), "intervalMs"),
        (command("set_interval", intervalMs=False), "intervalMs"),
        (command("set_interval", intervalMs={"value": 5}), "intervalMs"),
        (command("surface.action"), "actionId"),
        (command("surface.action", actionId=None), "actionId"),
        (command("surface.action", actionId=5), "actionId"),
        (body(type="get_state"), "conversationId"),
        (command("get_state", conversationId=None), "conversationId"),
        (command("get_state", conversationId=""), "conversationId"),
        (command("set_enabled", conversationId="a\x00b", enabled=True), "conversationId"),
    ],
)
def test_a_missing_null_or_mistyped_command_field(raw: bytes, name: str) -> None:
    invalid_field(decode_command(raw), name)


# -- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cid",
    [
        "c",
        "x" * 200,
        "é" * 100,  # 200 bytes
        "€" * 66,  # 198 bytes
        "😀" * 50,  # 200 bytes
        "conv:1/é ü",
        "a\u00a0b",  # no-break space is not a control character
        " ",
    ],
)
def test_conversation_id_within_the_limits(cid: str) -> None:
    assert decode_event(event("turn.started", conversationId=cid)) == TurnStarted(
        conversation_id=cid
    )
    assert decode_command(command("get_state", conversationId=cid)) == GetState(conversation_id=cid)


@pytest.mark.parametrize(
    "cid",
    [
        "",
        "x" * 201,
        "é" * 101,  # 202 bytes, 101 characters
        "€" * 67,  # 201 bytes
        "😀" * 51,  # 204 bytes
        "x" * 199 + "é",  # 201 bytes
        "\x00",
        "a\x00b",
        "a\tb",
        "a\nb",
        "\nabc",
        "a\rb",
        "a\x1fb",
        "a\x7fb",
        "a\x85b",
        "a\x9fb",
        "abc\n",  # `$` in a regex also matches before a final newline
    ],
)
def test_conversation_id_outside_the_limits(cid: str) -> None:
    invalid_field(decode_event(event("turn.started", conversationId=cid)), "conversationId")
    invalid_field(decode_command(command("set_enabled", conversationId=cid, enabled=True)))


@pytest.mark.parametrize("value", [0, 1, MAX_SAFE])
def test_seq_and_times_from_zero_to_the_largest_safe_integer(value: int) -> None:
    assert decode_event(started(seq=value, at=value)) == TurnStarted(
        conversation_id="c", seq=value, at=value
    )
    decoded = decode_event(
        event("turn.settled", conversationId="c", seq=value, lastRequestAt=value, at=value)
    )
    assert isinstance(decoded, TurnSettled) and decoded.last_request_at == value
    counts = {"inputTokens": value, "cacheReadTokens": value, "cacheWriteTokens": value}
    decoded = decode_event(completed(usage={**counts, "outputTokens": value}, at=value))
    assert isinstance(decoded, WarmCompleted) and decoded.usage is not None
    assert decoded.usage.input_tokens == value


@pytest.mark.parametrize("value", [-1, MAX_SAFE + 1, 2**64])
def test_seq_and_times_outside_the_bounds(value: int) -> None:
    invalid_field(decode_event(started(seq=value)), "seq")
    invalid_field(decode_event(started(at=value)), "at")
    invalid_field(decode_event(event("conversation.closed", conversationId="c", seq=value)), "seq")
    invalid_field(
        decode_event(event("turn.settled", conversationId="c", lastRequestAt=value)),
        "lastRequestAt",
    )
    invalid_field(decode_event(completed(error="x", at=value)), "at")
    for name in ("inputTokens", "cacheReadTokens", "cacheWriteTokens", "outputTokens"):
        invalid_field(decode_event(completed(usage={**USAGE, name: value})), name)


@pytest.mark.parametrize("token", [1, 2, MAX_SAFE])
def test_token_within_its_bounds(token: int) -> None:
    decoded = decode_event(completed(token=token, error="x"))
    assert isinstance(decoded, WarmCompleted) and decoded.token == token


@pytest.mark.parametrize("token", [0, -1, MAX_SAFE + 1])
def test_token_outside_its_bounds(token: int) -> None:
    # Tokens are issued from 1 to 2^53 - 1 (docs/contract.md, "Outbound: warm requests").
    invalid_field(decode_event(completed(token=token, usage=USAGE)), "token")


def test_cwd_and_model_name_lengths_count_characters() -> None:
    ok = decode_event(
        event("turn.settled", conversationId="c", cwd="é" * 4096, modelName="é" * 256)
    )
    assert isinstance(ok, TurnSettled) and ok.cwd == "é" * 4096
    invalid_field(decode_event(event("turn.settled", conversationId="c", cwd="x" * 4097)), "cwd")
    invalid_field(
        decode_event(event("turn.settled", conversationId="c", modelName="x" * 257)), "modelName"
    )


# -- never raises ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param(event("turn.paused")[:-1] + b',"x":1e400}', "unknown"),
        pytest.param(b"[1e400]", "invalid_json"),
        pytest.param(
            completed()[:-1] + b',"usage":{"inputTokens":1e400,"cacheReadTokens":0,'
            b'"cacheWriteTokens":0}}',
            "invalid_field",
        ),
        pytest.param(b'{"type":"turn.paused","x":"\xff"}', "invalid_json"),
        pytest.param(
            b'{"type":"turn.started","conversationId":"c","seq":"x","y":"\xff"}',
            "invalid_json",
        ),
        pytest.param(b'{"type":"turn.started","conversationId":"c","x":1e400}', "ok"),
        # Malformed JSON after the point where the typed decoder already gave up.
        pytest.param(b'{"type":"turn.paused","x":', "invalid_json"),
        pytest.param(b'{"type":"turn.paused"} trailing', "invalid_json"),
        pytest.param(b'{"type":"turn.started"} trailing', "invalid_json"),
        pytest.param(
            b'{"type":"turn.started","conversationId":5,"x":',
            "invalid_json",
        ),
        pytest.param(b'{"type":"set_enabled","conversationId":"c"', "invalid_json"),
    ],
)
def test_decoding_never_raises(raw: bytes, code: str) -> None:
    for decode in (decode_event, decode_command):
        result = decode(raw)  # must not raise
        assert isinstance(result, Rejection | UnknownType | msgspec.Struct)
    result = decode_event(raw)
    if code == "unknown":
        assert isinstance(result, UnknownType)
    elif code != "ok":
        rejected(result, code)


def test_an_unknown_field_beyond_a_double_is_ignored() -> None:
    raw = b'{"type":"turn.started","conversationId":"c","x":1e400}'
    assert decode_event(raw) == TurnStarted(conversation_id="c")


# -- numbers beyond a double: clamped, never refused (docs/contract.md) -------------------------


@pytest.mark.parametrize(
    ("raw", "clamped"),
    [
        (b"1e400", 86_400_000),
        (b"-1e400", 1000),
        (b"1E+999", 86_400_000),
        (b"1e-400", 1000),  # JSON.parse reads 0: clamped like 0
        (b"1e308", 86_400_000),
        (b"1" + b"0" * 400, 86_400_000),  # an integer longer than any double
    ],
)
def test_set_interval_beyond_a_double_is_clamped(raw: bytes, clamped: int) -> None:
    decoded = decode_command(
        b'{"type":"set_interval","conversationId":"c","intervalMs":' + raw + b"}"
    )
    assert isinstance(decoded, SetInterval), decoded
    assert clamp_interval(decoded.interval_ms) == clamped


@pytest.mark.parametrize(
    ("payload", "ms"),
    [
        (b"1e400", 86_400_000),
        (b'{"value":1e400}', 86_400_000),
        (b"-1e400", None),  # not a positive number of seconds
        (b'{"value":-1e400}', None),
        (b"1e-400", None),  # JSON.parse reads 0
    ],
)
def test_dashboard_seconds_beyond_a_double_are_clamped(payload: bytes, ms: int | None) -> None:
    decoded = decode_command(
        b'{"type":"surface.action","conversationId":"c",'
        b'"actionId":"cache-warming/set-interval","payload":' + payload + b"}"
    )
    assert isinstance(decoded, SurfaceAction), decoded
    value = decoded.payload.get("value") if isinstance(decoded.payload, dict) else decoded.payload
    assert seconds_to_interval(value) == ms


def test_an_integer_field_beyond_a_double_is_an_invalid_field() -> None:
    # Only intervalMs (and the dashboard's seconds) take any number: a count does not.
    invalid_field(decode_event(started()[:-1] + b',"seq":1e400}'), "seq")
    invalid_field(decode_event(started()[:-1] + b',"at":-1e400}'), "at")


# -- a key given twice: the last one wins, as JSON.parse reads it (docs/contract.md) -------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            b'{"type":"turn.settled","type":"turn.started","conversationId":"c"}',
            TurnStarted(conversation_id="c"),
        ),
        (
            b'{"type":"turn.started","conversationId":"c","type":"turn.settled","cwd":"/w"}',
            TurnSettled(conversation_id="c", cwd="/w"),
        ),
        (
            b'{"type":"turn.paused","type":"conversation.closed","conversationId":"c"}',
            ConversationClosed(conversation_id="c"),
        ),
        (
            b'{"type":5,"type":"turn.started","conversationId":"c"}',
            TurnStarted(conversation_id="c"),
        ),
        (
            b'{"type":"turn.started","conversationId":7,"seq":"x","conversationId":"c","seq":3}',
            TurnStarted(conversation_id="c", seq=3),
        ),
        (
            b'{"type":"turn.started","conversationId":"a","conversationId":"c"}',
            TurnStarted(conversation_id="c"),
        ),
        (
            b'{"type":"turn.settled","conversationId":"c","usage":{"inputTokens":"x",'
            b'"inputTokens":9,"cacheReadTokens":1,"cacheWriteTokens":2},"cacheTtlS":-1,'
            b'"cacheTtlS":300}',
            TurnSettled(
                conversation_id="c",
                usage=Usage(input_tokens=9, cache_read_tokens=1, cache_write_tokens=2),
                cache_ttl_s=300,
            ),
        ),
    ],
)
def test_a_key_given_twice_reads_as_its_last_value(raw: bytes, expected: object) -> None:
    assert decode_event(raw) == expected


def test_a_command_type_given_twice_reads_as_its_last_value() -> None:
    raw = b'{"type":"get_state","type":"set_enabled","conversationId":"c","enabled":true}'
    assert decode_command(raw) == SetEnabled(conversation_id="c", enabled=True)


def test_a_key_given_twice_is_judged_by_its_last_value() -> None:
    assert decode_event(
        b'{"type":"turn.started","type":"turn.paused","conversationId":"c"}'
    ) == UnknownType("turn.paused")
    invalid_field(
        decode_event(b'{"type":"turn.started","conversationId":"c","seq":3,"seq":"x"}'), "seq"
    )
    invalid_field(decode_event(b'{"type":"turn.started","type":null,"conversationId":"c"}'), "type")


def test_invalid_utf8_anywhere_in_the_body_is_invalid_json() -> None:
    rejected(
        decode_event(b'{"type":"turn.started","conversationId":"c","x":"\xff"}'), "invalid_json"
    )


# -- nesting --------------------------------------------------------------------------------


def nested(depth: int, kind: str = "array") -> bytes:
    """A JSON value ``depth`` levels deep: arrays, objects (``{"a": ...}``) or both in turn."""
    opens = {"array": ["["], "object": ['{"a":'], "mixed": ["[", '{"a":']}[kind]
    closes = {"[": "]", '{"a":': "}"}
    levels = [opens[i % len(opens)] for i in range(depth)]
    return ("".join(levels) + "1" + "".join(closes[o] for o in reversed(levels))).encode()


def with_field(raw: bytes, value: bytes) -> bytes:
    """``raw`` (a JSON object) with the field ``x`` set to the JSON text ``value``."""
    return raw[:-1] + b',"x":' + value + b"}"


def too_deep(result: object) -> Rejection:
    rejection = rejected(result, "invalid_json")
    assert "nested" in rejection.error, rejection.error
    assert rejection.dead_letter_always
    return rejection


@pytest.mark.parametrize("kind", ["array", "object", "mixed"])
def test_nesting_of_32_levels_is_read_and_33_is_invalid_json(kind: str) -> None:
    # The top-level object is level 1, so a field's value may nest 31 levels more.
    assert MAX_DEPTH == 32
    assert decode_event(with_field(started(), nested(31, kind))) == TurnStarted(conversation_id="c")
    too_deep(decode_event(with_field(started(), nested(32, kind))))
    assert isinstance(decode_command(with_field(command("get_state"), nested(31, kind))), GetState)
    too_deep(decode_command(with_field(command("get_state"), nested(32, kind))))


@pytest.mark.parametrize("kind", ["array", "object", "mixed"])
def test_a_payload_nests_as_deep_as_any_field(kind: str) -> None:
    action = command("surface.action", actionId="cache-warming/toggle")
    decoded = decode_command(action[:-1] + b',"payload":' + nested(31, kind) + b"}")
    assert isinstance(decoded, SurfaceAction)
    assert decoded.payload == msgspec.json.decode(nested(31, kind))
    too_deep(decode_command(action[:-1] + b',"payload":' + nested(32, kind) + b"}"))


def test_the_depth_of_a_body_that_is_not_an_object() -> None:
    for raw in (nested(32), nested(1)):
        rejection = rejected(decode_event(raw), "invalid_json")
        assert "nested" not in rejection.error
    too_deep(decode_event(nested(33)))


def test_the_depth_counts_open_brackets_not_all_of_them() -> None:
    # 40 arrays one after the other, each 2 levels deep inside the body: depth 3.
    raw = with_field(started(), b"[" + b",".join([b"[1]"] * 40) + b"]")
    assert decode_event(raw) == TurnStarted(conversation_id="c")


@pytest.mark.parametrize("bracket", ["[", "{", "]", "}", "[{"])
def test_brackets_inside_strings_do_not_count(bracket: str) -> None:
    cid = bracket * (40 // len(bracket))
    assert decode_event(event("turn.started", conversationId=cid)) == TurnStarted(
        conversation_id=cid
    )
    # In a field name, and in an unknown field beside a value 31 levels deep.
    assert isinstance(decode_event(started(**{cid: cid * 3})), TurnStarted)
    raw = with_field(started(pad=cid * 3), nested(31))
    assert decode_event(raw) == TurnStarted(conversation_id="c")


def test_an_escaped_quote_does_not_end_a_string() -> None:
    # `\"` stays inside the string, so the brackets after it are text.
    raw = with_field(started(), b'"\\"' + b"[" * 40 + b'\\\\\\""')
    assert decode_event(raw) == TurnStarted(conversation_id="c")


def test_an_escaped_backslash_ends_a_string_before_its_quote() -> None:
    # `"\\"` is one backslash: the quote after it ends the string, and what follows counts.
    raw = started(a="\\")[:-1] + b',"x":' + nested(32) + b"}"
    assert b'"\\\\"' in raw
    too_deep(decode_event(raw))
    assert decode_event(started(a="\\")[:-1] + b',"x":' + nested(31) + b"}") == TurnStarted(
        conversation_id="c"
    )


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 10_000 + b"]" * 10_000, id="top level"),
        pytest.param(with_field(started(), b"[" * 10_000 + b"]" * 10_000), id="in a field"),
        pytest.param(with_field(started(), b"[" * 10_000), id="unclosed"),
        pytest.param(b'{"x":' * 10_000 + b"1" + b"}" * 10_000, id="objects"),
        pytest.param(b'{"type":"set_enabled","x":' + b"[" * 30_000, id="no type yet"),
    ],
)
def test_ten_thousand_levels_are_invalid_json_and_nothing_raises(raw: bytes) -> None:
    for decode in (decode_event, decode_command):
        too_deep(decode(raw))


def test_the_slow_path_reads_a_deep_body_after_the_depth_check_too() -> None:
    # conversationId missing: the typed decoder fails, and `type` is read again.
    at_limit = with_field(event("turn.started"), nested(31))
    invalid_field(decode_event(at_limit), "conversationId")
    too_deep(decode_event(with_field(event("turn.started"), b"[" * 10_000 + b"]" * 10_000)))
    too_deep(decode_event(event("turn.started")[:-1] + b',"x":' + b"[" * 10_000))


def test_a_recursion_error_is_invalid_json_even_without_the_depth_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Belt and braces: were the check ever wrong, the decoders' own limit still holds.
    monkeypatch.setattr(contract, "_nested_too_deep", lambda text: False)
    deep = b"[" * 30_000 + b"]" * 30_000  # far beyond the interpreter's recursion limit
    bad_id = event("turn.started", conversationId=5)
    for decode in (decode_event, decode_command):
        # The typed decoder meets the depth; then, with conversationId failing first, the
        # envelope decoder that reads `type` again.
        for raw in (with_field(started(), deep), with_field(bad_id, deep)):
            rejection = rejected(decode(raw), "invalid_json")
            assert "too deep" in rejection.error


def test_an_unterminated_string_of_escaped_quotes_is_read_in_linear_time() -> None:
    # A scan that looked for the closing quote again from every quote would take seconds.
    raw = b'{"type":"turn.started","x":"' + b'\\"' * 32_000 + b"[" * 40
    assert len(raw) <= 64 * 1024
    start = time.perf_counter()
    for decode in (decode_event, decode_command):
        rejected(decode(raw), "invalid_json")
    assert time.perf_counter() - start < 1.0


# -- content encoding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoding", [None, "", "identity", "IDENTITY", "utf-8", "UTF-8", " utf-8 "]
)
def test_a_plain_content_encoding_is_accepted(encoding: str | None) -> None:
    assert decode_event(started(), content_encoding=encoding) == TurnStarted(conversation_id="c")
    assert decode_command(command("get_state"), content_encoding=encoding) == GetState(
        conversation_id="c"
    )


@pytest.mark.parametrize(
    "encoding", ["gzip", "deflate", "br", "utf-16", "x-gzip", "identity, gzip"]
)
def test_any_other_content_encoding_is_invalid_content_type(encoding: str) -> None:
    for decode, good in ((decode_event, started()), (decode_command, command("get_state"))):
        rejection = rejected(decode(good, content_encoding=encoding), "invalid_content_type")
        assert rejection.dead_letter_always
        assert repr(encoding) in rejection.error and "compressed" in rejection.error


def test_the_content_type_is_checked_before_the_encoding() -> None:
    rejection = rejected(
        decode_event(started(), "text/plain", content_encoding="gzip"), "invalid_content_type"
    )
    assert "text/plain" in rejection.error


# -- error texts are bounded ----------------------------------------------------------------


def test_a_type_that_is_not_a_string_is_quoted_short() -> None:
    raw = body(type=["\u0378" * 32_000])  # each character a 6-character escape in a repr
    assert len(raw) == 64_013
    for decode in (decode_event, decode_command):
        rejection = invalid_field(decode(raw), "type")
        assert len(rejection.error) <= MAX_ERROR_CHARS


def test_a_type_number_beyond_a_double_is_an_invalid_field() -> None:
    for raw in (b'{"type":1e400}', b'{"type":' + b"9" * 400 + b"}"):
        for decode in (decode_event, decode_command):
            invalid_field(decode(raw), "type")


def test_a_long_content_type_is_quoted_short_with_its_length() -> None:
    content_type = "text/" + "x" * 250  # 255: the most AMQP's short string holds
    rejection = rejected(decode_event(started(), content_type), "invalid_content_type")
    assert len(rejection.error) <= 260
    assert "xxxx…' (255 chars)" in rejection.error


def test_a_long_content_encoding_is_quoted_short() -> None:
    rejection = rejected(
        decode_event(started(), content_encoding="\x00" * 255), "invalid_content_type"
    )
    assert "(255 chars)" in rejection.error and len(rejection.error) <= 300


def test_a_long_unknown_type_is_kept_whole_and_shown_short() -> None:
    kind = "t" * 60_000
    for decode in (decode_event, decode_command):
        decoded = decode(body(type=kind, conversationId="c"))
        assert decoded == UnknownType(kind)
        assert isinstance(decoded, UnknownType)
        assert len(decoded.shown) == 64 and decoded.shown == "t" * 63 + "…"
    assert UnknownType("turn.paused").shown == "turn.paused"
    assert UnknownType("x" * 64).shown == "x" * 64


def test_every_rejection_is_cut_to_500_characters() -> None:
    rejection = Rejection("invalid_properties", "header x-a: " + "é" * 10_000)
    assert len(rejection.error) == MAX_ERROR_CHARS
    assert rejection.error.startswith("header x-a: éé") and rejection.error.endswith("…")
    assert Rejection("invalid_field", "x" * 500).error == "x" * 500


def test_unreadable_properties_fail_the_encoding_rules() -> None:
    # The worker reads the properties and builds this rejection itself.
    assert {
        "invalid_content_type",
        "invalid_properties",
        "too_large",
        "invalid_json",
    } == ENCODING_CODES
    assert Rejection("invalid_properties", "header x-a: not UTF-8").dead_letter_always
    assert not Rejection("unknown_type", "x").dead_letter_always


_KINDS = [
    "turn.started",
    "turn.settled",
    "warm.completed",
    "conversation.closed",
    "set_enabled",
    "set_interval",
    "get_state",
    "surface.action",
    "turn.paused",
]
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=40,
)
_FIELD_NAMES = st.sampled_from(
    [
        "conversationId",
        "seq",
        "at",
        "cwd",
        "modelName",
        "usage",
        "token",
        "error",
        "enabled",
        "intervalMs",
        "actionId",
        "payload",
        "x",
    ]
)
_MESSAGES = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(_KINDS) | _JSON,
    st.dictionaries(_FIELD_NAMES, _JSON, max_size=5),
)


def _never_raises_and_is_bounded(raw: bytes, content_type: str | None = None) -> None:
    for decode in (decode_event, decode_command):
        result = decode(raw, content_type)
        assert isinstance(result, Rejection | UnknownType | msgspec.Struct)
        if isinstance(result, Rejection):
            assert 0 < len(result.error) <= MAX_ERROR_CHARS, result
        if isinstance(result, UnknownType):
            assert len(result.shown) <= 64


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=4096), content_type=st.none() | st.text(max_size=300))
def test_arbitrary_bytes_never_raise_and_errors_stay_short(
    raw: bytes, content_type: str | None
) -> None:
    _never_raises_and_is_bounded(raw, content_type)


@settings(max_examples=300, deadline=None)
@given(message=_MESSAGES | _JSON, cut=st.integers(0, 64), depth=st.integers(0, 40))
def test_arbitrary_json_never_raises_and_errors_stay_short(
    message: Any, cut: int, depth: int
) -> None:
    raw = msgspec.json.encode(message)
    _never_raises_and_is_bounded(raw)
    _never_raises_and_is_bounded(raw[: len(raw) - cut])  # cut short: malformed
    _never_raises_and_is_bounded(b"[" * depth + raw + b"]" * depth)
    if isinstance(message, dict):
        _never_raises_and_is_bounded(with_field(raw, nested(depth)))


# -- outbound encodings -------------------------------------------------------------------


def test_warm_requested_leaves_out_unknown_context() -> None:
    request = WarmRequested(conversation_id="c", token=7, requested_at=1_760_000_000_000)
    assert as_json(request) == {
        "type": "warm.requested",
        "conversationId": "c",
        "token": 7,
        "requestedAt": 1_760_000_000_000,
    }


def test_warm_requested_with_context() -> None:
    request = WarmRequested(
        conversation_id="c", token=7, requested_at=1, cwd="/w", model_name="claude"
    )
    assert as_json(request) == {
        "type": "warm.requested",
        "conversationId": "c",
        "token": 7,
        "cwd": "/w",
        "modelName": "claude",
        "requestedAt": 1,
    }


def _state(**changes: Any) -> StateView:
    fields: dict[str, Any] = {
        "enabled": False,
        "interval_ms": 240_000,
        "active": False,
        "status": "disabled",
        "last_pct": None,
        "last_expected_pct": None,
        "last_warm_at": None,
        "next_warm_at": None,
        "last_error": None,
        "failures": 0,
    }
    fields.update(changes)
    return StateView(**fields)


def test_surface_changed_keeps_its_nulls() -> None:
    state = _state()
    update = SurfaceChanged(conversation_id="c", state=state, spec=build_panel(state), at=9)
    encoded = as_json(update)
    assert encoded["type"] == "surface.changed"
    assert encoded["conversationId"] == "c" and encoded["at"] == 9
    assert encoded["state"] == {
        "enabled": False,
        "intervalMs": 240_000,
        "active": False,
        "status": "disabled",
        "lastPct": None,
        "lastExpectedPct": None,
        "lastWarmAt": None,
        "nextWarmAt": None,
        "lastError": None,
        "failures": 0,
    }
    assert encoded["spec"]["id"] == "cache-warming"
    assert set(encoded) == {"type", "conversationId", "state", "spec", "at"}


def test_surface_changed_with_figures() -> None:
    state = _state(
        enabled=True,
        status="armed",
        last_pct=80,
        last_expected_pct=75,
        last_warm_at=10,
        next_warm_at=20,
        last_error="boom",
        failures=2,
    )
    encoded = as_json(
        SurfaceChanged(conversation_id="c", state=state, spec=build_panel(state), at=1)
    )
    assert encoded["state"]["lastPct"] == 80 and encoded["state"]["nextWarmAt"] == 20
    assert encoded["state"]["lastError"] == "boom" and encoded["state"]["failures"] == 2
    assert encoded["spec"]["fields"][-1] == {"kind": "stat", "label": "Last error", "value": "boom"}


def test_replies() -> None:
    settings = SettingsReply(settings=SettingsView(enabled=True, interval_ms=5000))
    assert as_json(settings) == {"ok": True, "settings": {"enabled": True, "intervalMs": 5000}}
    error = ErrorReply(error="actionId: unknown", code="unknown_action")
    assert as_json(error) == {"ok": False, "error": "actionId: unknown", "code": "unknown_action"}
    state = _state()
    reply = as_json(StateReply(state=state, spec=build_panel(state)))
    assert set(reply) == {"ok", "state", "spec"} and reply["ok"] is True


def test_the_default_panel_encoding() -> None:
    assert as_json(DEFAULT_PANEL) == {
        "id": "cache-warming",
        "region": "side",
        "title": "Cache Warming",
        "fields": [{"kind": "stat", "label": "Status", "value": "No conversation focused"}],
    }


def test_the_dash_is_an_em_dash() -> None:
    fields = as_json(build_panel(_state()))["fields"]
    assert fields[2]["value"] == "\u2014" == fields[3]["value"]
    assert encode(build_panel(_state())).count("\u2014".encode()) == 2
