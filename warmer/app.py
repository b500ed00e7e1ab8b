"""The composition root: builds the parts from the config, starts them, stops them.

Start: open the store and load every record; build the core from them and recover the
schedules (re-arm, await the warm that was out, warm at once what fell due while the cache
can still be alive), commit what recovery changed; build the inputs and the scheduler;
serve health and metrics over HTTP (``WARMER_HTTP``); connect (robustly) to the broker,
trying again with backoff for ``WARMER_STARTUP_WAIT_S`` while it cannot be reached, and
declare the topology; build the publisher and the pipeline, each complete, in that order;
arm the recovered timers; consume. Stop (SIGTERM or SIGINT): stop consuming, let the
pipeline apply and acknowledge what was delivered, stop the timers without touching
state, close. Shutting down never changes a conversation.

Ready (``/readyz``) means: connected to the broker, both consumers consuming since the
last (re)connection, the store open, the pipeline and every background task (timers,
store check, inbound check, prune, clock, stall watchdog) running, and no part reporting
trouble (``warmer.observe.health``: the broker blocking the connection, a stall, ...);
and, with ``WARMER_BEHIND_NOT_READY_S``, not further behind than that. How far behind is a
line of ``/readyz`` of its own either way (``about``).

A lost connection is logged once (``broker_connection_lost``) and its end once
(``broker_reconnected``, with the attempts and the time between), whatever the number of
attempts; aiormq notices a path that stopped forwarding within about three heartbeats
(``WARMER_HEARTBEAT_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, Literal, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from yarl import URL

from warmer.balance import assign
from warmer.bus import flow, lenient, reader
from warmer.bus.consumer import AmqpDelivery, ShardConsumer, close_quietly, own_channel
from warmer.bus.lock import ShardLock
from warmer.bus.port import ChannelGone, Delivery, PluginMissing, PublishFailed, ShardHeld
from warmer.bus.publisher import Publisher
from warmer.bus.reroute import needs_reroute, reroute
from warmer.bus.topology import Names, Topology, declare
from warmer.clock import STEP_CHECK_EVERY_MS, Clock, StepWatch, SystemClock, sleep, within
from warmer.config import Config, mask_password
from warmer.core import Arm, GapModel, GapModelError, Record, Status, Warmer, parse_settings
from warmer.core.economy import Economy
from warmer.core.gaps import MODEL_KEY
from warmer.core.records import RecordError, decode_record, encode_changes
from warmer.core.rules import token_start
from warmer.inputs import Inputs, Prune
from warmer.observe.failures import FailureLog
from warmer.observe.health import Health
from warmer.observe.http import HttpEndpoint
from warmer.observe.log import get_logger
from warmer.observe.metrics import CostGauges, Metrics, StateGauges
from warmer.observe.stall import Watchdog
from warmer.observe.tasks import watch
from warmer.scheduler import Scheduler
from warmer.shard import TOKEN_STRIDE, Runner
from warmer.store import (
    Store,
    StoreError,
    StoreLost,
    StoreOutcomeUnknown,
    StoreUnreachable,
    open_shared,
)
from warmer.store.base import Shared, StoreFenced
from warmer.worker import RETRY_FIRST_MS, RETRY_MAX_MS, Worker, held_records

log = get_logger(__name__)

_T = TypeVar("_T")
_Channels = tuple[AbstractRobustChannel, Topology, AbstractRobustChannel, AbstractExchange]
_Lane = tuple[int, int]
"""What the start-up's set-up gives the publisher: its channel, the topology, the
dead-letter channel and exchange."""

CONNECT_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 2.0
RECONNECT_INTERVAL_S: Final = 1
RECOVERY_CHUNK: Final = 10_000
"""Records a start-up commit writes at a time (Redis runs each commit as one script)."""
STARTUP_PAUSE_FIRST_MS: Final = 1000
STARTUP_PAUSE_MAX_MS: Final = 30_000
HEARTBEAT_MIN_S: Final = 1  # WARMER_HEARTBEAT_S's bounds, for a heartbeat in the URL
HEARTBEAT_MAX_S: Final = 3600
RECONNECT_MIN_S: Final = 0.1  # a URL's reconnect_interval: at most 10 attempts a second
RECONNECT_MAX_S: Final = 3600
_DECIMAL: Final = re.compile(r"[0-9]+(\.[0-9]+)?")  # what aio-pika reads as written
STOP_GRACE_S: Final = 10.0  # well inside a container's usual 30 s between SIGTERM and SIGKILL
PRUNE_EVERY_MS: Final = 60_000
RESTORE_AT_START_ATTEMPTS: Final = 10  # a store lost while starting: about 30 s at most
RESTORE_AT_START_PAUSE_MS: Final = 1_000
INBOUND_CHECK_MS: Final = 250  # how often the broker is asked what waits in a shard's queue
STORE_CHECK_MS: Final = 5_000  # how soon a store that lost its data is noticed when idle
_CUT: Final = (
    ChannelGone,
    ConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)
"""What a connection lost in the middle of taking a shard raises."""
BALANCE_EVERY_MS: Final = 1_000
"""How often a replica beats its presence and takes or hands over shards."""
PRESENCE_TTL_MS: Final = 3_000
"""How long a replica that stopped beating stays listed (three beats)."""
PRESENCE_FRESH_MS: Final = 2_000
"""How recent a replica's beat must be for shards to be assigned to it (two beats)."""
SETTLE_MS: Final = 4_000
"""How long start-up waits for the shards assigned to it that another replica still
holds (handing them over), before it goes on without them."""
COMMANDS_LOCK_WAIT_MS: Final = 5_000
"""How long a new owner waits for the old one to let go of a shard's command queue."""
EXIT_OK: Final = 0
EXIT_USAGE: Final = 2  # a setting the worker cannot use
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE: the broker or the store cannot be reached


class StartupError(Exception):
    """The worker cannot start; the message says what to do about it."""


