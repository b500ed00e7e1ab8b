"""Hostile bodies for the decoder's slow path (warmer.contract._reread): a body the typed
decoder refuses is read again as JSON.parse would (the last of a duplicated key wins, a
number beyond a double's range is infinite) and converted.

What is checked: nothing reaches the core that the typed decoder would refuse in the body
as JSON.parse reads it (a differential property), the depth limit holds on the slow path,
an error text is bounded and names the field that is wrong even when a value quotes a
path, and the numbers at the edges.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.unit.test_contract import _KINDS
from warmer.contract import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    MAX_ERROR_CHARS,
    Command,
    LifecycleEvent,
    Rejection,
    SetInterval,
    SetPolicy,
    SurfaceAction,
    TurnStarted,
    UnknownType,
    decode_command,
    decode_event,
)

_LOOSE = msgspec.json.Decoder(float_hook=float)
_TYPED: dict[bool, msgspec.json.Decoder[Any]] = {
    False: msgspec.json.Decoder(LifecycleEvent),
    True: msgspec.json.Decoder(Command),
}


def _pairs(*pairs: tuple[str, Any]) -> bytes:
    """A JSON object with the keys in order, duplicates kept (json.dumps of each part)."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()


# -- the differential property ----------------------------------------------------------

_KEYS = (
    "type",
    "conversationId",
    "seq",
    "at",
    "cwd",
    "modelName",
    "lastRequestAt",
    "usage",
    "cacheTtlS",
    "prefixTokens",
    "token",
    "error",
    "enabled",
    "intervalMs",
    "policy",
    "actionId",
    "payload",
    "other",
)
_TYPES = (*_KINDS, "set_policy", "bogus")
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2**53 - 1, 2**53, -1, 9007199254740, 9007199254741]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([-0.0, 1.0, 0.5, 1e308, 1e-320]),
    st.sampled_from(_TYPES),
    st.sampled_from(["a", "a\n", "a\x00", "x" * 201, "é" * 101, "fixed", "budget", ""]),
    st.text(max_size=8),
)
_USAGE = st.dictionaries(
    st.sampled_from(["inputTokens", "cacheReadTokens", "cacheWriteTokens", "outputTokens"]),
    _SCALARS,
    max_size=4,
)
_VALUES = st.one_of(_SCALARS, _USAGE, st.lists(_SCALARS, max_size=2))
_VALID_USAGE = {"inputTokens": 10, "cacheReadTokens": 5, "cacheWriteTokens": 1}
_REQUIRED: dict[str, list[tuple[str, Any]]] = {
    "warm.completed": [("usage", _VALID_USAGE)],
    "set_enabled": [("enabled", True)],
    "set_interval": [("intervalMs", 5_000)],
    "set_policy": [("policy", "budget")],
    "surface.action": [("actionId", "set-interval")],
}


@st.composite
def _bodies(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """A valid message of a random kind, with random pairs (duplicates of its keys among
    them) before, between or after its own: most are refused by the typed decoder, many
    of those read by the slow path."""
    kind = draw(st.sampled_from(_TYPES))
    pairs = [("type", kind), ("conversationId", "a"), *_REQUIRED.get(kind, [])]
    extras = draw(st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), max_size=5))
    for pair in extras:
        pairs.insert(draw(st.integers(0, len(pairs))), pair)
    return pairs


_BODIES = _bodies()
_LAST_ID_IS_A_NEWLINE = [("type", "turn.started"), ("conversationId", 5), ("conversationId", "\n")]


@settings(max_examples=1500, deadline=None)
@given(pairs=_BODIES, command=st.booleans())
@example(pairs=[("type", "turn.started"), ("conversationId", "a"), ("seq", 1.0)], command=False)
@example(pairs=[("type", "set_enabled"), ("conversationId", "a"), ("enabled", "1")], command=True)
@example(pairs=_LAST_ID_IS_A_NEWLINE, command=False)
def test_a_body_decodes_as_the_same_body_without_its_duplicates(
    pairs: list[tuple[str, Any]], command: bool
) -> None:
    """Whatever the slow path lets through, the typed decoder alone lets through in the
    body as JSON.parse reads it (the last of each key), re-encoded without duplicates, and
    as the same message; what it refuses stays refused, with the same code and text as that
    body gets. So no Meta constraint, post-init check, strictness or tag is bypassed by
    ``msgspec.convert``."""
    decode = decode_command if command else decode_event
    typed = _TYPED[command]
    raw = _pairs(*pairs)
    as_parsed = msgspec.json.encode(_LOOSE.decode(raw))
    got = decode(raw)
    try:
        message = typed.decode(as_parsed)
    except msgspec.ValidationError:
        assert isinstance(got, Rejection | UnknownType), (raw, got)
        assert got == decode(as_parsed), (raw, got)
    else:
        assert got == message, (raw, got, message)
    if isinstance(got, Rejection):
        assert len(got.error) <= MAX_ERROR_CHARS


