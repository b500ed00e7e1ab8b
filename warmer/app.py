"""The composition root: builds the parts from the config, starts them, stops them.

Start: open the store and load every record; build the core from them and recover the
schedules (re-arm, await the warm that was out, warm at once what fell due while the cache
can still be alive), commit what recovery changed; build the inputs and the scheduler;
serve health and metrics over HTTP (``WARMER_HTTP``); connect (robustly) to the broker and
declare the topology; build the publisher and the pipeline, each complete, in that order;
arm the recovered timers; consume. Stop (SIGTERM or SIGINT): stop consuming, let the
pipeline apply and acknowledge what was delivered, stop the timers without touching
state, close. Shutting down never changes a conversation.

Ready (``/readyz``) means: connected to the broker, both consumers consuming since the
last (re)connection, the store open and the pipeline running.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from yarl import URL

from warmer.bus import lenient
from warmer.bus.consumer import Consumer
from warmer.bus.port import Delivery
from warmer.bus.publisher import Publisher
from warmer.bus.topology import Names, declare
from warmer.clock import STEP_CHECK_EVERY_MS, Clock, StepWatch, SystemClock, sleep
from warmer.config import Config, mask_password
from warmer.core import Arm, GapModel, GapModelError, Record, Warmer, parse_settings
from warmer.core.gaps import MODEL_KEY
from warmer.core.records import RecordError, decode_record, encode_changes
from warmer.core.rules import token_start
from warmer.inputs import Inputs, Prune
from warmer.observe.health import Health
from warmer.observe.http import HttpEndpoint
from warmer.observe.log import get_logger
from warmer.observe.metrics import CostGauges, Metrics, StateGauges
from warmer.observe.tasks import watch
from warmer.scheduler import Scheduler
from warmer.store import Store, StoreError, open_store
from warmer.worker import RETRY_FIRST_MS, RETRY_MAX_MS, Worker

log = get_logger(__name__)

CONNECT_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 2.0
RECONNECT_INTERVAL_S: Final = 1
STOP_GRACE_S: Final = 10.0  # well inside a container's usual 30 s between SIGTERM and SIGKILL
PRUNE_EVERY_MS: Final = 60_000
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
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._retry_ms = retry_ms
        try:
            self.store: Store = open_store(config.store)
        except ValueError as exc:
            raise StartupError(f"WARMER_STORE: {exc}") from exc
        try:
            self._http_address = config.http_address
        except ValueError as exc:
            raise StartupError(f"WARMER_HTTP: {exc}") from exc
        self.names = Names.of(config.namespace)
        self.metrics = Metrics()
        """The worker's metrics, in a registry of this app's own."""
        self.health = Health()
        """What keeps the pipeline from making progress (``/readyz``)."""
        self.worker: Worker | None = None
        self._http: HttpEndpoint | None = None
        self._publisher: Publisher | None = None
        self._recovery_arms: list[Arm] = []
        self._connection: AbstractRobustConnection | None = None
        self._consumers: list[Consumer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._store_open = False
        self._consuming = False
        self._stopping = False
        self.reconnections = 0
        """How many times the connection was re-established since start."""

    @property
    def http_port(self) -> int | None:
        """The port health and metrics are served on (once started), None when off."""
        return None if self._http is None else self._http.port

    def readiness(self) -> str | None:
        """None when ready to do the work, else why not (what ``/readyz`` answers)."""
        if self._stopping:
            return "stopping"
        if not self._tasks:
            return "starting"
        if not self._store_open:
            return "store closed"
        if self._connection is None or not self._connection.connected.is_set():
            return "broker connection lost"
        if not self._consuming or not all(c.consuming for c in self._consumers):
            return "consumers not restored"
        if self._tasks[0].done():
            return "pipeline stopped"
        reasons = self.health.reasons()
        return "; ".join(reasons) if reasons else None

    async def start(self) -> None:
        """Load and recover state, connect, declare and consume; StartupError with advice."""
        core = await self._recovered_core()
        inputs = Inputs()
        scheduler = Scheduler(
            self.clock, inputs.fired, lateness=self.metrics.timer_lateness.observe
        )
        self.metrics.registry.register(StateGauges(core.statuses, scheduler.__len__))
        self.metrics.registry.register(CostGauges(core.economy, core.savings))
        await self._serve_http()
        try:
            await self._start(core, inputs, scheduler)
        except BaseException:
            await self._stop_http()
            raise
        log.info("worker_started", namespace=self.config.namespace)

    async def _start(self, core: Warmer, inputs: Inputs, scheduler: Scheduler) -> None:
        self._connection = await self._connect()
        publish_channel = await self._connection.channel(publisher_confirms=True)
        topology = await declare(publish_channel, self.names)
        # Dead letters on a channel of their own: one the broker refuses closes only it.
        dead_channel = await self._connection.channel(publisher_confirms=True)
        dlx = await dead_channel.declare_exchange(
            self.names.dlx, aio_pika.ExchangeType.FANOUT, durable=True
        )
        publisher = Publisher(
            publish_channel,
            topology,
            dead_channel,
            dlx,
            self.clock,
            confirm_timeout_ms=self.config.confirm_timeout_ms,
        )
        self._publisher = publisher
        worker = Worker(
            core,
            scheduler,
            self.store,
            self.clock,
            publisher,
            inputs,
            self.metrics,
            retry_ms=self._retry_ms,
            health=self.health,
            confirm_ms=self.config.confirm_timeout_ms,
        )
        self.worker = worker
        for arm in self._recovery_arms:
            scheduler.arm(arm.conversation_id, arm.due_at, arm.token)
        scheduler.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            watch(loop.create_task(worker.run(), name="pipeline")),
            watch(loop.create_task(self._prune_forever(inputs), name="prune")),
            watch(loop.create_task(self._watch_clock_forever(), name="clock")),
        ]
        await self._consume(self.names.lifecycle, inputs.lifecycle)
        await self._consume(self.names.commands, inputs.command)
        self._consuming = True

    async def _serve_http(self) -> None:
        if self._http_address is None:
            return
        host, port = self._http_address
        http = HttpEndpoint(host, port, self.readiness, self.metrics.registry)
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

    async def _recovered_core(self) -> Warmer:
        """The core with every persisted conversation, its schedules recovered and committed."""
        store_name = mask_password(self.config.store)
        try:
            await self.store.open()
            self._store_open = True
            loaded = await self.store.load()
        except StoreError as exc:
            raise StartupError(f"cannot open the store {store_name}: {exc}") from exc
        model = self._gap_model(loaded.records.pop(MODEL_KEY, None))
        records = {}
        for cid, raw in loaded.records.items():
            try:
                records[cid] = decode_record(raw)
            except RecordError as exc:
                raise StartupError(
                    f"the store {store_name} holds an unreadable record for conversation "
                    f"{cid[:200]!r}: {exc}; fix or delete it (nothing was changed)"
                ) from exc
        now = self._resumed_now(records)
        core = Warmer(
            self.config.policy(),
            records=records,
            adopt=True,  # decoded here for this core alone
            settings={cid: parse_settings(raw) for cid, raw in loaded.settings.items()},
            token_start=token_start(loaded.token, now),
            model=model,
        )
        core.begin()
        recovery = core.recover(now)
        changes = encode_changes(core.touched(), core.touched_model())
        try:
            await self.store.commit(changes, core.last_token)
        except StoreError as exc:
            core.rollback()
            raise StartupError(f"cannot write the store {store_name}: {exc}") from exc
        finally:
            core.end()
        self._recovery_arms = recovery.arms
        log.info(
            "state_recovered",
            loaded=recovery.loaded,
            rearmed=recovery.rearmed,
            awaited=recovery.awaited,
            warmed_now=recovery.warmed_now,
            expired=recovery.expired,
            token=core.last_token,
            gaps_learned=core.economy.model.seen,
        )
        return core

    def _resumed_now(self, records: Mapping[str, Record]) -> int:
        """The time to recover at: a previous run's time line that was ahead of the wall
        clock (it stepped back) goes on, its schedules with it (``SystemClock.resume``)."""
        if isinstance(self.clock, SystemClock):
            latest = max(
                (r.state.last_input_at for r in records.values() if r.state is not None),
                default=0,
            )
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

    async def _connect(self) -> AbstractRobustConnection:
        url = self.config.amqp_url_masked
        try:
            connection = await asyncio.wait_for(
                aio_pika.connect_robust(
                    _with_reconnect_interval(self.config.amqp_url),
                    client_properties={"connection_name": f"warmer {self.config.namespace}"},
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
            raise StartupError(_connect_failure(URL(self.config.amqp_url), url, exc)) from exc
        connection.reconnect_callbacks.add(self._on_reconnect)
        connection.close_callbacks.add(self._on_connection_lost)
        return connection

    def _on_connection_lost(self, *_: object) -> None:
        self._consuming = False
        if not self._stopping:
            log.warning("broker_connection_lost", url=self.config.amqp_url_masked)

    def _on_reconnect(self, *_: object) -> None:
        # Called once the channels are restored, the consumers consuming again with them.
        self._consuming = bool(self._consumers)
        self.reconnections += 1
        log.info("broker_reconnected", url=self.config.amqp_url_masked)

    async def _consume(
        self, queue_name: str, deliver: Callable[[Delivery], Awaitable[None]]
    ) -> None:
        assert self._connection is not None
        channel: AbstractRobustChannel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.config.prefetch)
        arguments = dict(next(args for name, args in self.names.queues() if name == queue_name))
        await channel.declare_queue(queue_name, durable=True, arguments=arguments)
        consumer = Consumer(channel, queue_name, deliver)
        await consumer.start()
        self._consumers.append(consumer)

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
        try:
            await asyncio.wait_for(self._finish(connected), STOP_GRACE_S)
        except TimeoutError:
            log.warning("stop_grace_expired", grace_s=STOP_GRACE_S)
        if self.worker is not None:
            self.worker.abandon()
            await self.worker.scheduler.stop()
        if self._publisher is not None:
            self._publisher.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), CLOSE_TIMEOUT_S)
            except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
                log.warning("connection_close_failed", error=repr(exc))
        await self.store.close()
        self._store_open = False
        await self._stop_http()
        log.info("worker_stopped")

    async def _finish(self, connected: bool) -> None:
        """The graceful part of stopping: no new deliveries, the delivered ones applied."""
        if connected:
            for consumer in self._consumers:
                try:
                    await asyncio.wait_for(consumer.cancel(), CLOSE_TIMEOUT_S)
                except Exception as exc:
                    log.warning("consumer_cancel_failed", error=repr(exc)[:300])
        if self.worker is not None:
            await self.worker.scheduler.stop()
            self.worker.inputs.close()
            await asyncio.wait([self._tasks[0]])  # the pipeline drains what was delivered
            await self.worker.settled()


def _with_reconnect_interval(url: str) -> URL:
    """Reconnect every second (aio-pika waits 5 s) unless the URL says otherwise."""
    parsed = URL(url)
    if "reconnect_interval" in parsed.query:
        return parsed
    return parsed.update_query(reconnect_interval=RECONNECT_INTERVAL_S)


def _connect_failure(parsed: URL, shown: str, exc: BaseException) -> str:
    """What went wrong connecting, in words an operator can act on."""
    user = parsed.user or "guest"
    vhost = parsed.path[1:] or "/"
    if isinstance(
        exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError
    ):
        return (
            f"the broker at {shown} refused the credentials of user {user!r} "
            "(ACCESS_REFUSED); check the user and password in WARMER_AMQP_URL"
        )
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        return (
            f"the broker at {shown} refused to open virtual host {vhost!r}: it does not "
            f"exist, or user {user!r} has no permission on it (rabbitmqctl add_vhost / "
            "set_permissions)"
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
    try:
        await app.start()
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
        await app.store.close()
        return EXIT_UNAVAILABLE
    await stop.wait()
    log.info("worker_stopping")
    await app.stop()
    return EXIT_OK
