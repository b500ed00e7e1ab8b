"""A fake shell for the core: it carries out the effects the way the worker would, minus I/O.

Tests drive a ``Warmer`` through it and read like the rules of docs/semantics.md:
``shell.settled("c")``, ``shell.fire("c")``, ``shell.completed("c", usage=...)``.
Each input is applied as the worker's pipeline does it, in a batch of its own: the
records it touched are encoded into ``store`` (a dict of bytes, as a store keeps them),
then its effects are carried out. A command whose store commit fails rolls the batch
back and is answered ``store_error``. Timers are a dict of the one pending timer per
conversation (``Arm`` starts or replaces it, ``Cancel`` removes it); what was
published and answered is collected in lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, assert_never

import pytest
from msgspec import UNSET

from warmer.contract import (
    ConversationClosed,
    CostPolicyName,
    GetState,
    LifecycleEvent,
    Reply,
    SetEnabled,
    SetInterval,
    SetPolicy,
    SurfaceAction,
    SurfaceChanged,
    TurnSettled,
    TurnStarted,
    Usage,
    WarmCompleted,
    WarmRequested,
)
from warmer.core import (
    Accounted,
    Arm,
    Cancel,
    Conversation,
    IntervalAdjusted,
    Outcome,
    Policy,
    PublishSurface,
    PublishWarm,
    Record,
    SendReply,
    Settings,
    SettingsChange,
    Warmer,
    WarmFailed,
    WarmSkipped,
    decode_record,
    encode_record,
)

T0 = 1_760_000_000_000
"""A plausible epoch-ms start time for every test."""


def build_usage(input_tokens: int = 1000, read: int = 800, write: int = 0) -> Usage:
    """A warm's token usage: ``input_tokens`` counts the cache reads and writes."""
    return Usage(input_tokens=input_tokens, cache_read_tokens=read, cache_write_tokens=write)


