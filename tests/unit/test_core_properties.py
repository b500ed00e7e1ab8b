"""Invariants of the state machine under random interleavings of everything it is fed.

Hypothesis draws a policy, persisted settings and a sequence of steps over three
conversations: lifecycle events (with and without ``seq``), commands (committed, or
failing in the store), timer fires (the pending timer, and stale tokens), unroutable
returns and completions (current, stale, future and missing tokens) while time
advances. Time only moves through ``advance``, which fires every timer that falls due
on the way, in due order, the way the scheduler would. After every step the
invariants of docs/semantics.md are checked against what the core returned and what the
worker did with it (the shell of ``conftest.py``: the real worker, in-memory bus).

Every step runs through the worker in a batch of its own, its records committed to an
in-memory store (encoded bytes); a command failing in the store is rolled back and
answered ``store_error``. After every step the decoded store is compared with the
test's own model of what it must hold: the settings, the status, the failures, the idle
stretch's warm count and the last ``seq`` of each conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec import UNSET

from warmer.contract import (
    ErrorReply,
    GetState,
    SetEnabled,
    SetInterval,
    SurfaceAction,
    Usage,
    WarmCompleted,
)
from warmer.core import (
    Arm,
    Outcome,
    Policy,
    PublishSurface,
    PublishWarm,
    Record,
    SendReply,
    Settings,
    SettingsChange,
    Warmer,
    build_panel,
)
from warmer.core.rules import clamp_interval, seconds_to_interval

CIDS = ("a", "b", "c")
PENDING = frozenset({"armed", "warming", "retrying"})
GUARDED = frozenset({"disabled", "paused", "budget_exhausted", "expired"})

cids = st.sampled_from(CIDS)
seqs = st.one_of(st.none(), st.integers(0, 12))
intervals = st.sampled_from([0, 999, 1_000, 1_500, 5_000, 30_000, 240_000, 10**9])
store_errors = st.sampled_from(["", "", "", "disk full"])
usages = st.builds(
    Usage,
    input_tokens=st.integers(0, 2_000),
    cache_read_tokens=st.integers(0, 2_000),
    cache_write_tokens=st.integers(0, 2_000),
)
errors = st.sampled_from(["provider error", "conversation is generating", "no history"])
_GOOD_USAGE = Usage(input_tokens=1000, cache_read_tokens=900, cache_write_tokens=100)
_THEN_ERROR = {"completed": None, "error": "boom", "generating": "conversation is generating"}

steps = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0, 1, 500, 1_000, 2_000, 5_000, 60_000])),
    st.tuples(st.just("advance"), st.integers(0, 700_000)),
    st.tuples(st.just("fire_next")),
    st.tuples(st.just("fire"), cids),
    st.tuples(st.just("fire"), cids),
    st.tuples(st.just("fire_then"), cids, st.just("returned"), st.just(0)),
    st.tuples(st.just("fire_then"), cids, st.just("completed"), st.just(10)),
    # A warm goes out and, a moment later, comes back unroutable, completes or fails.
    st.tuples(
        st.just("fire_then"),
        cids,
        st.sampled_from(["returned", "completed", "error", "generating"]),
        st.sampled_from([0, 1, 999]),
    ),
    st.tuples(st.just("started"), cids, seqs),
    st.tuples(
        st.just("settled"),
        cids,
        seqs,
        st.sampled_from([None, -300_000, -90_000, -1, 0, 2_000, 5_000]),
        st.sampled_from([None, "/repo"]),
    ),
    st.tuples(st.just("closed"), cids, seqs),
    st.tuples(
        st.just("completed"),
        cids,
        st.sampled_from(["current", "stale", "none", "future"]),
        st.one_of(st.none(), errors),
        usages,
    ),
    st.tuples(st.just("completed"), cids, st.just("current"), st.none(), usages),
    # The outstanding warm of whichever conversation is warming comes back or completes.
    st.tuples(st.just("returned"), st.just("warming"), st.just("current")),
    st.tuples(st.just("completed"), st.just("warming"), st.just("current"), st.none(), usages),
    st.tuples(st.just("completed"), st.just("warming"), st.just("current"), errors, usages),
    st.tuples(st.just("returned"), cids, st.sampled_from(["current", "current", "stale"])),
    st.tuples(st.just("returned"), cids, st.just("current")),
    st.tuples(st.just("fire_stale"), cids, st.integers(1, 3)),
    st.tuples(st.just("set_enabled"), cids, st.booleans(), store_errors),
    st.tuples(st.just("set_interval"), cids, intervals, store_errors),
    st.tuples(
        st.just("toggle"),
        cids,
        st.sampled_from([UNSET, {"value": True}, {"value": False}, {"value": "x"}]),
        store_errors,
    ),
    st.tuples(
        st.just("set_interval_action"),
        cids,
        st.sampled_from([1, 1.5, 30, {"value": 5}, 0, "30", None]),
        store_errors,
    ),
    st.tuples(st.just("get_state"), cids),
    # The worker is killed and a new one starts from the store after some downtime.
    st.tuples(st.just("restart"), st.sampled_from([0, 1_000, 60_000, 400_000, 3_000_000])),
    # ... just after its next timer fell due (and a little, or much, later).
    st.tuples(st.just("restart_past_due"), st.sampled_from([1, 1, 2_000, 400_000])),
)

policies = st.builds(
    Policy,
    warm_timeout_ms=st.sampled_from([1_000, 5_000, 60_000]),
    max_failures=st.integers(1, 4),
    idle_max_ms=st.sampled_from([10_000, 300_000, 2_700_000]),
    idle_max_warms=st.integers(1, 5),
)
persisted = st.fixed_dictionaries(
    {},
    optional={
        cid: st.builds(
            Settings,
            enabled=st.sampled_from([True, True, True, False]),
            interval_ms=st.sampled_from([1_000, 5_000, 240_000]),
        )
        for cid in CIDS
    },
)


@dataclass
class Stretch:
    """The test's own model of an idle stretch: when it began, how many warms went out."""

    started_at: int
    warms: int = 0


