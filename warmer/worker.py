"""The shell around the core: decodes deliveries, feeds the core, carries out its effects.

Each inbound queue has one inbox and one pump, so its deliveries are applied in order.
A lifecycle event is applied at once and acknowledged when everything it caused is
durable (publishes confirmed, settings committed); the next event does not wait for
that. A command is planned, persisted, committed and answered before the next one, so
two commands for one conversation never read the same stale settings.

Every delivery ends in exactly one of: acknowledged, dead-lettered then acknowledged,
rejected to the queue's own dead-lettering, or delivered again. A commit or a confirm
that fails is retried in place, with backoff, while the delivery stays unacknowledged and
the inboxes take no more (every return to a quorum queue counts toward its delivery
limit, so the worker never hands a good message back to make a failure go away); only
stopping, or the broker taking the delivery back with a lost connection, ends that. An
exception nobody expected (a bug) gives the delivery back to the queue, logged with its
traceback; at the delivery limit the broker dead-letters it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Final, assert_never, cast

import structlog
from aio_pika.abc import AbstractIncomingMessage

from warmer.bus.lenient import unreadable
from warmer.bus.publisher import DeadLetterRefused, Publisher, PublishFailed, PublishWithdrawn
from warmer.clock import Clock, sleep
from warmer.contract import (
    MAX_ERROR_CHARS,
    Command,
    ErrorReply,
    Rejection,
    UnknownType,
    decode_command,
    decode_event,
)
from warmer.core import (
    Arm,
    Cancel,
    Outcome,
    PersistSettings,
    PublishSurface,
    PublishWarm,
    SendReply,
    Warmer,
    WarmFailed,
)
from warmer.observe.tasks import watch
from warmer.scheduler import Scheduler
from warmer.store import Store, StoreError

log = structlog.get_logger("warmer.worker")

TOKEN_FLUSH_S: Final = 1.0
_REPLANS: Final = 5
RETRY_FIRST_MS: Final = 100
RETRY_MAX_MS: Final = 5000
UNKNOWN_TYPES_REMEMBERED: Final = 256
_STOP: Final = object()

Effect = Callable[[], Awaitable[None]]
"""One thing that must be durable before a delivery is acknowledged; can be tried again."""


class Gate:
    """Closed while any effect is being retried: the inboxes take no more deliveries."""

    def __init__(self) -> None:
        self._holders = 0
        self._open = asyncio.Event()
        self._open.set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep the gate closed for the duration of the block."""
        self._holders += 1
        self._open.clear()
        try:
            yield
        finally:
            self._holders -= 1
            if not self._holders:
                self._open.set()

    @property
    def is_open(self) -> bool:
        """True when no effect is being retried."""
        return self._open.is_set()

    async def passed(self) -> None:
        """Return once the gate is open."""
        await self._open.wait()


