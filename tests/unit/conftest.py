"""The worker around a core, for the core's tests: the real ``Worker`` on the in-memory bus.

Tests drive a ``Warmer`` through it and read like the rules of docs/semantics.md:
``shell.settled("c")``, ``shell.fire("c")``, ``shell.completed("c", usage=...)``.
Each input goes through the worker's whole pipeline in a batch of its own: an event or
a command is encoded as a delivery on a ``MemoryChannel``, decoded, applied, committed
to an in-memory store, its timers armed in the real ``Scheduler``, its messages
published on a ``MemoryOutbound``, and acknowledged. A timer fires, or a warm comes
back unroutable, as the scheduler and the publisher hand those over (``Fired``,
``Returned``).

The shell carries out no effect itself: the timers are read from the scheduler, what
was published from the outbound, what was committed from the store, and what each input
did from the core (``NotingWarmer`` notes what it returned to the worker). After each
input it checks that the worker carried out exactly that: the delivery acknowledged,
the surfaces, warm requests and replies published, the timer armed, the record
committed. Time is a ``ManualClock`` that moves only by hand, and a timer fires only
when a test fires it (``fire`` disarms it and hands it over, as the scheduler would).
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import msgspec
import pytest
from msgspec import UNSET

from warmer.bus.memory import MemoryChannel, MemoryOutbound
from warmer.clock import ManualClock
from warmer.contract import (
    Command,
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
    MODEL_KEY,
    Accounted,
    Arm,
    Cancel,
    Conversation,
    GapModel,
    IntervalAdjusted,
    Outcome,
    Policy,
    PublishSurface,
    PublishWarm,
    Record,
    Recovery,
    SendReply,
    Settings,
    SettingsChange,
    Warmer,
    WarmFailed,
    WarmSkipped,
    decode_record,
    encode_record,
)
from warmer.core.records import encode_changes
from warmer.core.rules import token_start as counter_start
from warmer.inputs import Fired, Input, Inputs, Received, Returned
from warmer.observe.metrics import Metrics
from warmer.scheduler import Scheduler
from warmer.store import MemoryStore, StoreError
from warmer.worker import Worker

T0 = 1_760_000_000_000
"""A plausible epoch-ms start time for every test."""

BATCH_DEADLINE_S = 10.0
"""Real time a batch may take: one that waits on the manual clock (a retry) never ends."""

Call = tuple[str, tuple[Any, ...], Any]
"""A call the worker made on the core: the method's name, its arguments, what it returned."""

_T = TypeVar("_T")


def build_usage(input_tokens: int = 1000, read: int = 800, write: int = 0) -> Usage:
    """A warm's token usage: ``input_tokens`` counts the cache reads and writes."""
    return Usage(input_tokens=input_tokens, cache_read_tokens=read, cache_write_tokens=write)


class NotingWarmer(Warmer):
    """The real core, noting (while ``noting`` is a list) each input applied and its result."""

    noting: list[Call] | None = None

    def _noted(self, name: str, args: tuple[Any, ...], result: _T) -> _T:
        if self.noting is not None:
            self.noting.append((name, args, result))
        return result

    def apply_event(self, now: int, event: LifecycleEvent) -> Outcome:
        """Apply a lifecycle event; noted."""
        return self._noted("apply_event", (now, event), super().apply_event(now, event))

    def on_timer(self, now: int, conversation_id: str, token: int, behind_ms: int = 0) -> Outcome:
        """A timer fired; noted (``behind_ms`` aside)."""
        args = (now, conversation_id, token)
        return self._noted("on_timer", args, super().on_timer(*args, behind_ms))

    def on_warm_returned(self, now: int, conversation_id: str, token: int) -> Outcome:
        """A warm came back unroutable; noted."""
        args = (now, conversation_id, token)
        return self._noted("on_warm_returned", args, super().on_warm_returned(*args))

    def plan_command(self, now: int, command: Command) -> Outcome | SettingsChange:
        """Validate a command; noted."""
        return self._noted("plan_command", (now, command), super().plan_command(now, command))

    def commit(self, now: int, change: SettingsChange) -> Outcome:
        """Apply a planned change; noted."""
        return self._noted("commit", (now, change), super().commit(now, change))

    def store_failed(self, change: SettingsChange, error: str) -> Outcome:
        """Answer a change the store refused; noted."""
        return self._noted("store_failed", (change, error), super().store_failed(change, error))

    def rollback(self) -> None:
        """Undo the batch; noted, since what was noted before it no longer stands."""
        super().rollback()
        self._noted("rollback", (), None)