class Shell:
    """Carries out a ``Warmer``'s effects into plain containers, with a hand-driven clock."""

    def __init__(
        self,
        policy: Policy | None = None,
        settings: Mapping[str, Settings] | None = None,
        token_start: int = 0,
        now: int = T0,
        records: Mapping[str, Record] | None = None,
        batched: bool = True,
    ) -> None:
        self.warmer = Warmer(
            policy or Policy(),
            settings=dict(settings or {}),
            token_start=token_start,
            records=records,
        )
        self.batched = batched
        """False: inputs are applied one by one outside any batch, and nothing is stored."""
        self.store: dict[str, bytes] = {
            cid: encode_record(record) for cid, record in (records or {}).items()
        }
        """The store's records, encoded; ``settings`` (an older store's) are not in it."""
        self.commits: list[dict[str, Record | None]] = []
        """What each batch committed, in order."""
        self.now = now
        self.timers: dict[str, tuple[int, int]] = {}
        """The one pending timer per conversation: ``(due_at, token)``."""
        self.warms: list[PublishWarm] = []
        self.surfaces: list[SurfaceChanged] = []
        self.replies: list[Reply] = []
        self.failed: list[WarmFailed] = []
        self.skipped: list[WarmSkipped] = []
        self.accounts: list[Accounted] = []
        self.adjusted: list[IntervalAdjusted] = []
        self.outcomes: list[Outcome] = []
        self.arms: list[Arm] = []
        self.cancels: list[Cancel] = []

    # -- carrying out ---------------------------------------------------------------

    def run(self, outcome: Outcome) -> Outcome:
        """Carry out an outcome's effects in order, as the worker's shell would."""
        self.outcomes.append(outcome)
        for effect in outcome.effects:
            match effect:
                case Arm():
                    self.arms.append(effect)
                    self.timers[effect.conversation_id] = (effect.due_at, effect.token)
                case Cancel():
                    self.cancels.append(effect)
                    self.timers.pop(effect.conversation_id, None)
                case PublishWarm():
                    self.warms.append(effect)
                case PublishSurface():
                    self.surfaces.append(effect.update)
                case SendReply():
                    self.replies.append(effect.reply)
                case WarmFailed():
                    self.failed.append(effect)
                case WarmSkipped():
                    self.skipped.append(effect)
                case Accounted():
                    self.accounts.append(effect)
                case IntervalAdjusted():
                    self.adjusted.append(effect)
                case _:  # pragma: no cover - a new effect kind the shell does not know
                    assert_never(effect)
        return outcome

    def apply(self, step: Callable[[], Outcome]) -> Outcome:
        """Apply one input in a batch of its own: commit what it touched, then carry it out."""
        if not self.batched:
            return self.run(step())
        self.warmer.begin()
        outcome = step()
        self.commit(self.warmer.touched())
        self.warmer.end()
        return self.run(outcome)

    def commit(self, changes: dict[str, Record | None]) -> None:
        """What a store's commit does: put each record (encoded), None deletes it."""
        self.commits.append(changes)
        for cid, record in changes.items():
            if record is None:
                self.store.pop(cid, None)
            else:
                self.store[cid] = encode_record(record)

    def advance(self, ms: int) -> int:
        """Let ``ms`` milliseconds pass; returns the new time."""
        self.now += ms
        return self.now

    # -- lifecycle events -------------------------------------------------------------

    def event(self, event: LifecycleEvent) -> Outcome:
        """Apply a decoded lifecycle event at the current time."""
        return self.apply(lambda: self.warmer.apply_event(self.now, event))

    def started(self, cid: str, seq: int | None = None) -> Outcome:
        """``turn.started``."""
        return self.event(TurnStarted(conversation_id=cid, seq=seq))

    def settled(self, cid: str, **fields: Any) -> Outcome:
        """``turn.settled`` with any of ``cwd``, ``model_name``, ``last_request_at``, ``seq``."""
        return self.event(TurnSettled(conversation_id=cid, **fields))

    def completed(
        self,
        cid: str,
        token: int | None = None,
        usage: Usage | None = None,
        error: str | None = None,
    ) -> Outcome:
        """``warm.completed``; ``usage`` defaults to 80 % read when no error is given."""
        if usage is None and error is None:
            usage = build_usage()
        return self.event(WarmCompleted(conversation_id=cid, token=token, usage=usage, error=error))

    def closed(self, cid: str, seq: int | None = None) -> Outcome:
        """``conversation.closed``."""
        return self.event(ConversationClosed(conversation_id=cid, seq=seq))

    # -- timers and returns -------------------------------------------------------------

    def fire(self, cid: str) -> Outcome:
        """Fire the conversation's pending timer at its due time (or now, if that is later)."""
        due, token = self.timers.pop(cid)
        self.now = max(self.now, due)
        return self.apply(lambda: self.warmer.on_timer(self.now, cid, token))

    def fire_token(self, cid: str, token: int) -> Outcome:
        """A timer with ``token`` fires now (a stale one, say); the pending timer stays."""
        return self.apply(lambda: self.warmer.on_timer(self.now, cid, token))

    def returned(self, cid: str, token: int | None = None) -> Outcome:
        """The broker returned the warm request (by default the last one) as unroutable."""
        if token is None:
            token = self.last_warm.token
        return self.apply(lambda: self.warmer.on_warm_returned(self.now, cid, token))

    # -- commands ---------------------------------------------------------------------

    def command(
        self,
        command: SetEnabled | SetInterval | SetPolicy | GetState | SurfaceAction,
        store_error: str = "",
    ) -> Outcome:
        """Plan a command and apply what it changes; a store error rolls it back.

        With ``store_error`` the batch is applied, its commit fails, and it is rolled
        back before the command is answered ``store_error``, as the worker does.
        """
        plan = self.warmer.plan_command(self.now, command)
        if isinstance(plan, Outcome):
            return self.run(plan)
        assert isinstance(plan, SettingsChange)
        if store_error:
            if self.batched:
                self.warmer.begin()
                self.warmer.commit(self.now, plan)
                self.warmer.rollback()
                self.warmer.end()
            return self.run(self.warmer.store_failed(plan, store_error))
        return self.apply(lambda: self.warmer.commit(self.now, plan))

    def set_enabled(self, cid: str, enabled: bool, store_error: str = "") -> Outcome:
        """``set_enabled``."""
        return self.command(SetEnabled(conversation_id=cid, enabled=enabled), store_error)

    def set_interval(self, cid: str, interval_ms: float, store_error: str = "") -> Outcome:
        """``set_interval``."""
        return self.command(SetInterval(conversation_id=cid, interval_ms=interval_ms), store_error)

    def set_policy(self, cid: str, policy: CostPolicyName | None) -> Outcome:
        """``set_policy``."""
        return self.command(SetPolicy(conversation_id=cid, policy=policy))

    def get_state(self, cid: str) -> Outcome:
        """``get_state``."""
        return self.command(GetState(conversation_id=cid))

    def action(self, cid: str, action_id: str, payload: Any = UNSET) -> Outcome:
        """``surface.action``."""
        return self.command(
            SurfaceAction(conversation_id=cid, action_id=action_id, payload=payload)
        )

    # -- reading back -------------------------------------------------------------------

    def conv(self, cid: str) -> Conversation:
        """The conversation's runtime state (it must exist)."""
        conv = self.warmer.get(cid)
        assert conv is not None, f"no record for {cid!r}"
        return conv

    def stored(self, cid: str) -> Record | None:
        """The conversation's record as the store holds it, decoded; None when it has none."""
        raw = self.store.get(cid)
        return None if raw is None else decode_record(raw)

    def status(self, cid: str) -> str:
        """The conversation's status."""
        return self.conv(cid).status

    def due(self, cid: str) -> int | None:
        """The due time of the conversation's pending timer, or None."""
        timer = self.timers.get(cid)
        return None if timer is None else timer[0]

    @property
    def last_warm(self) -> WarmRequested:
        """The last ``warm.requested`` published."""
        return self.warms[-1].request

    @property
    def last_surface(self) -> SurfaceChanged:
        """The last ``surface.changed`` published."""
        return self.surfaces[-1]

    @property
    def last_reply(self) -> Reply:
        """The last reply sent."""
        return self.replies[-1]

    def enabled_and_armed(self, cid: str, interval_ms: int | None = None) -> None:
        """Enable ``cid`` (optionally with an interval) and settle a turn, leaving it armed."""
        if interval_ms is not None:
            self.set_interval(cid, interval_ms)
        self.set_enabled(cid, True)
        self.settled(cid)
        assert self.status(cid) == "armed"

    def warming(self, cid: str, interval_ms: int | None = None) -> WarmRequested:
        """Bring ``cid`` to ``warming``: enabled, settled, its timer fired."""
        self.enabled_and_armed(cid, interval_ms)
        self.fire(cid)
        assert self.status(cid) == "warming"
        return self.last_warm


@pytest.fixture(scope="session")
def make_shell() -> Callable[..., Shell]:
    """Build a fresh fake shell: ``make_shell(policy=..., settings=..., records=...)``."""
    return Shell


@pytest.fixture
def shell() -> Shell:
    """A fake shell over a Warmer with the default policy and no persisted settings."""
    return Shell()


@pytest.fixture(scope="session")
def make_usage() -> Callable[..., Usage]:
    """Build a ``Usage``: ``make_usage(input_tokens, read, write)``."""
    return build_usage