class Inbox:
    """One queue's deliveries, applied in arrival order by one pump task."""

    def __init__(
        self,
        name: str,
        handle: Callable[[AbstractIncomingMessage], Awaitable[None]],
        gate: Gate | None = None,
    ):
        self.name = name
        self._handle = handle
        self._gate = gate or Gate()
        self._queue: asyncio.Queue[AbstractIncomingMessage | object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def deliver(self, message: AbstractIncomingMessage) -> None:
        """The consumer callback: enqueue first, before anything can reorder deliveries."""
        self._queue.put_nowait(message)

    def start(self) -> None:
        """Start the pump."""
        self._task = watch(asyncio.get_running_loop().create_task(self._pump(), name=self.name))

    async def drain(self) -> None:
        """Apply what was already delivered, then stop the pump."""
        self._queue.put_nowait(_STOP)
        if self._task is not None:
            await self._task

    def cancel(self) -> None:
        """Stop the pump at once (the grace period ran out); unacked deliveries return."""
        if self._task is not None:
            self._task.cancel()

    async def _pump(self) -> None:
        while (item := await self._queue.get()) is not _STOP:
            message = cast(AbstractIncomingMessage, item)
            await self._gate.passed()
            try:
                await self._handle(message)
            except Exception:
                # A bug, not bad input (bad input is rejected with a reason). Give it back:
                # each redelivery counts, and at the queue's delivery limit the broker
                # dead-letters it with x-death reason delivery_limit.
                log.exception("delivery_failed", queue=self.name, message_id=message.message_id)
                await _give_back(message)


class Worker:
    """Carries out the core's effects with the scheduler, the store and the publisher."""

    def __init__(
        self,
        core: Warmer,
        scheduler: Scheduler,
        store: Store,
        clock: Clock,
        retry_ms: tuple[int, int] = (RETRY_FIRST_MS, RETRY_MAX_MS),
    ) -> None:
        """``retry_ms``: the first and the longest pause between retries of an effect."""
        self.core = core
        self.scheduler = scheduler
        self.store = store
        self.clock = clock
        self.lifecycle_gate = Gate()
        """Closed while a lifecycle event's effects are retried: that inbox waits."""
        self.commands_gate = Gate()
        """Closed while a command's effects are retried: that inbox waits."""
        self.counts: Counter[str] = Counter()
        self.publisher: Publisher | None = None
        self._retry_first_ms, self._retry_max_ms = retry_ms
        self._settling: set[asyncio.Task[None]] = set()
        self._unknown_types: set[str] = set()
        self._flushed_token = core.last_token
        self._abandoned = False

    # -- inbound ----------------------------------------------------------------------

    async def on_lifecycle(self, message: AbstractIncomingMessage) -> None:
        """Apply one lifecycle event; acknowledge it once its effects are durable."""
        decoded = _unreadable(message) or decode_event(
            message.body, message.content_type, content_encoding=message.content_encoding
        )
        if isinstance(decoded, Rejection):
            self._rejected("lifecycle", message, decoded)
            self._spawn(self._dead_letter(message, decoded, [], self.lifecycle_gate))
            return
        if isinstance(decoded, UnknownType):
            self._unknown(decoded, message)
            self._settle(message, [])
            return
        outcome = self.core.apply_event(self.clock.now_ms(), decoded)
        self._count(outcome, decoded.conversation_id, type(decoded).__name__)
        self._settle(message, self._carry_out(outcome))

    async def on_command(self, message: AbstractIncomingMessage) -> None:
        """Apply one command and answer it; the next command waits for this one."""
        reply_to, correlation_id = message.reply_to, message.correlation_id
        decoded = _unreadable(message) or decode_command(
            message.body, message.content_type, content_encoding=message.content_encoding
        )
        if isinstance(decoded, UnknownType):
            decoded = Rejection("unknown_type", f"type: unknown command {decoded.shown}")
        if isinstance(decoded, Rejection):
            self._rejected("commands", message, decoded)
            answer: list[Effect] = []
            if reply_to:
                reply = ErrorReply(error=decoded.error, code=decoded.code)
                answer.append(functools.partial(self._reply, reply_to, correlation_id, reply))
            if decoded.dead_letter_always:
                await self._dead_letter(message, decoded, answer, self.commands_gate)
            else:
                await self._settle_now(message, answer, self.commands_gate)
            return
        plan = await self._apply_command(decoded)
        self._count(plan, decoded.conversation_id, type(decoded).__name__)
        for effect in plan.effects:
            if isinstance(effect, SendReply) and isinstance(effect.reply, ErrorReply):
                self.counts[f"rejected_{effect.reply.code}"] += 1
                log.warning(
                    "command_rejected",
                    code=effect.reply.code,
                    error=effect.reply.error,
                    conversation_id=decoded.conversation_id,
                    answered=bool(reply_to),
                )
        effects = self._carry_out(plan, reply_to, correlation_id)
        await self._settle_now(message, effects, self.commands_gate)

    async def _apply_command(self, command: Command) -> Outcome:
        """Plan, persist and commit; plan again if a close moved the settings meanwhile."""
        for _ in range(_REPLANS):
            planned = self.core.plan_command(self.clock.now_ms(), command)
            if isinstance(planned, Outcome):
                return planned
            plan = planned
            settings = plan.settings
            try:
                await self.store.put_settings(
                    plan.conversation_id, settings.enabled, settings.interval_ms
                )
            except StoreError as exc:
                log.error("store_failed", conversation_id=plan.conversation_id, error=str(exc))
                self.counts["store_errors"] += 1
                return self.core.store_failed(plan, str(exc))
            if self.core.is_current(plan):
                return self.core.commit(self.clock.now_ms(), plan)
            log.info("command_replanned", conversation_id=plan.conversation_id)
        return self.core.store_failed(plan, "the settings kept changing while being persisted")

    # -- timers and returns -----------------------------------------------------------

    def on_fire(self, conversation_id: str, token: int) -> None:
        """The scheduler's callback: a regular warm, a retry or a warm timeout fell due."""
        outcome = self.core.on_timer(self.clock.now_ms(), conversation_id, token)
        self._detach(self._carry_out(outcome))

    async def _send_warm(self, effect: PublishWarm) -> None:
        request = effect.request
        cid, token = request.conversation_id, request.token
        try:
            routed = await self._publisher.warm(
                request, effect.timeout_ms, lambda: self.core.is_awaiting(cid, token)
            )
        except PublishWithdrawn:
            log.info("warm_withdrawn", conversation_id=cid, token=token)
            return
        except PublishFailed as exc:
            # Left to the warm timeout, which fails and retries it.
            log.error("warm_publish_failed", conversation_id=cid, error=str(exc))
            return
        self.counts["warms_requested"] += 1
        log.info("warm_requested", conversation_id=cid, token=token)
        if not routed:
            outcome = self.core.on_warm_returned(self.clock.now_ms(), cid, token)
            self._detach(self._carry_out(outcome))

    # -- effects ----------------------------------------------------------------------

    def _carry_out(
        self, outcome: Outcome, reply_to: str | None = None, correlation_id: str | None = None
    ) -> list[Effect]:
        """Arm and cancel at once; return what must be durable before the input is acked."""
        pending: list[Effect] = []
        for effect in outcome.effects:
            match effect:
                case Arm():
                    self.scheduler.arm(effect.conversation_id, effect.due_at, effect.token)
                case Cancel():
                    self.scheduler.cancel(effect.conversation_id)
                case PublishSurface():
                    pending.append(functools.partial(self._publisher.surface, effect.update))
                case PublishWarm():
                    self._spawn(self._send_warm(effect))
                case PersistSettings():
                    settings = effect.settings
                    pending.append(
                        functools.partial(
                            self.store.put_settings,
                            effect.conversation_id,
                            settings.enabled,
                            settings.interval_ms,
                        )
                    )
                case SendReply():
                    if reply_to:
                        reply = functools.partial(
                            self._reply, reply_to, correlation_id, effect.reply
                        )
                        pending.append(reply)
                case WarmFailed():
                    self.counts["warms_failed"] += 1
                    log.warning(
                        "warm_failed",
                        conversation_id=effect.conversation_id,
                        token=effect.token,
                        error=effect.error,
                        failures=effect.failures,
                        paused=effect.paused,
                    )
                case _:
                    assert_never(effect)
        return pending

    async def _reply(self, reply_to: str, correlation_id: str | None, reply: Any) -> None:
        await self._publisher.reply(reply_to, correlation_id, reply)

    def _settle(self, message: AbstractIncomingMessage, pending: list[Effect]) -> None:
        """Acknowledge an event once ``pending`` is durable, not holding up the next one."""
        self._spawn(self._settle_now(message, pending, self.lifecycle_gate))

    async def _settle_now(
        self, message: AbstractIncomingMessage, pending: list[Effect], gate: Gate
    ) -> None:
        """Make ``pending`` durable, then acknowledge; a bug gives the delivery back.

        A dead letter that cannot go out rejects the delivery instead, so the queue's own
        dead-lettering takes it (``x-death`` reason ``rejected``).
        """
        try:
            if await self._durable(pending, gate, message):
                await _ack(message)
        except DeadLetterRefused as exc:
            self.counts["dead_letters_refused"] += 1
            log.warning(
                "dead_letter_refused",
                why=str(exc),
                routing_key=message.routing_key,
                action="rejected to the queue's own dead-lettering",
            )
            await _reject(message)
        except Exception:
            log.exception("delivery_failed", routing_key=message.routing_key)
            await _give_back(message)

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        rejection: Rejection,
        answer: list[Effect],
        gate: Gate,
    ) -> None:
        """Answer (when asked), dead-letter, then acknowledge."""
        dead_letter = functools.partial(self._publisher.dead_letter, message, rejection)
        await self._settle_now(message, [*answer, dead_letter], gate)

    async def _durable(
        self,
        pending: list[Effect],
        gate: Gate | None = None,
        message: AbstractIncomingMessage | None = None,
    ) -> bool:
        """Run each effect, retrying failed commits and confirms in place; False if stopped.

        While an effect is retried ``gate`` is closed: its inbox takes no further delivery.
        """
        for effect in pending:
            try:
                await effect()
                continue
            except (PublishFailed, StoreError) as exc:
                failure: Exception = exc
            with gate.held() if gate is not None else contextlib.nullcontext():
                attempt = 0
                while True:
                    attempt += 1
                    self.counts["effect_retries"] += 1
                    if isinstance(failure, StoreError):
                        self.counts["store_errors"] += 1
                    if self._abandoned or self._publisher.closing:
                        log.warning("effect_abandoned", error=str(failure)[:300])
                        return False
                    pause = min(self._retry_max_ms, self._retry_first_ms << min(attempt - 1, 20))
                    log.warning(
                        "effect_retrying",
                        attempt=attempt,
                        pause_ms=pause,
                        error=str(failure)[:300],
                        routing_key=None if message is None else message.routing_key,
                    )
                    await sleep(self.clock, pause)
                    try:
                        await effect()
                        break
                    except (PublishFailed, StoreError) as exc:
                        failure = exc
            log.info("effect_recovered", attempts=attempt + 1)
        return True

    def _detach(self, pending: list[Effect]) -> None:
        """Run effects nobody acknowledges (timer fires, returns) to completion."""
        if pending:
            self._spawn(self._durable_detached(pending))

    async def _durable_detached(self, pending: list[Effect]) -> None:
        await self._durable(pending)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that ``settled()`` waits for; a failure is logged."""
        task = asyncio.get_running_loop().create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        watch(task)

    async def settled(self) -> None:
        """Wait until every acknowledgement and detached effect under way has finished."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    def abandon(self) -> None:
        """Stop retrying (the worker is going): what is not durable stays unacknowledged."""
        self._abandoned = True
        for task in list(self._settling):
            task.cancel()

    async def flush_token(self) -> None:
        """Persist the token counter when it moved (the restart floor covers the gap)."""
        token = self.core.last_token
        if token > self._flushed_token:
            await self.store.put_token(token)
            self._flushed_token = token

    async def flush_token_forever(self) -> None:
        """Flush the token counter every second."""
        while True:
            await asyncio.sleep(TOKEN_FLUSH_S)
            try:
                await self.flush_token()
            except StoreError as exc:
                self.counts["store_errors"] += 1
                log.error("token_flush_failed", error=str(exc))

    # -- bookkeeping ------------------------------------------------------------------

    @property
    def _publisher(self) -> Publisher:
        if self.publisher is None:
            raise RuntimeError("the worker has no publisher yet")
        return self.publisher

    def _count(self, outcome: Outcome, conversation_id: str, kind: str) -> None:
        self.counts[f"inputs_{outcome.verdict}"] += 1
        if outcome.verdict != "applied":
            log.debug(
                "input_not_applied",
                kind=kind,
                conversation_id=conversation_id,
                verdict=outcome.verdict,
            )

    def _unknown(self, decoded: UnknownType, message: AbstractIncomingMessage) -> None:
        """Count an unknown event type; log each of a bounded number of them once."""
        self.counts["events_unknown_type"] += 1
        shown = decoded.shown
        if shown in self._unknown_types:
            return
        if len(self._unknown_types) < UNKNOWN_TYPES_REMEMBERED:
            self._unknown_types.add(shown)
            log.info("event_type_unknown", type=shown, routing_key=message.routing_key)
        elif len(self._unknown_types) == UNKNOWN_TYPES_REMEMBERED:
            self._unknown_types.add("")  # marks the one overflow line as written
            log.warning(
                "event_types_unknown_overflow",
                remembered=UNKNOWN_TYPES_REMEMBERED,
                note="further unknown types are counted, not logged",
            )

    def _rejected(self, queue: str, message: AbstractIncomingMessage, rejection: Rejection) -> None:
        self.counts[f"rejected_{rejection.code}"] += 1
        log.warning(
            "message_rejected",
            queue=queue,
            code=rejection.code,
            error=rejection.error,
            routing_key=message.routing_key,
            message_id=message.message_id,
        )


def _unreadable(message: AbstractIncomingMessage) -> Rejection | None:
    """``invalid_properties`` when the lenient reader could not read all the properties."""
    notes = unreadable(message.headers)
    if notes is None:
        return None
    return Rejection("invalid_properties", notes.describe()[:MAX_ERROR_CHARS])


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack()
    except Exception as exc:  # the channel went away: the broker delivers it again
        log.info("ack_lost", routing_key=message.routing_key, error=repr(exc)[:300])


async def _reject(message: AbstractIncomingMessage) -> None:
    """basic.reject without requeue: the queue's own dead-lettering takes it (``rejected``)."""
    try:
        await message.reject(requeue=False)
    except Exception as exc:
        log.info("reject_lost", routing_key=message.routing_key, error=repr(exc)[:300])


async def _give_back(message: AbstractIncomingMessage) -> None:
    """basic.reject with requeue: counts toward the delivery limit on every RabbitMQ version.

    (From 4.3 on, ``basic.nack`` and returns on a closed channel no longer count, so a
    bug given back with them would loop without end.)
    """
    try:
        await message.reject(requeue=True)
    except Exception as exc:
        log.info("give_back_lost", error=repr(exc)[:300])