class NotingScheduler(Scheduler):
    """The real scheduler, noting every timer armed in it."""

    def __init__(self, clock: ManualClock, inputs: Inputs) -> None:
        super().__init__(clock, inputs.fired)
        self.armed: list[Arm] = []
        self.checks: list[str] = []
        """The keys of the timers armed as checks (a warm's timeout), in arm order."""

    def arm(self, key: str, due_at_ms: int, token: int, *, check: bool = False) -> None:
        """Arm the timer of ``key``; noted."""
        self.armed.append(Arm(key, due_at_ms, token))
        if check:
            self.checks.append(key)
        super().arm(key, due_at_ms, token, check=check)


class NotingOutbound(MemoryOutbound):
    """The in-memory publisher, noting each warm request's timeout as well."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[int] = []

    async def warm(
        self, request: WarmRequested, timeout_ms: int, still_wanted: Callable[[], bool]
    ) -> bool:
        """Record a warm request and its timeout; returns ``routed``."""
        routed = await super().warm(request, timeout_ms, still_wanted)
        self.timeouts.append(timeout_ms)
        return routed


class FailableStore(MemoryStore):
    """The in-memory store; ``fail_commit(error)`` makes its next commit fail with ``error``."""

    def __init__(self, records: Mapping[str, bytes] | None = None) -> None:
        super().__init__(records=records)
        self.next_error: str | None = None

    def fail_commit(self, error: str) -> None:
        """The next commit raises StoreError(``error``) and changes nothing."""
        self.next_error = error

    async def commit(self, changes: Mapping[str, bytes | None], token: int) -> None:
        """Commit, unless told to fail this once."""
        error, self.next_error = self.next_error, None
        if error is not None:
            raise StoreError(error)
        await super().commit(changes, token)


@functools.cache
def _shared_metrics() -> Metrics:
    """One set of metrics for every shell: building one costs a millisecond and hypothesis
    builds hundreds of shells; nothing here reads them."""
    return Metrics()


class Shell:
    """A real worker over a core, on a hand-driven clock and an in-memory bus and store."""

    def __init__(
        self,
        policy: Policy | None = None,
        settings: Mapping[str, Settings] | None = None,
        token_start: int = 0,
        now: int = T0,
        records: Mapping[str, Record] | None = None,
        *,
        store: FailableStore | None = None,
    ) -> None:
        """A worker whose core starts with ``records`` (also in its store) and ``settings``
        (an older store's: in the core, not in the store), with no recovery run; or, given
        a ``store``, one that starts from it as the app does (``restarted``)."""
        self._loop = asyncio.new_event_loop()
        self._unseen: list[dict[str, Any]] = []
        self._loop.set_exception_handler(lambda _, context: self._unseen.append(context))
        weakref.finalize(self, self._loop.close)
        self.clock = ManualClock(now)
        policy = policy or Policy()
        if store is None:
            self.store = FailableStore(
                {cid: encode_record(r) for cid, r in (records or {}).items()}
            )
            self.warmer = NotingWarmer(
                policy, settings=dict(settings or {}), token_start=token_start, records=records
            )
            self._known = set(records or {}) | set(settings or {})
        else:
            self.store = store
            self.warmer = self._loaded(policy, now)
        self.inputs = Inputs()
        self.scheduler = NotingScheduler(self.clock, self.inputs)
        self.outbound = NotingOutbound()
        self.metrics = _shared_metrics()
        self.worker = Worker(
            self.warmer,
            self.scheduler,
            self.store,
            self.clock,
            self.outbound,
            self.inputs,
            self.metrics,
        )
        self.lifecycle = MemoryChannel("lifecycle")
        self.commands = MemoryChannel("commands")
        self.outcomes: list[Outcome] = []
        """What each input did, as the core returned it to the worker, in order."""
        self.calls: list[Call] = []
        """Every call the worker made on the core with an input, in order."""
        self.recovery: Recovery | None = None
        """What the start-up's recovery did (``restarted``), None when there was none."""
        if store is not None:
            self.recovery = self._recover(now)

    # -- driving the worker -------------------------------------------------------------

    def _run(self, work: Coroutine[Any, Any, _T]) -> _T:
        result = self._loop.run_until_complete(asyncio.wait_for(work, BATCH_DEADLINE_S))
        assert self._unseen == [], f"a task failed unseen: {self._unseen}"
        return result

    async def _batch(self, item: Input) -> None:
        await self.worker.run_batch([item])
        await self.worker.settled()  # the warm requests go out on their own

    def _apply(self, item: Input, cid: str) -> Outcome:
        """Run one input through the worker in a batch of its own; what the core did."""
        self._known.add(cid)
        published = (len(self.outbound.surfaces), len(self.outbound.warms), len(self.replies))
        noted: list[Call] = []
        self.warmer.noting = noted
        try:
            self._run(self._batch(item))
        finally:
            self.warmer.noting = None
            self.store.next_error = None  # a store error for a command that commits nothing
        self.calls += noted
        if isinstance(item, Received):
            channel = self.lifecycle if item.queue == "lifecycle" else self.commands
            settled = channel.outcome(item.delivery)  # type: ignore[arg-type]
            assert settled == "ack", f"the worker settled the input with {settled}"
        # What a rollback undid does not stand: the outcome is the one after it.
        rolled_back = [i for i, (name, _, _) in enumerate(noted) if name == "rollback"]
        standing = noted[rolled_back[-1] + 1 :] if rolled_back else noted
        outcomes = [result for _, _, result in standing if isinstance(result, Outcome)]
        assert len(outcomes) == 1, f"the worker did not apply {item!r} once: {noted}"
        self.outcomes.append(outcomes[0])
        self._carried_out(outcomes[0], published)
        self._committed(cid)
        return outcomes[0]

    def _committed(self, cid: str) -> None:
        """The store holds what the core holds of ``cid``: nothing applied is only in memory."""
        record, conv = self.stored(cid), self.warmer.get(cid)
        if conv is None:
            assert record is None or record.state is None, "a state stored and not held"
            return
        assert record is not None and record.state == conv, "the state committed"
        assert record.settings == self.warmer.persisted(cid), "the settings committed"

    def _carried_out(self, outcome: Outcome, published: tuple[int, int, int]) -> None:
        """The worker published and armed what the core returned, no more, in order."""
        effects = outcome.effects
        surfaces, warms, replies = published
        updates = [e.update for e in effects if isinstance(e, PublishSurface)]
        assert self.outbound.surfaces[surfaces:] == updates, "surfaces published"
        assert self.warms[warms:] == [e for e in effects if isinstance(e, PublishWarm)]
        assert self.replies[replies:] == [e.reply for e in effects if isinstance(e, SendReply)]
        timers = [e for e in effects if isinstance(e, Arm | Cancel)]
        if timers:
            last = timers[-1]
            armed = (last.due_at, last.token) if isinstance(last, Arm) else None
            assert self.scheduler.pending(last.conversation_id) == armed, "the timer armed"

    def advance(self, ms: int) -> int:
        """Let ``ms`` milliseconds pass (no timer fires); returns the new time."""
        self.clock.advance(ms)
        return self.now

    @property
    def now(self) -> int:
        """The clock's time, epoch ms."""
        return self.clock.now_ms()

    @now.setter
    def now(self, now: int) -> None:
        self.clock.set(now)

    # -- lifecycle events -------------------------------------------------------------

    def event(self, event: LifecycleEvent) -> Outcome:
        """Deliver a lifecycle event (encoded as the contract says) at the current time."""
        delivery = self.lifecycle.deliver(msgspec.json.encode(event))
        return self._apply(Received("lifecycle", delivery), event.conversation_id)

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
        """Fire the conversation's pending timer at its due time (or now, if that is later).

        As the scheduler fires it: disarmed, then handed to the worker.
        """
        pending = self.scheduler.pending(cid)
        assert pending is not None, f"no timer is pending for {cid!r}"
        due, token = pending
        self.now = max(self.now, due)
        self.scheduler.cancel(cid)
        return self._apply(Fired(cid, token), cid)

    def fire_token(self, cid: str, token: int) -> Outcome:
        """A timer with ``token`` fires now (a stale one, say); the pending timer stays."""
        return self._apply(Fired(cid, token), cid)

    def returned(self, cid: str, token: int | None = None) -> Outcome:
        """The broker returned the warm request (by default the last one) as unroutable."""
        if token is None:
            token = self.last_warm.token
        return self._apply(Returned(cid, token), cid)

    # -- commands ---------------------------------------------------------------------

    def command(
        self,
        command: SetEnabled | SetInterval | SetPolicy | GetState | SurfaceAction,
        store_error: str = "",
    ) -> Outcome:
        """Deliver a command (with a reply queue); ``store_error``: its commit fails so.

        The worker then rolls the batch back and applies it again, the command answered
        ``store_error``.
        """
        if store_error:
            self.store.fail_commit(store_error)
        delivery = self.commands.deliver(msgspec.json.encode(command), reply_to="replies")
        return self._apply(Received("commands", delivery), command.conversation_id)

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

    # -- a restart ----------------------------------------------------------------------

    def restarted(self, now: int) -> Shell:
        """A new worker started at ``now`` from this one's store: nothing else survives."""
        return Shell(self.warmer.policy, now=now, store=self.store)

    def _loaded(self, policy: Policy, now: int) -> NotingWarmer:
        """The core built from what the store holds, as the app's start-up builds it."""
        loaded = self._run(self.store.load())
        records = dict(loaded.records)
        raw_model = records.pop(MODEL_KEY, None)
        self._known = set(records)
        return NotingWarmer(
            policy,
            records={cid: decode_record(raw) for cid, raw in records.items()},
            token_start=counter_start(loaded.token, now),
            model=None if raw_model is None else GapModel.decode(raw_model),
        )

    def _recover(self, now: int) -> Recovery:
        """The app's start-up: ``recover`` in a batch, commit what it touched, arm its timers."""
        core = self.warmer
        core.begin()
        recovery = core.recover(now)
        changes = encode_changes(core.touched(), core.touched_model())
        self._run(self.store.commit(changes, core.last_token))
        core.end()
        for arm in recovery.arms:
            self.scheduler.arm(arm.conversation_id, arm.due_at, arm.token)
        return recovery

    # -- reading back -------------------------------------------------------------------

    @property
    def timers(self) -> dict[str, tuple[int, int]]:
        """The scheduler's pending timers: ``(due_at, token)`` per conversation."""
        timers = {cid: pending for cid in self._known if (pending := self.scheduler.pending(cid))}
        assert len(timers) == len(self.scheduler), "a timer armed for an unknown conversation"
        return timers

    def due(self, cid: str) -> int | None:
        """The due time of the conversation's pending timer, or None."""
        pending = self.scheduler.pending(cid)
        return None if pending is None else pending[0]

    @property
    def arms(self) -> list[Arm]:
        """Every timer armed in the scheduler, in order."""
        return self.scheduler.armed

    @property
    def warms(self) -> list[PublishWarm]:
        """Every warm request published, with the timeout it was sent with."""
        outbound = self.outbound
        return [PublishWarm(r, t) for r, t in zip(outbound.warms, outbound.timeouts, strict=True)]

    @property
    def surfaces(self) -> list[SurfaceChanged]:
        """Every ``surface.changed`` published."""
        return self.outbound.surfaces

    @property
    def replies(self) -> list[Reply]:
        """Every reply sent."""
        return [reply for _, _, reply in self.outbound.replies]

    @property
    def failed(self) -> list[WarmFailed]:
        """Every failed warm, as the core told the worker."""
        return self._effects(WarmFailed)

    @property
    def skipped(self) -> list[WarmSkipped]:
        """Every warm not sent, as the core told the worker."""
        return self._effects(WarmSkipped)

    @property
    def accounts(self) -> list[Accounted]:
        """Every addition to a savings account, as the core told the worker."""
        return self._effects(Accounted)

    @property
    def adjusted(self) -> list[IntervalAdjusted]:
        """Every interval adjusted to a cache's lifetime, as the core told the worker."""
        return self._effects(IntervalAdjusted)

    def _effects(self, kind: type[_T]) -> list[_T]:
        return [e for out in self.outcomes for e in out.effects if isinstance(e, kind)]

    def conv(self, cid: str) -> Conversation:
        """The conversation's runtime state (it must exist)."""
        conv = self.warmer.get(cid)
        assert conv is not None, f"no record for {cid!r}"
        return conv

    def stored(self, cid: str) -> Record | None:
        """The conversation's record as the store holds it, decoded; None when it has none."""
        raw = self.store.records.get(cid)
        return None if raw is None else decode_record(raw)

    def records(self) -> dict[str, Record]:
        """Every conversation's record the store holds, decoded."""
        return {
            cid: decode_record(raw) for cid, raw in self.store.records.items() if cid != MODEL_KEY
        }

    def status(self, cid: str) -> str:
        """The conversation's status."""
        return self.conv(cid).status

    @property
    def last_warm(self) -> WarmRequested:
        """The last ``warm.requested`` published."""
        return self.outbound.warms[-1]

    @property
    def last_surface(self) -> SurfaceChanged:
        """The last ``surface.changed`` published."""
        return self.outbound.surfaces[-1]

    @property
    def last_reply(self) -> Reply:
        """The last reply sent."""
        return self.outbound.replies[-1][2]

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
    """Build a fresh shell: ``make_shell(policy=..., settings=..., records=...)``."""
    return Shell


@pytest.fixture
def shell() -> Shell:
    """A shell over a core with the default policy and no persisted settings."""
    return Shell()


@pytest.fixture(scope="session")
def make_usage() -> Callable[..., Usage]:
    """Build a ``Usage``: ``make_usage(input_tokens, read, write)``."""
    return build_usage
