"""The shell: one pipeline from deliveries to acknowledgements, a batch at a time.

    take what was delivered (and timers that fell due) -> decode and apply to the core in
    order (``warmer.batch``) -> commit every record the batch touched in one store
    transaction -> arm the timers -> publish, confirms awaited together -> reject what
    must be, then one ``basic.ack`` with ``multiple`` per channel

A state change counts once it is committed. A commit or a confirm that fails is retried in
place, with backoff, while the batch's deliveries stay unacknowledged and the pipeline
takes no more lifecycle events; when the worker stops or loses its connection first, the
batch is rolled back in memory, so its redelivery is applied again (never dropped as stale
by ``seq``). Commands are not held behind a failing store: when a commit fails in a way
known not to have written, the batch's commands are answered ``store_error`` at once, and
so are those that arrive while it is retried; an outcome that is not known is written
again until it is, never answered as a failure (docs/contract.md, "Acknowledgement"). A
store found without what was committed is given everything the worker holds again.

Every delivery ends in exactly one of: acknowledged; dead-lettered, then acknowledged;
rejected to the queue's own dead-lettering; or delivered again (given back with
``basic.reject`` and requeue on a bug, or left for the broker when the worker goes).
A delivery left unsettled on a channel that stays open is remembered until the channel
closes, so no acknowledgement with ``multiple`` of a later batch covers it.

A confirm that does not come within the deadline (on the injected clock) means the
connection may be dead without a word: the pipeline says so (health part ``confirms``),
asks the port to drop the connection (the broker redelivers what was not acknowledged)
and retries on the new one; not while the broker has blocked the connection, when late
confirms are expected.

What a batch did is counted into ``warmer.observe.metrics`` once it is committed (a
rolled-back batch is applied again, and counted then); what happened on the way (store
errors, retries, redeliveries, confirmed publishes) is counted as it happens.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, assert_never

from warmer.batch import Applied, Applier, Effect, Step
from warmer.bus.port import (
    CONFIRM_BACKOFF_MAX,
    CONFIRM_TIMEOUT_MS,
    ChannelGone,
    ConfirmOverdue,
    DeadLetterRefused,
    Delivery,
    Outbound,
    PublishFailed,
    PublishWithdrawn,
)
from warmer.clock import Clock, sleep, within
from warmer.core import (
    Arm,
    Cancel,
    PublishWarm,
    Warmer,
)
from warmer.core.gaps import MODEL_KEY
from warmer.core.records import encode_changes, encode_record
from warmer.inputs import Fired, Input, Inputs, Received, Returned
from warmer.observe.failures import FailureLog
from warmer.observe.health import Health
from warmer.observe.log import get_logger
from warmer.observe.metrics import Metrics
from warmer.observe.tasks import watch
from warmer.scheduler import Scheduler
from warmer.store import Store, StoreError, StoreLost
from warmer.store.base import StoreFenced

log = get_logger(__name__)

RETRY_FIRST_MS: Final = 100
RETRY_MAX_MS: Final = 5000
_ENCODE_CHUNK: Final = 10_000
HOLD_ABOVE: Final = 256
"""No timer fires while more lifecycle messages than this wait at the broker (a full
prefetch window's worth, by default: ``WARMER_PREFETCH``)."""
QUEUED_MAX_MS: Final = 600_000
BEHIND_MIN_MS: Final = 100
"""Below this the worker keeps up (``behind_ms`` reports 0): a warm timeout fails."""


class Worker:
    """The pipeline: applies batches of inputs to the core, commits, publishes, acknowledges."""

    def __init__(
        self,
        core: Warmer,
        scheduler: Scheduler,
        store: Store,
        clock: Clock,
        outbound: Outbound,
        inputs: Inputs,
        metrics: Metrics,
        *,
        retry_ms: tuple[int, int] = (RETRY_FIRST_MS, RETRY_MAX_MS),
        health: Health | None = None,
        confirm_ms: int = CONFIRM_TIMEOUT_MS,
        on_fenced: Callable[[str], None] | None = None,
        warms_in_flight: int = 0,
        failures: FailureLog | None = None,
    ) -> None:
        """``retry_ms``: the first and the longest pause between retries of a failed step;
        ``health``: where the pipeline says what keeps it from making progress;
        ``confirm_ms``: how long a batch's publishes may wait for their confirms;
        ``on_fenced``: called once when the store refuses a commit because another replica
        took the shard (the pipeline has stopped); ``warms_in_flight``: at most this many
        timers fired and not yet through (applied, their warm request confirmed), the rest
        held back in the scheduler, due times kept (0: no bound); ``failures``: where failed
        warms are counted for the summary line (one of the worker's own when None)."""
        self.core = core
        self.scheduler = scheduler
        self.store = store
        self.clock = clock
        self.outbound = outbound
        self.inputs = inputs
        self.metrics = metrics
        self.health = health or Health()
        self.failures = failures or FailureLog(clock)
        """Failed warms, summed into a warning line every so often."""
        self._applier = Applier(core, clock, outbound, metrics, self.failures)
        self._retry_first_ms, self._retry_max_ms = retry_ms
        # Each warm request under way, and when it was started (insertion order: the
        # first is the oldest).
        self._warms: dict[asyncio.Task[None], int] = {}
        self._in_flight = warms_in_flight
        # Each batch taken and not yet settled, and when its oldest input arrived (in batch
        # order: the first is the oldest). Its deliveries hold the consumer's prefetch until
        # then: while they are old, what the broker holds back for this worker is late too.
        self._batches: dict[object, int] = {}
        self._queued = 0
        """Lifecycle messages the broker held in the shard's queue at the last look."""
        self._queued_ms = 0
        """How long they would wait, at the pace deliveries came meanwhile."""
        self.hold_above = HOLD_ABOVE
        """While more lifecycle messages than this wait at the broker, no timer fires."""
        if warms_in_flight > 0:
            scheduler.room = self._room
        self._abandoned = False
        self._confirm_ms = confirm_ms
        # The deadline now: the setting, doubled after each reset (a broker slow but alive
        # would otherwise be dropped at every deadline, each drop costing every message not
        # yet acknowledged one delivery toward its limit), back once confirms come in time.
        self._deadline_ms = confirm_ms
        self._reset_at: int | None = None
        # Per open channel (by id, the delivery kept holds the channel so the id stays its
        # own): a delivery on it and the lowest delivery tag left unsettled there.
        self._holes: dict[int, tuple[Delivery, int]] = {}
        # Per channel: tags of deliveries being settled outside the pipeline (rerouted to
        # their shard), which no ``multiple`` acknowledgement may cover either; and each
        # such delivery's channel (tags count per channel: a tag settled on one leaves the
        # same tag of another covered), kept until settled, so a hand-over waits for them.
        self._outside: dict[int, set[int]] = {}
        self._outside_of: dict[Delivery, int] = {}
        self._outside_done = asyncio.Event()
        self._outside_done.set()
        # Held from a batch's apply to its commit: a restore writes only what was committed.
        self._committing = asyncio.Lock()
        self._answering: set[asyncio.Task[None]] = set()
        self._failure = ""
        """The last store error of the batch being retried, for the commands refused."""
        self._on_fenced = on_fenced
        self.fenced: str | None = None
        """Why the store refused this shard's commits (another replica took it), if it did."""
        self._lost: str | None = None
        """Why the store is known to have lost what was committed, until it is restored."""

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Apply batches until the inputs are closed and drained (or the worker abandons).

        Two batches overlap at most: while one is published and acknowledged, the next is
        applied and committed. Acknowledgements still go out in batch order, and a batch
        whose publishes are being retried holds the pipeline after the next one.
        """
        tails: deque[asyncio.Task[None]] = deque()
        while not self._abandoned and (items := await self.inputs.take()) is not None:
            # A batch of commands (a person waits on each) does not wait for the batches
            # being published: its replies go out as soon as it is committed.
            most = len(tails) + 1 if _is_command(items[0]) else 1
            while len(tails) > most or (tails and tails[0].done()):
                await tails.popleft()
            try:
                tail = await self._stage(items, tails[-1] if tails else None)
            except Exception:  # a bug: hand the deliveries back, keep the pipeline going
                log.exception("batch_failed", size=len(items))
                given_back = [i.delivery for i in items if isinstance(i, Received)]
                self.metrics.redeliveries.inc(len(given_back))
                await self._give_back(given_back)
                continue
            if tail is not None:
                tails.append(tail)
        for tail in tails:
            await tail

    def abandon(self) -> None:
        """Stop retrying (the worker is going): what is not durable stays unacknowledged."""
        self._abandoned = True
        self.inputs.close()

    async def settled(self) -> None:
        """Wait for the warm requests under way, and the deliveries being settled outside
        the pipeline (a reroute cut by the shard's channels closing leaves its original
        unacknowledged: delivered again, rerouted again, answered twice)."""
        while self._warms or self._outside_of:
            if self._warms:
                await asyncio.gather(*list(self._warms), return_exceptions=True)
            else:
                await self._outside_done.wait()

    async def run_batch(self, items: list[Input]) -> None:
        """One batch, from decoding to acknowledgement."""
        tail = await self._stage(items, None)
        if tail is not None:
            await tail

    def _room(self) -> int:
        """How many more timers may fire now (``warms_in_flight`` bounds the timers fired
        and not yet through: waiting in the inputs or being applied, their warm requests
        not yet confirmed)."""
        if self._queued > self.hold_above:
            return 0  # completions wait for the worker: they come before new warms
        busy = self.inputs.fired_waiting + len(self._warms)
        return self._in_flight - busy

    def inbound(self, queued: int, delivered: int, over_ms: int) -> None:
        """The broker holds ``queued`` lifecycle messages for this shard; ``delivered``
        came in the last ``over_ms``: how long the last of them would wait."""
        self._queued = queued
        if queued <= 0:
            self._queued_ms = 0
        elif delivered > 0:
            self._queued_ms = min(queued * over_ms // delivered, QUEUED_MAX_MS)
        else:  # none taken meanwhile: at least that long already
            self._queued_ms = min(max(self._queued_ms + over_ms, over_ms), QUEUED_MAX_MS)
        if queued <= self.hold_above:
            self.scheduler.nudge()

    def behind_ms(self, now: int | None = None) -> int:
        """How far behind the worker is, in ms: the most of how late its oldest timer
        due is (held back, or not yet fired), how long its oldest input has waited
        (commands aside), and how long its oldest warm request has waited for its
        confirm. 0 when that is under ``BEHIND_MIN_MS``: it keeps up."""
        now = self.clock.now_ms() if now is None else now
        oldest_warm = next(iter(self._warms.values()), now)
        oldest_batch = next(iter(self._batches.values()), now)
        behind = max(
            self.scheduler.behind_ms(now),
            self.inputs.oldest_ms(now),
            now - oldest_warm,
            now - oldest_batch,
            self._queued_ms,
        )
        return behind if behind >= BEHIND_MIN_MS else 0

    async def _stage(
        self, items: list[Input], previous: asyncio.Task[None] | None
    ) -> asyncio.Task[None] | None:
        """Apply and commit; start the publishes; return the task that acknowledges."""
        fires = sum(type(item) is Fired for item in items)
        batch = object()
        since = self.inputs.taken_since_ms
        self._batches[batch] = self.clock.now_ms() if since is None else since
        try:
            steps = await self._apply_and_commit(items)
        except BaseException:
            self._batches.pop(batch, None)
            raise
        finally:
            if fires:
                self.inputs.fires_through(fires)
                self.scheduler.nudge()
        if steps is None:  # rolled back: each delivery is to come again
            self._batches.pop(batch, None)
            deliveries = [i.delivery for i in items if isinstance(i, Received)]
            if self._abandoned or self.outbound.closing:
                self._leave(deliveries)  # the worker goes: the broker takes them back
            else:  # a channel went: those on a channel still open are given back now
                await self._give_back([d for d in deliveries if _open(d)])
            return None
        work = [(step, effect) for step in steps for effect in step.publishes]
        # Started now, in order: a later batch's publishes never overtake these.
        attempts = _start(work)
        tail = watch(
            asyncio.get_running_loop().create_task(self._finish(steps, work, attempts, previous))
        )
        tail.add_done_callback(lambda _: self._batches.pop(batch, None))
        return tail

    async def _finish(
        self,
        steps: list[Step],
        work: list[tuple[Step, Effect]],
        attempts: list[asyncio.Task[None]],
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Await the confirms (one deadline for all), retry what failed, then settle.

        The previous batch is settled first, so acknowledgements go out in batch order.
        """
        retries = 0
        while work:
            failed, failure = await self._confirmed(work, attempts)
            if not failed:
                break
            if isinstance(failure, ConfirmOverdue):
                await self._confirms_overdue(failure)
            retries += 1
            if not await self._pause(retries, failure, [step for step, _ in failed]):
                for step, _ in failed:
                    if step.settle == "ack":
                        step.settle = "leave"
                break
            work = failed
            attempts = _start(work)
        if previous is not None:
            await asyncio.wait([previous])
        await self._settle(steps)

    async def _confirmed(
        self, work: list[tuple[Step, Effect]], attempts: list[asyncio.Task[None]]
    ) -> tuple[list[tuple[Step, Effect]], Exception]:
        """Wait for ``attempts``; what must be tried again, and the last failure seen.

        An attempt still unconfirmed at the deadline is cancelled and tried again: it was
        never confirmed, so its delivery is not acknowledged on its account. While the
        broker blocks the connection, the deadline is extended instead (confirms are held
        back on purpose, and a publish sent again would only queue behind the first).
        """
        deadline, started, answered = self._deadline_ms, self.clock.now_ms(), 0
        while True:
            try:
                await within(self.clock, deadline, asyncio.wait(attempts))
                break
            except TimeoutError:
                if self._abandoned:
                    break
                if self._blocked():
                    continue
                done = sum(attempt.done() for attempt in attempts)
                if done == answered:  # not one answer in a whole deadline: overdue
                    break
                answered = done  # answers still coming: slow, but the connection lives
        late = [attempt for attempt in attempts if not attempt.done()]
        for attempt in late:
            attempt.cancel()
        if late:
            await asyncio.wait(late)
        failed: list[tuple[Step, Effect]] = []
        failure: PublishFailed = PublishFailed("publish cancelled")
        if late:
            failure = ConfirmOverdue(
                f"{len(late)} of {len(attempts)} confirms missing after "
                f"{self.clock.now_ms() - started} ms"
            )
        confirmed = 0
        for (step, effect), attempt in zip(work, attempts, strict=True):
            if attempt.cancelled():  # never confirmed: tried again, never acknowledged as is
                failed.append((step, effect))
                continue
            exc = attempt.exception()
            if exc is None:
                confirmed += 1
            elif isinstance(exc, PublishFailed):
                failure = failure if late else exc
                failed.append((step, effect))
            elif isinstance(exc, DeadLetterRefused):
                self.metrics.dead_letters_refused.inc()
                log.warning(
                    "dead_letter_refused",
                    why=str(exc),
                    action="rejected to the queue's own dead-lettering",
                )
                step.settle = "reject"
            else:
                log.error("publish_failed_unexpectedly", exc_info=exc)
                step.settle = "requeue"
        if confirmed and not isinstance(failure, ConfirmOverdue):
            self._confirms_came(in_time=self.clock.now_ms() - started <= self._confirm_ms)
        return failed, failure

    def _blocked(self) -> bool:
        """The broker holds publishes back (``connection.blocked``): confirms come late."""
        return self.health.reason("broker_blocked") is not None

    async def _confirms_overdue(self, failure: ConfirmOverdue) -> None:
        """Confirms did not come in time: the connection may be dead without a word.

        Said once per occurrence (health part ``confirms`` until confirms come again).
        The connection is dropped, and the deadline doubled (at most ``CONFIRM_BACKOFF_MAX``
        times the setting), so a reconnection that went as silent as the first is dropped
        too, but a broker that confirms slowly is given the time it takes. Not dropped
        again within the deadline of a drop: confirms overdue together (warm requests, an
        overlapping batch) or sent before it say nothing about the new connection.
        """
        if self._blocked():
            return
        why = str(failure)[:300]
        if self.health.reason("confirms") is None:
            log.warning("confirms_overdue", why=why, action="dropping the connection")
        self.health.trouble("confirms", why)
        now = self.clock.now_ms()
        if self._reset_at is not None and now - self._reset_at < self._deadline_ms:
            return
        self._reset_at = now
        self._deadline_ms = min(2 * self._deadline_ms, CONFIRM_BACKOFF_MAX * self._confirm_ms)
        self.metrics.connection_resets.inc()
        await self.outbound.reset(why)

    def _confirms_came(self, *, in_time: bool) -> None:
        """Confirms come again: ready; and ``in_time`` (within the setting, not only the
        doubled deadline), the deadline back to the setting."""
        if in_time:
            self._deadline_ms = self._confirm_ms
        self.health.cleared("confirms")

    # -- apply and commit -------------------------------------------------------------

    async def _apply_and_commit(self, items: list[Input]) -> list[Step] | None:
        """Apply ``items`` and commit what they changed; None when abandoned (rolled back).

        Retried in place while the store fails, but commands are not held behind it:
        this batch's are answered ``store_error`` at once when the failure is known not to
        have written (and taken out of ``items``: they are settled), and those that arrive
        meanwhile likewise (``_refuse_arriving``). An outcome not known is never answered
        as a failure: the same changes are sent again until it is known. A store that lost
        its data is given everything held again (``_restore``) before the batch is
        committed.
        """
        now = self.clock.now_ms()
        metrics = self.metrics
        # How far behind the worker is as this batch is applied: a warm timeout in it is
        # checked again later rather than failed (``Warmer.on_timer``).
        waited = self.inputs.waited_ms if any(type(i) is Fired for i in items) else 0
        behind = max(self.behind_ms(now), waited if waited >= BEHIND_MIN_MS else 0)
        self._applier.behind_ms = behind
        async with self._committing:
            self.core.begin()
            refusing: asyncio.Task[None] | None = None
            try:
                applied = self._applier.apply(items, now, None)
                attempt = 0
                unknown = False  # once unknown, this batch's commands wait for the outcome
                lost_once = False
                while True:
                    try:
                        if self._lost is not None:
                            applied = await self._restore_beside(items, now)
                        changes = encode_changes(self.core.touched(), self.core.touched_model())
                        if changes:  # tokens matter only with the records that hold them
                            await self._commit(changes, self.core.last_token)
                            self.health.cleared("store")
                        break
                    except StoreFenced as exc:  # the shard is another replica's now
                        self.core.rollback()
                        self._fenced_by(exc)
                        return None
                    except StoreError as exc:
                        metrics.store_errors.inc()
                        outage_began = self.health.reason("store") is None
                        self.health.trouble("store", str(exc))
                        if isinstance(exc, StoreLost):
                            self._store_lost(exc)
                            if not lost_once:  # restored at once, then committed
                                lost_once = True
                                continue
                        unknown = unknown or exc.unknown
                        self._failure = str(exc)[:300]
                        if refusing is None:
                            refusing = watch(
                                asyncio.get_running_loop().create_task(
                                    self._refuse_arriving(), name="refuse-commands"
                                )
                            )
                        if not unknown and any(_is_command(i) for i in items):
                            applied = self._refuse_commands_of(items, now, outage_began)
                            continue
                        attempt += 1
                        if not await self._pause(attempt, exc, applied.steps):
                            self.core.rollback()
                            self.inputs.put_back(i for i in items if not isinstance(i, Received))
                            metrics.redeliveries.inc(sum(isinstance(i, Received) for i in items))
                            return None
                if attempt:
                    log.info("commit_recovered", attempts=attempt + 1)
            except BaseException:
                self.core.rollback()
                raise
            finally:
                self.core.end()
                await self._stop_refusing(refusing)
        metrics.add(applied.tally, len(items))
        self._applier.committed(applied)
        for timer in applied.timers:
            match timer:
                case Arm():
                    cid, token = timer.conversation_id, timer.token
                    # A warm's timeout publishes nothing: never held back (decision 109).
                    check = self.core.is_awaiting(cid, token)
                    self.scheduler.arm(cid, timer.due_at, token, check=check)
                case Cancel():
                    self.scheduler.cancel(timer.conversation_id)
                case _:
                    assert_never(timer)
        loop, started = asyncio.get_running_loop(), self.clock.now_ms()
        for warm in applied.warms:
            task = watch(loop.create_task(self._send_warm(warm)))
            self._warms[task] = started
            task.add_done_callback(self._warm_done)
        self.failures.flush()
        return applied.steps

    def _warm_done(self, task: asyncio.Task[None]) -> None:
        self._warms.pop(task, None)
        if self._in_flight > 0:
            self.scheduler.nudge()

    def _refuse_commands_of(self, items: list[Input], now: int, outage_began: bool) -> Applied:
        """The batch's commit failed, known not to have written: answer its commands
        ``store_error`` now (docs/contract.md) and take them out of ``items`` (settled on
        their own, the caller must not give them back); the rest is applied again.

        An error line once an outage (each refused command has its own warning), not one
        a batch: a command a second through a minute's outage was 60 error lines."""
        say = log.error if outage_began else log.debug
        say("store_failed_commands_refused", error=self._failure)
        commands = [i for i in items if _is_command(i)]
        items[:] = [i for i in items if not _is_command(i)]
        self.core.rollback()
        self.core.end()
        self.core.begin()
        applied = self._applier.apply(items, now, None)
        self._answer_refused(commands, self._failure)
        return applied

    async def _commit(self, changes: dict[str, bytes | None], token: int) -> None:
        started = time.perf_counter()  # a duration, not a wait: not the Clock's business
        try:
            await self.store.commit(changes, token)
        finally:
            self.metrics.commit_seconds.observe(time.perf_counter() - started)

    # -- while the store fails --------------------------------------------------------

    async def _refuse_arriving(self) -> None:
        """While a batch's commit is retried: answer each command as it arrives with
        ``store_error`` (nothing of it is written), instead of holding it behind."""
        while True:
            commands = self.inputs.take_commands()
            if commands:
                self._answer_refused(commands, f"not written, the store fails: {self._failure}")
            await self.inputs.arrived()

    def _answer_refused(self, commands: list[Input], error: str) -> None:
        """Apply ``commands`` refused with ``error`` (the core is left as it is) and answer
        them at once, each acknowledged on its own: a ``multiple`` acknowledgement could
        cover a delivery of the batch still being retried."""
        answered = self._applier.apply(commands, self.clock.now_ms(), error)
        self.metrics.add(answered.tally, len(commands))
        task = watch(asyncio.get_running_loop().create_task(self._answer(answered.steps)))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, steps: list[Step]) -> None:
        """Publish the replies (one confirm deadline), then settle each delivery alone."""
        work = [(step, effect) for step in steps for effect in step.publishes]
        if work:
            failed, _ = await self._confirmed(work, _start(work))
            for step, _ in failed:
                step.settle = "requeue"  # delivered again, answered again
        for step in steps:
            if step.delivery is None:
                continue
            if step.settle == "ack":
                await _ack(step.delivery, multiple=False)
            else:
                # Never left: the next batch's multiple acknowledgement would cover it.
                requeue = step.settle != "reject"
                if requeue:
                    self.metrics.redeliveries.inc()
                if not await _reject(step.delivery, requeue=requeue):
                    self._leave([step.delivery])

    async def _stop_refusing(self, refusing: asyncio.Task[None] | None) -> None:
        """Stop answering arriving commands; wait until those answered are settled, before
        a later batch's acknowledgement can cover them."""
        if refusing is not None:
            refusing.cancel()
            await asyncio.wait([refusing])
        while self._answering:
            await asyncio.wait(list(self._answering))

    # -- a store that lost its data ---------------------------------------------------

    def _fenced_by(self, exc: StoreFenced) -> None:
        """Another replica took the shard: stop at once, nothing more committed or
        published; what was delivered is left unacknowledged for the broker to give to
        the new owner (its channels are closed by the shard's runner, ``on_fenced``)."""
        if self.fenced is not None:
            return
        self.fenced = str(exc)[:300]
        self.metrics.fenced_commits.inc()
        log.error(
            "store_fenced",
            error=self.fenced,
            action="another replica owns the shard now: it stops here",
        )
        self.abandon()
        if self._on_fenced is not None:
            self._on_fenced(self.fenced)

    def _store_lost(self, exc: StoreLost) -> None:
        """Say once that the store lost what was committed: logged, counted, not ready."""
        if self._lost is not None:
            return
        self._lost = str(exc)[:300]
        self.metrics.store_data_lost.inc()
        log.error(
            "store_data_lost",
            error=self._lost,
            conversations=len(self.core),
            action="writing every conversation held again",
        )
        self.health.trouble("store_lost", self._lost)

    async def _restore(self) -> None:
        """Write every conversation held (as committed: no batch open), the gap model and
        the token into the store again; StoreError when it fails (still lost)."""
        started = time.perf_counter()
        held = await held_records(self.core)
        await self.store.restore(held, self.core.last_token)
        self._lost = None
        log.warning(
            "store_restored",
            conversations=len(held) - 1,
            token=self.core.last_token,
            took_ms=round((time.perf_counter() - started) * 1000),
        )
        self.health.cleared("store_lost")

    async def _restore_beside(self, items: list[Input], now: int) -> Applied:
        """Restore with the open batch set aside (only what was committed is written
        again), then apply it again; the batch is open again whatever happens."""
        self.core.rollback()
        self.core.end()
        try:
            await self._restore()
        finally:
            self.core.begin()
        return self._applier.apply(items, now, None)

    async def watch_store(self, every_ms: int) -> None:
        """Every ``every_ms``, ask the store whether it still holds what was committed
        (``Store.check``): give it everything again when not, and say on ``/readyz``
        while it cannot be reached. A batch being committed finds out on its own."""
        while True:
            await sleep(self.clock, every_ms)
            if self._committing.locked():
                continue
            try:
                await self._check_store()
            except StoreFenced as exc:
                self._fenced_by(exc)
                return
            except StoreError as exc:
                self.health.trouble("store", f"check failed: {exc}")
                continue
            if not self._committing.locked():
                self.health.cleared("store")

    async def check_before_close(self) -> None:
        """At stop, once the pipeline is done: a store that lost its data (noticed or not,
        a restore cut short) is given everything held again. Nothing else would: the next
        worker starts from what the store holds, and the periodic check may not have come
        round since Redis came back empty."""
        try:
            await self._check_store()
        except StoreError as exc:
            # Lost: what the store lacks is gone with this worker; else nothing is known.
            say = log.error if self._lost is not None else log.warning
            say(
                "store_unchecked_at_stop",
                error=str(exc)[:300],
                lost=self._lost is not None,
                conversations=len(self.core),
            )

    async def _check_store(self) -> None:
        """``Store.check``; everything held written again when the store lost its data
        (between batches); StoreError when the store cannot be checked or restored."""
        try:
            await self.store.check()
        except StoreLost as exc:
            self._store_lost(exc)
        if self._lost is not None:
            async with self._committing:
                if self._lost is not None:
                    await self._restore()

    # -- publish and settle -----------------------------------------------------------

    async def _pause(self, attempt: int, failure: Exception, steps: list[Step]) -> bool:
        """Wait before retrying; False when the worker is going or the deliveries are gone.

        The ``attempt``-th pause (from 1) is the first pause doubled ``attempt - 1`` times,
        at most the longest; on the injected clock.
        """
        self.metrics.retries.inc()
        if self._abandoned or self.outbound.closing:
            log.warning("retry_abandoned", error=str(failure)[:300])
            return False
        gone = any(s.delivery is not None and not _open(s.delivery) for s in steps)
        if gone and isinstance(failure, StoreError):  # the broker took the deliveries back
            log.warning("retry_abandoned_connection_lost", error=str(failure)[:300])
            return False
        pause = min(self._retry_max_ms, self._retry_first_ms << min(attempt - 1, 20))
        log.warning("retrying", attempt=attempt, pause_ms=pause, error=str(failure)[:300])
        await sleep(self.clock, pause)
        return True

    async def _settle(self, steps: list[Step]) -> None:
        """Rejections first, then acknowledgements, ``multiple`` where that is safe.

        A ``multiple`` acknowledgement must never cover a delivery that is rejected or left
        for redelivery, by this batch or an earlier one: rejections go out first, and on a
        channel with a delivery left unsettled only the deliveries below the lowest one
        left are acknowledged together, the others one by one.
        """
        self._forget_closed()
        acks: dict[int, list[Delivery]] = {}
        left: list[Delivery] = []
        redelivered = 0
        for step in steps:
            delivery = step.delivery
            if delivery is None:
                continue
            try:
                channel = id(delivery.channel)
            except ChannelGone:
                redelivered += 1  # the broker delivers it again
                continue
            if step.settle == "ack":
                acks.setdefault(channel, []).append(delivery)
            elif step.settle == "leave":
                redelivered += 1
                left.append(delivery)
            else:
                requeue = step.settle == "requeue"
                redelivered += requeue
                if not await _reject(delivery, requeue=requeue):
                    left.append(delivery)
        if redelivered:
            self.metrics.redeliveries.inc(redelivered)
        self._leave(left)
        for channel, deliveries in acks.items():
            floor = self._floor(channel)
            below = deliveries if floor is None else [d for d in deliveries if _tag(d) < floor]
            if below:
                await _ack(max(below, key=_tag), multiple=True)
            for delivery in deliveries:
                if floor is not None and _tag(delivery) >= floor:
                    await _ack(delivery, multiple=False)

    def _floor(self, channel: int) -> int | None:
        """The lowest tag on ``channel`` a ``multiple`` acknowledgement must not reach."""
        hole = self._holes.get(channel)
        outside = self._outside.get(channel)
        tags = ([hole[1]] if hole is not None else []) + ([min(outside)] if outside else [])
        return min(tags) if tags else None

    def settling_outside(self, delivery: Delivery) -> None:
        """``delivery`` is settled by someone else (a reroute): until ``settled_outside``,
        no ``multiple`` acknowledgement of the pipeline covers it. Call it as it arrives,
        before anything is awaited."""
        try:
            channel = id(delivery.channel)
        except ChannelGone:
            return
        self._outside.setdefault(channel, set()).add(_tag(delivery))
        self._outside_of[delivery] = channel
        self._outside_done.clear()

    def settled_outside(self, delivery: Delivery) -> None:
        """``delivery``, given to ``settling_outside``, is settled."""
        channel = self._outside_of.pop(delivery, None)
        if not self._outside_of:
            self._outside_done.set()
        if channel is None or channel not in self._outside:
            return
        tags = self._outside[channel]
        tags.discard(_tag(delivery))
        if not tags:
            del self._outside[channel]

    def _leave(self, deliveries: Iterable[Delivery]) -> None:
        """Remember deliveries left unsettled on open channels: no ``multiple`` covers them."""
        for delivery in deliveries:
            try:
                channel = id(delivery.channel)
            except ChannelGone:  # the broker delivers it again, and the channel is new
                continue
            held = self._holes.get(channel)
            if held is None or _tag(delivery) < held[1]:
                self._holes[channel] = (delivery, _tag(delivery))

    def _forget_closed(self) -> None:
        """Forget the holes of channels that closed (their tags died with them)."""
        for channel, (delivery, _) in list(self._holes.items()):
            if not _open(delivery):
                del self._holes[channel]

    async def _give_back(self, deliveries: list[Delivery]) -> None:
        """Requeue ``deliveries`` (a bug); one that cannot be is left, and remembered."""
        for delivery in deliveries:
            if not await _reject(delivery, requeue=True):
                self._leave([delivery])

    async def _send_warm(self, effect: PublishWarm) -> None:
        request = effect.request
        cid, token = request.conversation_id, request.token
        try:
            routed = await self.outbound.warm(
                request, effect.timeout_ms, lambda: self.core.is_awaiting(cid, token)
            )
        except PublishWithdrawn:
            log.info("warm_withdrawn", conversation_id=cid, token=token)
            return
        except PublishFailed as exc:  # left to the warm timeout, which fails and retries it
            # Counted into the failure summary (a warning every so often, not one a warm):
            # the worker handles it (the timeout retries; an overdue confirm drops the
            # connection), so it must not page anyone by itself.
            log.info("warm_publish_failed", conversation_id=cid, error=str(exc)[:300])
            self.failures.publish_failed(str(exc))
            if isinstance(exc, ConfirmOverdue):
                await self._confirms_overdue(exc)
            return
        self._confirms_came(in_time=True)  # within the publisher's deadline, the setting
        self.metrics.warms_requested.inc()
        log.info("warm_requested", conversation_id=cid, token=token)
        if not routed:
            self.inputs.put(Returned(cid, token))


