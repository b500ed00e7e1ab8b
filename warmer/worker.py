"""The shell around the core: decodes deliveries, feeds the core, carries out its effects.

Each inbound queue has one inbox and one pump, so its deliveries are applied in order.
A lifecycle event is applied at once and acknowledged when everything it caused is
durable (publishes confirmed, settings committed); the next event does not wait for
that. A command is planned, persisted, committed and answered before the next one, so
two commands for one conversation never read the same stale settings. When what a
delivery caused cannot be made durable, its channel is closed so the broker delivers
it (and every later unacknowledged one) again, in order.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import structlog
from aio_pika.abc import AbstractIncomingMessage

from warmer.bus.publisher import Publisher, PublishFailed, PublishWithdrawn
from warmer.clock import Clock
from warmer.contract import (
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
from warmer.scheduler import Scheduler
from warmer.store import Store, StoreError

log = structlog.get_logger("warmer.worker")

TOKEN_FLUSH_S: Final = 1.0
_REPLANS: Final = 5
# Before forcing a redelivery: every redelivery counts toward the queue's delivery
# limit (20), so a store that is down for a moment must not burn them all at once.
REDELIVERY_PAUSE_S: Final = 1.0
_STOP: Final = object()


class Inbox:
    """One queue's deliveries, applied in arrival order by one pump task."""

    def __init__(self, name: str, handle: Callable[[AbstractIncomingMessage], Awaitable[None]]):
        self.name = name
        self._handle = handle
        self._queue: asyncio.Queue[AbstractIncomingMessage | object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def deliver(self, message: AbstractIncomingMessage) -> None:
        """The consumer callback: enqueue first, before anything can reorder deliveries."""
        self._queue.put_nowait(message)

    def start(self) -> None:
        """Start the pump."""
        self._task = asyncio.get_running_loop().create_task(self._pump(), name=self.name)

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
        while (message := await self._queue.get()) is not _STOP:
            assert isinstance(message, AbstractIncomingMessage)
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

    def __init__(self, core: Warmer, scheduler: Scheduler, store: Store, clock: Clock) -> None:
        self.core = core
        self.scheduler = scheduler
        self.store = store
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.publisher: Publisher | None = None
        self._settling: set[asyncio.Task[None]] = set()
        self._unknown_types: set[str] = set()
        self._flushed_token = core.last_token

    # -- inbound ----------------------------------------------------------------------

    async def on_lifecycle(self, message: AbstractIncomingMessage) -> None:
        """Apply one lifecycle event; acknowledge it once its effects are durable."""
        decoded = decode_event(message.body, message.content_type)
        if isinstance(decoded, Rejection):
            self._rejected("lifecycle", message, decoded)
            self._settle(message, [self._publisher.dead_letter(message, decoded)])
            return
        if isinstance(decoded, UnknownType):
            self.counts["events_unknown_type"] += 1
            if decoded.type not in self._unknown_types:
                self._unknown_types.add(decoded.type)
                log.info("event_type_unknown", type=decoded.type, routing_key=message.routing_key)
            self._settle(message, [])
            return
        outcome = self.core.apply_event(self.clock.now_ms(), decoded)
        self._count(outcome, decoded.conversation_id, type(decoded).__name__)
        self._settle(message, self._carry_out(outcome))

    async def on_command(self, message: AbstractIncomingMessage) -> None:
        """Apply one command and answer it; the next command waits for this one."""
        reply_to, correlation_id = message.reply_to, message.correlation_id
        decoded = decode_command(message.body, message.content_type)
        if isinstance(decoded, UnknownType):
            decoded = Rejection("unknown_type", f"type: unknown command {decoded.type!r}")
        if isinstance(decoded, Rejection):
            self._rejected("commands", message, decoded)
            pending: list[Awaitable[None]] = []
            if reply_to:
                reply = ErrorReply(error=decoded.error, code=decoded.code)
                pending.append(self._publisher.reply(reply_to, correlation_id, reply))
            if decoded.dead_letter_always:
                pending.append(self._publisher.dead_letter(message, decoded))
            await self._settle_now(message, pending)
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
        await self._settle_now(message, self._carry_out(plan, reply_to, correlation_id))

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
            log.error(
                "warm_publish_failed", conversation_id=request.conversation_id, error=str(exc)
            )
            return
        self.counts["warms_requested"] += 1
        log.info("warm_requested", conversation_id=request.conversation_id, token=request.token)
        if not routed:
            outcome = self.core.on_warm_returned(
                self.clock.now_ms(), request.conversation_id, request.token
            )
            self._detach(self._carry_out(outcome))

    # -- effects ----------------------------------------------------------------------

    def _carry_out(
        self, outcome: Outcome, reply_to: str | None = None, correlation_id: str | None = None
    ) -> list[Awaitable[None]]:
        """Arm and cancel at once; return what must complete before the input is acked."""
        pending: list[Awaitable[None]] = []
        for effect in outcome.effects:
            if isinstance(effect, Arm):
                self.scheduler.arm(effect.conversation_id, effect.due_at, effect.token)
            elif isinstance(effect, Cancel):
                self.scheduler.cancel(effect.conversation_id)
            elif isinstance(effect, PublishSurface):
                pending.append(self._publisher.surface(effect.update))
            elif isinstance(effect, PublishWarm):
                self._detach([self._send_warm(effect)])
            elif isinstance(effect, PersistSettings):
                settings = effect.settings
                pending.append(
                    self.store.put_settings(
                        effect.conversation_id, settings.enabled, settings.interval_ms
                    )
                )
            elif isinstance(effect, SendReply):
                if reply_to:
                    pending.append(self._publisher.reply(reply_to, correlation_id, effect.reply))
            elif isinstance(effect, WarmFailed):
                self.counts["warms_failed"] += 1
                log.warning(
                    "warm_failed",
                    conversation_id=effect.conversation_id,
                    token=effect.token,
                    error=effect.error,
                    failures=effect.failures,
                    paused=effect.paused,
                )
        return pending

    def _settle(self, message: AbstractIncomingMessage, pending: list[Awaitable[None]]) -> None:
        """Acknowledge once ``pending`` completes, without holding up the next delivery."""
        self._spawn(self._settle_now(message, pending))

    async def _settle_now(
        self, message: AbstractIncomingMessage, pending: list[Awaitable[None]]
    ) -> None:
        try:
            for awaitable in pending:
                await awaitable
        except (PublishFailed, StoreError) as exc:
            log.error("delivery_not_durable", routing_key=message.routing_key, error=str(exc))
            self.counts["redeliveries_forced"] += 1
            await asyncio.sleep(REDELIVERY_PAUSE_S)
            await _redeliver(message)
            return
        try:
            await message.ack()
        except Exception as exc:  # the channel went away: the broker delivers it again
            log.info("ack_lost", routing_key=message.routing_key, error=repr(exc))

    def _detach(self, pending: list[Awaitable[None]]) -> None:
        """Run effects nobody acknowledges (timer fires, returns) to completion."""
        if pending:
            self._spawn(_run_detached(pending))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that ``settled()`` waits for."""
        task = asyncio.get_running_loop().create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def settled(self) -> None:
        """Wait until every acknowledgement and detached effect under way has finished."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

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


async def _run_detached(pending: list[Awaitable[None]]) -> None:
    for awaitable in pending:
        try:
            await awaitable
        except (PublishFailed, StoreError) as exc:
            log.error("effect_failed", error=str(exc))


async def _give_back(message: AbstractIncomingMessage) -> None:
    try:
        await message.nack(requeue=True)
    except Exception as exc:
        log.info("nack_lost", error=repr(exc))


async def _redeliver(message: AbstractIncomingMessage) -> None:
    """Close the channel under a delivery: the broker redelivers its unacked messages in order.

    The robust channel above it sees an unexpected close, reopens and consumes again.
    """
    try:
        await message.channel.close()
    except Exception as exc:
        log.warning("channel_close_failed", error=repr(exc))
