"""The stored form of a conversation's record: round trips, sizes, and malformed bytes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmer.contract import MAX_SAFE_INTEGER
from warmer.core import (
    Conversation,
    Record,
    RecordError,
    Settings,
    Status,
    Warmer,
    decode_record,
    encode_record,
)

T0 = 1_760_000_000_000
TOKEN = T0 * 1000 + 7
I64 = 2**63 - 1


def conversation(phase: Status = Status.IDLE, **fields: Any) -> Conversation:
    """A conversation in ``phase`` with what that phase needs (a due time when timed)."""
    if phase in (Status.ARMED, Status.RETRYING):
        fields.setdefault("next_warm_at", T0 + 240_000)
    fields.setdefault("enabled", True)
    fields.setdefault("interval_ms", 240_000)
    fields.setdefault("idle_since", T0)
    return Conversation(phase=phase, **fields)


def typical() -> Record:
    """An armed conversation after a few turns and a warm, with its context."""
    return Record(
        settings=Settings(True, 240_000),
        state=conversation(
            Status.ARMED,
            token=TOKEN,
            last_pct=98,
            last_expected_pct=99,
            last_warm_at=T0 - 5_000,
            cwd="/home/dev/projects/warmer",
            model_name="claude-sonnet-4-5",
            last_seq=42,
            idle_warms=3,
            published_at=T0 - 5_000,
            timeout_ms=60_000,
            answered_token=TOKEN - 1,
            last_read_at=T0 - 5_000,
            last_input_at=T0,
        ),
    )


def round_trip(record: Record) -> Record:
    decoded = decode_record(encode_record(record))
    assert decoded == record
    return decoded


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("phase", list(Status), ids=lambda p: p.value)
def test_every_phase_round_trips(phase: Status) -> None:
    decoded = round_trip(Record(settings=Settings(True, 5_000), state=conversation(phase)))
    assert decoded.state is not None and decoded.state.phase is phase


@pytest.mark.parametrize("enabled", [False, True])
def test_a_settings_only_record_round_trips(enabled: bool) -> None:
    decoded = round_trip(Record(settings=Settings(enabled, 1_000)))
    assert decoded.state is None


def test_every_optional_field_none_round_trips() -> None:
    state = conversation(enabled=False)
    assert state.next_warm_at is None and state.last_seq is None and state.cwd is None
    round_trip(Record(settings=Settings(), state=state))


def test_a_typical_record_round_trips_and_is_small() -> None:
    body = encode_record(typical())
    assert decode_record(body) == typical()
    # No field names on disk: 164 bytes, 43 of them the cwd and the model name, 15 the
    # cost fields of a conversation that never said its TTL or prefix.
    assert len(body) <= 170


def test_every_field_set_round_trips_with_the_largest_values() -> None:
    state = conversation(
        Status.RETRYING,
        active=False,
        token=MAX_SAFE_INTEGER,
        next_warm_at=I64,
        failures=MAX_SAFE_INTEGER,
        last_pct=100,
        last_expected_pct=0,
        last_warm_at=I64,
        last_error="e" * 500,
        cwd="c" * 4096,
        model_name="m" * 256,
        last_seq=MAX_SAFE_INTEGER,
        idle_warms=MAX_SAFE_INTEGER,
        published_at=I64,
        timeout_ms=MAX_SAFE_INTEGER,
        answered_token=MAX_SAFE_INTEGER,
        last_read_at=I64,
        last_input_at=I64,
    )
    round_trip(Record(settings=Settings(True, 86_400_000), state=state))


def test_unicode_text_round_trips() -> None:
    state = conversation(
        cwd="/home/dév/项目/🔥", model_name="modèle-ß", last_error="échec: \u2014 \x00 ok"
    )
    round_trip(Record(settings=Settings(True, 1_000), state=state))


def test_an_older_record_without_the_newer_fields_reads_them_as_defaults() -> None:
    # Fields are only ever added at the end: an older record is a shorter array.
    body = msgspec.msgpack.encode([[True, 5_000], [True, 5_000, T0]])
    state = decode_record(body).state
    assert state is not None
    assert (state.answered_token, state.last_read_at, state.last_input_at) == (0, None, 0)


def test_a_newer_record_with_more_fields_still_reads() -> None:
    raw = msgspec.msgpack.decode(encode_record(typical()))
    raw[0].append("later setting")
    raw[1].append("later field")
    assert decode_record(msgspec.msgpack.encode(raw)) == typical()


def test_phase_is_stored_by_its_value() -> None:
    assert b"budget_exhausted" in encode_record(
        Record(settings=Settings(True), state=conversation(Status.BUDGET_EXHAUSTED))
    )


@settings(max_examples=200, deadline=None)
@given(
    phase=st.sampled_from(list(Status)),
    enabled=st.booleans(),
    interval=st.integers(1_000, 86_400_000),
    token=st.integers(0, MAX_SAFE_INTEGER),
    times=st.lists(st.integers(-(2**63), I64), min_size=4, max_size=4),
    texts=st.lists(st.none() | st.text(max_size=200), min_size=3, max_size=3),
    pct=st.none() | st.integers(0, 100),
    seq=st.none() | st.integers(0, MAX_SAFE_INTEGER),
)
def test_any_record_the_core_could_write_round_trips(
    phase: Status,
    enabled: bool,
    interval: int,
    token: int,
    times: list[int],
    texts: list[str | None],
    pct: int | None,
    seq: int | None,
) -> None:
    timed = phase in (Status.ARMED, Status.RETRYING)
    state = Conversation(
        enabled=enabled or phase.pending,
        interval_ms=interval,
        idle_since=times[0],
        phase=phase,
        token=token,
        next_warm_at=times[1] if timed else None,
        last_pct=pct,
        last_warm_at=times[2],
        last_error=texts[0],
        cwd=texts[1],
        model_name=texts[2],
        last_seq=seq,
        last_read_at=times[3],
        last_input_at=times[3],
    )
    round_trip(Record(settings=Settings(enabled, interval), state=state))


# -- malformed -----------------------------------------------------------------------------


def _typical_raw() -> list[Any]:
    raw: list[Any] = msgspec.msgpack.decode(encode_record(typical()))
    return raw


def _with(path: tuple[int, ...], value: Any) -> bytes:
    raw = _typical_raw()
    target = raw
    for i in path[:-1]:
        target = target[i]
    target[path[-1]] = value
    return msgspec.msgpack.encode(raw)


GARBAGE = {
    "empty": b"",
    "truncated": encode_record(typical())[:-3],
    "trailing bytes": encode_record(typical()) + b"\x00",
    "json": b'{"settings": {"enabled": true}}',
    "not msgpack": b"\xc1",
    "a number": msgspec.msgpack.encode(7),
    "a string": msgspec.msgpack.encode("record"),
    "nil": msgspec.msgpack.encode(None),
    "an empty array": msgspec.msgpack.encode([]),
    "a map": msgspec.msgpack.encode({"settings": [True, 1_000]}),
    "settings not an array": msgspec.msgpack.encode([True]),
    "enabled not a bool": _with((0, 0), 1),
    "interval too small": _with((0, 1), 999),
    "interval too large": _with((0, 1), 86_400_001),
    "interval a float": _with((0, 1), 1_000.0),
    "unknown phase": _with((1, 4), "sleeping"),
    "phase by index": _with((1, 4), 1),
    "negative token": _with((1, 5), -1),
    "token above 2^53": _with((1, 5), MAX_SAFE_INTEGER + 1),
    "pct above 100": _with((1, 8), 101),
    "error too long": _with((1, 11), "e" * 501),
    "cwd not text": _with((1, 12), b"/w"),
    "state missing its required fields": msgspec.msgpack.encode([[True, 1_000], [True]]),
    "armed without a due time": _with((1, 6), None),
    "idle with a due time": _with((1, 4), "idle"),
    "warming while disabled": msgspec.msgpack.encode(
        [[False, 1_000], [False, 1_000, T0, False, "warming"]]
    ),
    "armed while active": msgspec.msgpack.encode(
        [[True, 1_000], [True, 1_000, T0, True, "armed", 1, T0]]
    ),
    "deeply nested": b"\x91" * 100_000 + b"\xc0",
    "a huge length": b"\xdd\xff\xff\xff\xff",
}


@pytest.mark.parametrize("body", list(GARBAGE.values()), ids=list(GARBAGE))
def test_malformed_bytes_raise_a_record_error_in_one_line(body: bytes) -> None:
    with pytest.raises(RecordError) as caught:
        decode_record(body)
    message = str(caught.value)
    assert message.startswith("malformed record") and "\n" not in message
    assert isinstance(caught.value, ValueError)


@settings(max_examples=1_000, deadline=None)
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_a_record_error(body: bytes) -> None:
    try:
        decode_record(body)
    except RecordError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_a_typical_record_with_any_byte_changed_is_a_record_or_a_record_error(
    data: st.DataObject,
) -> None:
    body = bytearray(encode_record(typical()))
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    try:
        record = decode_record(bytes(body))
    except RecordError:
        return
    assert decode_record(encode_record(record)) == record


def test_a_core_copies_the_records_it_is_given_unless_it_adopts_them() -> None:
    state = Conversation(enabled=True, interval_ms=240_000, idle_since=5, token=9)
    records = {"c": Record(settings=Settings(True), state=state)}
    copied, adopted = Warmer(records=records), Warmer(records=records, adopt=True)
    assert copied.get("c") == state and copied.get("c") is not state
    assert adopted.get("c") is state  # App.start decodes them for its core alone
    assert copied.last_token == adopted.last_token == 9