class App:
    """One running worker: store, core, scheduler, broker connection and consumers."""

    def __init__(
        self,
        config: Config,
        clock: Clock | None = None,
        retry_ms: tuple[int, int] = (RETRY_FIRST_MS, RETRY_MAX_MS),
    ) -> None:
        """``retry_ms``: the first and longest pause between retries of a failed commit."""
        lenient.install()
        flow.install()
        reader.install()
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._retry_ms = retry_ms
        self.replica = config.replica_id or f"{socket.gethostname()[:60]}:{os.getpid()}"
        """This replica's id: in logs, /readyz, the store's owners and what it publishes."""
        try:
            self.shared: Shared = open_shared(config.store, timeout_ms=config.store_timeout_ms)
        except ValueError as exc:
            raise StartupError(f"WARMER_STORE: {exc}") from exc
        self.store: Store = self.shared.shard(0, self.replica)
        """Shard 0's view (the whole store with one shard), until it is taken again."""
        self._store_fresh = True
        try:
            self._http_address = config.http_address
        except ValueError as exc:
            raise StartupError(f"WARMER_HTTP: {exc}") from exc
        try:
            self._url = _amqp_url(config.amqp_url, config.heartbeat_s)
        except ValueError as exc:
            raise StartupError(f"WARMER_AMQP_URL: {exc}") from exc
        self.shards = config.shards
        self.names = Names.of(config.namespace, config.shards)
        self.metrics = Metrics()
        """The worker's metrics, in a registry of this app's own."""
        self.metrics.broker_connected.set_function(lambda: float(self._connected()))
        self.health = Health()
        """What keeps the pipeline from making progress (``/readyz``)."""
        self.failures = FailureLog(self.clock)
        """Failed warms of every shard, summed into one warning line every so often."""
        self._runners: dict[int, Runner] = {}
        self._reroute_channel: AbstractRobustChannel | None = None
        self._reply_channel: AbstractRobustChannel | None = None
        self._wanted: frozenset[int] = frozenset()
        self._beaten_at = 0
        """When this replica's presence was last beaten (the Clock's ms)."""
        self._others: set[str] = set()
        """The other replicas alive at the last beat."""
        self._nudge = asyncio.Event()
        self._http: HttpEndpoint | None = None
        self._publisher: Publisher | None = None
        self._recovery_arms: list[Arm] = []
        self._connection: AbstractRobustConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._store_open = False
        self._consuming = False
        self._stopping = False
        self._connecting = False
        self._store_waiting = False
        self._lost_at: float | None = None
        self._failed_attempts = 0
        self._unsubscribe: Callable[[], None] | None = None
        self._blocked_underlay: object | None = None
        self.reconnections = 0
        """How many times the connection was re-established since start."""

    @property
    def http_port(self) -> int | None:
        """The port health and metrics are served on (once started), None when off."""
        return None if self._http is None else self._http.port

    @property
    def worker(self) -> Worker | None:
        """Shard 0's pipeline while this replica owns it (the only one with one shard)."""
        runner = self._runners.get(0)
        return None if runner is None else runner.worker

    @property
    def owned(self) -> list[int]:
        """The shards this replica owns now, in order."""
        return sorted(k for k, runner in self._runners.items() if runner.running)

    def about(self) -> str:
        """Which shards this replica owns (``/readyz``'s second line), and, while it is
        behind, how far (a third line)."""
        owns = f"replica {self.replica} owns shards {self.owned} of {self.shards}"
        behind = self.behind_ms()
        if behind <= 0:
            return owns
        return f"{owns}\nbehind {behind / 1000:.1f} s (oldest due timer, input or warm confirm)"

    def behind_ms(self) -> int:
        """How far behind the most behind shard's pipeline is (``Worker.behind_ms``)."""
        now = self.clock.now_ms()
        return max(
            (r.worker.behind_ms(now) for r in list(self._runners.values()) if r.worker),
            default=0,
        )

    def readiness(self) -> str | None:
        """None when ready to do the work, else why not (what ``/readyz`` answers).

        A replica that owns no shard (a standby, or one whose shards went to others) is
        ready: it does its part by standing by. One assigned a shard it has not taken yet
        is not, until it holds it.
        """
        if self._stopping:
            return "stopping"
        if self._store_waiting:
            return "waiting for the store"
        if self._connecting:
            return "connecting to the broker"
        if not self._tasks:
            return "starting"
        if not self._store_open:
            return "store closed"
        if self._connection is None or not self._connection.connected.is_set():
            return "broker connection lost"
        if not self._consuming:
            return "consumers not restored"
        # Any of them ended is a part that no longer works (a bug, logged as task_failed
        # once): the shards no longer balanced, the clock no longer watched.
        for task in self._tasks:
            if task.done():
                return f"{task.get_name()} stopped"
        for shard, runner in sorted(self._runners.items()):
            trouble = runner.trouble()
            if trouble is not None:
                return trouble if self.shards == 1 else f"shard {shard}: {trouble}"
        missing = sorted(self._wanted - set(self.owned))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            return f"taking shard {missing[0]}{more}"
        reasons = self.health.reasons()
        if reasons:
            return "; ".join(reasons)
        limit_s = self.config.behind_not_ready_s
        if limit_s > 0:
            behind = self.behind_ms()
            if behind > limit_s * 1000:
                return f"behind by {behind / 1000:.1f} s (WARMER_BEHIND_NOT_READY_S {limit_s})"
        return None

    async def start(self) -> None:
        """Open the store, connect, declare, take this replica's shards; StartupError with
        advice. Returns once the shards assigned to it are taken (or held by another: a
        standby)."""
        # Served first: /healthz answers while the store and the broker are waited for.
        await self._serve_http()
        try:
            await self._open_shared()
            await self._start()
        except BaseException:
            await self._stop_http()
            raise
        log.info(
            "worker_started",
            namespace=self.config.namespace,
            replica=self.replica,
            shards=self.shards,
            owned=self.owned,
        )

    async def _start(self) -> None:
        # Before the topology is declared: a replica with more shards than the store's
        # layout would bind its extra shard queues into the hash ring, moving conversations
        # to queues nobody consumes once it is refused.
        await self._check_layout()
        await self._check_replica_id()
        publish_channel, topology, dead_channel, dlx = await self._connect(self._set_up)
        self._publisher = Publisher(
            publish_channel,
            topology,
            dead_channel,
            dlx,
            self.clock,
            confirm_timeout_ms=self.config.confirm_timeout_ms,
            replica=self.replica,
            reply_channel=self._reply_channel,
        )
        self.metrics.registry.register(StateGauges(self._statuses, self._timers))
        self.metrics.behind.set_function(lambda: self.behind_ms() / 1000)
        self.metrics.registry.register(CostGauges(self._economy, self._savings))
        await self._balance(first=True)
        # A shard whose lock is free has no live holder, whatever the store says (a killed
        # predecessor's beat is still fresh): taken now, not after the beat ages out.
        for shard in range(self.shards):
            if shard not in self._runners:
                await self._take(shard)
        deadline = self.clock.now_ms() + SETTLE_MS
        while self._wanted - set(self.owned) and self.clock.now_ms() < deadline:
            await sleep(self.clock, BALANCE_EVERY_MS // 4)
            await self._balance(first=False)
        loop = asyncio.get_running_loop()
        self._tasks = [
            watch(loop.create_task(self._balance_forever(), name="balance")),
            watch(loop.create_task(self._watch_clock_forever(), name="clock")),
            watch(loop.create_task(self.failures.run(), name="failure-summary")),
        ]
        self._consuming = True

    async def _set_up(self) -> _Channels:
        """Declare the topology, open the publishing channels, make sure no replica with
        an embedded store shares the namespace.

        Part of each start-up attempt: a connection lost in the middle of it is tried
        again like one that could not be made.
        """
        assert self._connection is not None
        await self._check_alone()  # first: the clearest reason a second replica is refused
        await self._check_topology()
        publish_channel = await self._connection.channel(publisher_confirms=True)
        try:
            topology = await declare(publish_channel, self.names)
        except PluginMissing as exc:
            raise StartupError(str(exc)) from exc
        # Dead letters on a channel of their own: one the broker refuses closes only it.
        dead_channel = await self._connection.channel(publisher_confirms=True)
        dlx = await dead_channel.declare_exchange(
            self.names.dlx, aio_pika.ExchangeType.FANOUT, durable=True
        )
        # Command replies on a channel of their own: not behind a flood of warms (issue 17).
        self._reply_channel = await self._connection.channel(publisher_confirms=True)
        if self.shards > 1:  # re-publishes what reached a shard without its header
            self._reroute_channel = await self._connection.channel(publisher_confirms=True)
        return publish_channel, topology, dead_channel, dlx

    async def _check_topology(self) -> None:
        """The namespace's topology on the broker has this replica's number of shards:
        a worker with one shard beside sharded ones would bind the single queues, which
        then get a copy of every message (answered later from another store), and one
        with shards beside the single queues would leave them to fill. Refused instead."""
        assert self._connection is not None
        ns = self.config.namespace
        underlay = await own_channel(self._connection)
        try:
            if self.shards == 1:
                await underlay.exchange_declare(f"{ns}.lifecycle.shards", passive=True)
                advice = (
                    f"the namespace {ns!r} is sharded on the broker ({ns}.lifecycle.shards "
                    "exists): give this worker WARMER_SHARDS and WARMER_STORE as its other "
                    "replicas have them"
                )
            else:
                await underlay.queue_declare(self.names.lifecycle, passive=True)
                advice = (
                    f"the namespace {ns!r} still has the single-queue topology (the queue "
                    f"{self.names.lifecycle} exists): stop its worker and run `warmer "
                    f"reshard --shards {self.shards}`, which moves what is queued"
                )
        except aiormq.exceptions.ChannelNotFoundEntity:
            return  # as expected
        finally:
            await close_quietly(underlay)
        raise StartupError(advice)

    async def _check_replica_id(self) -> None:
        """No other live process beats with this replica id: two would count each other's
        shards as their own, and a stop would remove the other's presence. A restarted
        process of the same name waits for its predecessor's beat to age out first."""
        me = self._identity()
        deadline = self.clock.now_ms() + PRESENCE_TTL_MS + BALANCE_EVERY_MS
        while True:
            try:
                live = await self.shared.replicas()
            except StoreError as exc:
                raise StartupError(f"cannot read the store {self.shared.url}: {exc}") from exc
            twin = next((r for r in live if r.id == self.replica), None)
            if twin is None or twin.info.split(",")[0] == me:
                return
            if self.clock.now_ms() >= deadline:
                raise StartupError(
                    f"another live process uses WARMER_REPLICA_ID={self.replica!r} "
                    f"({twin.info.split(',')[0][:200]}): give each replica its own id, or "
                    "leave it empty (host name and process id)"
                )
            await sleep(self.clock, BALANCE_EVERY_MS // 2)

    def _identity(self) -> str:
        return f"pid {os.getpid()} on {socket.gethostname()[:60]}"

    async def _check_alone(self) -> None:
        """An embedded store (SQLite) cannot be shared: its replica holds the exclusive
        queue ``{namespace}.embedded`` for as long as its connection lives, and any other
        replica of the namespace, whatever its store, is refused while it is held."""
        assert self._connection is not None
        name = f"{self.config.namespace}.embedded"
        channel = await self._connection.channel()
        try:
            if self.shared.shareable:
                await channel.declare_queue(name, passive=True)
            else:
                await channel.declare_queue(name, exclusive=True, auto_delete=True)
                return  # held with the connection; the channel stays open
        except aiormq.exceptions.ChannelNotFoundEntity:
            return  # no replica with an embedded store runs here
        except aiormq.exceptions.ChannelLockedResource as exc:
            raise StartupError(
                f"another worker runs in namespace {self.config.namespace!r} with an "
                "embedded store (SQLite), which cannot be shared between replicas: stop it, "
                "or give every replica one shared WARMER_STORE (redis:// or postgresql://)"
            ) from exc
        with contextlib.suppress(Exception):
            await channel.close()

    async def _check_layout(self) -> None:
        """The store's records are laid out for WARMER_SHARDS shards (set on first use)."""
        try:
            layout = await self.shared.layout()
            if layout is None:
                await self.shared.set_layout(self.shards)
                return
        except StoreError as exc:
            raise StartupError(f"cannot read the store {self.shared.url}: {exc}") from exc
        if layout != self.shards:
            raise StartupError(
                f"the store {self.shared.url} is laid out for {layout} shard(s), not "
                f"WARMER_SHARDS={self.shards}: stop every replica and run "
                f"`warmer reshard --shards {self.shards}` (nothing is lost), or set "
                f"WARMER_SHARDS={layout}"
            )

    def _watchdog(self, runner: Runner) -> Watchdog:
        after_ms = self.config.stall_s * 1000
        return Watchdog(self.clock, runner.health, runner.inputs, after_ms, self.metrics.stalls.inc)

    # -- shards -----------------------------------------------------------------------

    async def _balance_forever(self) -> None:
        """Every second (or at once when nudged): beat, then take or hand over shards;
        until the worker stops (``stop`` lets a hand-over under way finish first)."""
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await within(self.clock, BALANCE_EVERY_MS, self._nudge.wait())
            self._nudge.clear()
            try:
                await self._balance(first=False)
            except Exception as exc:  # a connection cut mid-round (aiormq raises even bare
                # Exceptions): the next round, a second from now, tries again
                log.warning("balance_round_failed", error=repr(exc)[:300], owned=self.owned)

    async def _balance(self, *, first: bool) -> None:
        """Beat this replica's presence; hand over the shards assigned to others and take
        the ones assigned to it that nobody holds. At start (``first``), a store that
        cannot be read is a StartupError; later it is logged and the shards held kept."""
        if self._stopping or not self._connected():
            return
        try:
            live = await self.shared.beat(self.replica, self._info(), PRESENCE_TTL_MS)
            owners = await self.shared.owners()
        except StoreError as exc:
            if first:
                raise StartupError(f"cannot reach the store {self.shared.url}: {exc}") from exc
            log.warning("presence_beat_failed", error=str(exc)[:300])
            await self._let_go_unless_alone()
            return
        self._beaten_at = self.clock.now_ms()
        self._others = {r.id for r in live} - {self.replica}
        # The store's clock: this beat's own time. A replica that missed two beats is left
        # out (its shards' locks are tried: free if it died, held if it is only slow).
        now = max((r.seen_ms for r in live if r.id == self.replica), default=0)
        replicas = [r.id for r in live if now - r.seen_ms <= PRESENCE_FRESH_MS]
        if self.replica not in replicas:
            replicas.append(self.replica)
        current = {o.shard: o.replica for o in owners if not o.released}
        for shard, runner in self._runners.items():
            if runner.running:
                current[shard] = self.replica
        assignment = assign(self.shards, replicas, current)
        self._wanted = assignment.get(self.replica, frozenset())
        for shard in sorted(set(self._runners) - self._wanted):
            await self._lose(shard, "handover", graceful=True)
        for shard in sorted(k for k, r in self._runners.items() if r.suspended):
            await self._resume(shard)
        for shard in sorted(self._wanted - set(self._runners)):
            if self._stopping:
                return
            try:
                await self._take(shard)
            except (StoreError, StartupError) as exc:
                if first:
                    raise
                log.warning("shard_take_failed", shard=shard, error=str(exc)[:300])

    async def _let_go_unless_alone(self) -> None:
        """Beats failing for longer than the presence lasts: this replica cannot commit
        either, and the others, which no longer see it, are assigned its shards but meet
        its locks. With others alive at the last beat, it lets its shards go (their
        pipelines could not commit; what was delivered goes back) and takes none until a
        beat succeeds; alone, it keeps them (nobody else could do better, and commands are
        still answered ``store_error``)."""
        if not self._others or not self._runners:
            return
        if self.clock.now_ms() - self._beaten_at < PRESENCE_TTL_MS:
            return
        log.error(
            "store_unreachable_shards_released",
            shards=self.owned,
            action="the replicas that reach the store take them; taken again once it answers",
        )
        for shard in list(self._runners):
            await self._lose(shard, "store unreachable", graceful=False)

    def _connected(self) -> bool:
        return self._connection is not None and self._connection.connected.is_set()

    def _info(self) -> str:
        return f"{self._identity()}, owns {self.owned}"

    async def _take(self, shard: int) -> bool:
        """Take ``shard``: its lock, then its store view (fencing the previous owner), its
        conversations recovered, its command queue, its pipeline and timers. False when
        another replica holds it; StartupError or StoreError when its state cannot be
        read or written."""
        assert self._connection is not None and self._publisher is not None
        started = time.perf_counter()  # a duration, not a wait: not the Clock's
        runner = Runner(shard, self.health if self.shards == 1 else Health(), self.clock)
        lock = await self._lock(shard)
        if lock is None:
            return False
        runner.lock = lock
        self._runners[shard] = runner  # from here a lost connection drops it
        try:
            view = runner.view = self._view(shard)
            lane = (TOKEN_STRIDE, shard) if self.shards > 1 else (1, 0)
            core = await self._recovered_core(view, lane)
            arms, self._recovery_arms = self._recovery_arms, []
            scheduler = Scheduler(
                self.clock, runner.inputs.fired, lateness=self.metrics.timer_lateness.observe
            )
            worker = runner.worker = Worker(
                core,
                scheduler,
                view,
                self.clock,
                self._publisher,
                runner.inputs,
                self.metrics,
                retry_ms=self._retry_ms,
                health=runner.health,
                confirm_ms=self.config.confirm_timeout_ms,
                on_fenced=lambda _: self._lose_soon(shard, "fenced"),
                warms_in_flight=self.config.warms_in_flight,
                failures=self.failures,
            )
            worker.hold_above = self.config.prefetch
            await self._consume(runner)
        except _CUT:  # the connection went: taken again once it is back
            await self._lose(shard, "connection lost", graceful=False)
            return False
        except BaseException:
            await self._lose(shard, "take failed", graceful=False)
            raise
        if runner.lost is not None:  # the connection went meanwhile
            return False
        # The warms out: their timeouts are checks (decision 109), never held back.
        checks: list[tuple[str, int, int]] = []
        warms: list[tuple[str, int, int]] = []
        for arm in arms:
            into = checks if core.is_awaiting(arm.conversation_id, arm.token) else warms
            into.append((arm.conversation_id, arm.due_at, arm.token))
        scheduler.arm_many(warms)
        scheduler.arm_many(checks, check=True)
        scheduler.start()
        loop = asyncio.get_running_loop()
        runner.tasks = [
            watch(loop.create_task(worker.run(), name="pipeline")),
            watch(loop.create_task(self._prune_forever(runner.inputs), name="prune")),
            watch(loop.create_task(self._watchdog(runner).run(), name="stall watchdog")),
            watch(loop.create_task(worker.watch_store(STORE_CHECK_MS), name="store-check")),
            watch(loop.create_task(self._watch_inbound(runner), name="inbound-check")),
        ]
        took = time.perf_counter() - started
        self.metrics.takeovers.inc()
        self.metrics.takeover_seconds.observe(took)
        self.metrics.shards_owned.set(len(self.owned))
        log.info(
            "shard_gained",
            shard=shard,
            epoch=view.epoch,
            conversations=len(core),
            armed=len(arms),
            took_ms=round(took * 1000),
        )
        return True

    async def _watch_inbound(self, runner: Runner) -> None:
        """Every ``INBOUND_CHECK_MS``, ask the broker how many lifecycle messages wait in
        the shard's queue (a passive declare, on a channel of its own) and tell the
        pipeline (``Worker.inbound``): messages the broker holds back because the worker
        has not settled what it was given are inputs waiting too, completions among them.
        A failed look is only logged (the connection going, say) and tried again."""
        queue = self.names.shard_queues(runner.shard)[0]
        channel: aiormq.abc.AbstractChannel | None = None
        delivered, at = runner.inputs.delivered, self.clock.now_ms()
        try:
            while True:
                await sleep(self.clock, INBOUND_CHECK_MS)
                worker = runner.worker
                if worker is None or self._connection is None:
                    continue
                try:
                    if channel is None or channel.is_closed:
                        channel = await own_channel(self._connection)
                    declared = await within(
                        self.clock,
                        self.config.confirm_timeout_ms,
                        channel.queue_declare(queue, passive=True),
                    )
                except (*_CUT, aiormq.exceptions.AMQPError, TimeoutError) as exc:
                    log.debug("inbound_check_failed", shard=runner.shard, error=repr(exc)[:300])
                    channel = None
                    continue
                except asyncio.CancelledError as exc:
                    # aiormq cancels the RPCs of a connection it closes (a stall, a reset):
                    # that look is lost; a cancellation aimed at this task ends it.
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
                    log.debug("inbound_check_failed", shard=runner.shard, error=repr(exc)[:300])
                    channel = None
                    continue
                except Exception as exc:
                    # aiormq fails an RPC that a closing connection cut with a bare
                    # Exception (its futures' default rejection): the look is lost, not
                    # the task. Anything else is a bug worth a line, and still retried.
                    say = log.debug if type(exc) is Exception else log.warning
                    say("inbound_check_failed", shard=runner.shard, error=repr(exc)[:300])
                    channel = None
                    continue
                now, count = self.clock.now_ms(), runner.inputs.delivered
                worker.inbound(declared.message_count or 0, count - delivered, now - at)
                delivered, at = count, now
        finally:
            if channel is not None:
                await close_quietly(channel)

    async def _lock(self, shard: int) -> ShardLock | None:
        """``shard``'s lock, taken; None when another replica holds it or the connection
        is down."""
        assert self._connection is not None
        lock = ShardLock(
            self._connection,
            self.names.lock(shard),
            lambda why: self._suspend(shard, f"lock lost: {why}"),
        )
        try:
            await lock.take()
        except (ShardHeld, *_CUT):
            return None
        return lock

    async def _consume(self, runner: Runner) -> None:
        """Consume the shard's two queues into its runner; ChannelGone when not connected."""
        assert self._connection is not None
        shard = runner.shard
        for queue, deliver in zip(
            self.names.shard_queues(shard),
            (self._deliverer(runner, "lifecycle"), self._deliverer(runner, "commands")),
            strict=True,
        ):
            consumer = ShardConsumer(
                self._connection,
                queue,
                deliver,
                lambda why: self._suspend(shard, f"consumer lost: {why}"),
                self.config.prefetch,
            )
            await consumer.start()
            runner.consumers.append(consumer)

    def _suspend(self, shard: int, why: str) -> None:
        """The shard's lock or a consumer went (the connection, or a channel): stop
        consuming, keep the pipeline and timers (what they commit is fenced if another
        replica takes the shard meanwhile), and try to resume at the next balance."""
        runner = self._runners.get(shard)
        if runner is None or runner.lost is not None or runner.suspended:
            return
        runner.suspend()
        log.info("shard_suspended", shard=shard, why=why[:300])
        self._nudge.set()
        loop = asyncio.get_running_loop()
        watch(loop.create_task(self._watch_suspended(runner), name="suspended"))

    async def _watch_suspended(self, runner: Runner) -> None:
        """While a shard is suspended, ask the store every second whether another replica
        took it: its pipeline may sit waiting for the connection and commit nothing that
        the fence could refuse, and its timers must not outlive the takeover for long."""
        while runner.suspended and runner.lost is None and not self._stopping:
            await sleep(self.clock, BALANCE_EVERY_MS)
            if runner.view is None or not runner.suspended:
                return
            try:
                await runner.view.check()
            except StoreFenced:
                await self._lose(runner.shard, "fenced", graceful=False)
                return
            except StoreError:
                continue  # the store is out too: the pipeline and the next beats say so

    async def _resume(self, shard: int) -> None:
        """Take a suspended shard's lock again and consume again, if nobody took it in
        between (its lock free, its epoch still this view's); else it is lost."""
        runner = self._runners[shard]
        lock = await self._lock(shard)
        if lock is None:
            if self._connected():  # held by another replica now
                await self._lose(shard, "connection lost, taken meanwhile", graceful=False)
            return
        runner.lock = lock
        if runner.view is not None:
            try:
                await runner.view.check()
            except StoreFenced:
                await self._lose(shard, "fenced", graceful=False)
                return
            except StoreError as exc:  # the pipeline finds out by itself; consume meanwhile
                log.warning("shard_resume_unchecked", shard=shard, error=str(exc)[:300])
        try:
            await self._consume(runner)
        except _CUT:
            runner.suspend()
            return
        runner.suspended = False
        log.info("shard_resumed", shard=shard)

    def _view(self, shard: int) -> Store:
        """Shard ``shard``'s store view: ``self.store`` the first time shard 0 is taken
        (a test may have set it), a new one every other time."""
        if shard == 0 and self._store_fresh:
            self._store_fresh = False
            return self.store
        view = self.shared.shard(shard, self.replica)
        if shard == 0:
            self.store = view
        return view

    def _lose_soon(self, shard: int, reason: str) -> None:
        """``_lose`` from a callback (the store fenced it, the broker cancelled its lock)."""
        runner = self._runners.get(shard)
        if runner is None or runner.lost is not None:
            return
        loop = asyncio.get_running_loop()
        watch(loop.create_task(self._lose(shard, reason, graceful=False), name="shard-lost"))

    async def _lose(self, shard: int, reason: str, *, graceful: bool) -> None:
        """Stop owning ``shard``: handed over gracefully, or dropped at once."""
        runner = self._runners.get(shard)
        if runner is None or runner.lost is not None:
            return
        runner.lost = reason
        started = time.perf_counter()
        try:
            if graceful:
                await runner.release(STOP_GRACE_S)
            else:
                await runner.drop(
                    self._connection is not None and self._connection.connected.is_set()
                )
        finally:
            if graceful:
                self.metrics.handover_seconds.observe(time.perf_counter() - started)
            if self._runners.get(shard) is runner:
                del self._runners[shard]
            self.metrics.shards_lost[reason.split(" ")[0]].inc()
            self.metrics.shards_owned.set(len(self.owned))
            log.info(
                "shard_lost",
                shard=shard,
                reason=reason,
                took_ms=round((time.perf_counter() - started) * 1000),
            )
        self._nudge.set()  # another may be taken now

    def _deliverer(
        self, runner: Runner, queue: Literal["lifecycle", "commands"]
    ) -> Callable[[Delivery], Awaitable[None]]:
        """What a shard's consumer hands its deliveries to: the shard's inputs, or (with
        shards) its right shard again when the conversation-id header does not say the
        body's conversation (``warmer.bus.reroute``), one at a time in delivery order."""
        put = runner.inputs.lifecycle if queue == "lifecycle" else runner.inputs.command
        if self.shards == 1:
            return put
        exchange = (
            self.names.lifecycle_shards if queue == "lifecycle" else self.names.commands_shards
        )
        one_at_a_time = asyncio.Lock()

        async def deliver(delivery: Delivery) -> None:
            conversation_id = needs_reroute(delivery)
            if conversation_id is None or not isinstance(delivery, AmqpDelivery):
                await put(delivery)
                return
            worker = runner.worker
            assert worker is not None  # built before its consumers start
            worker.settling_outside(delivery)
            try:
                async with one_at_a_time:
                    await self._reroute(delivery, exchange, conversation_id)
            finally:
                worker.settled_outside(delivery)

        return deliver

    async def _reroute(self, delivery: AmqpDelivery, exchange: str, conversation_id: str) -> None:
        """Publish a delivery again to its shard, confirmed, then acknowledge it; when that
        fails it goes back to its queue (tried again, by whoever owns the shard then)."""
        assert self._reroute_channel is not None
        try:
            underlay = await self._reroute_channel.get_underlay_channel()
            routed = await reroute(
                delivery,
                underlay,
                exchange,
                conversation_id,
                self.clock,
                self.config.confirm_timeout_ms,
            )
        except (ChannelGone, PublishFailed, aiormq.exceptions.AMQPError, RuntimeError) as exc:
            log.warning("reroute_failed", conversation_id=conversation_id, error=repr(exc)[:300])
            with contextlib.suppress(ChannelGone, aiormq.exceptions.AMQPError, RuntimeError):
                await delivery.reject(requeue=True)
            return
        if routed:
            self.metrics.rerouted.inc()

    def _statuses(self) -> Counter[Status]:
        total: Counter[Status] = Counter()
        for runner in list(self._runners.values()):
            if runner.worker is not None:
                total.update(runner.worker.core.statuses())
        return total

    def _timers(self) -> int:
        return sum(
            len(r.worker.scheduler) for r in list(self._runners.values()) if r.worker is not None
        )

    def _economy(self) -> Economy:
        cores = [r.worker.core for r in list(self._runners.values()) if r.worker is not None]
        if not cores:
            return Economy(self.config.policy(), None)
        return max(cores, key=lambda core: core.economy.model.seen).economy

    def _savings(self) -> tuple[int, int, int]:
        spent = avoided = missed = 0
        for runner in list(self._runners.values()):
            if runner.worker is not None:
                s, a, m = runner.worker.core.savings()
                spent, avoided, missed = spent + s, avoided + a, missed + m
        return spent, avoided, missed

    async def _serve_http(self) -> None:
        if self._http_address is None:
            return
        host, port = self._http_address
        http = HttpEndpoint(host, port, self.readiness, self.metrics.registry, self.about)
        try:
            await http.start()
        except OSError as exc:
            raise StartupError(
                f"cannot serve HTTP on {self.config.http} ({exc.strerror or exc}); "
                "choose another host:port in WARMER_HTTP, or off"
            ) from exc
        self._http = http
        log.info("http_serving", host=host, port=http.port)

    async def _stop_http(self) -> None:
        if self._http is not None:
            await self._http.stop()

    async def _open_shared(self) -> None:
        """Open the shared store (connect, prepare the schema), waiting while it cannot be
        reached; StartupError when it cannot be used."""
        try:
            await self._open_store(self.shared.open)
        except StoreError as exc:
            raise StartupError(f"cannot open the store {self.shared.url}: {exc}") from exc
        self._store_open = True

    async def _open_store(self, opening: Callable[[], Awaitable[None]]) -> None:
        """``opening()`` the store; while it cannot be reached (a Redis starting beside the worker,
        an SQLite file an old process still holds), again with backoff (1, 2, 4 .. 30 s)
        for ``WARMER_STARTUP_WAIT_S``, as the broker is waited for. Anything else fails at
        once (refused credentials, a missing directory, a file that is no database)."""
        deadline_ms = self.clock.now_ms() + self.config.startup_wait_s * 1000
        self._store_waiting = True
        try:
            attempt = 1
            while True:
                try:
                    await opening()
                    break
                except StoreUnreachable as exc:
                    left_ms = deadline_ms - self.clock.now_ms()
                    if left_ms <= 0:
                        raise
                    pause_ms = _startup_pause_ms(attempt, left_ms)
                    log.warning(
                        "store_unreachable",
                        attempt=attempt,
                        retry_in_s=round(pause_ms / 1000, 1),
                        error=str(exc)[:300],
                    )
                    await sleep(self.clock, pause_ms)
                    attempt += 1
        finally:
            self._store_waiting = False
        if attempt > 1:
            log.info("store_reached", attempts=attempt)

    async def _recovered_core(self, view: Store | None = None, lane: _Lane = (1, 0)) -> Warmer:
        """The core with every conversation of ``view``'s shard (``self.store`` by
        default), its schedules recovered and committed; opening the view takes the shard.
        ``lane``: the core's token lane (``Warmer``)."""
        view = view or self.store
        store_name = mask_password(self.config.store)
        try:
            await self._open_store(view.open)
            self._store_open = True
            loaded = await view.load()
        except StoreError as exc:
            raise StartupError(f"cannot open the store {store_name}: {exc}") from exc
        model = self._gap_model(loaded.records.pop(MODEL_KEY, None))
        core = Warmer(
            self.config.policy(),
            records=self._decoded(loaded.records, store_name),
            adopt=True,  # decoded here for this core alone
            settings={cid: parse_settings(raw) for cid, raw in loaded.settings.items()},
            token_start=loaded.token,
            model=model,
            token_lane=lane,
        )
        now = self._resumed_now(core.latest_input())
        core.tokens_from(token_start(loaded.token, now))
        core.begin()
        recovery = core.recover(now)
        changes = encode_changes(core.touched(), core.touched_model())
        try:
            try:
                await self._commit_recovery(view, changes, core.last_token)
            except StoreLost as exc:  # lost since it was loaded: give it all again
                log.error("store_data_lost", error=str(exc)[:300], conversations=len(core))
                self.metrics.store_data_lost.inc()
                await self._restore_at_start(view, core)
        except StoreError as exc:
            core.rollback()
            raise StartupError(f"cannot write the store {store_name}: {exc}") from exc
        finally:
            core.end()
        self._recovery_arms = recovery.arms
        log.info(
            "state_recovered",
            shard=view.shard,
            loaded=recovery.loaded,
            rearmed=recovery.rearmed,
            awaited=recovery.awaited,
            warmed_now=recovery.warmed_now,
            expired=recovery.expired,
            moved_earlier=recovery.moved_earlier,
            retention_paused_ms=recovery.retention_paused_ms,
            token=core.last_token,
            gaps_learned=core.economy.model.seen,
        )
        return core

    async def _commit_recovery(
        self, view: Store, changes: dict[str, bytes | None], token: int
    ) -> None:
        """Commit what recovery changed, ``RECOVERY_CHUNK`` records at a time.

        After a long pause recovery touches every record (a million, decision 83): in one
        commit, Redis runs one script for longer than ``WARMER_STORE_TIMEOUT_MS`` and the
        start fails with its outcome unknown, again at every start. Each record is a whole
        state and recovering one twice gives the same, so a start cut between chunks is
        recovered again by the next. A chunk whose outcome is not known is sent again.
        """
        items = list(changes.items())
        for first in range(0, max(len(items), 1), RECOVERY_CHUNK):
            chunk = dict(items[first : first + RECOVERY_CHUNK])
            await self._persist_at_start(
                functools.partial(view.commit, chunk, token),
                StoreOutcomeUnknown,
                "recovery_commit_retrying",
            )

    async def _restore_at_start(self, view: Store, core: Warmer) -> None:
        """Write what was read back into a store that lost it since; tried again while it
        fails (lost again, not answering: a Redis restarted twice): this worker alone holds
        it now, and giving up would lose it. StoreError after the last attempt."""
        held = await held_records(core)
        await self._persist_at_start(
            functools.partial(view.restore, held, core.last_token),
            StoreError,
            "store_restore_retrying",
        )

    async def _persist_at_start(
        self,
        write: Callable[[], Awaitable[None]],
        retried: type[StoreError],
        event: str,
    ) -> None:
        """``write()``, tried again on ``retried`` up to ``RESTORE_AT_START_ATTEMPTS`` times,
        ``RESTORE_AT_START_PAUSE_MS`` apart (``event`` logged each time); the last error is
        raised."""
        for attempt in range(1, RESTORE_AT_START_ATTEMPTS + 1):
            try:
                await write()
                return
            except retried as exc:
                if attempt == RESTORE_AT_START_ATTEMPTS:
                    raise
                log.warning(event, attempt=attempt, error=str(exc)[:300])
                await sleep(self.clock, RESTORE_AT_START_PAUSE_MS)

    @staticmethod
    def _decoded(records: dict[str, bytes], store_name: str) -> Iterator[tuple[str, Record]]:
        """Each stored record decoded, its bytes dropped as soon as it is (``records`` is
        emptied): a million records are never held both as bytes and decoded, and the
        memory each one's bytes free is there for the next ones' states. StartupError
        names the first unreadable one."""
        for cid in list(records):
            try:
                yield cid, decode_record(records.pop(cid))
            except RecordError as exc:
                raise StartupError(
                    f"the store {store_name} holds an unreadable record for conversation "
                    f"{cid[:200]!r}: {exc}; fix or delete it (nothing was changed)"
                ) from exc

    def _resumed_now(self, latest: int) -> int:
        """The time to recover at, given the newest stored input: a previous run's time
        line that was ahead of the wall clock (it stepped back) goes on, its schedules
        with it (``SystemClock.resume``)."""
        if isinstance(self.clock, SystemClock):
            ahead_ms = self.clock.resume(latest)
            if ahead_ms:
                log.warning(
                    "clock_resumed",
                    ahead_ms=ahead_ms,
                    action="going on from the stored times, slewing back to the wall clock",
                )
        return self.clock.now_ms()

    @staticmethod
    def _gap_model(raw: bytes | None) -> GapModel | None:
        """The stored gap model; an unreadable one is replaced by the prior (it is only
        learned figures, and the next gap observed overwrites it)."""
        if raw is None:
            return None
        try:
            return GapModel.decode(raw)
        except GapModelError as exc:
            log.warning(
                "gap_model_unreadable", error=str(exc)[:300], action="starting from the prior"
            )
            return None

    async def _prune_forever(self, inputs: Inputs) -> None:
        """Ask the pipeline to forget conversations past the retention time, every minute."""
        while True:
            await sleep(self.clock, PRUNE_EVERY_MS)
            inputs.put(Prune())

    async def _watch_clock_forever(self) -> None:
        """Every second: did the wall clock step? Log and count it, show the offset."""
        steps = StepWatch(self.clock)
        while True:
            await sleep(self.clock, STEP_CHECK_EVERY_MS)
            step = steps.check()
            self.metrics.clock_offset.set(steps.offset_ms / 1000)
            if step is not None:
                self.metrics.clock_steps.inc()
                log.warning(
                    "clock_stepped",
                    step_ms=step,
                    offset_ms=steps.offset_ms,
                    action="timers and the cost rules go on by the time elapsed; "
                    "published times differ from the wall clock by the offset until restart",
                )

    async def _connect(self, set_up: Callable[[], Awaitable[_T]]) -> _T:
        """Connect and ``set_up``; while the broker cannot be reached, or the connection is
        lost before the set-up is done, again with backoff (1, 2, 4 .. 30 s) for
        ``WARMER_STARTUP_WAIT_S``. What waiting does not change fails at once: refused
        credentials, a missing vhost, a topology the broker refuses."""
        parsed, shown = URL(self.config.amqp_url), self.config.amqp_url_masked
        deadline_ms = self.clock.now_ms() + self.config.startup_wait_s * 1000
        self._connecting = True
        try:
            attempt = 1
            while True:
                try:
                    connection, done = await self._open(set_up)
                    break
                except (
                    OSError,
                    aiormq.exceptions.AMQPError,
                    aiormq.exceptions.ChannelInvalidStateError,
                    TimeoutError,
                ) as exc:
                    error = _connect_failure(parsed, shown, exc)
                    left_ms = deadline_ms - self.clock.now_ms()
                    if _refusal(exc) is not None or left_ms <= 0:
                        raise StartupError(error) from exc
                    pause_ms = _startup_pause_ms(attempt, left_ms)
                    log.warning(
                        "broker_unreachable",
                        attempt=attempt,
                        retry_in_s=round(pause_ms / 1000, 1),
                        error=error,
                    )
                    await sleep(self.clock, pause_ms)
                    attempt += 1
        finally:
            self._connecting = False
        if attempt > 1:
            log.info("broker_connected", url=shown, attempts=attempt)
        connection.reconnect_callbacks.add(self._on_reconnect)
        connection.close_callbacks.add(self._on_connection_lost)
        return done

    async def _open(
        self, set_up: Callable[[], Awaitable[_T]]
    ) -> tuple[AbstractRobustConnection, _T]:
        """One attempt at the robust connection and its set-up; nothing of it left behind
        when it fails."""
        connection = aio_pika.RobustConnection(
            self._url, client_properties={"connection_name": f"warmer {self.config.namespace}"}
        )
        # Before connecting: the broker may block a connection as soon as it is open.
        self._connection = connection
        self._unsubscribe = flow.subscribe(self._on_flow)
        try:
            await asyncio.wait_for(connection.connect(CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S)
            done = await set_up()
        except BaseException:
            self._unsubscribe()
            self._connection = self._unsubscribe = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT_S)
            raise
        return connection, done

    def _on_flow(self, underlay: object, reason: str | None) -> None:
        """The broker blocked (``reason``) or unblocked (None) one connection: ours?"""
        transport = None if self._connection is None else self._connection.transport
        if transport is None or transport.connection is not underlay:
            return
        if reason is None:
            self._blocked_underlay = None
            self.health.cleared("broker_blocked")
            return
        self._blocked_underlay = underlay
        if self.health.reason("broker_blocked") is None:
            self.metrics.broker_blocked.inc()
        self.health.trouble("broker_blocked", f"the broker blocked publishing: {reason}")

    def _on_connection_lost(self, _sender: object, exc: BaseException | None = None) -> None:
        # Called once when the connection is lost, then once per failed attempt to make
        # it again: one line for the loss, the attempts counted for the line at the end.
        self._consuming = False
        self.health.cleared("broker_blocked")  # a new connection starts unblocked
        if self._blocked_underlay is not None:  # its writer waits for an unblocked
            flow.release(self._blocked_underlay)
            self._blocked_underlay = None
        if self._stopping:
            return
        for shard in list(self._runners):  # their locks went with the connection
            self._suspend(shard, "connection lost")
        if self._lost_at is not None:
            self._failed_attempts += 1
            return
        self._lost_at = time.monotonic()  # a duration, not a wait: not the Clock's
        self._failed_attempts = 0
        # aiormq cancels its reader when no frame came within its heartbeat grace.
        error: str | None = None if exc is None else _reason(exc)
        if isinstance(exc, asyncio.CancelledError):
            error = "no frame from the broker in time"
        log.warning("broker_connection_lost", url=self.config.amqp_url_masked, error=error)

    def _on_reconnect(self, *_: object) -> None:
        # Called once the channels are restored; the shards are taken again from here.
        self._consuming = True
        self._nudge.set()
        self.reconnections += 1
        self.metrics.reconnections.inc()
        lost_for = 0.0 if self._lost_at is None else time.monotonic() - self._lost_at
        log.info(
            "broker_reconnected",
            url=self.config.amqp_url_masked,
            attempts=self._failed_attempts + 1,
            lost_for_s=round(lost_for, 1),
        )
        self._lost_at = None
        self._failed_attempts = 0

    async def close_store(self) -> None:
        """Close shard 0's view and the shared store (a start that failed); harmless twice."""
        await self.store.close()
        await self.shared.close()
        self._store_open = False

    async def stop(self) -> None:
        """Stop consuming, apply and acknowledge what was delivered, stop timers, close.

        Bounded: with the broker gone, nothing can be acknowledged any more (the broker
        requeues it all), so publishes stop waiting for it and the worker exits.
        """
        if self._stopping:
            return
        self._stopping = True
        connected = self._connection is not None and self._connection.connected.is_set()
        if self._publisher is not None and not connected:
            self._publisher.close()
        # No shard taken or handed over from here. A hand-over under way is let finish:
        # cancelled, its shard was gone from the runners before its deliveries were
        # acknowledged, and the next owner answered its commands again.
        self._nudge.set()
        balancing = [t for t in self._tasks if t.get_name() == "balance"]
        if balancing:
            await asyncio.wait(balancing, timeout=STOP_GRACE_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Each shard's release is bounded: its pipeline gets STOP_GRACE_S to drain, then
        # the store check and the closes have their own timeouts.
        shards = list(self._runners)
        await asyncio.gather(*(self._lose(k, "stopping", graceful=connected) for k in shards))
        self.failures.flush(force=True)  # the failure counts not yet told
        if self._publisher is not None:
            self._publisher.close()
        if self._store_open:
            try:
                await asyncio.wait_for(self.shared.leave(self.replica), CLOSE_TIMEOUT_S)
            except (StoreError, TimeoutError) as exc:
                log.warning("presence_leave_failed", error=str(exc)[:300])
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), CLOSE_TIMEOUT_S)
            except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
                log.warning("connection_close_failed", error=repr(exc))
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self.store.close()
        await self.shared.close()
        self._store_open = False
        await self._stop_http()
        log.info("worker_stopped")


def _amqp_url(url: str, heartbeat_s: int) -> URL:
    """Reconnect every second (aio-pika waits 5 s) and beat every ``heartbeat_s`` (aiormq's
    default is 60 s: a dead path would go unnoticed for minutes), unless the URL says.

    ValueError when the URL's own values are ones the clients misread without a word:
    aiormq reads a heartbeat of 0, a negative, 65535 or more, or a word as "no heartbeat"
    (a path that stops forwarding then goes unnoticed for as long as the kernel keeps the
    socket: hours); aio-pika reads a reconnect_interval of 0, a negative, a word or ``1e3``
    as 0, and reconnects in a busy loop (over 2,000 attempts a second, the loop starved).
    """
    parsed = URL(url)
    given = parsed.query.get("heartbeat")
    if given is not None and not (
        given.isascii() and given.isdigit() and HEARTBEAT_MIN_S <= int(given) <= HEARTBEAT_MAX_S
    ):
        raise ValueError(
            f"heartbeat={given[:20]!r} would turn the heartbeat off (a dead path unnoticed); "
            f"give {HEARTBEAT_MIN_S}..{HEARTBEAT_MAX_S} s, or leave it out for "
            "WARMER_HEARTBEAT_S"
        )
    given = parsed.query.get("reconnect_interval")
    if given is not None and not (
        _DECIMAL.fullmatch(given) and RECONNECT_MIN_S <= float(given) <= RECONNECT_MAX_S
    ):
        raise ValueError(
            f"reconnect_interval={given[:20]!r} is not {RECONNECT_MIN_S}..{RECONNECT_MAX_S} s "
            "(aio-pika reads 0, a negative or a word as 0: reconnecting in a busy loop); "
            f"give one, or leave it out ({RECONNECT_INTERVAL_S} s)"
        )
    defaults = {"reconnect_interval": RECONNECT_INTERVAL_S, "heartbeat": heartbeat_s}
    missing = {k: v for k, v in defaults.items() if k not in parsed.query}
    return parsed.update_query(missing) if missing else parsed


def _refusal(exc: BaseException) -> Literal["credentials", "vhost", "topology"] | None:
    """What the broker refused for good (retrying cannot help), None for anything else."""
    if isinstance(exc, aiormq.exceptions.ChannelClosed):  # the broker closed a channel
        return "topology"
    if isinstance(
        exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError
    ):
        return "credentials"
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        return "vhost"
    return None


def _startup_pause_ms(attempt: int, left_ms: int) -> int:
    """The pause after failed start-up attempt ``attempt``: 1, 2, 4 .. 30 s, never more than
    what is left of the wait."""
    return min(left_ms, STARTUP_PAUSE_MAX_MS, STARTUP_PAUSE_FIRST_MS << min(attempt - 1, 10))


def _connect_failure(parsed: URL, shown: str, exc: BaseException) -> str:
    """What went wrong connecting, in words an operator can act on."""
    user = parsed.user or "guest"
    vhost = parsed.path[1:] or "/"
    refusal = _refusal(exc)
    if refusal == "credentials":
        return (
            f"the broker at {shown} refused the credentials of user {user!r} "
            "(ACCESS_REFUSED); check the user and password in WARMER_AMQP_URL"
        )
    if refusal == "vhost":
        return (
            f"the broker at {shown} refused to open virtual host {vhost!r}: it does not "
            f"exist, or user {user!r} has no permission on it (rabbitmqctl add_vhost / "
            "set_permissions)"
        )
    if refusal == "topology":
        return (
            f"the broker at {shown} refused to declare the worker's queues or exchanges "
            f"({_reason(exc)}): one of the same name exists with other arguments, or user "
            f"{user!r} may not configure it; check WARMER_NAMESPACE and the permissions"
        )
    if isinstance(exc, TimeoutError):
        return (
            f"no answer from RabbitMQ at {shown} within {CONNECT_TIMEOUT_S:.0f} s; "
            "check the host and port in WARMER_AMQP_URL and that nothing blocks them"
        )
    return (
        f"cannot reach RabbitMQ at {shown} ({_reason(exc)}); start a broker "
        "(`rabbitmq-server -detached`) or set WARMER_AMQP_URL"
    )


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


async def run(config: Config) -> int:
    """Run the worker until SIGTERM or SIGINT; the process exit code."""
    try:
        app = App(config)
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
        return EXIT_USAGE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.ensure_future(app.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # asked to stop while still starting (waiting for the broker)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    elif isinstance(starting.exception(), StartupError):
        stopped.cancel()
        log.error("startup_failed", error=str(starting.exception()))
        await app.close_store()
        return EXIT_UNAVAILABLE
    else:
        starting.result()  # anything else is a bug: raise it
        await stopped
    log.info("worker_stopping")
    await app.stop()
    return EXIT_OK
