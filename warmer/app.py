"""The composition root: builds the parts from the config, starts them, stops them.

Start: open the store and load every persisted setting and the token counter, build
the core and the scheduler, connect (robustly) to the broker, declare the topology,
consume. Stop (SIGTERM or SIGINT): stop consuming, apply what was already delivered,
wait until every acknowledgement is settled, stop the timers without touching state,
flush the token counter, close. Shutting down never changes a conversation.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Final

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from yarl import URL

from warmer.bus import lenient
from warmer.bus.publisher import Publisher
from warmer.bus.topology import Names, declare
from warmer.clock import Clock, SystemClock
from warmer.config import Config, mask_password
from warmer.core import Policy, Warmer, parse_settings
from warmer.core.rules import token_start
from warmer.observe.tasks import watch
from warmer.scheduler import Scheduler
from warmer.store import Store, StoreError, open_store
from warmer.worker import RETRY_FIRST_MS, RETRY_MAX_MS, Gate, Inbox, Worker

log = structlog.get_logger("warmer.app")

CONNECT_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 2.0
RECONNECT_INTERVAL_S: Final = 1
STOP_GRACE_S: Final = 10.0  # well inside a container's usual 30 s between SIGTERM and SIGKILL
EXIT_OK: Final = 0
EXIT_USAGE: Final = 2  # a setting the worker cannot use
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE: the broker or the store cannot be reached


class StartupError(Exception):
    """The worker cannot start; the message says what to do about it."""


def policy_of(config: Config) -> Policy:
    """The core's policy from the config."""
    return Policy(
        warm_timeout_ms=config.warm_timeout_ms,
        max_failures=config.max_failures,
        idle_max_ms=config.idle_max_ms,
        idle_max_warms=config.idle_max_warms,
    )


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
        self.names = Names.of(config.namespace)
        self.worker: Worker | None = None
        self._connection: AbstractRobustConnection | None = None
        self._consumers: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._inboxes: list[Inbox] = []
        self._flusher: asyncio.Task[None] | None = None
        self._stopping = False
        self.reconnections = 0
        """How many times the connection was re-established since start."""

    async def start(self) -> None:
        """Load state, connect, declare and consume; raises StartupError with advice."""
        try:
            await self.store.open()
            raw = await self.store.load_settings()
            stored_token = await self.store.load_token()
        except StoreError as exc:
            raise StartupError(
                f"cannot open the store {mask_password(self.config.store)}: {exc}"
            ) from exc
        settings = {cid: parse_settings(value) for cid, value in raw.items()}
        core = Warmer(
            policy_of(self.config), settings, token_start(stored_token, self.clock.now_ms())
        )
        scheduler = Scheduler(self.clock, lambda key, token: worker.on_fire(key, token))
        worker = Worker(core, scheduler, self.store, self.clock, self._retry_ms)
        self.worker = worker
        log.info("state_loaded", conversations=len(settings), token=core.last_token)

        self._connection = await self._connect()
        publish_channel = await self._connection.channel(publisher_confirms=True)
        topology = await declare(publish_channel, self.names)
        # Dead letters on a channel of their own: one the broker refuses closes only it.
        dead_channel = await self._connection.channel(publisher_confirms=True)
        dlx = await dead_channel.declare_exchange(
            self.names.dlx, aio_pika.ExchangeType.FANOUT, durable=True
        )
        worker.publisher = Publisher(publish_channel, topology, dead_channel, dlx)
        scheduler.start()
        flusher = asyncio.get_running_loop().create_task(worker.flush_token_forever())
        self._flusher = watch(flusher)
        await self._consume(self.names.lifecycle, worker.on_lifecycle, worker.lifecycle_gate)
        await self._consume(self.names.commands, worker.on_command, worker.commands_gate)
        log.info("worker_started", namespace=self.config.namespace)

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
            raise StartupError(
                f"cannot reach RabbitMQ at {url} ({_reason(exc)}); start a broker "
                "(`rabbitmq-server -detached`) or set WARMER_AMQP_URL"
            ) from exc
        connection.reconnect_callbacks.add(self._on_reconnect)
        connection.close_callbacks.add(
            lambda *_: None if self._stopping else log.warning("broker_connection_lost", url=url)
        )
        return connection

    def _on_reconnect(self, *_: object) -> None:
        self.reconnections += 1
        log.info("broker_reconnected", url=self.config.amqp_url_masked)

    async def _consume(
        self,
        queue_name: str,
        handle: Callable[[AbstractIncomingMessage], Awaitable[None]],
        gate: Gate,
    ) -> None:
        assert self._connection is not None
        channel: AbstractRobustChannel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.config.prefetch)
        arguments = dict(next(args for name, args in self.names.queues() if name == queue_name))
        queue = await channel.declare_queue(queue_name, durable=True, arguments=arguments)
        inbox = Inbox(queue_name, handle, gate)
        inbox.start()
        self._inboxes.append(inbox)
        tag = await queue.consume(inbox.deliver)
        self._consumers.append((queue, tag))

    async def stop(self) -> None:
        """Stop consuming, finish what was delivered, settle acks, stop timers, close.

        Bounded: with the broker gone, nothing can be acknowledged any more (the broker
        requeues it all), so publishes stop waiting for it and the worker exits.
        """
        if self._stopping:
            return
        self._stopping = True
        worker = self.worker
        connected = self._connection is not None and self._connection.connected.is_set()
        if worker is not None and worker.publisher is not None and not connected:
            worker.publisher.close()
        try:
            await asyncio.wait_for(self._finish(connected), STOP_GRACE_S)
        except TimeoutError:
            log.warning("stop_grace_expired", grace_s=STOP_GRACE_S)
        if worker is not None:
            worker.abandon()
            if worker.publisher is not None:
                worker.publisher.close()
            for inbox in self._inboxes:
                inbox.cancel()
            await worker.scheduler.stop()
            if self._flusher is not None:
                self._flusher.cancel()
            try:
                await worker.flush_token()
            except StoreError as exc:
                log.error("token_flush_failed", error=str(exc))
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), CLOSE_TIMEOUT_S)
            except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
                log.warning("connection_close_failed", error=repr(exc))
        await self.store.close()
        log.info("worker_stopped")

    async def _finish(self, connected: bool) -> None:
        """The graceful part of stopping: no new deliveries, the delivered ones applied."""
        if connected:
            for queue, tag in self._consumers:
                try:
                    await asyncio.wait_for(queue.cancel(tag), CLOSE_TIMEOUT_S)
                except Exception as exc:
                    log.warning("consumer_cancel_failed", queue=queue.name, error=repr(exc))
        for inbox in self._inboxes:
            await inbox.drain()
        if self.worker is not None:
            await self.worker.scheduler.stop()
            await self.worker.settled()


def _with_reconnect_interval(url: str) -> URL:
    """Reconnect every second (aio-pika waits 5 s) unless the URL says otherwise."""
    parsed = URL(url)
    if "reconnect_interval" in parsed.query:
        return parsed
    return parsed.update_query(reconnect_interval=RECONNECT_INTERVAL_S)


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