@dataclass
class Model:
    """What the test tracks independently of the core, to check it against."""

    stretches: dict[str, Stretch] = field(default_factory=dict)
    last_token: int = 0
    conv_tokens: dict[str, int] = field(default_factory=dict)
    warm_of: dict[str, PublishWarm] = field(default_factory=dict)
    timeout_due: dict[str, int] = field(default_factory=dict)
    # What the store must hold: settings per conversation with a record, and, for a
    # conversation an input was applied to, its state as the model sees it.
    settings: dict[str, Settings] = field(default_factory=dict)
    states: set[str] = field(default_factory=set)
    active: dict[str, bool] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)


def _status_before(shell: Any, cid: str) -> str:
    conv = shell.warmer.get(cid)
    if conv is not None:
        return str(conv.status)
    return "idle" if shell.warmer.persisted(cid).enabled else "disabled"


def _core(warmer: Warmer) -> Any:
    """What the core holds of every conversation, and its token counter."""
    convs = {cid: warmer.get(cid) for cid in CIDS}
    return (
        {cid: None if c is None else msgspec.structs.asdict(c) for cid, c in convs.items()},
        warmer.last_token,
        {cid: warmer.persisted(cid) for cid in CIDS},
    )


def _snapshot(shell: Any) -> Any:
    convs, last_token, persisted = _core(shell.warmer)
    return (convs, shell.timers, last_token, persisted)


def _token(shell: Any, cid: str, kind: str, k: int = 1) -> int | None:
    conv = shell.warmer.get(cid)
    current = 0 if conv is None else conv.token
    if kind == "current":
        return current or 1
    if kind == "stale":
        return current - k if current - k >= 1 else None
    if kind == "future":
        return current + k
    return None


def _planned_settings(model: Model, cid: str, command: Any) -> Settings | None:
    """The settings a command sets, as the model reads the rules; None: it is refused."""
    current = model.settings.get(cid, Settings())
    if isinstance(command, SetEnabled):
        return Settings(command.enabled, current.interval_ms)
    if isinstance(command, SetInterval):
        return Settings(current.enabled, clamp_interval(command.interval_ms))
    payload = command.payload
    if command.action_id == "cache-warming/toggle":
        if isinstance(payload, dict):
            payload = payload.get("value")
        elif payload is UNSET or payload is None:
            return Settings(not current.enabled, current.interval_ms)
        return Settings(payload, current.interval_ms) if isinstance(payload, bool) else None
    if isinstance(payload, dict):
        payload = payload.get("value")
    interval = seconds_to_interval(payload)
    return None if interval is None else Settings(current.enabled, interval)


