"""Start-up and retention: records restored, ``recover`` (docs/semantics.md, addition 3), ``prune``.

The worker builds the core from the stored records, opens a batch, calls ``recover(now)``,
commits what it touched and arms the timers it returns. Every rule is checked here with
an explicit ``now``; times are offsets from it.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmer.contract import CostPolicyName, TurnSettled, TurnStarted, WarmCompleted
from warmer.core import (
    Arm,
    Conversation,
    Policy,
    PublishWarm,
    Record,
    Recovery,
    Settings,
    Status,
    Warmer,
    WarmFailed,
)
from warmer.core.retention import RETENTION_PAUSE_MS

NOW = 1_760_000_000_000
START = NOW * 1000  # where the restarted counter starts (rules.token_start)
INTERVAL = 240_000
TTL = 300_000
C = "conv-1"


def conv(phase: Status = Status.IDLE, **fields: Any) -> Conversation:
    """A conversation as a record holds it; armed ones due in one minute by default."""
    if phase in (Status.ARMED, Status.RETRYING):
        fields.setdefault("next_warm_at", NOW + 60_000)
    fields.setdefault("enabled", True)
    fields.setdefault("interval_ms", INTERVAL)
    fields.setdefault("idle_since", NOW - 60_000)
    fields.setdefault("token", 100)
    fields.setdefault("last_input_at", NOW - 60_000)
    return Conversation(phase=phase, **fields)


def record(state: Conversation | None = None, settings: Settings | None = None) -> Record:
    if settings is None:
        settings = Settings(True, INTERVAL) if state is None else Settings(state.enabled, INTERVAL)
    return Record(settings=settings, state=state)


def restore(
    records: dict[str, Record], now: int = NOW, policy: Policy | None = None, **kwargs: Any
) -> tuple[Warmer, Recovery, dict[str, Record | None]]:
    """A restarted core: built from ``records``, recovered at ``now`` inside a batch."""
    warmer = Warmer(policy or Policy(), token_start=START, records=records, **kwargs)
    warmer.begin()
    recovery = warmer.recover(now)
    touched = warmer.touched()
    warmer.end()
    return warmer, recovery, touched


def counts(recovery: Recovery) -> tuple[int, int, int, int, int]:
    r = recovery
    return (r.loaded, r.rearmed, r.awaited, r.warmed_now, r.expired)


# -- restoring -----------------------------------------------------------------------------


def test_restoring_copies_the_states_and_the_settings() -> None:
    state = conv(Status.ARMED, cwd="/w")
    warmer = Warmer(records={C: record(state, Settings(True, 5_000))}, token_start=START)
    assert warmer.get(C) == state and warmer.get(C) is not state
    assert warmer.persisted(C) == Settings(True, 5_000)
    assert warmer.last_token == START


def test_the_token_counter_never_starts_below_a_stored_token() -> None:
    warmer = Warmer(records={C: record(conv(token=START + 5))}, token_start=START)
    assert warmer.last_token == START + 5


def test_a_record_wins_over_older_settings_of_the_same_conversation() -> None:
    warmer = Warmer(
        settings={C: Settings(False, 1_000), "old": Settings(True, 2_000)},
        records={C: record(conv(), Settings(True, 5_000))},
    )
    assert warmer.persisted(C) == Settings(True, 5_000)
    assert warmer.persisted("old") == Settings(True, 2_000) and warmer.get("old") is None


# -- recover: re-armed as they were --------------------------------------------------------


@pytest.mark.parametrize("phase", [Status.ARMED, Status.RETRYING])
@pytest.mark.parametrize("due", [NOW, NOW + 1, NOW + 200_000])
def test_a_pending_timer_due_later_is_rearmed_with_its_token(phase: Status, due: int) -> None:
    state = conv(phase, next_warm_at=due, token=START - 7)
    warmer, recovery, touched = restore({C: record(state)})
    assert recovery.arms == [Arm(C, due, START - 7)]
    assert counts(recovery) == (1, 1, 0, 0, 0)
    assert warmer.get(C) == state and touched == {}


# -- recover: a schedule stored on a time line ahead of this run's -------------------------

_AHEAD = 2 * 3_600_000  # the wall stepped back 2 h before the restart: more than resume takes


@pytest.mark.parametrize("phase", [Status.ARMED, Status.RETRYING])
def test_a_schedule_due_more_than_an_interval_ahead_is_moved_to_one_interval_from_now(
    phase: Status,
) -> None:
    """No schedule is armed more than one effective interval ahead: one due further was
    stored on a line ahead of this run's. It warms within an interval, not 2 h later, and
    its new due time is persisted."""
    state = conv(
        phase,
        next_warm_at=NOW + _AHEAD + 60_000,
        token=77,
        idle_since=NOW + _AHEAD - 180_000,
        last_input_at=NOW + _AHEAD - 180_000,
    )
    warmer, recovery, touched = restore({C: record(state)})
    assert recovery.arms == [Arm(C, NOW + INTERVAL, 77)]
    assert counts(recovery) == (1, 1, 0, 0, 0) and recovery.moved_earlier == 1
    after = warmer.get(C)
    assert after is not None and after.phase is phase and after.next_warm_at == NOW + INTERVAL
    assert touched == {C: Record(settings=Settings(True, INTERVAL), state=after)}
    # It then warms as any armed schedule does: its cache was read on the same line.
    out = warmer.on_timer(NOW + INTERVAL, C, 77)
    assert [type(e) for e in out.effects if isinstance(e, PublishWarm)] == [PublishWarm]


def test_the_bound_is_the_effective_interval_and_a_schedule_at_it_stays() -> None:
    """With a known TTL of 2 min the effective interval is 1 min (TTL - margin): due in
    exactly a minute stays as it is, a millisecond later is moved to a minute."""
    ttl = 120_000
    states = {
        "at": conv(Status.ARMED, next_warm_at=NOW + 60_000, cache_ttl_ms=ttl, token=1),
        "over": conv(Status.ARMED, next_warm_at=NOW + 60_001, cache_ttl_ms=ttl, token=2),
    }
    warmer, recovery, touched = restore({cid: record(state) for cid, state in states.items()})
    assert sorted(recovery.arms, key=lambda arm: arm.token) == [
        Arm("at", NOW + 60_000, 1),
        Arm("over", NOW + 60_000, 2),
    ]
    assert recovery.moved_earlier == 1 and set(touched) == {"over"}
    assert warmer.get("at") == states["at"]


def test_a_warm_out_on_a_line_ahead_is_awaited_at_most_its_timeout_from_now() -> None:
    state = conv(Status.WARMING, published_at=NOW + _AHEAD, timeout_ms=60_000, token=77)
    _, recovery, touched = restore({C: record(state)})
    assert recovery.arms == [Arm(C, NOW + 60_000, 77)]
    assert counts(recovery) == (1, 0, 1, 0, 0) and touched == {}


# -- recover: a warm that was out ----------------------------------------------------------


def test_a_warm_out_is_awaited_until_its_own_timeout() -> None:
    state = conv(Status.WARMING, published_at=NOW - 10_000, timeout_ms=60_000, token=77)
    warmer, recovery, touched = restore({C: record(state)})
    assert recovery.arms == [Arm(C, NOW + 50_000, 77)]
    assert counts(recovery) == (1, 0, 1, 0, 0) and touched == {}
    assert warmer.is_awaiting(C, 77)


def test_its_completion_with_the_token_from_before_the_crash_is_applied_as_current(
    make_usage: Any,
) -> None:
    state = conv(Status.WARMING, published_at=NOW - 10_000, timeout_ms=60_000, token=77)
    warmer, _, _ = restore({C: record(state)})
    event = WarmCompleted(conversation_id=C, token=77, usage=make_usage())
    out = warmer.apply_event(NOW + 1_000, event)
    arms = [e for e in out.effects if isinstance(e, Arm)]
    after = warmer.get(C)
    assert out.verdict == "applied" and after is not None
    assert after.phase is Status.ARMED and after.answered_token == 77 and after.last_pct == 80
    assert arms == [Arm(C, NOW + 1_000 + INTERVAL, START + 1)]
    assert warmer.apply_event(NOW + 2_000, event).verdict == "stale"


def test_a_timeout_already_past_fires_at_once_and_fails_by_the_normal_rules() -> None:
    state = conv(Status.WARMING, published_at=NOW - 90_000, timeout_ms=60_000, token=77)
    warmer, recovery, _ = restore({C: record(state)})
    assert recovery.arms == [Arm(C, NOW, 77)]
    out = warmer.on_timer(NOW, C, 77)
    failed = [e for e in out.effects if isinstance(e, WarmFailed)]
    assert failed == [WarmFailed(C, 77, "no completion within 60 s", 1, False, "timeout")]
    after = warmer.get(C)
    assert after is not None and after.phase is Status.RETRYING and after.token == START + 1


# -- recover: fell due while down ----------------------------------------------------------


def test_overdue_with_the_cache_alive_warms_at_once() -> None:
    state = conv(Status.ARMED, next_warm_at=NOW - 5_000, last_read_at=NOW - TTL + 1, token=9)
    warmer, recovery, touched = restore({C: record(state)})
    assert recovery.arms == [Arm(C, NOW, 9)]
    assert counts(recovery) == (1, 0, 0, 1, 0)
    after = warmer.get(C)
    assert after is not None and after.phase is Status.ARMED and after.next_warm_at == NOW
    assert touched == {C: Record(settings=Settings(True, INTERVAL), state=after)}
    out = warmer.on_timer(NOW, C, 9)
    assert [e.request.token for e in out.effects if isinstance(e, PublishWarm)] == [9]


def test_overdue_without_a_known_read_counts_from_when_it_went_idle() -> None:
    alive = conv(Status.RETRYING, next_warm_at=NOW - 1, idle_since=NOW - TTL + 1)
    gone = conv(Status.RETRYING, next_warm_at=NOW - 1, idle_since=NOW - TTL)
    _, recovery, _ = restore({"alive": record(alive), "gone": record(gone)})
    assert [a.conversation_id for a in recovery.arms] == ["alive"]
    assert counts(recovery) == (2, 0, 0, 1, 1)


@pytest.mark.parametrize("read", [NOW - TTL, NOW - TTL - 1, NOW - 3_600_000])
def test_overdue_with_the_cache_gone_waits_for_its_next_turn(read: int) -> None:
    state = conv(Status.ARMED, next_warm_at=NOW - 1_000, last_read_at=read)
    warmer, recovery, touched = restore({C: record(state)})
    assert recovery.arms == [] and counts(recovery) == (1, 0, 0, 0, 1)
    after = warmer.get(C)
    # The late-fire guard (docs/economics.md): expired, and shown why.
    assert after is not None and after.status == "expired" and after.next_warm_at is None
    assert after.hold == "expired"
    assert after.token == state.token
    assert touched == {C: Record(settings=Settings(True, INTERVAL), state=after)}
    # Its next turn arms it as usual.
    warmer.apply_event(NOW + 5, TurnSettled(conversation_id=C))
    assert warmer.get(C).status == "armed"  # type: ignore[union-attr]


def test_a_warm_moved_beyond_the_idle_budget_time_is_not_armed() -> None:
    # Due at the very end of the stretch's budget, then the worker was down: warming at
    # once would be a warm due after stretch start + idle max (addition 4).
    idle_max = Policy().idle_max_ms
    state = conv(
        Status.ARMED,
        idle_since=NOW - idle_max,
        next_warm_at=NOW - 1,
        last_read_at=NOW - 60_000,
    )
    within = conv(Status.ARMED, idle_since=NOW - idle_max, next_warm_at=NOW - 2, last_read_at=NOW)
    warmer, recovery, touched = restore({"late": record(state), "within": record(within)})
    assert recovery.arms == [Arm("within", NOW, within.token)]
    assert counts(recovery) == (2, 0, 0, 1, 1)
    late = warmer.get("late")
    assert late is not None and late.status == "budget_exhausted" and late.next_warm_at is None
    assert set(touched) == {"late", "within"}


@pytest.mark.parametrize(
    ("deployment", "own", "warmed"),
    [
        ("adaptive", None, True),
        ("fixed", "adaptive", True),
        ("adaptive", "fixed", False),
        ("budget", None, False),
    ],
)
def test_recovery_applies_the_idle_budget_as_the_running_worker_does(
    deployment: CostPolicyName, own: CostPolicyName | None, warmed: bool
) -> None:
    # Decision 46: the idle budget binds fixed and budget, not adaptive, at every arm:
    # a restart that moves a warm past the budget's time must judge it the same way.
    idle_max = Policy().idle_max_ms
    state = conv(
        Status.ARMED,
        idle_since=NOW - 2 * idle_max,
        next_warm_at=NOW - 1,
        last_read_at=NOW - 60_000,
        idle_warms=Policy().idle_max_warms + 5,
        policy=own,
    )
    settings = Settings(True, INTERVAL, own)
    policy = Policy(cost_policy=deployment)
    warmer, recovery, _ = restore({C: record(state, settings)}, policy=policy)
    late = warmer.get(C)
    assert late is not None
    if warmed:
        assert recovery.arms == [Arm(C, NOW, state.token)] and late.status == "armed"
    else:
        assert recovery.arms == [] and late.status == "budget_exhausted"


def test_the_cache_ttl_is_a_policy() -> None:
    state = conv(Status.ARMED, next_warm_at=NOW - 1_000, last_read_at=NOW - 400_000)
    _, recovery, _ = restore({C: record(state)}, policy=Policy(cache_ttl_ms=3_600_000))
    assert recovery.warmed_now == 1


def test_a_burst_is_spread_most_overdue_first() -> None:
    records = {
        f"c{i}": record(conv(Status.ARMED, next_warm_at=NOW - 1_000 * (i + 1), last_read_at=NOW))
        for i in range(3)
    }
    _, recovery, _ = restore(records)
    assert [(a.conversation_id, a.due_at) for a in recovery.arms] == [
        ("c2", NOW),
        ("c1", NOW + 50),
        ("c0", NOW + 100),
    ]


@pytest.mark.parametrize(("count", "spread_ms"), [(100, 5_000), (1_000, 5_000), (7, 100)])
def test_a_large_burst_stays_within_the_spread_window(count: int, spread_ms: int) -> None:
    records = {
        f"c{i:04d}": record(conv(Status.ARMED, next_warm_at=NOW - 1, last_read_at=NOW))
        for i in range(count)
    }
    policy = Policy(recovery_spread_ms=spread_ms)
    _, recovery, touched = restore(records, policy=policy)
    dues = [a.due_at for a in recovery.arms]
    assert recovery.warmed_now == count == len(touched)
    assert dues == sorted(dues) and dues[0] == NOW and dues[-1] < NOW + spread_ms
    assert len(set(dues)) == count, "no two warms of the burst in the same instant"
    assert dues[1] - dues[0] == min(50, spread_ms // count)


# -- recover: what stays as it is ----------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        conv(Status.PAUSED, failures=3),
        conv(Status.BUDGET_EXHAUSTED),
        conv(Status.IDLE),
        conv(Status.IDLE, enabled=False),
        conv(Status.IDLE, active=True),
        conv(Status.IDLE, enabled=False, active=True),
    ],
    ids=["paused", "budget_exhausted", "idle", "disabled", "active", "disabled_active"],
)
def test_other_statuses_stay_as_they_are_without_a_timer(state: Conversation) -> None:
    warmer, recovery, touched = restore({C: record(state)})
    assert recovery.arms == [] and counts(recovery) == (1, 0, 0, 0, 0)
    assert warmer.get(C) == state and touched == {}


# -- recover: records from an older store --------------------------------------------------


def test_settings_only_records_get_a_state_as_a_first_input_would() -> None:
    warmer, recovery, touched = restore(
        {C: record(None, Settings(True, 5_000)), "off": record(None, Settings(False, 1_000))},
        settings={"older": Settings(True, 2_000)},
    )
    assert counts(recovery) == (3, 0, 0, 0, 0) and recovery.arms == []
    assert set(touched) == {C, "off", "older"}
    state = warmer.get(C)
    assert state is not None and state.status == "idle" and state.interval_ms == 5_000
    assert state.idle_since == NOW and state.last_input_at == NOW
    assert touched[C] == Record(settings=Settings(True, 5_000), state=state)
    assert warmer.get("off").status == "disabled"  # type: ignore[union-attr]
    assert warmer.get("older").interval_ms == 2_000  # type: ignore[union-attr]


def test_an_unknown_last_input_counts_from_now_and_is_persisted() -> None:
    state = conv(Status.ARMED, last_input_at=0)
    warmer, recovery, touched = restore({C: record(state)})
    assert recovery.rearmed == 1
    after = warmer.get(C)
    assert after is not None and after.last_input_at == NOW
    assert touched == {C: Record(settings=Settings(True, INTERVAL), state=after)}


# -- after recovery the machine goes on ----------------------------------------------------


def test_after_recovery_the_rearmed_timer_fires_and_new_tokens_are_above_the_start() -> None:
    state = conv(Status.ARMED, next_warm_at=NOW + 1_000, token=START - 50, cwd="/w")
    warmer, recovery, _ = restore({C: record(state)})
    (arm,) = recovery.arms
    out = warmer.on_timer(arm.due_at, C, arm.token)
    warms = [e for e in out.effects if isinstance(e, PublishWarm)]
    assert [(w.request.token, w.request.cwd) for w in warms] == [(START - 50, "/w")]
    timeouts = [e for e in out.effects if isinstance(e, Arm)]
    assert timeouts == [Arm(C, NOW + 1_000 + 60_000, START - 50)]
    # The warm's completion re-arms with a token from the new counter.
    warmer.apply_event(
        NOW + 2_000,
        WarmCompleted(conversation_id=C, token=START - 50, error="provider error"),
    )
    after = warmer.get(C)
    assert after is not None and after.phase is Status.RETRYING and after.token == START + 1
    assert after.answered_token == START - 50


def test_a_shell_restarted_from_its_store_picks_up_its_schedules(make_shell: Any) -> None:
    # One worker runs, is killed (nothing but the store survives) and a new one starts.
    before = make_shell(token_start=START)
    before.set_enabled("armed", True)
    before.settled("armed", cwd="/a", seq=3)
    before.set_enabled("warming", True)
    before.set_interval("warming", 10_000)
    before.settled("warming")
    before.fire("warming")
    before.set_interval("off", 5_000)
    states = {cid: before.warmer.get(cid) for cid in ("armed", "warming", "off")}
    assert set(before.records()) == set(states)
    committed = dict(before.store.records)

    after = before.restarted(before.now + 1_000)
    assert after.store.records == committed, "recovery had nothing to change"
    assert counts(after.recovery) == (3, 1, 1, 0, 0)
    assert {cid: after.warmer.get(cid) for cid in states} == states
    assert after.timers == {cid: before.timers[cid] for cid in ("armed", "warming")}, (
        "the timers are those the old worker had"
    )
    assert after.settled("armed", seq=3).verdict == "stale", "the last seq survived"
    timeout = after.fire("warming")  # the warm out before the crash times out
    assert isinstance(timeout.effects[0], WarmFailed)
    assert after.conv("warming").token > before.warmer.last_token


# -- what recovery and retention read ------------------------------------------------------


def test_a_settle_records_when_the_provider_read_the_cache(shell: Any) -> None:
    now = shell.now
    shell.settled(C, last_request_at=now - 90_000)
    assert shell.conv(C).last_read_at == now - 90_000
    shell.settled(C, last_request_at=now + 1_500)  # up to 2 s ahead counts as now
    assert shell.conv(C).last_read_at == now
    shell.advance(10)
    shell.settled(C, last_request_at=shell.now + 5_000)  # further ahead is ignored
    assert shell.conv(C).last_read_at == shell.now
    shell.advance(10)
    shell.settled(C)
    assert shell.conv(C).last_read_at == shell.now


def test_a_completion_with_usage_is_a_read_an_error_is_not(shell: Any) -> None:
    shell.settled(C)
    read = shell.now
    shell.advance(1_000)
    shell.completed(C, error="boom")
    assert shell.conv(C).last_read_at == read
    shell.advance(1_000)
    shell.completed(C)
    assert shell.conv(C).last_read_at == shell.now


def test_only_applied_inputs_count_as_input(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, seq=5)
    applied = shell.now
    assert shell.conv(C).last_input_at == applied
    shell.advance(1_000)
    shell.settled(C, seq=4)  # stale
    shell.get_state(C)
    shell.fire_token(C, 1)  # stale timer
    shell.completed(C, token=1)  # stale completion
    assert shell.conv(C).last_input_at == applied
    shell.fire(C)
    assert shell.conv(C).last_input_at == shell.now


# -- prune ---------------------------------------------------------------------------------


def test_prune_forgets_state_and_settings_after_the_retention_time(make_shell: Any) -> None:
    shell = make_shell(Policy(retention_ms=10_000))
    shell.set_interval("old", 5_000)
    shell.advance(5_000)
    shell.started("recent")
    shell.advance(5_001)  # old: 10,001 ms without input; recent: 5,001
    shell.warmer.begin()
    assert shell.warmer.prune(shell.now) == ["old"]
    assert shell.warmer.touched() == {"old": None}
    shell.warmer.end()
    assert shell.warmer.get("old") is None and shell.warmer.persisted("old") == Settings()
    assert shell.warmer.get("recent") is not None
    # A pruned conversation that comes back starts afresh.
    shell.set_enabled("old", True)
    assert shell.warmer.persisted("old") == Settings(True, 240_000)


def test_prune_keeps_what_was_used_exactly_at_the_limit_and_unknown_times() -> None:
    warmer = Warmer(
        Policy(retention_ms=1_000),
        records={
            "limit": record(conv(last_input_at=NOW - 1_000)),
            "unknown": record(conv(last_input_at=0)),
            "over": record(conv(last_input_at=NOW - 1_001)),
        },
    )
    assert warmer.prune(NOW) == ["over"]
    assert len(warmer) == 2


@pytest.mark.parametrize("retention", [1_000, 30 * 60_000, 7 * 24 * 3_600_000])
def test_prune_forgets_a_conversation_at_the_first_check_past_the_retention_time(
    retention: int,
) -> None:
    # Checks between full scans look at the candidates of the last scan only: one whose
    # time comes between two scans must be among them, or it is forgotten up to an hour
    # late. Here the scan happens while it is still within the retention time.
    last = NOW - 60_000
    warmer = Warmer(Policy(retention_ms=retention), records={C: record(conv(last_input_at=last))})
    limit = last + retention
    for now in (limit - 30 * 60_000, limit - 1, limit):
        assert warmer.prune(now) == [], now
    assert warmer.prune(limit + 1) == [C]
    assert warmer.get(C) is None


_DAY = 86_400_000
_WEEK = 7 * _DAY


def test_a_restart_does_not_count_the_time_since_the_newest_stored_input() -> None:
    """The store's newest input is 8 days old at start (a clock step the last run's times
    kept, or 8 days down): every loaded last input moves on by those 8 days, persisted, so
    each conversation is forgotten once idle for the retention time beyond them; an input
    after the start is judged as it is."""
    lag = 8 * _DAY
    newest = NOW - lag
    warmer, recovery, touched = restore(
        {
            "newest": record(conv(last_input_at=newest)),
            "older": record(conv(last_input_at=newest - 6 * _DAY)),
            "stale": record(conv(last_input_at=newest - _WEEK - 1)),
            "off": record(conv(last_input_at=newest - _DAY, enabled=False)),
        }
    )
    assert recovery.retention_paused_ms == lag
    moved = {cid: r.state.last_input_at for cid, r in touched.items() if r and r.state}
    assert moved == {
        "newest": NOW,
        "older": NOW - 6 * _DAY,
        "stale": NOW - _WEEK - 1,
        "off": NOW - _DAY,
    }
    assert warmer.prune(NOW + 60_000) == ["stale"], "idle a week before the newest input"
    warmer.apply_event(NOW + 60_000, TurnStarted(conversation_id="new"))
    assert warmer.prune(NOW + _DAY) == []
    assert warmer.prune(NOW + _DAY + 1) == ["older"]  # 6 days + 1 day since the start
    assert warmer.prune(NOW + 6 * _DAY + 1) == ["off"]
    assert warmer.prune(NOW + _WEEK) == []
    assert warmer.prune(NOW + _WEEK + 1) == ["newest"]
    assert warmer.prune(NOW + 60_000 + _WEEK) == []
    assert warmer.prune(NOW + 60_000 + _WEEK + 1) == ["new"]


def test_a_pause_of_up_to_an_hour_counts_as_idleness() -> None:
    """An hour since the newest input is counted (nothing rewritten); a millisecond more
    is not. What the last run stored otherwise stays as it was."""
    at = record(conv(last_input_at=NOW - RETENTION_PAUSE_MS))
    _, recovery, touched = restore({C: at})
    assert recovery.retention_paused_ms == 0 and touched == {}
    over = record(conv(last_input_at=NOW - RETENTION_PAUSE_MS - 1, cwd="/w"))
    _, recovery, touched = restore({C: over})
    assert recovery.retention_paused_ms == RETENTION_PAUSE_MS + 1
    state = touched[C].state  # type: ignore[union-attr]
    assert state == conv(last_input_at=NOW, cwd="/w")


def test_an_ordinary_restart_prunes_as_before() -> None:
    """The newest stored input is 5 s old: nothing is moved, and a conversation past the
    retention time is forgotten at the first check, one a minute short of it a minute
    later, as without a restart (the check runs every minute)."""
    warmer, recovery, touched = restore(
        {
            "live": record(conv(last_input_at=NOW - 5_000)),
            "past": record(conv(last_input_at=NOW - _WEEK - 60_000)),
            "soon": record(conv(last_input_at=NOW - _WEEK + 65_000)),
        }
    )
    assert recovery.retention_paused_ms == 0 and touched == {}
    assert warmer.prune(NOW + 60_000) == ["past"]
    assert warmer.prune(NOW + 120_000) == ["soon"]
    assert [cid for cid in ("live", "past", "soon") if warmer.get(cid)] == ["live"]


def test_no_pause_when_the_stored_times_are_ahead_or_unknown() -> None:
    """Stored times ahead of now (a wall behind them, resume refused) or unknown (0, set
    to now) move nothing: a conversation is kept until idle for the retention time."""
    for last in (NOW + 3_600_000, 0):
        warmer, recovery, _ = restore({C: record(conv(last_input_at=last))})
        assert recovery.retention_paused_ms == 0
        limit = max(last, NOW) + _WEEK
        assert warmer.prune(limit) == []
        assert warmer.prune(limit + 1) == [C]


def test_prune_outside_a_batch_and_with_nothing_due_changes_nothing() -> None:
    warmer = Warmer(records={C: record(conv())})
    assert warmer.prune(NOW) == []
    assert warmer.get(C) is not None


_HOUR = 3_600_000
prune_steps = st.lists(
    st.one_of(
        st.tuples(st.just("input"), st.sampled_from("abcdef")),
        st.tuples(st.just("advance"), st.sampled_from([1, 60_000, 600_000, _HOUR, 3 * _HOUR])),
        st.tuples(st.just("prune"), st.booleans()),
        st.tuples(st.just("prune_rolled_back"), st.booleans()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    retention=st.sampled_from([0, 1_000, _HOUR // 2, 2 * _HOUR, 7 * 24 * _HOUR]), steps=prune_steps
)
def test_prune_forgets_exactly_what_a_full_scan_would(
    retention: int, steps: list[tuple[Any, ...]]
) -> None:
    # prune scans everything only about once an hour and checks its candidates in
    # between: it must still forget exactly what a scan of every conversation would.
    warmer = Warmer(Policy(retention_ms=retention))
    now = NOW
    for kind, arg in steps:
        if kind == "input":
            warmer.apply_event(now, TurnStarted(conversation_id=arg))
        elif kind == "advance":
            now += arg
        else:
            cutoff = now - retention
            expected = sorted(
                cid for cid in "abcdef" if (c := warmer.get(cid)) and c.last_input_at < cutoff
            )
            warmer.begin()
            before = {cid: warmer.get(cid) for cid in "abcdef"}
            assert sorted(warmer.prune(now)) == expected
            assert sorted(warmer.touched()) == expected
            if kind == "prune_rolled_back":
                warmer.rollback()
                assert {cid: warmer.get(cid) for cid in "abcdef"} == before
            warmer.end()