# -- the depth limit on the slow path ---------------------------------------------------


def _nested(levels: int) -> str:
    """A value that, inside the top-level object, brings the depth to ``levels``."""
    arrays = levels - 1
    return "[" * arrays + "1" + "]" * arrays


@pytest.mark.parametrize("where", ["extra", "seq"])
def test_the_depth_limit_holds_on_the_slow_path(where: str) -> None:
    """A body that takes the slow path (a bad first ``seq``) at MAX_DEPTH levels is read;
    at one more it is ``invalid_json``, as on the typed path."""
    for levels, readable in ((MAX_DEPTH, True), (MAX_DEPTH + 1, False)):
        deep = _nested(levels)
        if where == "extra":
            text = f'{{"type":"turn.started","conversationId":"a","seq":"x","seq":1,"x":{deep}}}'
        else:  # the deep value is the refused duplicate itself
            text = f'{{"type":"turn.started","conversationId":"a","seq":{deep},"seq":1}}'
        got = decode_event(text.encode())
        if readable:
            assert got == TurnStarted(conversation_id="a", seq=1)
        else:
            assert got == Rejection(
                "invalid_json", f"body is nested more than {MAX_DEPTH} levels deep"
            )


# -- error texts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["zz - at `$.enabled`", "x" * 30_000 + " - at `$.enabled`", "matching regex - at `$.type`"],
)
def test_a_value_quoting_a_path_does_not_move_the_error_to_another_field(value: str) -> None:
    """msgspec quotes an enum value in its message, before the path: a value that itself
    ends in " - at `$.enabled`" made the error name ``enabled`` (and a value with
    "matching regex" in it was described as a control character in the id). Fixed: the
    path is the last one in the message."""
    got = decode_command(_pairs(("type", "set_policy"), ("conversationId", "a"), ("policy", value)))
    assert isinstance(got, Rejection) and got.code == "invalid_field"
    assert got.error.startswith("set_policy: policy: Invalid enum value "), got.error
    assert len(got.error) <= MAX_ERROR_CHARS


def test_a_near_64_kib_body_of_duplicates_is_read_last_wins_and_errors_stay_short() -> None:
    head = '{"type":"set_interval","conversationId":"a","intervalMs":"x"'
    repeat = ',"intervalMs":' + json.dumps("y" * 100)
    count = (MAX_BODY_BYTES - len(head) - 40) // len(repeat)
    raw = (head + repeat * count + ',"intervalMs":2500}').encode()
    assert len(raw) <= MAX_BODY_BYTES
    assert decode_command(raw) == SetInterval(conversation_id="a", interval_ms=2500)
    refused = decode_command(raw.replace(b',"intervalMs":2500}', b"}"))
    assert refused == Rejection(
        "invalid_field", "set_interval: intervalMs: Expected `int | float`, got `str`"
    )
    # A duplicated type, each one long: the last is the one told (cut in logs by `shown`).
    long_types = _pairs(("type", "q" * 30_000), ("conversationId", "a"), ("type", "z" * 30_000))
    unknown = decode_command(long_types)
    assert isinstance(unknown, UnknownType) and unknown.type == "z" * 30_000
    assert len(unknown.shown) == 64


def test_duplicates_read_as_json_parse_does() -> None:
    """The cases of the brief: valid only after last-wins, an unknown last type, a null or
    numeric last type, a bad earlier value inside a nested object, -0 and 1e-400."""
    assert decode_event(
        _pairs(("type", "turn.started"), ("conversationId", 5), ("conversationId", "a"))
    ) == TurnStarted(conversation_id="a")
    assert decode_event(
        _pairs(("type", "turn.started"), ("conversationId", "a"), ("type", "bogus"))
    ) == UnknownType("bogus")
    assert decode_command(
        _pairs(("type", "get_state"), ("conversationId", "a"), ("type", "bogus"))
    ) == UnknownType("bogus")
    assert decode_command(
        _pairs(("type", "get_state"), ("conversationId", "a"), ("type", None))
    ) == Rejection("invalid_field", "type: missing or null")
    assert decode_command(
        _pairs(
            ("type", "set_policy"), ("conversationId", "a"), ("policy", "x"), ("policy", "budget")
        )
    ) == SetPolicy(conversation_id="a", policy="budget")
    assert decode_event(b'{"type":"turn.started","conversationId":"a","seq":-0}') == TurnStarted(
        conversation_id="a", seq=0
    )
    assert decode_command(
        b'{"type":"set_interval","conversationId":"a","intervalMs":1e-400}'
    ) == SetInterval(conversation_id="a", interval_ms=0.0)
    # NaN-like strings are strings; NaN and Infinity are no JSON.
    nan_string = b'{"type":"set_interval","conversationId":"a","intervalMs":"NaN"}'
    assert decode_command(nan_string) == Rejection(
        "invalid_field", "set_interval: intervalMs: Expected `int | float`, got `str`"
    )
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        raw = b'{"type":"set_interval","conversationId":"a","intervalMs":' + literal + b"}"
        got = decode_command(raw)
        assert isinstance(got, Rejection) and got.code == "invalid_json", literal
    # Invalid UTF-8 in the refused duplicate: the whole body is refused, before any read.
    raw = b'{"type":"turn.started","conversationId":"\xff","conversationId":"a"}'
    assert decode_event(raw) == Rejection(
        "invalid_json", "body is not UTF-8: invalid start byte at byte 41"
    )