class Run:
    """Runs one drawn scenario step by step, checking the invariants after each."""

    def __init__(self, shell: Any, stored: dict[str, Settings] | None = None) -> None:
        self.shell = shell
        self.model = Model(last_token=shell.warmer.last_token, settings=dict(stored or {}))

    # -- driving ------------------------------------------------------------------------

    def step(self, step: tuple[Any, ...]) -> None:
        kind, *args = step
        shell = self.shell
        if kind == "advance":
            self.advance(args[0])
            return
        if kind == "restart":
            self.restart(args[0])
            return
        if kind == "restart_past_due":
            if shell.timers:
                self.restart(min(due for due, _ in shell.timers.values()) - shell.now + args[0])
            return
        if kind == "fire_next":
            if shell.timers:
                self.advance(min(due for due, _ in shell.timers.values()) - shell.now)
            return
        if kind == "fire":
            if args[0] in shell.timers:
                self.advance(shell.timers[args[0]][0] - shell.now)
            return
        if kind == "fire_then":
            cid, then, delay = args
            if cid not in shell.timers:
                return
            self.advance(shell.timers[cid][0] - shell.now)
            self.advance(delay)
            if then == "returned":
                self.step(("returned", cid, "current"))
            else:
                self.step(("completed", cid, "current", _THEN_ERROR[then], _GOOD_USAGE))
            return
        cid = args[0]
        if cid == "warming":
            warming = [c for c in CIDS if _status_before(shell, c) == "warming"]
            if not warming:
                return
            cid = warming[0]
        before = _snapshot(shell)
        status_before = _status_before(shell, cid)
        seq = args[1] if kind in ("started", "settled", "closed") else None
        last_seq = self.model.last_seq.get(cid)
        stale_seq = seq is not None and last_seq is not None and seq <= last_seq
        if kind == "started":
            out = shell.started(cid, seq=args[1])
        elif kind == "settled":
            seq, offset, cwd = args[1:]
            fields: dict[str, Any] = {"seq": seq, "cwd": cwd}
            if offset is not None:
                fields["last_request_at"] = max(0, shell.now + offset)
            out = shell.settled(cid, **fields)
        elif kind == "closed":
            out = shell.closed(cid, seq=args[1])
        elif kind == "completed":
            token_kind, error, usage = args[1:]
            token = _token(shell, cid, token_kind, 1)
            if token_kind == "stale" and token is None:
                return
            event = WarmCompleted(
                conversation_id=cid, token=token, usage=None if error else usage, error=error
            )
            out = shell.event(event)
        elif kind == "returned":
            token = _token(shell, cid, args[1])
            if token is None:
                return
            out = shell.returned(cid, token)
        elif kind == "fire_stale":
            token = _token(shell, cid, "stale", args[1])
            if token is None:
                return
            out = shell.fire_token(cid, token)
            assert out.effects == [], "a stale timer must do nothing"
        elif kind == "get_state":
            out = shell.command(GetState(conversation_id=cid))
        else:
            command, store_error = self.command(kind, cid, args[1]), args[2]
            planned = _planned_settings(self.model, cid, command)
            plan = shell.warmer.plan_command(shell.now, command)
            stored = shell.stored(cid)
            out = shell.command(command, store_error)
            if store_error and out.verdict == "applied":
                # Nothing to write (the same settings at the same instant): the worker
                # met no store, so no store error.
                assert shell.stored(cid) == stored and _snapshot(shell) == before
                store_error = ""
            if isinstance(plan, SettingsChange) and not store_error:
                assert shell.warmer.persisted(cid) == plan.settings == planned
                self.model.settings[cid] = planned
            elif isinstance(plan, SettingsChange):
                assert [type(e) for e in out.effects] == [SendReply]
                reply = out.effects[0].reply
                assert isinstance(reply, ErrorReply) and reply.code == "store_error"
                # Applied, then rolled back: nothing stands but the tokens it took.
                after = _snapshot(shell)
                assert (after[0], after[1], after[3]) == (before[0], before[1], before[3])
                assert after[2] >= before[2], "the token counter went back"
                self.model.last_token = shell.warmer.last_token
                before = after
            else:
                assert planned is None, "the model expected the command to apply"
        if kind in ("started", "settled", "closed"):
            assert (out.verdict == "stale") == stale_seq, (kind, seq, last_seq, out.verdict)
            if seq is not None and not stale_seq:
                self.model.last_seq[cid] = seq
        self.check_outcome(kind, cid, out, before, status_before)

    def restart(self, downtime: int) -> None:
        """Kill the worker (only the store survives) and start a new one ``downtime`` later."""
        old, model = self.shell, self.model
        records = old.records()
        now = old.now + downtime
        shell = old.restarted(now)
        recovery = shell.recovery
        assert recovery is not None
        self.shell = shell
        model.last_token = shell.warmer.last_token
        assert recovery.loaded == len(records)
        assert all(arm.due_at >= now for arm in recovery.arms)
        for cid in CIDS:
            conv = shell.warmer.get(cid)
            if conv is None:
                assert cid not in records
                continue
            if cid not in model.states:  # settings only: a state, as a first input makes it
                assert conv.status in ("idle", "disabled") and conv.idle_since == now
                model.states.add(cid)
                model.stretches[cid] = Stretch(now)
                model.failures[cid] = 0
            elif conv.status != model.status[cid]:
                # Fell due while down and not warmed at once: it waits for its next turn.
                assert model.status[cid] in ("armed", "retrying"), (cid, conv.status)
                assert conv.status in ("expired", "budget_exhausted"), (cid, conv.status)
            model.status[cid] = conv.status
            if conv.status == "warming":  # awaited until its own timeout, or at once
                model.timeout_due[cid] = max(now, model.timeout_due[cid])
        self.check_state()

    def command(self, kind: str, cid: str, arg: Any) -> Any:
        if kind == "set_enabled":
            return SetEnabled(conversation_id=cid, enabled=arg)
        if kind == "set_interval":
            return SetInterval(conversation_id=cid, interval_ms=arg)
        action = "cache-warming/toggle" if kind == "toggle" else "cache-warming/set-interval"
        return SurfaceAction(conversation_id=cid, action_id=action, payload=arg)

    def advance(self, ms: int) -> None:
        """Let time pass, firing every timer that falls due on the way, in due order."""
        shell = self.shell
        target = shell.now + ms
        while shell.timers:
            cid, (due, _) = min(shell.timers.items(), key=lambda item: (item[1][0], item[0]))
            if due > target:
                break
            before = _snapshot(shell)
            status_before = _status_before(shell, cid)
            out = shell.fire(cid)
            assert out.effects, f"the pending timer of {cid} fired and did nothing"
            self.check_outcome("fire", cid, out, before, status_before)
        shell.now = target
        self.check_state()

    # -- checking -------------------------------------------------------------------------

    def check_outcome(
        self, kind: str, cid: str, out: Outcome, before: Any, status_before: str
    ) -> None:
        shell, model, policy = self.shell, self.model, self.shell.warmer.policy
        surfaces = [e.update for e in out.effects if isinstance(e, PublishSurface)]
        applied = out.verdict == "applied" and kind != "get_state"
        if applied:
            assert len(surfaces) == 1, f"{kind}: {len(surfaces)} surfaces for an applied input"
            update = surfaces[0]
            conv = shell.conv(cid)
            assert update.conversation_id == cid and update.at == shell.now
            assert update.state == conv.view(), "the surface is published after the re-arm"
            conv = shell.warmer.get(update.conversation_id)
            extra = [] if conv is None else shell.warmer.economy.fields(conv)
            assert update.spec == build_panel(update.state, extra)
            self.expect_stored(kind, cid, update.state)
        else:
            assert not surfaces, f"{kind}: a surface for an input that was not applied"
            assert not [e for e in out.effects if not isinstance(e, SendReply)]
            assert _snapshot(shell) == before, f"{kind}: {out.verdict} changed the state"

        # The idle stretch, as the test understands addition 4 (a record that never
        # settled nor was enabled from a guard counts from when it was created).
        if shell.warmer.get(cid) is not None and cid not in model.stretches:
            model.stretches[cid] = Stretch(shell.now)
        if applied and kind == "settled":
            model.stretches[cid] = Stretch(shell.now)
        enabled_now = shell.warmer.get(cid) is not None and shell.conv(cid).enabled
        if (
            applied
            and kind in ("set_enabled", "toggle")
            and enabled_now
            and status_before in GUARDED
        ):
            model.stretches[cid] = Stretch(shell.now)

        for effect in out.effects:
            if isinstance(effect, Arm):
                assert effect.conversation_id == cid
                assert effect.due_at >= shell.now, "a timer is never due in the past"
                is_timeout = any(
                    isinstance(e, PublishWarm) and e.request.token == effect.token
                    for e in out.effects
                )
                if is_timeout:  # the warm timeout carries the warm's own token
                    assert effect.token == shell.conv(cid).token <= model.last_token
                else:
                    assert effect.token > model.last_token, "every arm takes a new token"
                    model.last_token = effect.token
            elif isinstance(effect, PublishWarm):
                conv = shell.conv(cid)
                assert conv.enabled and not conv.active, "a warm for a disabled/active conv"
                assert conv.status == "warming"
                assert effect.request.token == conv.token
                assert effect.request.requested_at == shell.now
                assert effect.timeout_ms == min(policy.warm_timeout_ms, conv.interval_ms)
                stretch = model.stretches[cid]
                stretch.warms += 1
                assert stretch.warms <= policy.idle_max_warms, "a warm beyond the budget count"
                assert shell.now <= stretch.started_at + policy.idle_max_ms, (
                    "a warm beyond the budget time"
                )
                model.warm_of[cid] = effect
                model.timeout_due[cid] = effect.request.requested_at + effect.timeout_ms
        conv = shell.warmer.get(cid)
        if conv is not None and conv.status == "budget_exhausted" != status_before:
            # Never exhausted early: any arm is due at most one interval from now.
            stretch = model.stretches[cid]
            assert (
                stretch.warms >= policy.idle_max_warms
                or shell.now + conv.interval_ms > stretch.started_at + policy.idle_max_ms
            ), "budget_exhausted while the idle budget was not spent"
        self.check_state()

    def expect_stored(self, kind: str, cid: str, state: Any) -> None:
        """An input was applied to ``cid``: what its record must now hold, as the model says."""
        model = self.model
        model.states.add(cid)
        if kind == "closed":
            model.settings[cid] = Settings(False, model.settings.get(cid, Settings()).interval_ms)
        elif kind in ("started", "settled"):
            model.active[cid] = kind == "started"
        if not model.settings.get(cid, Settings()).enabled:
            assert state.status == "disabled", f"{kind}: enabled in memory, not in the model"
        elif model.active.get(cid, False):
            assert state.status == "active"
        model.status[cid] = state.status
        model.failures[cid] = state.failures

    def check_store(self) -> None:
        """The store holds what the model says, record by record, decoded from its bytes."""
        shell, model = self.shell, self.model
        store = shell.records()
        assert set(store) == set(model.settings) | model.states
        for cid, record in store.items():
            assert record.settings == model.settings.get(cid, Settings()), cid
            state = record.state
            if cid not in model.states:
                assert state is None, f"{cid}: a state stored without an input applied"
                continue
            assert state is not None
            assert state.status == model.status[cid], cid
            assert state.failures == model.failures[cid], cid
            assert state.idle_warms == model.stretches[cid].warms, f"{cid}: the stretch's warms"
            assert state.last_seq == model.last_seq.get(cid), cid

    def check_state(self) -> None:
        shell, model = self.shell, self.model
        self.check_store()
        assert shell.warmer.last_token >= model.last_token
        assert shell.warmer.last_token == model.last_token, "a token taken and not armed"
        for cid in CIDS:
            conv = shell.warmer.get(cid)
            timer = shell.timers.get(cid)
            if conv is None:
                assert timer is None
                continue
            status = conv.status
            # The token only grows.
            assert conv.token >= model.conv_tokens.get(cid, 0)
            model.conv_tokens[cid] = conv.token
            # Status agrees with the rest of the state.
            assert (status == "disabled") == (not conv.enabled)
            assert (status == "active") == (conv.enabled and conv.active)
            assert conv.view().status == status
            # One timer per conversation, pending exactly in the scheduled statuses, current.
            assert (timer is not None) == (status in PENDING), (status, timer)
            if timer is not None:
                assert timer[1] == conv.token, "a pending timer with an old token"
            # nextWarmAt is the due time of the pending timer, null otherwise.
            if status in ("armed", "retrying"):
                assert timer is not None and conv.next_warm_at == timer[0]
            else:
                assert conv.next_warm_at is None
            # warming: the warm timeout of the last warm published is pending.
            if status == "warming":
                warm = model.warm_of[cid]
                assert warm.request.token == conv.token
                assert timer == (model.timeout_due[cid], conv.token)
            assert 0 <= conv.failures < shell.warmer.policy.max_failures or status in (
                "paused",
                "disabled",
                "active",
            )
            if status == "paused":  # after failures, or after warms that found the cache gone
                policy = shell.warmer.policy
                assert conv.failures >= policy.max_failures or conv.misses >= policy.max_misses
            assert conv.last_error is None or len(conv.last_error) <= 500
            assert 1_000 <= conv.interval_ms <= 86_400_000


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    policy=policies,
    stored=persisted,
    prelude=st.lists(st.booleans(), min_size=3, max_size=3),
    scenario=st.lists(steps, min_size=10, max_size=60),
    token_start=st.sampled_from([0, 1_760_000_000_000_000]),
)
def test_invariants_hold_after_every_step(
    make_shell: Any,
    policy: Policy,
    stored: dict[str, Settings],
    prelude: list[bool],
    scenario: list[tuple[Any, ...]],
    token_start: int,
) -> None:
    records = {cid: Record(settings=value) for cid, value in stored.items()}
    run = Run(make_shell(policy, records=records, token_start=token_start), stored)
    for cid, settle in zip(CIDS, prelude, strict=True):
        if settle:  # most stored settings are enabled: this arms them
            run.step(("settled", cid, None, None, "/repo"))
    for step in scenario:
        run.step(step)
    run.advance(3_000_000)


