"""The warmer state machine: given the time and an input, it returns effects.

It never sleeps, reads a clock or does I/O. Commands that change settings go in two
steps, ``plan_command`` (``warmer.core.commands``) then ``commit``, or ``store_failed``
when the batch they were committed in could not be persisted and was rolled back. The
cost judgement on top of the rules (TTL, holds, the savings account) is
``warmer.core.economy``'s.

Batches: the shell opens one (``begin``), applies a run of inputs, persists the records
they changed (``touched``) in one transaction and closes it (``end``), or, when that
cannot be done, puts the batch back (``rollback``) so the redelivered inputs apply
again. Outside a batch every input works the same, with nothing remembered.

Start-up: a ``Warmer`` built from the stored records (``records=``) recovers their
timers with ``recover``; ``prune`` forgets conversations without input for too long.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, assert_never

from msgspec import UNSET
from msgspec.structs import replace

from warmer.contract import (
    Command,
    ConversationClosed,
    GetState,
    LifecycleEvent,
    SetEnabled,
    SetInterval,
    SetPolicy,
    SettingsReply,
    SettingsView,
    StateReply,
    Status,
    SurfaceAction,
    SurfaceChanged,
    TurnSettled,
    TurnStarted,
    Usage,
    WarmCompleted,
    WarmRequested,
)
from warmer.core.census import Census
from warmer.core.commands import SettingsChange, plan_settings, reject
from warmer.core.economy import Economy
from warmer.core.effects import (
    Arm,
    Cancel,
    Effect,
    IntervalAdjusted,
    Outcome,
    PublishSurface,
    PublishWarm,
    SendReply,
    WarmFailed,
    WarmFailedCause,
    WarmSkipped,
)
from warmer.core.gaps import GapModel
from warmer.core.journal import Journal
from warmer.core.panel import build_panel
from warmer.core.policy import Policy
from warmer.core.recovery import Recovery, plan_recovery
from warmer.core.retention import RETENTION_PAUSE_MS, Retention
from warmer.core.rules import (
    GENERATING,
    NO_CONSUMER,
    cache_pct,
    cut_error,
    effective_request_start,
    expected_pct,
    timeout_error,
)
from warmer.core.sharing import Sharing
from warmer.core.state import (
    DEFAULT_SETTINGS,
    Conversation,
    Hold,
    Record,
    Settings,
    settings_of,
)

_NOTHING: Final = Outcome([], "ignored")
_GUARDED: Final = frozenset(
    {Status.DISABLED, Status.PAUSED, Status.BUDGET_EXHAUSTED, Status.EXPIRED}
)
# The status a hold leaves: the spend cap is a budget; everything else waits for a turn.
_HELD: Final = {Hold.EXPIRED: Status.EXPIRED, Hold.SPEND_CAP: Status.BUDGET_EXHAUSTED}
_NOTHING_TO_WARM: Final = frozenset({Hold.SMALL_PREFIX, Hold.EXPIRED})
_SCHEDULED: Final = frozenset({Status.ARMED, Status.WARMING, Status.RETRYING})
_HAND_RESETS: Final = frozenset({Status.ARMED, Status.RETRYING, Status.IDLE})


class Warmer:
    """Every conversation's state, and the rules that move it."""

    def __init__(
        self,
        policy: Policy | None = None,
        settings: Mapping[str, Settings] | None = None,
        token_start: int = 0,
        *,
        records: Mapping[str, Record] | Iterable[tuple[str, Record]] | None = None,
        model: GapModel | None = None,
        adopt: bool = False,
        token_lane: tuple[int, int] = (1, 0),
    ) -> None:
        """Start empty, or from what the store holds.

        ``settings``: persisted settings of conversations without a record (an older
        store); ``records``: the stored records (a mapping, or pairs decoded one at a time
        so that none is held beyond its turn), their states copied, or taken over as
        they are with ``adopt`` (records decoded for this core alone: at a million, the
        copy costs a second and a copy of every state). The token counter starts at
        ``token_start``, and never below a stored token. ``model``: the stored gap model
        (the prior when None). ``token_lane`` = (stride, lane): every token issued is
        ``lane`` modulo ``stride``, so cores of different shards, which never share a
        conversation, never issue the same token (docs/decisions.md).
        """
        self.policy = policy or Policy()
        self.economy = Economy(self.policy, model)
        self._settings: dict[str, Settings] = dict(settings or {})
        self._conversations: dict[str, Conversation] = {}
        self._token = token_start
        self._stride, self._lane = token_lane
        self._journal = Journal(self._conversations, self._settings)
        self._retention = Retention(self.policy.retention_ms)
        self._sharing = Sharing()
        self._adopt_all(records or {}, adopt)
        self._census = Census(self._conversations)
        # Called before every change of a conversation: bound once, on the hot path.
        self._touch = _both(self._census.touch, self._journal.touch)

    def _adopt_all(
        self, records: Mapping[str, Record] | Iterable[tuple[str, Record]], adopt: bool
    ) -> None:
        """Take the stored records in: at start a million of them, so one tight loop;
        their values shared (``Sharing``), their settings kept apart only where they
        differ from those merged into the state (``settings_of``)."""
        apart = self._settings
        conversations = self._conversations
        share = self._sharing.adopt
        token = self._token
        pairs = records.items() if isinstance(records, Mapping) else records
        for cid, record in pairs:
            settings = record.settings
            state = record.state
            if state is None or (
                settings.enabled != state.enabled
                or settings.interval_ms != state.interval_ms
                or settings.policy != state.policy
            ):
                apart[cid] = settings  # what ``settings_of(state)`` would not say
            if state is not None:
                if not adopt:
                    state = replace(state)
                share(state)
                conversations[cid] = state
                if state.token > token:
                    token = state.token
        self._token = token

    def tokens_from(self, start: int) -> None:
        """Issue every later token above ``start`` (the counter never goes back): for a
        start decided once the records are in (``token_start`` at the resumed time)."""
        self._token = max(self._token, start)

    # -- queries ----------------------------------------------------------------------

    @property
    def last_token(self) -> int:
        """The highest token issued so far (or the start of the counter)."""
        return self._token

    def latest_input(self) -> int:
        """The newest last input of any conversation; 0 when none is known."""
        return max((conv.last_input_at for conv in self._conversations.values()), default=0)

    def get(self, conversation_id: str) -> Conversation | None:
        """The runtime state of a conversation, if it has one."""
        return self._conversations.get(conversation_id)

    def __len__(self) -> int:
        return len(self._conversations)

    def is_awaiting(self, conversation_id: str, token: int) -> bool:
        """True while the warm request of ``token`` is the one out (status ``warming``)."""
        conv = self._conversations.get(conversation_id)
        return conv is not None and conv.token == token and conv.phase is Status.WARMING

    def statuses(self) -> Counter[Status]:
        """How many conversations are in each status (kept as they change: ``Census``)."""
        return self._census.statuses()

    def savings(self) -> tuple[int, int, int]:
        """Every conversation's savings account summed: (spent, avoided, missed), in
        base-input-token units (kept as they change: ``Census``)."""
        return self._census.savings()

    def persisted(self, conversation_id: str) -> Settings:
        """The persisted settings of a conversation: those kept apart for it, else those
        merged into its state (``settings_of``), else the defaults."""
        settings = self._settings.get(conversation_id)
        if settings is not None:
            return settings
        conv = self._conversations.get(conversation_id)
        return DEFAULT_SETTINGS if conv is None else settings_of(conv)

    def records(self) -> Iterator[tuple[str, Record]]:
        """Every conversation's record, as the store should hold it once its batch is
        committed: what the shell writes again into a store that lost its data."""
        conversations, settings = self._conversations, self._settings
        for cid in conversations.keys() | settings.keys():
            yield cid, Record(settings=self.persisted(cid), state=conversations.get(cid))

    # -- batches (``warmer.core.journal``) ---------------------------------------------

    def begin(self) -> None:
        """Open a batch: each conversation is snapshotted before an input first changes it."""
        self._journal.begin()
        self.economy.begin()

    def touched(self) -> dict[str, Record | None]:
        """The record of each conversation the open batch changed or created; None: removed."""
        return self._journal.touched()

    def touched_model(self) -> GapModel | None:
        """The gap model, when the open batch changed it (persisted with the batch)."""
        return self.economy.touched_model()

    def end(self) -> None:
        """Close the batch: its changes were committed."""
        self._journal.end()
        self.economy.end()
        self._census.settle()

    def rollback(self) -> None:
        """Put every conversation the batch touched back as it was at ``begin``.

        The batch stays open until ``end``; tokens do not go back (see ``Journal``).
        """
        self._retention.rescan()  # older last inputs may come back
        for cid in self._journal.snapshotted():
            self._census.touch(cid)  # their old copies come back without a touch
        self._journal.rollback()
        self.economy.rollback()

    # -- start-up and retention -------------------------------------------------------

    def recover(self, now: int) -> Recovery:
        """The timers of the restored schedules, at start-up (``warmer.core.recovery``).

        Settings-only records get a state, as their first input would create it, and a
        last input unknown (0, an older record) counts from now. When the newest stored
        input is more than `RETENTION_PAUSE_MS` old, the time since is not counted
        against retention (it may be a wall-clock step the previous run's times kept,
        not idleness): every loaded last input moves on by it. Open a batch first: what
        this changes is to be persisted (``touched``).
        """
        for cid in self._settings.keys() - self._conversations.keys():
            self._create(now, cid)
        newest = 0
        for cid, conv in self._conversations.items():
            if conv.last_input_at == 0:
                self._touch(cid)
                conv.last_input_at = now
            elif conv.last_input_at > newest:
                newest = conv.last_input_at
        paused = now - newest if newest and now - newest > RETENTION_PAUSE_MS else 0
        if paused:
            # Stored, not only remembered: the next restart must not judge them on the
            # times before the pause (it would take the pause for idleness again).
            for cid, conv in self._conversations.items():
                if conv.last_input_at < now:
                    self._touch(cid)
                    conv.last_input_at += paused
        plan = plan_recovery(self._conversations, now, self.economy)
        for arm in plan.warm_now + plan.moved:
            self._touch(arm.conversation_id)
            self._conversations[arm.conversation_id].next_warm_at = arm.due_at
        for phase, cids in (
            (Status.EXPIRED, plan.expired),
            (Status.BUDGET_EXHAUSTED, plan.exhausted),
        ):
            for cid in cids:
                self._touch(cid)
                conv = self._conversations[cid]
                conv.phase = phase
                conv.next_warm_at = None
                if phase is Status.EXPIRED:
                    conv.hold = Hold.EXPIRED
        return replace(plan.recovery, retention_paused_ms=paused) if paused else plan.recovery

    def prune(self, now: int) -> list[str]:
        """Forget (state and settings) every conversation without input for ``retention_ms``.

        Returns their ids; in a batch, ``touched`` lists them as None. A conversation
        whose last input is unknown (0, before ``recover``) is kept.
        """
        gone = self._retention.due(self._conversations, now)
        for cid in gone:
            self._touch(cid)
            self.economy.abandoned(self._conversations.pop(cid))
            self._settings.pop(cid, None)
        return gone

    # -- lifecycle events -------------------------------------------------------------

    def apply_event(self, now: int, event: LifecycleEvent) -> Outcome:
        """Apply one decoded lifecycle event."""
        match event:
            case WarmCompleted():
                return self._completed(now, event)
            case _:
                pass  # a turn's event: ordered by ``seq``, dispatched below
        cid = event.conversation_id
        conv = self._conversations.get(cid)
        if _is_stale_seq(event.seq, conv):
            return Outcome([], "stale")
        self._touch(cid)
        if conv is None:
            conv = self._create(now, cid)
        if event.seq is not None:
            conv.last_seq = event.seq
        effects: list[Effect] = []
        match event:
            case TurnStarted():
                conv.active = True
                self.economy.started(now, conv)
                self._cancel(cid, conv, effects)
            case TurnSettled():
                self._settled(now, cid, conv, event, effects)
            case ConversationClosed():
                self._closed(cid, conv, effects)
            case _:
                assert_never(event)
        self._applied(now, cid, conv, effects)
        return Outcome(effects)

    def _settled(
        self, now: int, cid: str, conv: Conversation, event: TurnSettled, effects: list[Effect]
    ) -> None:
        conv.cwd = self._sharing.text(event.cwd)
        conv.model_name = self._sharing.text(event.model_name)
        conv.active = False
        conv.failures = 0
        self._start_stretch(now, conv)
        start = effective_request_start(event.last_request_at, now)
        conv.last_read_at = now if start is None else start
        account = self.economy.settled(cid, conv, event)
        if account is not None:
            effects.append(account)
        if conv.enabled:
            self._arm(now, cid, conv, effects, since=start)

    def _closed(self, cid: str, conv: Conversation, effects: list[Effect]) -> None:
        # Persisted with the record, in the same commit as the event's batch.
        self._cancel(cid, conv, effects)
        self.economy.abandoned(conv)
        conv.enabled = False
        self._settings[cid] = Settings(False, conv.interval_ms, conv.policy)

    def _completed(self, now: int, event: WarmCompleted) -> Outcome:
        cid = event.conversation_id
        conv = self._conversations.get(cid)
        if conv is not None and conv.active:
            return Outcome([], "dropped_active")
        late = conv is not None and _is_late_answer(event.token, conv)
        if conv is not None and not late and _is_stale_token(event.token, conv):
            return Outcome([], "stale")
        self._touch(cid)
        if conv is None:
            conv = self._create(now, cid)
        current = event.token is not None and (event.token == conv.token or late)
        if current:
            assert event.token is not None
            conv.answered_token = event.token
        status = conv.status
        effects: list[Effect] = []
        if event.error is not None:
            error = cut_error(event.error)
            if current and conv.phase is Status.WARMING:
                if event.error == GENERATING:
                    conv.last_error = error
                    self._cancel(cid, conv, effects)
                else:
                    self._fail(now, cid, conv, error, "error", effects)
            else:
                conv.last_error = error
        else:
            assert event.usage is not None
            self._record(now, conv, event.usage)
            if current:
                effects.append(self.economy.warmed(cid, conv, event.usage))
            if current and conv.misses >= self.policy.max_misses:
                conv.failures = 0
                self._hold(cid, conv, Hold.MISSES, effects, Status.PAUSED)
            elif current or status in _HAND_RESETS:
                conv.failures = 0
                conv.last_error = None
                self._arm(now, cid, conv, effects)
        self._applied(now, cid, conv, effects)
        return Outcome(effects)

    # -- timers and returns -----------------------------------------------------------

    def on_timer(self, now: int, conversation_id: str, token: int, behind_ms: int = 0) -> Outcome:
        """A timer fired: publish a warm, or time out the outstanding one.

        ``behind_ms``: how far behind the worker is now (its timers, its inputs, its warm
        requests not yet confirmed: the shell's measure, 0 when it keeps up). A warm
        timeout that fires while the worker is behind is not the orchestrator's failure:
        the completion may be waiting behind the worker's own backlog. It is checked again
        ``behind_ms`` later, or half its timeout if that is later (verdict ``extended``: no
        change, no surface), for at most ``warm_timeout_ms`` past its deadline; only a
        timeout that fires while the worker keeps up (or past that bound) fails the warm.
        """
        conv = self._conversations.get(conversation_id)
        if conv is None or token != conv.token or not conv.enabled or conv.active:
            return _NOTHING
        if conv.phase is Status.WARMING and behind_ms > 0:
            deadline = conv.published_at + conv.timeout_ms
            if now < deadline + self.policy.warm_timeout_ms:
                wait = max(behind_ms, conv.timeout_ms // 2)
                again = min(now + wait, deadline + self.policy.warm_timeout_ms)
                return Outcome([Arm(conversation_id, again, token)], "extended")
        self._touch(conversation_id)
        effects: list[Effect] = []
        if conv.phase is Status.WARMING:
            error = timeout_error(conv.timeout_ms)
            self._fail(now, conversation_id, conv, error, "timeout", effects)
        elif conv.phase in (Status.ARMED, Status.RETRYING):
            expires = self.economy.expires_at(conv)
            if expires is not None and now >= expires:  # late: the warm would only re-write
                self._hold(conversation_id, conv, Hold.EXPIRED, effects)
            else:
                self._publish_warm(now, conversation_id, conv, effects)
        else:
            return _NOTHING
        self._applied(now, conversation_id, conv, effects)
        return Outcome(effects)

    def on_warm_returned(self, now: int, conversation_id: str, token: int) -> Outcome:
        """The broker returned a warm request as unroutable: a failed warm."""
        conv = self._conversations.get(conversation_id)
        if conv is None or token != conv.token or conv.phase is not Status.WARMING:
            return _NOTHING
        if not conv.enabled or conv.active:
            return _NOTHING
        self._touch(conversation_id)
        effects: list[Effect] = []
        self._fail(now, conversation_id, conv, NO_CONSUMER, "returned", effects)
        self._applied(now, conversation_id, conv, effects)
        return Outcome(effects)

    def _publish_warm(self, now: int, cid: str, conv: Conversation, effects: list[Effect]) -> None:
        timeout = min(self.policy.warm_timeout_ms, self.economy.interval(conv))
        conv.phase = Status.WARMING
        conv.next_warm_at = None
        conv.idle_warms += 1
        conv.published_at = now
        conv.timeout_ms = timeout
        request = WarmRequested(
            conversation_id=cid,
            token=conv.token,
            requested_at=now,
            cwd=UNSET if conv.cwd is None else conv.cwd,
            model_name=UNSET if conv.model_name is None else conv.model_name,
        )
        effects.append(PublishWarm(request, timeout))
        effects.append(Arm(cid, now + timeout, conv.token))

    def _fail(
        self,
        now: int,
        cid: str,
        conv: Conversation,
        error: str,
        cause: WarmFailedCause,
        effects: list[Effect],
    ) -> None:
        conv.last_error = error
        conv.failures += 1
        paused = conv.failures >= self.policy.max_failures
        effects.append(WarmFailed(cid, conv.token, error, conv.failures, paused, cause))
        if paused:
            self._cancel(cid, conv, effects)
            conv.phase = Status.PAUSED
            return
        backoff = now + 2 ** (conv.failures - 1) * 1000
        due = max(now, min(backoff, conv.published_at + self.economy.interval(conv)))
        self._arm(now, cid, conv, effects, due=due, retry=True)

    # -- commands ---------------------------------------------------------------------

    def plan_command(self, now: int, command: Command) -> Outcome | SettingsChange:
        """Validate a command: a reply to send now, or a settings change to persist."""
        cid = command.conversation_id
        match command:
            case GetState():
                conv = self._conversations.get(cid) or self._virtual(now, cid)
                view = conv.view()
                spec = build_panel(view, self.economy.fields(conv))
                return Outcome([SendReply(StateReply(state=view, spec=spec))], "answered")
            case SetEnabled() | SetInterval() | SetPolicy() | SurfaceAction():
                persisted = self.persisted(cid)
                known = self._conversations.get(cid)
                enabled = known.enabled if known is not None else persisted.enabled
                return plan_settings(command, persisted, enabled)
            case _:
                assert_never(command)

    def commit(self, now: int, change: SettingsChange) -> Outcome:
        """Apply a planned change: merge the settings, re-arm as the rules say, reply.

        In a batch the settings are persisted with the batch's records; when that commit
        fails, the shell rolls the batch back and answers with ``store_failed``.
        """
        cid = change.conversation_id
        self._touch(cid)
        self._settings[cid] = change.settings
        conv = self._conversations.get(cid) or self._create(now, cid)
        effects: list[Effect] = []
        settings = change.settings
        match change.field:
            case "enabled":
                self._set_enabled(now, cid, conv, settings, effects)
            case "interval":
                conv.interval_ms = settings.interval_ms
                if conv.status is Status.ARMED:
                    self._arm(now, cid, conv, effects)
            case "policy":
                conv.policy = settings.policy  # judged at the next arm
            case _:
                assert_never(change.field)
        self._applied(now, cid, conv, effects)
        view = SettingsView(
            enabled=settings.enabled,
            interval_ms=settings.interval_ms,
            policy=UNSET if settings.policy is None else settings.policy,
        )
        effects.append(SendReply(SettingsReply(settings=view)))
        return Outcome(effects)

    def _set_enabled(
        self, now: int, cid: str, conv: Conversation, settings: Settings, effects: list[Effect]
    ) -> None:
        status = conv.status
        conv.enabled = settings.enabled
        conv.interval_ms = settings.interval_ms
        conv.policy = settings.policy
        if not settings.enabled:
            self._cancel(cid, conv, effects)
        elif status in _GUARDED:
            conv.failures = 0
            conv.phase = Status.IDLE
            self._start_stretch(now, conv)
            self._arm(now, cid, conv, effects)
        elif status is Status.IDLE:
            self._arm(now, cid, conv, effects)
        # armed, warming, retrying: the schedule stands; active: the settle will arm.

    def store_failed(self, change: SettingsChange, error: str) -> Outcome:
        """Persisting a planned change failed: nothing changes, the requester is told."""
        return reject(f"settings store failed: {error}", "store_error")

    # -- the shared moves -------------------------------------------------------------

    def _create(self, now: int, cid: str) -> Conversation:
        self._touch(cid)
        conv = self._virtual(now, cid)
        self._conversations[cid] = conv
        return conv

    def _virtual(self, now: int, cid: str) -> Conversation:
        settings = self.persisted(cid)
        return Conversation(
            enabled=settings.enabled,
            interval_ms=settings.interval_ms,
            idle_since=now,
            policy=settings.policy,
        )

    def _start_stretch(self, now: int, conv: Conversation) -> None:
        conv.idle_since = now
        conv.idle_warms = 0
        conv.stretch_cost = 0
        if not conv.phase.pending:
            conv.phase = Status.IDLE

    def _cancel(self, cid: str, conv: Conversation, effects: list[Effect]) -> None:
        if conv.phase.pending:
            effects.append(Cancel(cid))
            conv.phase = Status.IDLE
        conv.next_warm_at = None
        conv.hold = Hold.NONE  # a reason not to warm holds only until something else stops it

    def _arm(
        self,
        now: int,
        cid: str,
        conv: Conversation,
        effects: list[Effect],
        due: int | None = None,
        retry: bool = False,
        since: int | None = None,
    ) -> None:
        """Arm the next warm: due at ``due``, else one effective interval after ``since``
        (the settle's ``lastRequestAt``, never before now) or now, and with a known
        lifetime never later than the cache allows (``Economy.latest_due``, never before
        now): an enable or a new interval long after the last read warms a live cache in
        time instead of letting the late-fire guard find it dead."""
        if not conv.enabled or conv.active:
            self._cancel(cid, conv, effects)
            return
        conv.hold = Hold.NONE
        economy = self.economy
        if due is None:
            interval = self._interval(cid, conv, effects)
            due = now + interval if since is None else max(now, since + interval)
            latest = economy.latest_due(conv)
            if latest is not None and latest < due:
                due = max(now, latest)
        hold = economy.hold(conv, due)
        # Nothing to warm (no cache, or a dead one) says more than a spent budget.
        if economy.budget_spent(conv, due) and hold not in _NOTHING_TO_WARM:
            self._cancel(cid, conv, effects)
            conv.phase = Status.BUDGET_EXHAUSTED
            return
        if hold is not Hold.NONE:
            self._hold(cid, conv, hold, effects, _HELD.get(hold, Status.IDLE))
            return
        self._token += 1 + (self._lane - self._token - 1) % self._stride
        conv.token = self._token
        conv.phase = Status.RETRYING if retry else Status.ARMED
        conv.next_warm_at = due
        effects.append(Arm(cid, due, conv.token))

    def _interval(self, cid: str, conv: Conversation, effects: list[Effect]) -> int:
        """The effective interval; a known TTL overriding the configured one is reported once."""
        interval = self.economy.interval(conv)
        if interval != conv.interval_ms and interval != conv.noted_interval_ms:
            conv.noted_interval_ms = interval
            ttl = conv.cache_ttl_ms
            assert ttl is not None, "only a known cache lifetime overrides the interval"
            effects.append(IntervalAdjusted(cid, conv.interval_ms, interval, ttl))
        return interval

    def _hold(
        self,
        cid: str,
        conv: Conversation,
        hold: Hold,
        effects: list[Effect],
        phase: Status = Status.EXPIRED,
    ) -> None:
        """The cost rules stop warming until the next turn (or enable): say why."""
        self._cancel(cid, conv, effects)
        conv.phase = phase
        conv.hold = hold
        effects.append(WarmSkipped(cid, hold))

    def _record(self, now: int, conv: Conversation, usage: Usage) -> None:
        conv.last_pct = cache_pct(usage.input_tokens, usage.cache_read_tokens)
        conv.last_expected_pct = expected_pct(usage.cache_read_tokens, usage.cache_write_tokens)
        conv.last_warm_at = now
        conv.last_read_at = now

    def _applied(self, now: int, cid: str, conv: Conversation, effects: list[Effect]) -> None:
        """Every applied input ends here: note when (retention) and publish the surface."""
        conv.last_input_at = now
        view = conv.view()
        spec = build_panel(view, self.economy.fields(conv))
        update = SurfaceChanged(conversation_id=cid, state=view, spec=spec, at=now)
        effects.append(PublishSurface(update))


def _both(census: Callable[[str], None], journal: Callable[[str], None]) -> Callable[[str], None]:
    """The core's ``touch``: the census and the journal, told before every change."""

    def touch(cid: str) -> None:
        census(cid)
        journal(cid)

    return touch


def _is_stale_token(token: int | None, conv: Conversation) -> bool:
    """A completion older than the armed token, or a duplicate of one already applied."""
    return token is not None and (token < conv.token or token <= conv.answered_token)


def _is_late_answer(token: int | None, conv: Conversation) -> bool:
    """The completion of a warm that failed (timed out) while no newer request went out:
    the retry is only armed (``retrying``), and the token is one of ours not yet answered.
    It answers the warm after all: credited as current (docs/semantics.md, "Tokens")."""
    return (
        token is not None
        and conv.phase is Status.RETRYING
        and conv.answered_token < token < conv.token
    )


def _is_stale_seq(seq: int | None, conv: Conversation | None) -> bool:
    """An event whose ``seq`` is not above the last one applied is a redelivery or reordering."""
    return (
        seq is not None and conv is not None and conv.last_seq is not None and seq <= conv.last_seq
    )