# -- numbers beyond a double, written as integers ------------------------------------------

_HUGE = "1" + "0" * 4400  # beyond a double (JSON.parse: Infinity) and Python's 4300 digits


def test_an_integer_literal_beyond_a_double_is_clamped_as_1e400_is() -> None:
    """4400 digits: beyond Python's int-from-text limit (4300), where msgspec only errs
    ("Integer value out of range"): the body was invalid_json, a command dead-lettered with
    no reply, where decision 6 clamps 1e400. Fixed: read as 1e400 (JSON.parse: Infinity)."""
    for sign, clamped in (("", float("inf")), ("-", float("-inf"))):
        raw = f'{{"type":"set_interval","conversationId":"a","intervalMs":{sign}{_HUGE}}}'
        assert decode_command(raw.encode()) == SetInterval(conversation_id="a", interval_ms=clamped)
    action = _pairs(
        ("type", "surface.action"), ("conversationId", "a"), ("actionId", "set-interval")
    ).replace(b"}", f',"payload":{{"value":{_HUGE}}}}}'.encode())
    assert decode_command(action) == SurfaceAction(
        conversation_id="a", action_id="set-interval", payload={"value": float("inf")}
    )


def test_an_integer_literal_beyond_a_double_is_a_field_error_where_an_integer_is_taken() -> None:
    """seq 1e400 is invalid_field; the same number in 4400 digits was invalid_json (an
    encoding error: dead-lettered even as a command). Now the same invalid_field."""
    raw = f'{{"type":"turn.started","conversationId":"a","seq":{_HUGE}}}'.encode()
    assert decode_event(raw) == Rejection(
        "invalid_field", "turn.started: seq: Expected `int | null`, got `float`"
    )


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (f"0{_HUGE}", "JSON is malformed: invalid number (byte 51)"),  # a leading zero
        (f"-0{_HUGE}", "JSON is malformed: invalid number (byte 52)"),
        (f"{_HUGE}x", "Integer value out of range - at `$[...]`"),  # not a whole literal
        (f"{_HUGE}, x", "Integer value out of range - at `$[...]`"),  # malformed later
        # Digits of another script after a huge ASCII literal: not taken for a number.
        (_HUGE + ', "x": 1' + "\u0660" * 400, "Integer value out of range - at `$[...]`"),
    ],
)
def test_a_malformed_body_with_a_huge_integer_stays_malformed(value: str, error: str) -> None:
    raw = f'{{"type":"turn.started","conversationId":"a","seq":{value}}}'.encode()
    assert decode_event(raw) == Rejection("invalid_json", f"body is not JSON: {error}")


def test_a_huge_integer_inside_a_string_is_left_as_it_is() -> None:
    raw = _pairs(("type", "turn.started"), ("conversationId", 'a"' + _HUGE), ("seq", "x"))
    raw = raw.replace(b'"x"}', f"{_HUGE}}}".encode())
    got = decode_event(raw)
    assert got == Rejection(
        "invalid_field", "turn.started: conversationId: Expected `str` of length <= 200"
    )


def test_an_integer_literal_beyond_a_double_within_python_s_limit_is_clamped() -> None:
    """Up to 4300 digits it is an int, clamped for intervalMs, beyond seq's range."""
    big = "1" + "0" * 400
    raw = f'{{"type":"set_interval","conversationId":"a","intervalMs":{big}}}'.encode()
    assert decode_command(raw) == SetInterval(conversation_id="a", interval_ms=10**400)
    raw = f'{{"type":"turn.started","conversationId":"a","seq":{big}}}'.encode()
    got = decode_event(raw)
    assert isinstance(got, Rejection) and got.code == "invalid_field"
    assert got.error == "turn.started: seq: Expected `int` <= 9007199254740991"


@pytest.mark.parametrize("number", [f"1e-{_HUGE}", f"1e+{_HUGE}", f"1.{_HUGE}", f"-{_HUGE}.5"])
def test_a_float_with_huge_digits_beside_a_huge_integer_is_read_as_a_float(number: str) -> None:
    """Only whole integer literals are read as 1e400: an exponent's or a fraction's digits
    are a float's, which the float hook reads as it is."""
    raw = f'{{"type":"turn.started","conversationId":"a","seq":{_HUGE},"x":{number}}}'.encode()
    assert decode_event(raw) == Rejection(
        "invalid_field", "turn.started: seq: Expected `int | null`, got `float`"
    )
