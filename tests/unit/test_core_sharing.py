"""Equal values held once (``warmer.core.sharing``): shared, bounded, and invisible in a record."""

from __future__ import annotations

from warmer.contract import TurnStarted
from warmer.core import Record, Settings, Status, Warmer, decode_record, encode_record
from warmer.core.sharing import Sharing
from warmer.core.state import Conversation

T0 = 1_760_000_000_000


def _fresh(text: str) -> str:
    """An equal string that is not the same object (as each decoded record holds)."""
    return "".join(list(text))


def _stored(i: int) -> bytes:
    """Conversation ``i``'s record as the store hands it back: every value its own object."""
    now = T0 + i
    conv = Conversation(
        enabled=True,
        interval_ms=240_000,
        idle_since=now,
        phase=Status.ARMED,
        token=now * 1000,
        answered_token=now * 1000,
        next_warm_at=now + 240_000,
        last_warm_at=now,
        last_read_at=now,
        published_at=now,
        last_input_at=now,
        timeout_ms=60_000,
        cwd=f"/home/dev/project-{i % 3}",
        model_name="claude-sonnet-4-5",
    )
    return encode_record(Record(settings=Settings(True, 240_000), state=conv))


def test_an_equal_string_is_handed_back_as_the_one_held() -> None:
    sharing = Sharing()
    first = sharing.text(_fresh("/srv/app"))
    assert sharing.text(_fresh("/srv/app")) is first
    assert sharing.text(None) is None


def test_a_full_table_starts_over_instead_of_growing() -> None:
    sharing = Sharing(max_strings=2, max_chars=100, max_numbers=2)
    held = [sharing.text(_fresh(f"/p{i}")) for i in range(3)]  # the third clears the table
    assert sharing.text(_fresh("/p2")) is held[2]
    assert sharing.text(_fresh("/p0")) is not held[0]  # forgotten, shared from now on
    numbers = [sharing.number(int(f"{i}00000")) for i in range(1, 4)]
    assert sharing.number(int("300000")) is numbers[2]
    assert sharing.number(int("100000")) is not numbers[0]


def test_a_string_longer_than_the_character_budget_is_never_held() -> None:
    sharing = Sharing(max_chars=4)
    long = _fresh("/much/too/long")
    assert sharing.text(long) is long
    assert sharing.text(_fresh("/much/too/long")) is not long


def test_loaded_conversations_share_their_strings_numbers_and_equal_times() -> None:
    core = Warmer(records={f"c{i}": decode_record(_stored(i)) for i in range(6)}, adopt=True)
    convs = [core.get(f"c{i}") for i in range(6)]
    assert all(conv is not None for conv in convs)
    a, b, d = convs[0], convs[1], convs[3]
    assert a is not None and b is not None and d is not None
    assert a.cwd is d.cwd and a.cwd != b.cwd
    assert a.model_name is b.model_name
    assert a.interval_ms is b.interval_ms and a.timeout_ms is b.timeout_ms
    assert a.last_warm_at is a.last_read_at is a.published_at is a.last_input_at is a.idle_since
    assert a.answered_token is a.token


def test_sharing_changes_no_stored_byte() -> None:
    stored = {f"c{i}": _stored(i) for i in range(6)}
    core = Warmer(records={cid: decode_record(raw) for cid, raw in stored.items()}, adopt=True)
    assert {cid: encode_record(record) for cid, record in core.records()} == stored


def test_settings_the_state_carries_are_not_kept_apart_yet_read_and_stored_alike() -> None:
    stored = {"same": _stored(1), "other": _stored(2)}
    record = decode_record(stored["other"])
    differing = Record(settings=Settings(False, 300_000), state=record.state)
    stored["other"] = encode_record(differing)
    core = Warmer(records={cid: decode_record(raw) for cid, raw in stored.items()}, adopt=True)
    assert core.persisted("same") == Settings(True, 240_000)
    assert core.persisted("other") == Settings(False, 300_000)
    assert core._settings.keys() == {"other"}  # the one a state does not say
    assert {cid: encode_record(record) for cid, record in core.records()} == stored
    core.begin()
    for cid in stored:
        core.apply_event(T0 + 10, TurnStarted(conversation_id=cid, seq=10**6, at=T0 + 10))
    touched = core.touched()
    core.end()
    assert touched["same"] is not None and touched["same"].settings == Settings(True, 240_000)
    assert touched["other"] is not None and touched["other"].settings == Settings(False, 300_000)
