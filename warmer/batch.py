"""A batch's inputs, decoded and applied to the core in order: what each publishes, how its
delivery is to be settled, what is armed and what is counted.

Applying never waits and never touches the broker or the store: it decides. The pipeline
(``warmer.worker``) then commits what the core changed, arms the timers, sends the
publishes and settles the deliveries. Decoding happens here, once per delivery, with the
contract's decoders; what cannot be read is a ``Rejection`` (dead-lettered, or a command's
error reply) and changes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal, assert_never, get_args

from msgspec.structs import replace

from warmer.bus.lenient import unreadable
from warmer.bus.port import Delivery, Outbound
from warmer.clock import Clock
from warmer.contract import (
    MAX_ERROR_CHARS,
    Command,
    ErrorReply,
    LifecycleEvent,
    Rejection,
    SurfaceChanged,
    TurnSettled,
    UnknownType,
    WarmCompleted,
    decode_command,
    decode_event,
)
from warmer.core import (
    Accounted,
    Arm,
    Cancel,
    IntervalAdjusted,
    Outcome,
    PublishSurface,
    PublishWarm,
    SendReply,
    SettingsChange,
    Warmer,
    WarmFailed,
    WarmSkipped,
)
from warmer.inputs import Fired, Input, Prune, Queue, Received, Returned
from warmer.observe.failures import FailureLog
from warmer.observe.log import get_logger
from warmer.observe.metrics import Metrics, Tally

__all__ = ["UNKNOWN_TYPES_REMEMBERED", "Applied", "Applier", "Effect", "Settle", "Step"]

log = get_logger(__name__)

UNKNOWN_TYPES_REMEMBERED: Final = 256

Effect = Callable[[], Coroutine[Any, Any, None]]
"""A publish the batch must see confirmed; can be tried again."""
Settle = Literal["ack", "reject", "requeue", "leave"]


class Step:
    """One input of a batch: what it publishes, and how its delivery is settled."""

    __slots__ = ("delivery", "publishes", "queue", "settle")

    def __init__(self, item: Input) -> None:
        self.delivery: Delivery | None = None
        self.queue: Queue | None = None
        if isinstance(item, Received):
            self.delivery, self.queue = item.delivery, item.queue
        self.publishes: list[Effect] = []
        self.settle: Settle = "ack"


class Applied:
    """What applying a batch produced, kept apart until it is committed."""

    __slots__ = ("failed", "refused", "steps", "tally", "timers", "warms")

    def __init__(self, refused: bool) -> None:
        self.refused = refused
        self.failed: list[WarmFailed] = []
        """The warms that failed, for the failure summary once committed."""
        self.steps: list[Step] = []
        self.timers: list[Arm | Cancel] = []
        self.warms: list[PublishWarm] = []
        self.tally = Tally()


class Applier:
    """Applies inputs to the core: decodes, counts, and collects each one's effects."""

    def __init__(
        self,
        core: Warmer,
        clock: Clock,
        outbound: Outbound,
        metrics: Metrics,
        failures: FailureLog | None = None,
    ) -> None:
        """``failures``: told of each failed warm once its batch is committed (the
        pipeline's ``commit``; a summary line every so often, not a warning a warm)."""
        self.core = core
        self.failures = failures or FailureLog(clock)
        self.behind_ms = 0
        """How far behind the worker is for the batch being applied (``Warmer.on_timer``)."""
        self.clock = clock
        self.outbound = outbound
        self.metrics = metrics
        # Bound once: the hot path looks a decoded message's counter up by its class.
        self._event_counters = {
            kind: metrics.events[str(kind.__struct_config__.tag)]
            for kind in get_args(LifecycleEvent)
        }
        self._command_types = {kind: str(kind.__struct_config__.tag) for kind in get_args(Command)}
        self.unknown_types: set[str] = set()
        """The unknown event types logged so far (at most ``UNKNOWN_TYPES_REMEMBERED``)."""

    def apply(self, items: list[Input], now: int, refuse_commands: str | None) -> Applied:
        """Decode and apply ``items`` in order; what they publish, arm and count.

        With ``refuse_commands``, commands are answered ``store_error`` with it instead of
        being committed (their write is known not to have happened)."""
        applied = Applied(refused=refuse_commands is not None)
        for item in items:
            step = Step(item)
            applied.steps.append(step)
            try:
                outcome = self._outcome(item, step, now, refuse_commands, applied.tally)
            except Exception:  # a bug while applying: give this one back, go on
                log.exception("input_failed", kind=type(item).__name__)
                step.settle = "requeue"
                continue
            if outcome is not None:
                self._collect(outcome, step, applied)
        return applied

    def _outcome(
        self,
        item: Input,
        step: Step,
        now: int,
        refuse_commands: str | None,
        tally: Tally,
    ) -> Outcome | None:
        match item:
            case Fired(cid, token):
                outcome = self.core.on_timer(now, cid, token, self.behind_ms)
                if outcome.verdict == "extended":
                    tally.counts[self.metrics.warm_timeouts_extended] += 1
                return outcome
            case Returned(cid, token):
                return self.core.on_warm_returned(now, cid, token)
            case Prune():
                pruned = self.core.prune(now)
                if pruned:
                    log.info("conversations_pruned", count=len(pruned))
                return None
            case Received("lifecycle", delivery):
                return self._event(delivery, step, now, tally)
            case Received(_, delivery):
                return self._command(delivery, step, now, refuse_commands, tally)
            case _:
                assert_never(item)

    def _event(self, delivery: Delivery, step: Step, now: int, tally: Tally) -> Outcome | None:
        decoded = _unreadable(delivery) or decode_event(
            delivery.body, delivery.content_type, content_encoding=delivery.content_encoding
        )
        counts = tally.counts
        if isinstance(decoded, Rejection):
            counts[self.metrics.rejected[decoded.code]] += 1
            _rejected("lifecycle", delivery, decoded)
            step.publishes.append(functools.partial(self.outbound.dead_letter, delivery, decoded))
            return None
        if isinstance(decoded, UnknownType):
            counts[self.metrics.events["unknown"]] += 1
            self._unknown(decoded, delivery)
            return None
        counts[self._event_counters[type(decoded)]] += 1
        if isinstance(decoded, TurnSettled) and decoded.last_request_at is not None:
            # The producer's wall clock, on the core's steady time line (warmer.clock).
            at = self.clock.from_wall(decoded.last_request_at)
            if at != decoded.last_request_at:
                decoded = replace(decoded, last_request_at=at)
        outcome = self.core.apply_event(now, decoded)
        if isinstance(decoded, WarmCompleted):
            self._completion(decoded, outcome, tally)
        _not_applied(outcome, decoded)
        return outcome

    def _completion(self, completed: WarmCompleted, outcome: Outcome, tally: Tally) -> None:
        """Count a completion: stale, dropped, or (with usage, applied) its cache figures."""
        verdict, metrics, counts = outcome.verdict, self.metrics, tally.counts
        if verdict == "stale":
            counts[metrics.warms_stale] += 1
        elif verdict == "dropped_active":
            counts[metrics.warms_dropped] += 1
        elif verdict == "applied" and completed.error is None and completed.usage is not None:
            usage = completed.usage
            counts[metrics.warms_completed] += 1
            counts[metrics.cache_read_tokens] += usage.cache_read_tokens
            counts[metrics.cache_write_tokens] += usage.cache_write_tokens
            if usage.input_tokens > 0:
                tally.ratios.append(min(usage.cache_read_tokens / usage.input_tokens, 1.0))

    def _command(
        self,
        delivery: Delivery,
        step: Step,
        now: int,
        refuse: str | None,
        tally: Tally,
    ) -> Outcome | None:
        reply_to, correlation_id = delivery.reply_to, delivery.correlation_id
        counts, metrics = tally.counts, self.metrics
        decoded = _unreadable(delivery) or decode_command(
            delivery.body, delivery.content_type, content_encoding=delivery.content_encoding
        )
        if isinstance(decoded, UnknownType):
            decoded = Rejection("unknown_type", f"type: unknown command {decoded.shown}")
        if isinstance(decoded, Rejection):
            counts[metrics.rejected[decoded.code]] += 1
            _rejected("commands", delivery, decoded)
            if reply_to:
                reply = ErrorReply(error=decoded.error, code=decoded.code)
                step.publishes.append(
                    functools.partial(self.outbound.reply, reply_to, correlation_id, reply)
                )
            if decoded.dead_letter_always:
                publish = functools.partial(self.outbound.dead_letter, delivery, decoded)
                step.publishes.append(publish)
            return None
        planned = self.core.plan_command(now, decoded)
        if isinstance(planned, SettingsChange):
            if refuse is None:
                planned = self.core.commit(now, planned)
            else:
                planned = self.core.store_failed(planned, refuse)
        counts[metrics.command(self._command_types[type(decoded)], planned.verdict)] += 1
        _not_applied(planned, decoded)
        for effect in planned.effects:
            if isinstance(effect, SendReply) and isinstance(effect.reply, ErrorReply):
                counts[metrics.rejected[effect.reply.code]] += 1
                log.warning(
                    "command_rejected",
                    code=effect.reply.code,
                    error=effect.reply.error,
                    conversation_id=decoded.conversation_id,
                    answered=bool(reply_to),
                )
        return planned

    def _collect(self, outcome: Outcome, step: Step, applied: Applied) -> None:
        delivery = step.delivery
        for effect in outcome.effects:
            match effect:
                case Arm() | Cancel():
                    applied.timers.append(effect)
                case PublishSurface():
                    step.publishes.append(functools.partial(self._surface, effect.update))
                case PublishWarm():
                    applied.warms.append(effect)
                case SendReply():
                    if delivery is not None and delivery.reply_to:
                        answer = functools.partial(
                            self.outbound.reply,
                            delivery.reply_to,
                            delivery.correlation_id,
                            effect.reply,
                        )
                        step.publishes.append(answer)
                case WarmFailed():
                    applied.tally.counts[self.metrics.warms_failed[effect.cause]] += 1
                    applied.failed.append(effect)
                    log.info(
                        "warm_failed",
                        conversation_id=effect.conversation_id,
                        token=effect.token,
                        error=effect.error,
                        cause=effect.cause,
                        failures=effect.failures,
                        paused=effect.paused,
                    )
                case WarmSkipped():
                    applied.tally.counts[self.metrics.warms_skipped[effect.reason]] += 1
                    log.info(
                        "warm_skipped",
                        conversation_id=effect.conversation_id,
                        reason=effect.reason.value,
                    )
                case Accounted():
                    self._account(effect, applied.tally)
                case IntervalAdjusted():
                    applied.tally.counts[self.metrics.intervals_adjusted] += 1
                    log.info(
                        "interval_adjusted",
                        conversation_id=effect.conversation_id,
                        configured_ms=effect.configured_ms,
                        effective_ms=effect.effective_ms,
                        cache_ttl_ms=effect.ttl_ms,
                    )
                case _:
                    assert_never(effect)

    def committed(self, applied: Applied) -> None:
        """``applied`` was committed: its failed warms go into the failure summary."""
        for failed in applied.failed:
            self.failures.failed(
                failed.cause, failed.conversation_id, failed.error, paused=failed.paused
            )

    def _account(self, effect: Accounted, tally: Tally) -> None:
        """Count what an input added to a savings account (base-input-token units)."""
        counts, metrics = tally.counts, self.metrics
        if effect.spent:
            counts[metrics.warm_cost_tokens] += effect.spent
        if effect.avoided:
            counts[metrics.rewrites_avoided_tokens] += effect.avoided
        if effect.missed:
            counts[metrics.rewrites_missed_tokens] += effect.missed

    async def _surface(self, update: SurfaceChanged) -> None:
        await self.outbound.surface(update)
        self.metrics.surface_updates.inc()

    def _unknown(self, decoded: UnknownType, delivery: Delivery) -> None:
        """Count an unknown event type; log each of a bounded number of them once."""
        shown = decoded.shown
        if shown in self.unknown_types:
            return
        if len(self.unknown_types) < UNKNOWN_TYPES_REMEMBERED:
            self.unknown_types.add(shown)
            log.info("event_type_unknown", type=shown, routing_key=delivery.routing_key)
        elif len(self.unknown_types) == UNKNOWN_TYPES_REMEMBERED:
            self.unknown_types.add("")  # marks the one overflow line as written
            log.warning(
                "event_types_unknown_overflow",
                remembered=UNKNOWN_TYPES_REMEMBERED,
                note="further unknown types are counted, not logged",
            )


def _not_applied(outcome: Outcome, decoded: LifecycleEvent | Command) -> None:
    if outcome.verdict != "applied":
        log.debug(
            "input_not_applied",
            kind=type(decoded).__name__,
            conversation_id=decoded.conversation_id,
            verdict=outcome.verdict,
        )


def _rejected(queue: str, delivery: Delivery, rejection: Rejection) -> None:
    log.warning(
        "message_rejected",
        queue=queue,
        code=rejection.code,
        error=rejection.error,
        routing_key=delivery.routing_key,
        message_id=delivery.message_id,
    )


def _unreadable(delivery: Delivery) -> Rejection | None:
    """``invalid_properties`` when the lenient reader could not read all the properties."""
    notes = unreadable(delivery.headers)
    if notes is None:
        return None
    return Rejection("invalid_properties", notes.describe()[:MAX_ERROR_CHARS])