async def held_records(core: Warmer) -> dict[str, bytes]:
    """Everything ``core`` holds as the store keeps it: every record and the gap model
    (what a store that lost its data is given again). Encoded a chunk at a time, letting
    the loop run between (a million records take seconds); the caller keeps the core
    from changing meanwhile."""
    held: dict[str, bytes] = {}
    for count, (cid, record) in enumerate(core.records(), 1):
        held[cid] = encode_record(record)
        if count % _ENCODE_CHUNK == 0:
            await asyncio.sleep(0)
    held[MODEL_KEY] = core.economy.model.encode()
    return held


def _is_command(item: Input) -> bool:
    return isinstance(item, Received) and item.queue == "commands"


def _start(work: list[tuple[Step, Effect]]) -> list[asyncio.Task[None]]:
    loop = asyncio.get_running_loop()
    return [loop.create_task(effect()) for _, effect in work]


def _open(delivery: Delivery) -> bool:
    try:
        delivery.channel  # noqa: B018 - raises once the channel is closed
    except ChannelGone:
        return False
    return True


def _tag(delivery: Delivery) -> int:
    return delivery.delivery_tag or 0


async def _ack(delivery: Delivery, *, multiple: bool) -> None:
    try:
        await delivery.ack(multiple=multiple)
    except Exception as exc:  # the channel went away: the broker delivers it again
        log.info("ack_lost", routing_key=delivery.routing_key, error=repr(exc)[:300])


async def _reject(delivery: Delivery, *, requeue: bool) -> bool:
    """Without requeue the queue's dead-lettering takes it (``x-death`` reason ``rejected``).

    With requeue it is delivered again and counts toward the delivery limit on every
    RabbitMQ version (from 4.3 on, ``basic.nack`` and returns on a closed channel do not).
    False when it could not be sent: the delivery stays unsettled.
    """
    try:
        await delivery.reject(requeue=requeue)
    except Exception as exc:
        log.info("reject_lost", routing_key=delivery.routing_key, error=repr(exc)[:300])
        return False
    return True


__all__ = ["RETRY_FIRST_MS", "RETRY_MAX_MS", "Worker", "held_records"]
