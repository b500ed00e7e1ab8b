"""Batches: what ``touched`` lists after each kind of input, ``rollback`` and ``end``.

The shell opens a batch, applies a run of inputs, commits ``touched()`` in one store
transaction and closes it with ``end()``; when the commit cannot be made it calls
``rollback()`` so the redelivered inputs apply again. ``touched`` lists the records an
input changed, created (the record) or removed (None); an input that changed nothing
(stale, dropped, invalid, ``get_state``, a fire that failed its check) lists nothing.

Each test opens its batches itself: what it applies inside one goes to the core directly
(``Direct``); what it sets up before goes through the shell, the real worker.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from msgspec import UNSET

from warmer.contract import (
    ConversationClosed,
    GetState,
    SetEnabled,
    SetInterval,
    SurfaceAction,
    TurnSettled,
    TurnStarted,
    Usage,
    WarmCompleted,
)
from warmer.core import (
    Conversation,
    Outcome,
    Policy,
    Record,
    Settings,
    SettingsChange,
    Status,
    Warmer,
)

C = "conv-1"
OTHER = "conv-2"
T0 = 1_760_000_000_000

Shell = Any  # conftest.Shell, reached through the make_shell fixture


class Direct:
    """Inputs applied to the core itself, outside the worker: the test opens the batch.

    Each returns what the core returned; a timer fires with the token the core holds.
    """

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.warmer: Warmer = shell.warmer

    def started(self, cid: str, seq: int | None = None) -> Outcome:
        return self.warmer.apply_event(self.shell.now, TurnStarted(conversation_id=cid, seq=seq))

    def settled(self, cid: str, **fields: Any) -> Outcome:
        event = TurnSettled(conversation_id=cid, **fields)
        return self.warmer.apply_event(self.shell.now, event)

    def closed(self, cid: str, seq: int | None = None) -> Outcome:
        event = ConversationClosed(conversation_id=cid, seq=seq)
        return self.warmer.apply_event(self.shell.now, event)

    def completed(self, cid: str, token: int | None = None) -> Outcome:
        usage = Usage(input_tokens=1000, cache_read_tokens=800, cache_write_tokens=0)
        event = WarmCompleted(conversation_id=cid, token=token, usage=usage)
        return self.warmer.apply_event(self.shell.now, event)

    def fire(self, cid: str) -> Outcome:
        conv = self.warmer.get(cid)
        assert conv is not None
        return self.fire_token(cid, conv.token)

    def fire_token(self, cid: str, token: int) -> Outcome:
        return self.warmer.on_timer(self.shell.now, cid, token)

    def returned(self, cid: str, token: int | None = None) -> Outcome:
        if token is None:
            conv = self.warmer.get(cid)
            assert conv is not None
            token = conv.token
        return self.warmer.on_warm_returned(self.shell.now, cid, token)

    def command(self, command: Any, store_error: str = "") -> Outcome:
        """Plan and commit a command; ``store_error``: answered as when its commit failed."""
        plan = self.warmer.plan_command(self.shell.now, command)
        if isinstance(plan, Outcome):
            return plan
        if store_error:
            return self.warmer.store_failed(plan, store_error)
        return self.warmer.commit(self.shell.now, plan)

    def set_enabled(self, cid: str, enabled: bool, store_error: str = "") -> Outcome:
        return self.command(SetEnabled(conversation_id=cid, enabled=enabled), store_error)

    def set_interval(self, cid: str, interval_ms: int) -> Outcome:
        return self.command(SetInterval(conversation_id=cid, interval_ms=interval_ms))

    def get_state(self, cid: str) -> Outcome:
        return self.command(GetState(conversation_id=cid))

    def action(self, cid: str, action_id: str, payload: Any = UNSET) -> Outcome:
        return self.command(
            SurfaceAction(conversation_id=cid, action_id=action_id, payload=payload)
        )


def in_batch(shell: Shell, *steps: Any) -> dict[str, Record | None]:
    """Run ``steps`` (callables over ``Direct``) in one batch; what it touched."""
    direct = Direct(shell)
    shell.warmer.begin()
    for step in steps:
        step(direct)
    touched: dict[str, Record | None] = shell.warmer.touched()
    shell.warmer.end()
    return touched


def record_of(touched: dict[str, Record | None], cid: str = C) -> Record:
    record = touched[cid]
    assert record is not None
    return record


def state_of(touched: dict[str, Record | None], cid: str = C) -> Conversation:
    state = record_of(touched, cid).state
    assert state is not None
    return state


def memory(warmer: Warmer) -> Any:
    """Everything the core holds, deep-copied, to compare before and after."""
    return copy.deepcopy((warmer._conversations, warmer._settings))


# -- touched, input by input ---------------------------------------------------------------


def test_an_event_for_a_new_conversation_lists_its_new_record(shell: Shell) -> None:
    touched = in_batch(shell, lambda s: s.started(C))
    assert list(touched) == [C]
    assert touched[C] == Record(settings=Settings(), state=shell.conv(C))
    assert state_of(touched).active and state_of(touched).last_input_at == shell.now


def test_a_settle_lists_the_armed_record(shell: Shell) -> None:
    shell.set_enabled(C, True)
    touched = in_batch(shell, lambda s: s.settled(C, cwd="/w", seq=3))
    state = state_of(touched)
    assert state.phase is Status.ARMED and state.cwd == "/w" and state.last_seq == 3
    assert record_of(touched).settings == Settings(True, 240_000)


def test_a_close_lists_the_disabled_settings(shell: Shell) -> None:
    shell.set_interval(C, 30_000)
    shell.set_enabled(C, True)
    touched = in_batch(shell, lambda s: s.closed(C))
    assert record_of(touched).settings == Settings(False, 30_000)
    assert state_of(touched).status == "disabled"


@pytest.mark.parametrize(
    ("command", "settings"),
    [
        (SetEnabled(conversation_id=C, enabled=True), Settings(True, 240_000)),
        (SetInterval(conversation_id=C, interval_ms=5_000), Settings(False, 5_000)),
        (SurfaceAction(conversation_id=C, action_id="cache-warming/toggle"), Settings(True)),
        (
            SurfaceAction(conversation_id=C, action_id="cache-warming/set-interval", payload=9),
            Settings(False, 9_000),
        ),
    ],
    ids=["set_enabled", "set_interval", "toggle", "set-interval"],
)
def test_each_command_lists_its_settings_and_state(
    shell: Shell, command: Any, settings: Settings
) -> None:
    touched = in_batch(shell, lambda s: s.command(command))
    assert record_of(touched).settings == settings
    assert state_of(touched) == shell.conv(C)


def test_a_repeated_enable_is_listed_for_its_input_time(shell: Shell) -> None:
    shell.set_enabled(C, True)
    shell.settled(C)
    armed = shell.conv(C).token
    # Enabling an armed conversation again: the schedule stands, but the input was
    # applied (a surface, a reply) and its time noted for retention.
    shell.advance(10)
    touched = in_batch(shell, lambda s: s.set_enabled(C, True))
    assert state_of(touched).last_input_at == shell.now and state_of(touched).token == armed


@pytest.mark.parametrize(
    "step",
    [
        lambda s: s.get_state(C),
        lambda s: s.get_state("never-seen"),
        lambda s: s.action(C, "cache-warming/toggle", {"value": "x"}),
        lambda s: s.action(C, "cache-warming/unknown"),
        lambda s: s.set_enabled(C, False, store_error="disk full"),
        lambda s: s.started(C, seq=1),  # not above the last seq: stale
        lambda s: s.completed(C, token=1),  # older than the armed token: stale
        lambda s: s.fire_token(C, 1),  # a stale timer
        lambda s: s.returned(C, 1),  # a stale return
    ],
    ids=[
        "get_state",
        "get_state_unseen",
        "invalid",
        "unknown_action",
        "store_error",
        "stale_seq",
        "stale_completion",
        "stale_timer",
        "stale_return",
    ],
)
def test_an_input_that_changes_nothing_lists_nothing(shell: Shell, step: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, seq=1)
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token)
    assert shell.conv(C).token > 1
    before = memory(shell.warmer)
    assert in_batch(shell, step) == {}
    assert memory(shell.warmer) == before


def test_a_completion_dropped_while_active_lists_nothing(shell: Shell) -> None:
    shell.started(C)
    assert in_batch(shell, lambda s: s.completed(C)) == {}


def test_a_timer_fire_lists_the_warming_record(shell: Shell) -> None:
    shell.set_enabled(C, True)
    shell.settled(C)
    touched = in_batch(shell, lambda s: s.fire(C))
    state = state_of(touched)
    assert state.phase is Status.WARMING and state.idle_warms == 1
    assert state.published_at == shell.now and state.next_warm_at is None


def test_a_warm_timeout_lists_the_failure(shell: Shell) -> None:
    shell.set_enabled(C, True)
    shell.settled(C)
    shell.fire(C)
    touched = in_batch(shell, lambda s: s.fire(C))
    state = state_of(touched)
    assert state.phase is Status.RETRYING and state.failures == 1
    assert state.last_error == "no completion within 60 s"


def test_a_returned_warm_lists_the_failure(shell: Shell) -> None:
    shell.set_enabled(C, True)
    shell.settled(C)
    shell.fire(C)
    touched = in_batch(shell, lambda s: s.returned(C))
    assert state_of(touched).last_error == "no consumer took the warm request"


def test_a_completion_lists_the_figures_and_the_new_arm(shell: Shell) -> None:
    shell.set_enabled(C, True)
    shell.settled(C)
    warm = shell.fire(C)
    assert warm.effects
    token = shell.last_warm.token
    touched = in_batch(shell, lambda s: s.completed(C, token=token))
    state = state_of(touched)
    assert state.answered_token == token < state.token
    assert state.last_pct == 80 and state.last_read_at == shell.now


def test_a_batch_lists_each_conversation_once_as_it_ends(shell: Shell) -> None:
    shell.set_enabled(C, True)
    touched = in_batch(
        shell,
        lambda s: s.settled(C),
        lambda s: s.started(OTHER),
        lambda s: s.fire(C),
        lambda s: s.settled(OTHER),
    )
    assert set(touched) == {C, OTHER}
    assert state_of(touched, C).phase is Status.WARMING
    assert not state_of(touched, OTHER).active


def test_touched_lists_copies(shell: Shell) -> None:
    direct = Direct(shell)
    shell.warmer.begin()
    direct.started(C)
    touched = shell.warmer.touched()
    direct.settled(C)
    assert state_of(touched).active and not shell.conv(C).active
    shell.warmer.end()


def test_a_new_batch_starts_with_nothing_touched(shell: Shell) -> None:
    in_batch(shell, lambda s: s.set_interval(C, 5_000))
    shell.warmer.begin()
    assert shell.warmer.touched() == {}
    shell.warmer.end()


def test_outside_a_batch_nothing_is_remembered(shell: Shell) -> None:
    Direct(shell).settled(C)
    assert shell.warmer._journal._batch is None
    with pytest.raises(RuntimeError, match="no batch"):
        shell.warmer.touched()


# -- rollback ------------------------------------------------------------------------------


@pytest.fixture
def busy(make_shell: Any) -> Iterator[Shell]:
    """Two conversations, one armed and one warming, with persisted settings."""
    shell = make_shell()
    shell.set_enabled(C, True)
    shell.settled(C, cwd="/w", seq=4)
    shell.set_interval(OTHER, 10_000)
    shell.set_enabled(OTHER, True)
    shell.settled(OTHER)
    shell.fire(OTHER)
    yield shell


def test_rollback_restores_state_and_settings_exactly(busy: Shell) -> None:
    warmer = busy.warmer
    before = memory(warmer)
    token = warmer.last_token
    direct = Direct(busy)
    warmer.begin()
    direct.started(C, seq=5)
    direct.closed(C, seq=6)
    direct.fire(OTHER)  # the warm times out: a failure and a retry
    direct.set_interval(OTHER, 2_000)
    direct.settled("new", cwd="/n")
    direct.set_enabled("new", True)
    assert set(warmer.touched()) == {C, OTHER, "new"}
    taken = warmer.last_token
    assert taken > token
    warmer.rollback()
    assert memory(warmer) == before
    assert warmer.get("new") is None and warmer.persisted("new") == Settings()
    assert warmer.last_token == taken, "the token counter never goes back"
    assert warmer.touched() == {}, "the batch stays open, as if just begun"
    warmer.end()
    # Tokens issued after a rollback are still above every token issued before.
    busy.set_interval(C, 9_000)
    assert busy.conv(C).token > taken


def test_rollback_twice_still_restores(busy: Shell) -> None:
    warmer = busy.warmer
    before = memory(warmer)
    direct = Direct(busy)
    warmer.begin()
    direct.closed(C)
    warmer.rollback()
    direct.started(C)
    direct.set_interval(OTHER, 3_000)
    warmer.rollback()
    warmer.end()
    assert memory(warmer) == before


def test_a_redelivered_event_is_applied_again_after_a_rollback(busy: Shell) -> None:
    warmer = busy.warmer
    event = TurnStarted(conversation_id=C, seq=5)
    warmer.begin()
    assert warmer.apply_event(busy.now, event).verdict == "applied"
    warmer.rollback()
    warmer.end()
    # The broker redelivers it: its seq is above the restored last seq.
    out = busy.event(event)
    assert out.verdict == "applied" and busy.conv(C).active and busy.conv(C).last_seq == 5


def test_a_rolled_back_fire_applied_again_does_the_same(busy: Shell) -> None:
    # The shell applies again the inputs nobody redelivers (a timer that fired).
    warmer = busy.warmer
    due, token = busy.timers[C]
    busy.now = due
    warmer.begin()
    first = warmer.on_timer(busy.now, C, token)
    warmer.rollback()
    again = warmer.on_timer(busy.now, C, token)
    assert again == first and busy.conv(C).phase is Status.WARMING
    warmer.end()


def test_a_rolled_back_completion_applies_again(busy: Shell, make_usage: Any) -> None:
    warmer = busy.warmer
    token = busy.conv(OTHER).token
    event = WarmCompleted(conversation_id=OTHER, token=token, usage=make_usage())
    warmer.begin()
    assert warmer.apply_event(busy.now, event).verdict == "applied"
    warmer.rollback()
    warmer.end()
    assert busy.conv(OTHER).answered_token == 0
    assert busy.event(event).verdict == "applied"
    assert busy.event(event).verdict == "stale"


def test_rollback_of_a_command_restores_a_conversation_never_seen(shell: Shell) -> None:
    warmer = shell.warmer
    plan = warmer.plan_command(shell.now, SetEnabled(conversation_id=C, enabled=True))
    assert isinstance(plan, SettingsChange)
    warmer.begin()
    warmer.commit(shell.now, plan)
    assert warmer.get(C) is not None and warmer.persisted(C).enabled
    warmer.rollback()
    warmer.end()
    assert warmer.get(C) is None and C not in warmer._settings


def test_get_state_in_a_batch_touches_nothing(busy: Shell) -> None:
    warmer = busy.warmer
    warmer.begin()
    warmer.plan_command(busy.now, GetState(conversation_id=C))
    warmer.plan_command(busy.now, GetState(conversation_id="never-seen"))
    assert warmer._journal._batch == {}
    warmer.end()


# -- prune in a batch ----------------------------------------------------------------------


def test_pruned_conversations_are_listed_as_none_and_come_back_on_rollback(
    make_shell: Any,
) -> None:
    shell = make_shell(Policy(retention_ms=1_000))
    shell.set_interval(C, 5_000)
    shell.started(OTHER)
    shell.advance(500)
    shell.settled("fresh")
    shell.advance(600)  # C and OTHER: 1,100 ms without input; fresh: 600
    before = memory(shell.warmer)
    shell.warmer.begin()
    assert sorted(shell.warmer.prune(shell.now)) == [C, OTHER]
    assert shell.warmer.get(C) is None and shell.warmer.persisted(C) == Settings()
    assert shell.warmer.touched() == {C: None, OTHER: None}
    shell.warmer.rollback()
    assert memory(shell.warmer) == before
    shell.warmer.end()


def test_a_conversation_created_then_pruned_in_one_batch_lists_nothing(make_shell: Any) -> None:
    shell = make_shell(Policy(retention_ms=0))
    shell.warmer.begin()
    Direct(shell).started(C)
    shell.advance(1)
    assert shell.warmer.prune(shell.now) == [C]
    assert shell.warmer.touched() == {}
    shell.warmer.end()


# -- misuse --------------------------------------------------------------------------------


def test_begin_twice_raises() -> None:
    warmer = Warmer()
    warmer.begin()
    with pytest.raises(RuntimeError, match="already open"):
        warmer.begin()


@pytest.mark.parametrize("call", ["end", "rollback", "touched"])
def test_closing_or_reading_without_a_batch_raises(call: str) -> None:
    warmer = Warmer()
    with pytest.raises(RuntimeError, match="no batch is open"):
        getattr(warmer, call)()
    warmer.begin()
    warmer.end()
    with pytest.raises(RuntimeError, match="no batch is open"):
        getattr(warmer, call)()


def test_a_batch_applies_exactly_as_outside_one() -> None:
    events = [
        SetEnabled(conversation_id=C, enabled=True),
        TurnSettled(conversation_id=C, cwd="/w", seq=1),
        TurnStarted(conversation_id=OTHER, seq=1),
    ]
    outcomes = []
    for batched in (False, True):
        warmer = Warmer(token_start=T0)
        if batched:
            warmer.begin()
        plan = warmer.plan_command(T0, events[0])  # type: ignore[arg-type]
        assert isinstance(plan, SettingsChange)
        run = [warmer.commit(T0, plan)]
        run += [warmer.apply_event(T0 + 1, e) for e in events[1:]]  # type: ignore[arg-type]
        outcomes.append((run, warmer.get(C), warmer.get(OTHER)))
    assert outcomes[0] == outcomes[1]