@settings(max_examples=100, deadline=None)
@given(scenario=st.lists(steps, max_size=40))
def test_get_state_never_creates_a_record_or_publishes(
    make_shell: Any, scenario: list[tuple[Any, ...]]
) -> None:
    run = Run(make_shell())
    for step in scenario:
        run.step(step)
    shell = run.shell
    records = len(shell.warmer)
    for cid in (*CIDS, "never-seen"):
        before = _snapshot(shell)
        out = shell.command(GetState(conversation_id=cid))
        assert [type(e) for e in out.effects] == [SendReply]
        assert _snapshot(shell) == before and len(shell.warmer) == records
        if shell.warmer.get(cid) is not None:
            assert out.effects[0].reply.state == shell.conv(cid).view()


@settings(max_examples=100, deadline=None)
@given(
    enabled=st.booleans(),
    repeats=st.integers(1, 5),
    gaps=st.lists(st.integers(0, 100_000), min_size=5, max_size=5),
)
def test_repeated_enables_never_postpone_a_warm(
    make_shell: Any, enabled: bool, repeats: int, gaps: list[int]
) -> None:
    shell = make_shell()
    shell.set_enabled("a", True)
    shell.settled("a")
    due = shell.due("a")
    for gap in gaps[:repeats]:
        shell.advance(min(gap, due - shell.now - 1))
        shell.set_enabled("a", True)
        assert shell.due("a") == due


_COMMANDS = frozenset({"set_enabled", "set_interval", "toggle", "set_interval_action"})


@settings(max_examples=100, deadline=None)
@given(
    policy=policies,
    stored=persisted,
    scenario=st.lists(steps, min_size=10, max_size=60),
)
def test_a_batch_changes_nothing_but_what_is_remembered(
    make_shell: Any, policy: Policy, stored: dict[str, Settings], scenario: list[tuple[Any, ...]]
) -> None:
    # What the worker applied in batches, applied again to a core outside any batch: the
    # same outcomes, the same states. (No store errors: a rolled back batch skips tokens
    # the direct run does not take.)
    scenario = [(*step[:-1], "") if step[0] in _COMMANDS else step for step in scenario]
    scenario = [step for step in scenario if not step[0].startswith("restart")]
    records = {cid: Record(settings=value) for cid, value in stored.items()}
    batched = Run(make_shell(policy, records=records), stored)
    direct = Warmer(policy, settings=stored)
    replayed = 0
    for step in scenario:
        batched.step(step)
        calls = batched.shell.calls
        for name, args, result in calls[replayed:]:
            assert getattr(direct, name)(*args) == result, name
        replayed = len(calls)
        assert _core(direct) == _core(batched.shell.warmer)
