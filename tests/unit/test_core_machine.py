"""The state machine against docs/semantics.md: one test per rule, addition and race.

Each test drives a ``Warmer`` through the shell of ``conftest.py`` (the real worker) and reads
like the rule it checks. Times are relative to the shell's start, ``shell.now``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from msgspec import UNSET

from warmer.contract import (
    ConversationClosed,
    CustomField,
    ErrorReply,
    SetEnabled,
    SetInterval,
    StateReply,
    StatField,
    SurfaceAction,
    SurfaceChanged,
    Usage,
    WarmCompleted,
    encode,
)
from warmer.core import (
    DEFAULT_PANEL,
    Arm,
    Cancel,
    Outcome,
    Policy,
    PublishSurface,
    PublishWarm,
    SendReply,
    Settings,
    SettingsChange,
    Warmer,
    WarmFailed,
    build_panel,
)
from warmer.core.rules import NO_CONSUMER

C = "conv-1"
OTHER = "conv-2"
INTERVAL = 240_000
TIMEOUT = 60_000


def one_surface(outcome: Outcome) -> SurfaceChanged:
    """The one surface update an applied input publishes."""
    updates = [e.update for e in outcome.effects if isinstance(e, PublishSurface)]
    assert len(updates) == 1, outcome
    return updates[0]


def no_surface(outcome: Outcome) -> None:
    """A dropped, stale or invalid input publishes nothing."""
    assert not [e for e in outcome.effects if isinstance(e, PublishSurface)], outcome


def effects_of(outcome: Outcome, kind: type) -> list[Any]:
    return [e for e in outcome.effects if isinstance(e, kind)]


def as_json(value: msgspec.Struct) -> Any:
    return msgspec.json.decode(encode(value))


def snapshot(shell: Any, cid: str = C) -> Any:
    """Everything a test can see of a conversation, for a before/after comparison."""
    conv = shell.warmer.get(cid)
    return (
        None if conv is None else msgspec.structs.asdict(conv),
        shell.timers.get(cid),
        shell.warmer.last_token,
        shell.warmer.persisted(cid),
    )


def assert_rolled_back(before: Any, after: Any) -> None:
    """All is as before but the token counter, which never goes back (it may skip tokens)."""
    assert (after[0], after[1], after[3]) == (before[0], before[1], before[3])
    assert after[2] >= before[2]


# -- turn.started -------------------------------------------------------------------------


def test_turn_started_marks_active_cancels_and_publishes(shell: Any) -> None:
    shell.enabled_and_armed(C)
    token = shell.conv(C).token
    out = shell.started(C)
    assert out.verdict == "applied"
    assert effects_of(out, Cancel) == [Cancel(C)]
    assert C not in shell.timers
    conv = shell.conv(C)
    assert conv.active and conv.status == "active" and conv.next_warm_at is None
    assert conv.token == token  # cancelling does not change the token
    update = one_surface(out)
    assert update.state.status == "active" and update.state.next_warm_at is None
    assert update.state.active is True


def test_turn_started_for_a_conversation_never_seen(shell: Any) -> None:
    out = shell.started(C)
    assert shell.status(C) == "disabled"
    assert shell.conv(C).active
    assert one_surface(out).state.active is True
    assert not shell.timers


# -- turn.settled -------------------------------------------------------------------------


def test_turn_settled_when_disabled_arms_nothing(shell: Any) -> None:
    shell.started(C)
    out = shell.settled(C, cwd="/w")
    assert not shell.conv(C).active
    assert shell.status(C) == "disabled"
    assert not effects_of(out, Arm)
    assert one_surface(out).state.next_warm_at is None


def test_turn_settled_when_enabled_arms_one_interval_later(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.started(C)
    shell.advance(5_000)
    out = shell.settled(C)
    due = shell.now + INTERVAL
    [arm] = effects_of(out, Arm)
    assert arm.due_at == due and arm.token == shell.conv(C).token
    assert shell.timers[C] == (due, arm.token)
    assert shell.status(C) == "armed" and shell.conv(C).next_warm_at == due
    update = one_surface(out)
    assert update.state.status == "armed" and update.state.next_warm_at == due
    assert update.at == shell.now


def test_turn_settled_replaces_the_context_not_merges_it(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, cwd="/a", model_name="m")
    shell.settled(C, cwd="/b")
    shell.fire(C)
    assert shell.last_warm.cwd == "/b"
    assert shell.last_warm.model_name is UNSET
    assert as_json(shell.last_warm) == {
        "type": "warm.requested",
        "conversationId": C,
        "token": shell.conv(C).token,
        "cwd": "/b",
        "requestedAt": shell.now,
    }
    shell.settled(C, model_name="n")
    shell.fire(C)
    warm = shell.last_warm  # a new warm: what was asserted of the previous one no longer holds
    assert warm.cwd is UNSET and warm.model_name == "n"


def test_a_failed_warm_names_its_cause(shell: Any) -> None:
    warm = shell.warming(C)
    returned = effects_of(shell.returned(C), WarmFailed)
    assert [(f.token, f.cause, f.error) for f in returned] == [
        (warm.token, "returned", NO_CONSUMER)
    ]
    assert effects_of(shell.fire(C), WarmFailed) == []  # the retry goes out
    timed_out = effects_of(shell.fire(C), WarmFailed)  # and gets no completion in time
    assert [(f.cause, f.failures) for f in timed_out] == [("timeout", 2)]


def test_turn_settled_resets_failures(shell: Any) -> None:
    shell.warming(C)
    shell.returned(C)
    assert shell.conv(C).failures == 1
    shell.settled(C)
    assert shell.conv(C).failures == 0
    assert shell.status(C) == "armed"


@pytest.mark.parametrize("guard", ["paused", "budget_exhausted"])
def test_turn_settled_clears_paused_and_budget_exhausted(make_shell: Any, guard: str) -> None:
    shell = make_shell(Policy(max_failures=1, idle_max_warms=1))
    shell.warming(C)
    if guard == "paused":
        shell.returned(C)
    else:
        shell.completed(C, token=shell.last_warm.token)
    assert shell.status(C) == guard
    out = shell.settled(C)
    assert shell.status(C) == "armed"
    assert shell.due(C) == shell.now + INTERVAL
    assert one_surface(out).state.status == "armed"


def test_turn_settled_while_disabled_clears_paused_underneath(make_shell: Any) -> None:
    shell = make_shell(Policy(max_failures=1))
    shell.warming(C)
    shell.returned(C)
    shell.set_enabled(C, False)
    shell.settled(C)
    shell.set_enabled(C, True)
    assert shell.status(C) == "armed"


# -- arm ------------------------------------------------------------------------------------


def test_every_arm_takes_a_new_greater_token(make_shell: Any) -> None:
    shell = make_shell(token_start=1_000)
    shell.set_enabled(C, True)
    shell.settled(C)
    shell.settled(C)
    shell.set_interval(C, 10_000)
    tokens = [a.token for a in shell.arms]
    assert tokens == [1_001, 1_002, 1_003, 1_004]
    assert shell.warmer.last_token == 1_004


def test_the_first_token_is_one_when_the_counter_starts_at_zero(shell: Any) -> None:
    shell.set_enabled(C, True)
    assert shell.conv(C).token == 1


def test_cancelling_does_not_change_the_token(shell: Any) -> None:
    shell.enabled_and_armed(C)
    token = shell.conv(C).token
    shell.started(C)
    shell.set_enabled(C, False)
    shell.closed(C)
    assert shell.conv(C).token == token
    assert shell.warmer.last_token == token


def test_tokens_are_one_counter_across_conversations(shell: Any) -> None:
    shell.enabled_and_armed(C)
    shell.enabled_and_armed(OTHER)
    tokens = [a.token for a in shell.arms]
    assert tokens == sorted(set(tokens))


# -- timer fires ----------------------------------------------------------------------------


def test_timer_fires_publishes_a_warm_and_starts_the_timeout(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, cwd="/repo", model_name="claude")
    token = shell.conv(C).token
    due = shell.due(C)
    out = shell.fire(C)
    assert shell.now == due
    [publish] = effects_of(out, PublishWarm)
    assert publish.timeout_ms == TIMEOUT
    assert as_json(publish.request) == {
        "type": "warm.requested",
        "conversationId": C,
        "token": token,
        "cwd": "/repo",
        "modelName": "claude",
        "requestedAt": due,
    }
    assert shell.timers[C] == (due + TIMEOUT, token)
    conv = shell.conv(C)
    assert conv.status == "warming" and conv.next_warm_at is None
    update = one_surface(out)
    assert update.state.status == "warming" and update.state.next_warm_at is None
    # The surface follows the warm: the dashboard never sees a warm it was not sent.
    kinds = [type(e) for e in out.effects]
    assert kinds.index(PublishWarm) < kinds.index(PublishSurface)


def test_a_warm_without_context_leaves_cwd_and_model_name_out(shell: Any) -> None:
    shell.warming(C)
    body = as_json(shell.last_warm)
    assert "cwd" not in body and "modelName" not in body
    assert set(body) == {"type", "conversationId", "token", "requestedAt"}


def test_a_stale_fire_changes_nothing(shell: Any) -> None:
    shell.enabled_and_armed(C)
    old = shell.conv(C).token
    shell.settled(C)  # re-armed with a new token
    before = snapshot(shell)
    out = shell.fire_token(C, old)
    assert out.effects == []
    assert snapshot(shell) == before


def test_a_fire_for_a_disabled_conversation_changes_nothing(shell: Any) -> None:
    shell.enabled_and_armed(C)
    token = shell.conv(C).token
    shell.set_enabled(C, False)
    before = snapshot(shell)
    out = shell.fire_token(C, token)
    assert out.effects == [] and not shell.warms
    assert snapshot(shell) == before


def test_a_fire_for_an_active_conversation_changes_nothing(shell: Any) -> None:
    shell.enabled_and_armed(C)
    token = shell.conv(C).token
    shell.started(C)
    before = snapshot(shell)
    out = shell.fire_token(C, token)
    assert out.effects == [] and not shell.warms
    assert snapshot(shell) == before


def test_a_fire_for_a_conversation_never_seen_changes_nothing(shell: Any) -> None:
    out = shell.fire_token(C, 1)
    assert out.effects == []
    assert shell.warmer.get(C) is None


def test_a_fire_while_idle_with_the_current_token_changes_nothing(shell: Any) -> None:
    warm = shell.warming(C)
    shell.completed(C, token=warm.token, error="conversation is generating")
    assert shell.status(C) == "idle"
    before = snapshot(shell)
    assert shell.fire_token(C, warm.token).effects == []
    assert snapshot(shell) == before


# -- warm.completed with usage ------------------------------------------------------------


def test_completion_with_the_current_token_records_and_rearms(shell: Any, make_usage: Any) -> None:
    warm = shell.warming(C)
    shell.advance(3_000)
    out = shell.completed(C, token=warm.token, usage=make_usage(1000, 333, 667))
    conv = shell.conv(C)
    assert (conv.last_pct, conv.last_expected_pct, conv.last_warm_at) == (33, 33, shell.now)
    assert conv.failures == 0 and conv.last_error is None
    assert conv.status == "armed" and conv.token > warm.token
    due = shell.now + INTERVAL
    assert shell.timers[C] == (due, conv.token)
    update = one_surface(out)
    # The surface carries the new future nextWarmAt, never the warm that already fired.
    assert update.state.next_warm_at == due
    timer = update.spec.fields[4]
    assert isinstance(timer, CustomField)
    assert timer.payload.next_warm_at == due
    assert update.state.last_warm_at == shell.now
    kinds = [type(e) for e in out.effects]
    assert kinds.index(Arm) < kinds.index(PublishSurface)


def test_completion_resets_failures_and_last_error(shell: Any) -> None:
    shell.warming(C)
    shell.returned(C)
    shell.fire(C)  # the retry goes out
    assert shell.conv(C).failures == 1
    shell.completed(C, token=shell.last_warm.token)
    conv = shell.conv(C)
    assert conv.failures == 0 and conv.last_error is None and conv.status == "armed"


def test_completion_while_active_is_dropped(shell: Any) -> None:
    warm = shell.warming(C)
    shell.started(C)
    before = snapshot(shell)
    out = shell.completed(C, token=warm.token)
    assert out.verdict != "applied" and out.effects == []
    assert snapshot(shell) == before
    assert shell.conv(C).last_warm_at is None


def test_completion_by_hand_while_active_is_dropped(shell: Any) -> None:
    shell.started(C)
    before = snapshot(shell)
    out = shell.completed(C)
    assert out.effects == []
    assert snapshot(shell) == before


def test_a_duplicate_completion_is_stale(shell: Any) -> None:
    warm = shell.warming(C)
    shell.completed(C, token=warm.token)
    before = snapshot(shell)
    shell.advance(10_000)
    out = shell.completed(C, token=warm.token, error="late")
    assert out.verdict == "stale" and out.effects == []
    out = shell.completed(C, token=warm.token)
    assert out.verdict == "stale" and out.effects == []
    assert snapshot(shell) == before


def test_a_completion_whose_retry_already_went_out_is_stale(shell: Any) -> None:
    warm = shell.warming(C)
    shell.returned(C)
    shell.fire(C)
    before = snapshot(shell)
    out = shell.completed(C, token=warm.token)
    assert out.verdict == "stale" and out.effects == []
    assert snapshot(shell) == before


def test_a_duplicate_after_an_arm_that_spent_the_budget_is_stale(make_shell: Any) -> None:
    # The completion's arm finds the budget spent: no new token, so the duplicate still
    # carries the conversation's token; it was answered already, so it is stale.
    shell = make_shell(Policy(idle_max_warms=1))
    warm = shell.warming(C)
    first = shell.completed(C, token=warm.token)
    assert first.verdict == "applied" and shell.status(C) == "budget_exhausted"
    assert shell.conv(C).token == warm.token == shell.conv(C).answered_token
    before, stored = snapshot(shell), shell.stored(C)
    shell.advance(1_000)
    for again in (
        shell.completed(C, token=warm.token),
        shell.completed(
            C,
            token=warm.token,
            usage=Usage(input_tokens=9, cache_read_tokens=1, cache_write_tokens=0),
        ),
        shell.completed(C, token=warm.token, error="late"),
    ):
        assert again.verdict == "stale" and again.effects == []
    assert snapshot(shell) == before and shell.stored(C) == stored


@pytest.mark.parametrize("how", ["usage", "error", "generating"])
def test_a_duplicate_after_the_conversation_was_disabled_is_stale(shell: Any, how: str) -> None:
    # Disabled while warming: the completion is applied (figures or error only) and
    # arms nothing, so the token stays; its duplicate is stale.
    warm = shell.warming(C)
    shell.set_enabled(C, False)
    error = {"usage": None, "error": "boom", "generating": "conversation is generating"}[how]
    first = shell.completed(C, token=warm.token, error=error)
    assert first.verdict == "applied" and shell.status(C) == "disabled"
    assert shell.conv(C).token == warm.token == shell.conv(C).answered_token
    before = snapshot(shell)
    surfaces = len(shell.surfaces)
    shell.advance(1_000)
    again = shell.completed(C, token=warm.token, error=error)
    assert again.verdict == "stale" and again.effects == []
    assert snapshot(shell) == before and len(shell.surfaces) == surfaces


def test_a_duplicate_of_a_generating_answer_is_stale(shell: Any) -> None:
    warm = shell.warming(C)
    shell.completed(C, token=warm.token, error="conversation is generating")
    assert shell.status(C) == "idle"
    out = shell.completed(C, token=warm.token, error="conversation is generating")
    assert out.verdict == "stale" and out.effects == []


def test_a_completion_by_hand_never_marks_a_token_answered(shell: Any) -> None:
    warm = shell.warming(C)
    shell.completed(C)  # no token: by hand, while warming
    shell.completed(C, token=warm.token + 5)  # a token from before the state was lost
    assert shell.conv(C).answered_token == 0 and shell.status(C) == "warming"
    assert shell.completed(C, token=warm.token).verdict == "applied"
    assert shell.conv(C).answered_token == warm.token


def test_completion_by_hand_resets_the_cycle_while_armed(shell: Any) -> None:
    shell.enabled_and_armed(C)
    old = shell.conv(C).token
    shell.advance(100_000)
    out = shell.completed(C, token=None)
    conv = shell.conv(C)
    assert conv.status == "armed" and conv.token > old
    assert shell.due(C) == shell.now + INTERVAL
    assert conv.last_warm_at == shell.now and conv.last_pct == 80
    assert one_surface(out).state.next_warm_at == shell.now + INTERVAL


def test_completion_by_hand_while_retrying_resets_failures_and_arms(shell: Any) -> None:
    shell.warming(C)
    shell.returned(C)
    assert shell.status(C) == "retrying"
    shell.completed(C)
    conv = shell.conv(C)
    assert conv.status == "armed" and conv.failures == 0 and conv.last_error is None
    assert shell.due(C) == shell.now + INTERVAL


def test_completion_by_hand_while_idle_arms(shell: Any) -> None:
    warm = shell.warming(C)
    shell.completed(C, token=warm.token, error="conversation is generating")
    assert shell.status(C) == "idle"
    shell.advance(1_000)
    shell.completed(C)
    assert shell.status(C) == "armed" and shell.conv(C).last_error is None
    assert shell.due(C) == shell.now + INTERVAL


def test_completion_by_hand_for_an_enabled_conversation_never_seen_arms(make_shell: Any) -> None:
    # Persisted as enabled, no record yet: its status is idle, and a read refreshes the cache.
    shell = make_shell(settings={C: Settings(True, 5_000)})
    shell.completed(C)
    assert shell.status(C) == "armed" and shell.due(C) == shell.now + 5_000


def test_completion_with_a_future_token_is_by_hand(shell: Any) -> None:
    shell.enabled_and_armed(C)
    future = shell.conv(C).token + 1_000
    shell.advance(50_000)
    out = shell.completed(C, token=future)
    assert out.verdict == "applied"
    assert shell.status(C) == "armed" and shell.due(C) == shell.now + INTERVAL


def test_completion_with_a_future_token_never_closes_a_warm_of_ours(shell: Any) -> None:
    warm = shell.warming(C)
    timer = shell.timers[C]
    shell.completed(C, token=warm.token + 1_000, error="provider error")
    assert shell.status(C) == "warming" and shell.timers[C] == timer
    assert shell.conv(C).failures == 0 and shell.conv(C).last_error == "provider error"
    shell.completed(C, token=warm.token + 1_000)
    assert shell.status(C) == "warming" and shell.timers[C] == timer


@pytest.mark.parametrize("status", ["warming", "paused", "budget_exhausted"])
def test_completion_by_hand_records_the_figures_only(
    make_shell: Any, make_usage: Any, status: str
) -> None:
    shell = make_shell(Policy(max_failures=1, idle_max_warms=1))
    warm = shell.warming(C)
    if status == "paused":
        shell.returned(C)
    elif status == "budget_exhausted":
        shell.completed(C, token=warm.token)
    assert shell.status(C) == status
    conv = shell.conv(C)
    failures, error, token, timer = conv.failures, conv.last_error, conv.token, shell.timers.get(C)
    shell.advance(7_000)
    out = shell.completed(C, usage=make_usage(200, 29, 171))
    conv = shell.conv(C)
    assert (conv.last_pct, conv.last_expected_pct, conv.last_warm_at) == (14, 14, shell.now)
    assert conv.status == status
    assert (conv.failures, conv.last_error, conv.token) == (failures, error, token)
    assert shell.timers.get(C) == timer
    assert not effects_of(out, Arm) and not effects_of(out, Cancel)
    assert one_surface(out).state.last_pct == 14


def test_completion_for_a_disabled_conversation_records_and_arms_nothing(shell: Any) -> None:
    shell.settled(C)
    out = shell.completed(C)
    conv = shell.conv(C)
    assert conv.status == "disabled" and conv.last_pct == 80 and conv.last_warm_at == shell.now
    assert not shell.timers and not effects_of(out, Arm)
    assert one_surface(out).state.last_pct == 80


def test_completion_for_a_conversation_never_seen_records_and_arms_nothing(shell: Any) -> None:
    out = shell.completed(C, token=12345)
    conv = shell.conv(C)
    assert conv.status == "disabled" and conv.last_pct == 80 and conv.last_expected_pct == 100
    assert not shell.timers and not effects_of(out, Arm)
    assert one_surface(out).state.last_warm_at == shell.now


def test_completion_with_the_current_token_after_disable_records_and_arms_nothing(
    shell: Any,
) -> None:
    shell.warming(C)
    shell.returned(C)
    shell.fire(C)
    warm = shell.last_warm
    shell.set_enabled(C, False)
    shell.completed(C, token=warm.token)
    conv = shell.conv(C)
    assert conv.status == "disabled" and conv.last_pct == 80
    assert conv.failures == 0 and conv.last_error is None
    assert not shell.timers


def test_error_decides_when_a_completion_has_both(shell: Any) -> None:
    warm = shell.warming(C)
    usage = Usage(input_tokens=100, cache_read_tokens=100, cache_write_tokens=0)
    shell.event(WarmCompleted(conversation_id=C, token=warm.token, usage=usage, error="boom"))
    conv = shell.conv(C)
    assert conv.last_pct is None and conv.last_error == "boom" and conv.status == "retrying"


# -- warm.completed with error ------------------------------------------------------------


def test_error_with_the_current_token_fails_the_warm(shell: Any) -> None:
    warm = shell.warming(C)
    shell.advance(2_000)
    out = shell.completed(C, token=warm.token, error="provider error")
    conv = shell.conv(C)
    assert conv.last_error == "provider error" and conv.failures == 1
    assert conv.status == "retrying" and conv.token > warm.token
    assert shell.timers[C] == (shell.now + 1_000, conv.token)
    assert conv.next_warm_at == shell.now + 1_000
    assert effects_of(out, WarmFailed) == [
        WarmFailed(C, warm.token, "provider error", 1, False, "error")
    ]
    update = one_surface(out)
    assert update.state.status == "retrying" and update.state.failures == 1
    assert update.state.next_warm_at == shell.now + 1_000


def test_error_is_cut_to_500_characters(shell: Any) -> None:
    warm = shell.warming(C)
    shell.completed(C, token=warm.token, error="é" * 600)
    assert shell.conv(C).last_error == "é" * 500
    shell.completed(OTHER, error="x" * 501)
    assert shell.conv(OTHER).last_error == "x" * 500


def test_conversation_is_generating_is_not_a_failure(shell: Any) -> None:
    warm = shell.warming(C)
    out = shell.completed(C, token=warm.token, error="conversation is generating")
    conv = shell.conv(C)
    assert conv.status == "idle" and conv.failures == 0
    assert conv.last_error == "conversation is generating"
    assert conv.next_warm_at is None and C not in shell.timers
    assert not effects_of(out, WarmFailed) and not effects_of(out, Arm)
    assert one_surface(out).state.status == "idle"
    # No longer awaited: it can no longer time out, and the turn.started on its way applies.
    assert shell.fire_token(C, warm.token).effects == []
    shell.started(C)
    shell.settled(C)
    assert shell.status(C) == "armed"


@pytest.mark.parametrize("status", ["armed", "warming", "retrying"])
def test_error_by_hand_records_last_error_only(shell: Any, status: str) -> None:
    shell.warming(C) if status != "armed" else shell.enabled_and_armed(C)
    if status == "retrying":
        shell.returned(C)
    conv = shell.conv(C)
    timer, token, failures = shell.timers[C], conv.token, conv.failures
    out = shell.completed(C, error="no history")
    conv = shell.conv(C)
    assert conv.last_error == "no history" and conv.status == status
    assert conv.failures == failures and conv.token == token and shell.timers[C] == timer
    assert not effects_of(out, WarmFailed)
    assert one_surface(out).state.last_error == "no history"


def test_error_with_the_current_token_while_not_warming_records_only(shell: Any) -> None:
    shell.enabled_and_armed(C)
    token = shell.conv(C).token
    timer = shell.timers[C]
    shell.completed(C, token=token, error="odd")
    assert shell.status(C) == "armed" and shell.timers[C] == timer
    assert shell.conv(C).failures == 0 and shell.conv(C).last_error == "odd"


@pytest.mark.parametrize("seen", [False, True])
def test_error_for_a_disabled_or_never_seen_conversation_records_only(
    shell: Any, seen: bool
) -> None:
    if seen:
        shell.settled(C)
    out = shell.completed(C, token=99, error="no history")
    conv = shell.conv(C)
    assert conv.status == "disabled" and conv.last_error == "no history" and conv.failures == 0
    assert not shell.timers
    assert one_surface(out).state.last_error == "no history"


def test_error_while_active_or_stale_is_dropped(shell: Any) -> None:
    warm = shell.warming(C)
    shell.started(C)
    before = snapshot(shell)
    assert shell.completed(C, token=warm.token, error="boom").effects == []
    assert shell.completed(C, error="boom").effects == []
    assert snapshot(shell) == before
    shell.settled(C)
    before = snapshot(shell)
    assert shell.completed(C, token=warm.token, error="boom").effects == []
    assert snapshot(shell) == before


def test_a_refused_first_warm_after_enable_is_a_failure(shell: Any) -> None:
    # Enabling a conversation that never settled arms it; a refusal is addition 2.
    shell.set_enabled(C, True)
    assert shell.status(C) == "armed"
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token, error="no history")
    assert shell.status(C) == "retrying" and shell.conv(C).failures == 1


# -- conversation.closed ------------------------------------------------------------------


def test_closed_cancels_disables_publishes_and_persists(shell: Any) -> None:
    shell.set_interval(C, 30_000)
    shell.enabled_and_armed(C)
    out = shell.closed(C)
    conv = shell.conv(C)
    assert conv.status == "disabled" and not conv.enabled and conv.next_warm_at is None
    assert C not in shell.timers
    assert [type(e) for e in out.effects] == [Cancel, PublishSurface]
    assert one_surface(out).state.enabled is False
    assert shell.warmer.persisted(C) == Settings(False, 30_000)
    # Committed with the event's batch, before the surface goes out.
    stored = shell.stored(C)
    assert stored.settings == Settings(False, 30_000)
    assert stored.state.status == "disabled" and stored.state.next_warm_at is None


def test_closed_leaves_active_the_context_and_the_figures(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, cwd="/w", model_name="m")
    shell.completed(C)
    shell.started(C)
    shell.closed(C)
    conv = shell.conv(C)
    assert conv.active and conv.status == "disabled"
    assert (conv.cwd, conv.model_name, conv.last_pct) == ("/w", "m", 80)


def test_closed_never_seen_keeps_the_stored_interval(make_shell: Any) -> None:
    shell = make_shell(settings={C: Settings(True, 45_000)})
    shell.closed(C)
    assert shell.warmer.persisted(C) == Settings(False, 45_000)
    assert shell.stored(C).settings == Settings(False, 45_000)


def test_close_racing_a_settle_never_rearms(shell: Any) -> None:
    shell.enabled_and_armed(C)
    shell.started(C)
    shell.closed(C)
    out = shell.settled(C)
    assert not effects_of(out, Arm) and not shell.timers
    assert shell.status(C) == "disabled"


def test_close_while_warming_then_its_completion_never_rearms(shell: Any) -> None:
    warm = shell.warming(C)
    shell.closed(C)
    assert not shell.timers
    shell.completed(C, token=warm.token)
    assert not shell.timers and shell.status(C) == "disabled"
    assert shell.conv(C).last_pct == 80
    assert shell.returned(C, warm.token).effects == []


# -- set_enabled ----------------------------------------------------------------------------


def test_set_enabled_plans_the_persisted_settings_with_the_new_value(make_shell: Any) -> None:
    shell = make_shell(settings={C: Settings(False, 12_000)})
    plan = shell.warmer.plan_command(shell.now, SetEnabled(conversation_id=C, enabled=True))
    assert plan == SettingsChange(
        C, Settings(True, 12_000), "enabled", base=Settings(False, 12_000)
    )
    assert shell.warmer.get(C) is None  # nothing changes before the commit


def test_enabling_a_conversation_that_never_settled_arms_it(shell: Any) -> None:
    out = shell.set_enabled(C, True)
    assert shell.status(C) == "armed" and shell.due(C) == shell.now + INTERVAL
    assert one_surface(out).state.next_warm_at == shell.now + INTERVAL
    [reply] = [e.reply for e in out.effects if isinstance(e, SendReply)]
    assert as_json(reply) == {"ok": True, "settings": {"enabled": True, "intervalMs": INTERVAL}}
    kinds = [type(e) for e in out.effects]
    assert kinds.index(PublishSurface) < kinds.index(SendReply)


def test_enable_restores_the_persisted_interval(make_shell: Any) -> None:
    shell = make_shell(settings={C: Settings(False, 5_000)})
    shell.settled(C)
    assert shell.conv(C).interval_ms == 5_000
    shell.set_enabled(C, True)
    assert shell.conv(C).interval_ms == 5_000 and shell.due(C) == shell.now + 5_000
    shell.closed(C)
    shell.set_enabled(C, True)
    assert shell.conv(C).interval_ms == 5_000 and shell.due(C) == shell.now + 5_000


def test_enable_after_an_interval_change_while_disabled_uses_it(shell: Any) -> None:
    shell.settled(C)
    shell.set_interval(C, 9_000)
    shell.set_enabled(C, False)
    shell.set_enabled(C, True)
    assert shell.due(C) == shell.now + 9_000


@pytest.mark.parametrize("status", ["armed", "warming", "retrying"])
def test_repeated_enables_never_postpone_a_warm(shell: Any, status: str) -> None:
    shell.warming(C) if status != "armed" else shell.enabled_and_armed(C)
    if status == "retrying":
        shell.returned(C)
    assert shell.status(C) == status
    timer, token = shell.timers[C], shell.conv(C).token
    shell.advance(500)
    out = shell.set_enabled(C, True)
    assert not effects_of(out, Arm) and not effects_of(out, Cancel)
    assert shell.timers[C] == timer and shell.conv(C).token == token
    assert shell.status(C) == status
    assert one_surface(out).state.status == status


def test_enable_when_idle_arms(shell: Any) -> None:
    warm = shell.warming(C)
    shell.completed(C, token=warm.token, error="conversation is generating")
    shell.advance(1_000)
    shell.set_enabled(C, True)
    assert shell.status(C) == "armed" and shell.due(C) == shell.now + INTERVAL


@pytest.mark.parametrize("guard", ["paused", "budget_exhausted"])
def test_enable_after_a_guard_resets_failures_and_a_fresh_budget(
    make_shell: Any, guard: str
) -> None:
    shell = make_shell(Policy(max_failures=1, idle_max_warms=1))
    warm = shell.warming(C)
    if guard == "paused":
        shell.returned(C)
    else:
        shell.completed(C, token=warm.token)
    assert shell.status(C) == guard
    shell.advance(10_000)
    shell.set_enabled(C, True)
    conv = shell.conv(C)
    assert conv.status == "armed" and conv.failures == 0
    assert shell.due(C) == shell.now + INTERVAL
    shell.fire(C)  # the fresh budget allows one warm again
    assert len(shell.warms) == 2


def test_enable_while_disabled_and_active_waits_for_the_settle(shell: Any) -> None:
    shell.started(C)
    out = shell.set_enabled(C, True)
    assert shell.status(C) == "active" and not shell.timers and not effects_of(out, Arm)
    shell.settled(C)
    assert shell.status(C) == "armed"


def test_enable_while_active_leaves_the_turn_alone(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.started(C)
    out = shell.set_enabled(C, True)
    assert shell.status(C) == "active" and not shell.timers and not effects_of(out, Arm)


def test_disable_cancels(shell: Any) -> None:
    shell.enabled_and_armed(C)
    out = shell.set_enabled(C, False)
    conv = shell.conv(C)
    assert conv.status == "disabled" and conv.next_warm_at is None and not shell.timers
    assert effects_of(out, Cancel) == [Cancel(C)]
    assert as_json(shell.last_reply) == {
        "ok": True,
        "settings": {"enabled": False, "intervalMs": INTERVAL},
    }
    assert one_surface(out).state.status == "disabled"


def test_disable_while_warming_stops_awaiting_the_warm(shell: Any) -> None:
    warm = shell.warming(C)
    shell.set_enabled(C, False)
    assert not shell.timers
    assert shell.fire_token(C, warm.token).effects == []  # can no longer time out
    assert shell.returned(C, warm.token).effects == []


# -- set_interval ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "clamped"),
    [(0, 1000), (-5, 1000), (500, 1000), (86_400_001, 86_400_000), (1e15, 86_400_000)],
)
def test_set_interval_clamps_and_replies(shell: Any, asked: float, clamped: int) -> None:
    out = shell.set_interval(C, asked)
    assert shell.conv(C).interval_ms == clamped
    assert as_json(shell.last_reply) == {
        "ok": True,
        "settings": {"enabled": False, "intervalMs": clamped},
    }
    assert one_surface(out).state.interval_ms == clamped


def test_set_interval_keeps_the_persisted_enabled(make_shell: Any) -> None:
    shell = make_shell(settings={C: Settings(True, 5_000)})
    plan = shell.warmer.plan_command(shell.now, SetInterval(conversation_id=C, interval_ms=7_000))
    assert plan == SettingsChange(C, Settings(True, 7_000), "interval", base=Settings(True, 5_000))


def test_interval_change_while_armed_rearms_a_full_interval_from_now(shell: Any) -> None:
    shell.enabled_and_armed(C)
    old = shell.conv(C).token
    shell.advance(200_000)
    out = shell.set_interval(C, 60_000)
    conv = shell.conv(C)
    assert conv.status == "armed" and conv.token > old
    assert shell.timers[C] == (shell.now + 60_000, conv.token)
    assert one_surface(out).state.next_warm_at == shell.now + 60_000


def test_interval_change_while_warming_does_not_rearm(shell: Any) -> None:
    warm = shell.warming(C)
    timer = shell.timers[C]
    out = shell.set_interval(C, 30_000)
    assert not effects_of(out, Arm) and shell.timers[C] == timer
    assert shell.status(C) == "warming"
    shell.advance(1_000)
    shell.completed(C, token=warm.token)
    assert shell.due(C) == shell.now + 30_000  # the completion uses the new interval


@pytest.mark.parametrize("status", ["disabled", "idle", "retrying", "paused", "active"])
def test_interval_change_while_not_armed_does_not_arm(make_shell: Any, status: str) -> None:
    shell = make_shell(Policy(max_failures=1 if status == "paused" else 3))
    if status == "disabled":
        shell.settled(C)
    elif status == "active":
        shell.set_enabled(C, True)
        shell.started(C)
    else:
        warm = shell.warming(C)
        if status == "idle":
            shell.completed(C, token=warm.token, error="conversation is generating")
        else:
            shell.returned(C)
    assert shell.status(C) == status
    timer = shell.timers.get(C)
    out = shell.set_interval(C, 30_000)
    assert not effects_of(out, Arm)
    assert shell.timers.get(C) == timer and shell.status(C) == status
    assert shell.conv(C).interval_ms == 30_000


# -- surface.action -------------------------------------------------------------------------


def test_toggle_without_payload_flips_the_in_memory_state(shell: Any) -> None:
    shell.action(C, "cache-warming/toggle")
    assert shell.conv(C).enabled and shell.status(C) == "armed"
    assert as_json(shell.last_reply) == {
        "ok": True,
        "settings": {"enabled": True, "intervalMs": INTERVAL},
    }
    shell.action(C, "cache-warming/toggle")
    assert not shell.conv(C).enabled and not shell.timers


def test_toggle_flips_what_a_close_disabled_in_memory(make_shell: Any) -> None:
    shell = make_shell(settings={C: Settings(True, INTERVAL)})
    shell.closed(C)
    shell.action(C, "cache-warming/toggle")
    assert shell.conv(C).enabled


@pytest.mark.parametrize("value", [True, False])
def test_toggle_with_a_value_sets_it(shell: Any, value: bool) -> None:
    shell.action(C, "cache-warming/toggle", {"value": value})
    shell.action(C, "cache-warming/toggle", {"value": value})
    assert shell.conv(C).enabled is value
    assert as_json(shell.last_reply)["settings"]["enabled"] is value


@pytest.mark.parametrize(
    "payload",
    [
        {"value": "true"},
        {"value": 1},
        {"value": 0},
        {"value": []},
        "yes",
        1,
        [True],
        {},
        {"enabled": True},
        pytest.param(
            {"value": None},
        ),
    ],
)
def test_toggle_with_a_value_that_is_not_a_boolean_is_invalid(shell: Any, payload: Any) -> None:
    shell.settled(C)
    before = snapshot(shell)
    out = shell.action(C, "cache-warming/toggle", payload)
    assert out.verdict == "rejected"
    assert [type(e) for e in out.effects] == [SendReply]
    assert isinstance(shell.last_reply, ErrorReply) and shell.last_reply.code == "invalid_payload"
    assert as_json(shell.last_reply)["ok"] is False
    assert snapshot(shell) == before


@pytest.mark.parametrize(
    ("payload", "ms"),
    [
        (30, 30_000),
        (1.5, 1_500),
        (0.0005, 1_000),
        (0.2, 1_000),
        (100_000, 86_400_000),
        (10**30, 86_400_000),
        ({"value": 30}, 30_000),
        ({"value": 2.5}, 2_500),
        ({"value": 2.0005}, 2_001),
    ],
)
def test_set_interval_action_takes_seconds(shell: Any, payload: Any, ms: int) -> None:
    out = shell.action(C, "cache-warming/set-interval", payload)
    assert shell.conv(C).interval_ms == ms
    assert as_json(shell.last_reply) == {
        "ok": True,
        "settings": {"enabled": False, "intervalMs": ms},
    }
    assert one_surface(out).state.interval_ms == ms


def test_set_interval_action_rearms_when_armed(shell: Any) -> None:
    shell.enabled_and_armed(C)
    shell.advance(1_000)
    shell.action(C, "cache-warming/set-interval", 10)
    assert shell.due(C) == shell.now + 10_000


@pytest.mark.parametrize(
    "payload",
    [
        UNSET,
        None,
        "30",
        "1.5",
        True,
        False,
        {},
        {"value": "30"},
        {"value": None},
        [30],
        0,
        -1,
        -0.5,
    ],
)
def test_set_interval_action_refuses_what_is_not_positive_seconds(shell: Any, payload: Any) -> None:
    shell.settled(C)
    before = snapshot(shell)
    out = shell.action(C, "cache-warming/set-interval", payload)
    assert out.verdict == "rejected" and [type(e) for e in out.effects] == [SendReply]
    assert shell.last_reply.code == "invalid_payload"
    assert snapshot(shell) == before


def test_unknown_action(shell: Any) -> None:
    shell.settled(C)
    before = snapshot(shell)
    out = shell.action(C, "cache-warming/explode", {"value": True})
    assert out.verdict == "rejected" and [type(e) for e in out.effects] == [SendReply]
    assert shell.last_reply.code == "unknown_action"
    assert snapshot(shell) == before


def test_an_unknown_action_id_the_size_of_the_body_is_quoted_short(shell: Any) -> None:
    shell.action(C, "x" * 60_000)
    assert shell.last_reply.code == "unknown_action"
    assert "(60000 chars)" in shell.last_reply.error
    assert len(shell.last_reply.error) <= 250


# -- get_state --------------------------------------------------------------------------------


def test_get_state_for_a_conversation_never_seen_creates_no_record(make_shell: Any) -> None:
    shell = make_shell(settings={OTHER: Settings(True, 1_500)})
    out = shell.get_state(C)
    assert [type(e) for e in out.effects] == [SendReply]
    assert shell.warmer.get(C) is None and len(shell.warmer) == 0
    reply = shell.last_reply
    assert isinstance(reply, StateReply)
    body = as_json(reply)
    assert body["ok"] is True
    assert body["state"] == {
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
    assert body["spec"] == as_json(build_panel(reply.state))
    # Merged with its persisted settings, if any.
    shell.get_state(OTHER)
    state = as_json(shell.last_reply)["state"]
    assert (state["enabled"], state["intervalMs"], state["status"]) == (True, 1_500, "idle")
    assert as_json(shell.last_reply)["spec"]["fields"][1]["value"] == 2
    assert len(shell.warmer) == 0 and not shell.surfaces


def test_get_state_of_a_known_conversation_changes_and_publishes_nothing(shell: Any) -> None:
    shell.enabled_and_armed(C)
    before = snapshot(shell)
    surfaces = len(shell.surfaces)
    out = shell.get_state(C)
    assert [type(e) for e in out.effects] == [SendReply]
    assert shell.last_reply.state == shell.conv(C).view()
    assert shell.last_reply.state.next_warm_at == shell.due(C)
    assert snapshot(shell) == before and len(shell.surfaces) == surfaces


# -- store errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        SetEnabled(conversation_id=C, enabled=True),
        SetEnabled(conversation_id=C, enabled=False),
        SetInterval(conversation_id=C, interval_ms=5_000),
        SurfaceAction(conversation_id=C, action_id="cache-warming/toggle"),
        SurfaceAction(conversation_id=C, action_id="cache-warming/set-interval", payload=5),
    ],
    ids=["enable", "disable", "interval", "toggle", "set-interval"],
)
def test_a_store_error_changes_nothing_and_publishes_nothing(shell: Any, command: Any) -> None:
    shell.enabled_and_armed(C)
    shell.advance(1_000)  # even a repeated enable has its input time to commit
    before, stored = snapshot(shell), shell.stored(C)
    surfaces = len(shell.surfaces)
    out = shell.command(command, store_error="disk full")
    assert out.verdict == "rejected" and [type(e) for e in out.effects] == [SendReply]
    assert as_json(shell.last_reply)["ok"] is False
    assert shell.last_reply.code == "store_error"
    # The batch was applied then rolled back: all is as before but the token counter,
    # which never goes back (the rolled back arm's token is skipped).
    assert_rolled_back(before, snapshot(shell))
    assert len(shell.surfaces) == surfaces and shell.stored(C) == stored


def test_a_store_error_on_a_never_seen_conversation_creates_nothing(shell: Any) -> None:
    out = shell.set_enabled(C, True, store_error="disk full")
    assert shell.warmer.get(C) is None and not shell.timers and not shell.surfaces
    assert shell.warmer.persisted(C) == Settings()
    assert [type(e) for e in out.effects] == [SendReply]
    assert shell.last_reply.code == "store_error"


def test_a_store_error_on_enable_leaves_a_paused_conversation_paused(make_shell: Any) -> None:
    shell = make_shell(Policy(max_failures=1))
    shell.warming(C)
    shell.returned(C)
    before = snapshot(shell)
    shell.set_enabled(C, True, store_error="disk full")
    assert_rolled_back(before, snapshot(shell))
    assert shell.status(C) == "paused"


# -- addition 2: failures -----------------------------------------------------------------


def test_a_warm_timeout_is_a_failure_and_retries_a_second_later(shell: Any) -> None:
    warm = shell.warming(C)
    published = shell.now
    out = shell.fire(C)  # the warm timeout
    assert shell.now == published + TIMEOUT
    conv = shell.conv(C)
    assert conv.last_error == "no completion within 60 s" and conv.failures == 1
    assert conv.status == "retrying" and conv.token > warm.token
    assert shell.timers[C] == (shell.now + 1_000, conv.token)
    assert effects_of(out, WarmFailed) == [
        WarmFailed(C, warm.token, "no completion within 60 s", 1, False, "timeout")
    ]
    update = one_surface(out)
    assert update.state.last_error == "no completion within 60 s"
    assert update.spec.fields[-1] == _stat("Last error", "no completion within 60 s")


def test_an_unroutable_warm_is_a_failure(shell: Any) -> None:
    warm = shell.warming(C)
    out = shell.returned(C)
    conv = shell.conv(C)
    assert conv.last_error == "no consumer took the warm request" and conv.failures == 1
    assert conv.status == "retrying" and shell.due(C) == shell.now + 1_000
    assert effects_of(out, WarmFailed)[0].token == warm.token
    assert one_surface(out).state.status == "retrying"


def test_failures_back_off_then_pause_and_a_settle_resumes(shell: Any) -> None:
    shell.warming(C)
    shell.returned(C)
    assert shell.due(C) == shell.now + 1_000
    shell.fire(C)
    assert shell.status(C) == "warming" and shell.conv(C).failures == 1
    shell.returned(C)
    assert shell.due(C) == shell.now + 2_000 and shell.conv(C).failures == 2
    shell.fire(C)
    out = shell.returned(C)
    conv = shell.conv(C)
    assert conv.status == "paused" and conv.failures == 3 and conv.next_warm_at is None
    assert not shell.timers
    assert effects_of(out, WarmFailed)[0].paused is True
    assert one_surface(out).state.status == "paused"
    assert len(shell.warms) == 3
    shell.settled(C)
    assert shell.status(C) == "armed" and shell.conv(C).failures == 0


def test_backoff_doubles_up_to_the_cap(make_shell: Any) -> None:
    shell = make_shell(Policy(max_failures=6))
    shell.warming(C)
    delays = []
    for _ in range(5):
        shell.returned(C)
        delays.append(shell.due(C) - shell.now)
        shell.fire(C)
    assert delays == [1_000, 2_000, 4_000, 8_000, 16_000]


def test_a_retry_is_never_later_than_one_interval_after_the_failed_attempt(
    shell: Any,
) -> None:
    shell.warming(C, interval_ms=5_000)
    published = shell.now
    shell.advance(4_500)
    shell.returned(C)
    assert shell.due(C) == published + 5_000  # not failedAt + 1 s


def test_a_timeout_at_the_interval_retries_at_once(shell: Any) -> None:
    shell.warming(C, interval_ms=5_000)
    published = shell.now
    assert shell.warms[-1].timeout_ms == 5_000
    shell.fire(C)
    assert shell.now == published + 5_000
    assert shell.due(C) == shell.now  # max(failedAt, min(failedAt + 1 s, publishedAt + 5 s))
    assert shell.conv(C).last_error == "no completion within 5 s"


@pytest.mark.parametrize(
    ("interval", "timeout", "text"),
    [
        (240_000, 60_000, "no completion within 60 s"),
        (30_000, 30_000, "no completion within 30 s"),
        (1_500, 1_500, "no completion within 2 s"),
        (2_499, 2_499, "no completion within 2 s"),
    ],
)
def test_the_warm_timeout_is_never_more_than_the_interval(
    shell: Any, interval: int, timeout: int, text: str
) -> None:
    shell.warming(C, interval_ms=interval)
    published = shell.now
    assert shell.warms[-1].timeout_ms == timeout
    assert shell.due(C) == published + timeout
    shell.fire(C)
    assert shell.conv(C).last_error == text


def test_a_policy_timeout_shorter_than_the_interval(make_shell: Any) -> None:
    shell = make_shell(Policy(warm_timeout_ms=10_000))
    shell.warming(C)
    assert shell.warms[-1].timeout_ms == 10_000
    shell.fire(C)
    assert shell.conv(C).last_error == "no completion within 10 s"


def test_a_retry_is_a_new_warm_with_its_own_token(shell: Any) -> None:
    first = shell.warming(C)
    shell.returned(C)
    retry_token = shell.conv(C).token
    shell.fire(C)
    assert shell.last_warm.token == retry_token > first.token
    assert shell.status(C) == "warming"


@pytest.mark.parametrize("how", ["stale_token", "not_warming", "active", "disabled", "unknown"])
def test_a_return_that_does_not_match_the_outstanding_warm_changes_nothing(
    shell: Any, how: str
) -> None:
    warm = shell.warming(C)
    token = warm.token
    if how == "stale_token":
        shell.returned(C)
        shell.fire(C)
    elif how == "not_warming":
        shell.completed(C, token=warm.token)
        token = shell.conv(C).token
    elif how == "active":
        shell.started(C)
    elif how == "disabled":
        shell.set_enabled(C, False)
    before = snapshot(shell)
    cid = OTHER if how == "unknown" else C
    out = shell.returned(cid, token)
    assert out.effects == []
    assert snapshot(shell) == before


def test_a_turn_cancels_a_pending_retry(shell: Any) -> None:
    shell.warming(C)
    shell.returned(C)
    out = shell.started(C)
    assert effects_of(out, Cancel) and not shell.timers
    assert shell.conv(C).next_warm_at is None


# -- addition 4: the idle budget -----------------------------------------------------------


def test_idle_budget_by_count(make_shell: Any) -> None:
    shell = make_shell(Policy(idle_max_warms=3))
    shell.enabled_and_armed(C)
    for n in range(3):
        shell.fire(C)
        out = shell.completed(C, token=shell.last_warm.token)
        assert shell.status(C) == ("budget_exhausted" if n == 2 else "armed")
    conv = shell.conv(C)
    assert conv.next_warm_at is None and not shell.timers and len(shell.warms) == 3
    assert one_surface(out).state.status == "budget_exhausted"
    assert conv.last_pct == 80  # the third warm's figures are recorded


def test_idle_budget_counts_retries(make_shell: Any) -> None:
    shell = make_shell(Policy(idle_max_warms=2))
    shell.warming(C)
    shell.returned(C)
    assert shell.status(C) == "retrying"
    shell.fire(C)
    shell.returned(C)
    assert shell.status(C) == "budget_exhausted"
    assert not shell.timers and len(shell.warms) == 2 and shell.conv(C).failures == 2


def test_idle_budget_by_time(make_shell: Any) -> None:
    shell = make_shell(Policy(idle_max_ms=480_000))
    start = shell.now
    shell.enabled_and_armed(C)
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token)
    assert shell.due(C) == start + 480_000  # due exactly at the limit: armed
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token)
    assert shell.status(C) == "budget_exhausted" and not shell.timers


def test_idle_budget_by_time_applies_to_retries(make_shell: Any) -> None:
    shell = make_shell(Policy(idle_max_ms=240_500))
    shell.warming(C)
    shell.returned(C)  # due in 1 s: beyond the 240.5 s stretch
    assert shell.status(C) == "budget_exhausted" and not shell.timers


def test_a_settle_starts_a_fresh_idle_budget(make_shell: Any) -> None:
    shell = make_shell(Policy(idle_max_warms=1))
    shell.warming(C)
    shell.completed(C, token=shell.last_warm.token)
    assert shell.status(C) == "budget_exhausted"
    shell.started(C)
    assert shell.status(C) == "active"
    shell.settled(C)
    assert shell.status(C) == "armed"


def test_enable_from_disabled_starts_a_fresh_idle_stretch(make_shell: Any) -> None:
    shell = make_shell(Policy(idle_max_ms=300_000))
    shell.settled(C)
    shell.advance(1_000_000)
    shell.set_enabled(C, True)
    assert shell.status(C) == "armed" and shell.due(C) == shell.now + INTERVAL


def test_enable_when_idle_keeps_the_idle_stretch(make_shell: Any) -> None:
    shell = make_shell(Policy(idle_max_ms=300_000))
    warm = shell.warming(C)  # stretch started at the settle
    shell.completed(C, token=warm.token, error="conversation is generating")
    shell.advance(10_000)
    shell.set_enabled(C, True)  # due 490 s after the settle: past the 300 s budget
    assert shell.status(C) == "budget_exhausted" and not shell.timers


def test_a_fire_of_a_budget_exhausted_conversation_does_nothing(make_shell: Any) -> None:
    shell = make_shell(Policy(idle_max_warms=1))
    warm = shell.warming(C)
    shell.completed(C, token=warm.token)
    before = snapshot(shell)
    assert shell.fire_token(C, warm.token).effects == []
    assert snapshot(shell) == before


# -- addition 5: ordering -------------------------------------------------------------------


def test_events_with_a_seq_not_above_the_last_are_stale(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.started(C, seq=5)
    before = snapshot(shell)
    for out in (
        shell.settled(C, seq=5),
        shell.settled(C, seq=4),
        shell.closed(C, seq=1),
        shell.started(C, seq=0),
    ):
        assert out.verdict == "stale" and out.effects == []
    assert snapshot(shell) == before
    out = shell.settled(C, seq=6)
    assert out.verdict == "applied" and shell.status(C) == "armed"
    one_surface(out)


def test_events_without_a_seq_are_always_applied(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.started(C, seq=10)
    shell.settled(C)
    assert shell.status(C) == "armed"
    shell.started(C)
    assert shell.status(C) == "active"
    assert shell.settled(C, seq=10).verdict == "stale"
    assert shell.settled(C, seq=11).verdict == "applied"


def test_seq_is_per_conversation(shell: Any) -> None:
    shell.started(C, seq=100)
    assert shell.started(OTHER, seq=1).verdict == "applied"
    assert shell.settled(C, seq=99).verdict == "stale"


def test_a_stale_seq_for_a_conversation_never_seen_is_applied(shell: Any) -> None:
    assert shell.settled(C, seq=0).verdict == "applied"
    assert shell.settled(C, seq=0).verdict == "stale"


# -- addition 6: timing from the provider's clock ---------------------------------------


def test_the_first_warm_after_a_long_streamed_turn_is_timed_from_last_request_at(
    shell: Any,
) -> None:
    shell.set_enabled(C, True)
    shell.started(C)
    last_request_at = shell.now
    shell.advance(90_000)  # a long streamed answer
    out = shell.settled(C, last_request_at=last_request_at)
    assert shell.due(C) == last_request_at + INTERVAL == shell.now + 150_000
    assert one_surface(out).state.next_warm_at == last_request_at + INTERVAL


def test_a_settle_whose_cache_is_due_already_arms_now(shell: Any) -> None:
    shell.set_enabled(C, True)
    out = shell.settled(C, last_request_at=shell.now - 300_000)
    assert shell.due(C) == shell.now
    assert one_surface(out).state.next_warm_at == shell.now


@pytest.mark.parametrize("ahead", [1, 2_000, 2_001, 600_000])
def test_a_last_request_at_in_the_future_counts_as_now_or_is_ignored(
    shell: Any, ahead: int
) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, last_request_at=shell.now + ahead)
    assert shell.due(C) == shell.now + INTERVAL


def test_last_request_at_times_only_the_arm_of_that_settle(shell: Any) -> None:
    shell.set_enabled(C, True)
    settled_at = shell.now
    shell.settled(C, last_request_at=settled_at - 100_000)
    shell.fire(C)
    shell.advance(2_000)
    shell.completed(C, token=shell.last_warm.token)
    assert shell.due(C) == shell.now + INTERVAL
    shell.advance(1_000)
    shell.set_interval(C, INTERVAL)  # a re-arm counts from its own now
    assert shell.due(C) == shell.now + INTERVAL


def test_last_request_at_on_a_disabled_settle_does_not_time_a_later_enable(shell: Any) -> None:
    shell.settled(C, last_request_at=shell.now - 100_000)
    shell.advance(5_000)
    shell.set_enabled(C, True)
    assert shell.due(C) == shell.now + INTERVAL


# -- races -----------------------------------------------------------------------------------


def test_a_turn_starting_while_a_warm_is_in_flight(shell: Any) -> None:
    warm = shell.warming(C)
    out = shell.started(C)
    assert effects_of(out, Cancel) == [Cancel(C)] and not shell.timers
    assert shell.completed(C, token=warm.token).effects == []  # dropped, no re-arm
    assert not shell.timers and shell.conv(C).last_warm_at is None
    assert shell.fire_token(C, warm.token).effects == []  # the timeout no longer applies
    shell.settled(C)
    assert shell.status(C) == "armed"
    late = shell.completed(C, token=warm.token)
    assert late.verdict == "stale" and late.effects == []


def test_interval_change_then_enable_twice_keeps_one_timer(shell: Any) -> None:
    shell.enabled_and_armed(C)
    shell.set_interval(C, 10_000)
    shell.set_enabled(C, True)
    shell.set_enabled(C, True)
    assert shell.timers[C] == (shell.now + 10_000, shell.conv(C).token)


# -- one surface per applied input ---------------------------------------------------------


def test_each_applied_input_publishes_exactly_one_surface(shell: Any) -> None:
    shell.set_interval(C, 5_000)
    steps: list[Callable[[], Outcome]] = [
        lambda: shell.set_enabled(C, True),
        lambda: shell.started(C, seq=1),
        lambda: shell.settled(C, seq=2, cwd="/w"),
        lambda: shell.fire(C),
        lambda: shell.returned(C),
        lambda: shell.fire(C),
        lambda: shell.fire(C),  # a timeout
        lambda: shell.fire(C),
        lambda: shell.completed(C, token=shell.last_warm.token),
        lambda: shell.completed(C),
        lambda: shell.completed(C, error="no history"),
        lambda: shell.set_interval(C, 6_000),
        lambda: shell.action(C, "cache-warming/set-interval", 7),
        lambda: shell.action(C, "cache-warming/toggle"),
        lambda: shell.action(C, "cache-warming/toggle", {"value": True}),
        lambda: shell.closed(C, seq=3),
    ]
    for step in steps:
        out = step()
        assert out.verdict == "applied", step
        update = one_surface(out)
        assert update.conversation_id == C and update.at == shell.now
        assert update.state == shell.conv(C).view()
        extra = shell.warmer.economy.fields(shell.conv(C))
        assert update.spec == build_panel(update.state, extra)


def test_nothing_is_published_for_what_is_not_applied(shell: Any) -> None:
    warm = shell.warming(C)
    shell.started(C, seq=3)
    before = len(shell.surfaces)
    shell.completed(C, token=warm.token)  # dropped: active
    shell.started(C, seq=3)  # stale seq
    shell.fire_token(C, warm.token)  # a fire that fails its check
    shell.get_state(C)
    shell.action(C, "nope")
    shell.action(C, "cache-warming/toggle", {"value": "x"})
    shell.set_enabled(C, False, store_error="down")
    shell.returned(C, warm.token)
    assert len(shell.surfaces) == before


# -- the panel -------------------------------------------------------------------------------


def _stat(label: str, value: str) -> StatField:
    return StatField(label=label, value=value)


def _panel(
    enabled: bool,
    seconds: int,
    pct: str,
    retention: str,
    next_warm_at: int | None,
    last_warm_at: int | None,
    status: str,
    last_error: str | None = None,
) -> dict[str, Any]:
    fields: list[dict[str, Any]] = [
        {
            "kind": "toggle",
            "label": "Enabled",
            "value": enabled,
            "action": {"actionId": "cache-warming/toggle"},
        },
        {
            "kind": "number",
            "label": "Refresh Interval",
            "value": seconds,
            "min": 1,
            "step": 1,
            "unit": "s",
            "action": {"actionId": "cache-warming/set-interval"},
        },
        {"kind": "stat", "label": "Last Cache %", "value": pct},
        {"kind": "stat", "label": "Cache retention", "value": retention},
        {
            "kind": "custom",
            "rendererId": "cache-warming-timer",
            "payload": {"nextWarmAt": next_warm_at, "lastWarmAt": last_warm_at},
        },
        {"kind": "stat", "label": "Status", "value": status},
    ]
    if last_error is not None:
        fields.append({"kind": "stat", "label": "Last error", "value": last_error})
    return {"id": "cache-warming", "region": "side", "title": "Cache Warming", "fields": fields}


def test_the_panel_of_a_fresh_conversation(shell: Any) -> None:
    out = shell.settled(C)
    assert as_json(one_surface(out).spec) == _panel(
        False, 240, "\u2014", "\u2014", None, None, "disabled"
    )


def test_the_panel_with_figures_a_schedule_and_an_error(shell: Any, make_usage: Any) -> None:
    warm = shell.warming(C, interval_ms=2_500)
    shell.completed(C, token=warm.token, usage=make_usage(1000, 333, 667))
    warmed_at = shell.now
    shell.fire(C)
    out = shell.returned(C)
    spec = as_json(one_surface(out).spec)
    savings = spec["fields"].pop()  # the cost fields come after the contract's
    assert spec == _panel(
        True,
        3,  # 2.5 s rounds half up
        "33%",
        "33%",
        shell.due(C),
        warmed_at,
        "retrying",
        "no consumer took the warm request",
    )
    assert "max" not in spec["fields"][1]
    assert savings["label"] == "Savings" and savings["value"].startswith("net -")


def test_the_panel_drops_last_error_once_it_is_cleared(shell: Any) -> None:
    shell.warming(C)
    shell.returned(C)
    shell.fire(C)
    out = shell.completed(C, token=shell.last_warm.token)
    fields = as_json(one_surface(out).spec)["fields"]
    assert [f["label"] for f in fields[5:]] == ["Status", "Savings"]


def test_the_panel_shows_zero_percent_not_a_dash(shell: Any, make_usage: Any) -> None:
    out = shell.completed(C, usage=make_usage(0, 0, 0))
    fields = as_json(one_surface(out).spec)["fields"]
    assert fields[2]["value"] == "0%" and fields[3]["value"] == "0%"


@pytest.mark.parametrize(
    ("ms", "seconds"), [(1_000, 1), (1_499, 1), (1_500, 2), (86_400_000, 86_400)]
)
def test_the_panel_interval_in_seconds_rounded_half_up(shell: Any, ms: int, seconds: int) -> None:
    out = shell.set_interval(C, ms)
    assert as_json(one_surface(out).spec)["fields"][1]["value"] == seconds


def test_the_default_panel() -> None:
    assert as_json(DEFAULT_PANEL) == {
        "id": "cache-warming",
        "region": "side",
        "title": "Cache Warming",
        "fields": [{"kind": "stat", "label": "Status", "value": "No conversation focused"}],
    }


def test_the_surface_update_encoding(shell: Any) -> None:
    out = shell.settled(C)
    body = as_json(one_surface(out))
    assert set(body) == {"type", "conversationId", "state", "spec", "at"}
    assert body["type"] == "surface.changed" and body["at"] == shell.now
    assert body["state"]["lastError"] is None and "nextWarmAt" in body["state"]


# -- a command racing a close ---------------------------------------------------------------


def test_a_change_planned_after_a_close_keeps_the_close() -> None:
    # The pipeline plans and commits a command in one step of its batch, so a close is
    # always applied before or after the whole command, never in between.
    warmer = Warmer(settings={C: Settings(True, 240_000)})
    warmer.apply_event(1, ConversationClosed(conversation_id=C))
    again = warmer.plan_command(2, SetInterval(conversation_id=C, interval_ms=9_000))
    assert isinstance(again, SettingsChange)
    assert again.settings == Settings(False, 9_000)  # the close's enabled = false stands
    warmer.commit(3, again)
    conv = warmer.get(C)
    assert conv is not None and conv.status == "disabled" and conv.interval_ms == 9_000
