"""`warmer demo`: a worker, an orchestrator and six conversations on the local broker.

Everything runs in one process, in a namespace of its own (``warmer-demo-<random>``)
with a temporary SQLite store: the worker (``App``), a simulated orchestrator that
answers each ``warm.requested`` after 0.3 to 1.5 s with a ``warm.completed`` (mostly
cache reads; about 10 % an expired cache written again, 5 % a provider error), and
conversations that opt in with intervals of a few seconds, take turns and sit idle at
human pace, while the live view (``warmer.watch``) draws them. Ctrl-C, SIGTERM, SIGHUP
or ``duration_s`` stops it all and deletes the namespace and the store. ``seed`` makes
the simulation reproducible (the timings of the broker and the event loop aside).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from rich.console import Console

from warmer.app import EXIT_OK, EXIT_UNAVAILABLE, App, StartupError
from warmer.bus.topology import COMMAND_ROUTING_KEY, WARM_ROUTING_KEY, Names, delete
from warmer.config import Config, ConfigError
from warmer.contract import (
    Command,
    LifecycleEvent,
    SetEnabled,
    SetInterval,
    TurnSettled,
    TurnStarted,
    Usage,
    WarmCompleted,
)
from warmer.observe.log import configure_logging
from warmer.observe.tasks import watch as log_failure
from warmer.watch import Board, watch

__all__ = ["DemoSummary", "Pace", "demo", "main", "play"]

EXIT_USAGE: Final = 2
REPLY_TIMEOUT_S: Final = 10.0
PROVIDER_ERRORS: Final = (
    "provider overloaded",
    "rate limited (429)",
    "upstream timeout after 30 s",
)
_CHATS: Final = (
    ("billing-api-refactor", "/srv/billing", "claude-sonnet-4-5"),
    ("docs-typos", "/home/ana/docs", "claude-haiku-4-5"),
    ("flaky-test-hunt", "/srv/ci", "claude-sonnet-4-5"),
    ("k8s-migration", "/ops/cluster", "claude-opus-4-1"),
    ("onboarding-guide", "/home/li/handbook", "claude-sonnet-4-5"),
    ("perf-regression", "/srv/search", "claude-opus-4-1"),
)


class Pace(msgspec.Struct, frozen=True, kw_only=True):
    """How fast the simulated people work: each a (low, high) range in seconds."""

    stagger_s: tuple[float, float]
    interval_s: tuple[int, int]
    turn_s: tuple[float, float]
    idle_s: tuple[float, float]
    answer_s: tuple[float, float] = (0.3, 1.5)


HUMAN: Final = Pace(stagger_s=(0, 4), interval_s=(5, 15), turn_s=(1, 4), idle_s=(5, 40))
FAST: Final = Pace(stagger_s=(0, 1), interval_s=(2, 3), turn_s=(0.5, 1.5), idle_s=(2, 6))


class DemoSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What a demo run did, for its caller (and its test)."""

    exit_code: int
    namespace: str
    store_dir: str
    warms: int = 0
    """``warm.requested`` messages the simulated orchestrator received."""
    completions: int = 0
    """``warm.completed`` it published with a usage."""
    errors: int = 0
    """``warm.completed`` it published with an error."""
    turns: int = 0
    """Turns the conversations settled."""
    surface_updates: int = 0
    """``surface.changed`` messages the live view applied."""
    measured: int = 0
    """Conversations whose last cache % the view showed (a completion was applied)."""


class _Tally:
    """Counts the simulation keeps as it goes."""

    def __init__(self) -> None:
        self.warms = 0
        self.completions = 0
        self.errors = 0
        self.turns = 0


class _Chat:
    """One simulated conversation: its context, its growing prompt and its own dice."""

    def __init__(self, conversation_id: str, cwd: str, model: str, rng: random.Random) -> None:
        self.id = conversation_id
        self.cwd = cwd
        self.model = model
        self.rng = rng
        self.prefix_tokens = rng.randint(8_000, 30_000)
        self.active = False
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq


async def demo(
    config: Config,
    *,
    duration_s: float | None = None,
    console: Console | None = None,
    seed: int | None = None,
    fast: bool = False,
) -> int:
    """Run the demo until Ctrl-C, SIGTERM or ``duration_s``; the exit code (0, or 69)."""
    summary = await play(config, duration_s=duration_s, console=console, seed=seed, fast=fast)
    return summary.exit_code


async def play(
    config: Config,
    *,
    duration_s: float | None = None,
    console: Console | None = None,
    seed: int | None = None,
    fast: bool = False,
) -> DemoSummary:
    """``demo``, returning what happened. ``fast``: 2-3 s intervals and short idle gaps."""
    console = console or Console()
    namespace = f"warmer-demo-{uuid.uuid4().hex[:8]}"
    store_dir = Path(tempfile.mkdtemp(prefix="warmer-demo-"))
    own = msgspec.structs.replace(
        config,
        namespace=namespace,
        store=f"sqlite:///{store_dir / 'warmer.db'}",
        log_level="warning",
    )
    seed = random.randrange(2**32) if seed is None else seed
    console.print(
        f"[bold]warmer demo[/] namespace [cyan]{namespace}[/], seed {seed}, "
        f"broker {own.amqp_url_masked}; Ctrl-C stops it and deletes what it made"
    )
    tally, board, stop = _Tally(), Board(), asyncio.Event()
    try:
        with _stop_on_signals(stop):
            code = await _run(
                own, console, seed, FAST if fast else HUMAN, duration_s, stop, tally, board
            )
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    measured = sum(1 for s in board.states.values() if s.get("lastPct") is not None)
    if code == EXIT_OK:
        console.print(
            f"demo over: {tally.warms} warm requests ({tally.completions} answered with a "
            f"usage, {tally.errors} with an error), {tally.turns} turns; namespace "
            f"{namespace} and the store deleted"
        )
    return DemoSummary(
        exit_code=code,
        namespace=namespace,
        store_dir=str(store_dir),
        warms=tally.warms,
        completions=tally.completions,
        errors=tally.errors,
        turns=tally.turns,
        surface_updates=board.updates,
        measured=measured,
    )


async def _run(
    config: Config,
    console: Console,
    seed: int,
    pace: Pace,
    duration_s: float | None,
    stop: asyncio.Event,
    tally: _Tally,
    board: Board,
) -> int:
    """Start the worker, the simulation and the view; stop them all; delete the namespace."""
    try:
        app = App(config)
    except StartupError as exc:
        print(f"warmer demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        await app.start()
    except StartupError as exc:
        print(f"warmer demo: {exc}", file=sys.stderr)
        await app.close_store()
        return EXIT_UNAVAILABLE
    view = asyncio.create_task(
        watch(config, console=console, until=stop, board=board), name="demo-view"
    )
    ended = asyncio.create_task(stop.wait(), name="demo-stop")
    simulation: _Simulation | None = None
    try:
        simulation = await _Simulation.start(config, seed, pace, tally)
        await asyncio.wait([view, ended], timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        if simulation is not None:
            await simulation.quiet()
        await asyncio.gather(view, ended, return_exceptions=True)
        try:
            # The orchestrator stays bound until the worker stopped: a warm falling due
            # now is taken (and left unanswered) instead of coming back unroutable.
            await app.stop()
        finally:
            if simulation is not None:
                await simulation.disconnect()
            await _delete_namespace(config)
    return EXIT_OK


class _Simulation:
    """The orchestrator and the conversations, on a connection of their own."""

    def __init__(
        self,
        connection: AbstractConnection,
        channel: AbstractChannel,
        names: Names,
        exchanges: tuple[AbstractExchange, AbstractExchange],
        seed: int,
        pace: Pace,
        tally: _Tally,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._names = names
        self._lifecycle, self._commands = exchanges
        self._pace = pace
        self._tally = tally
        self._rng = random.Random(f"{seed}:orchestrator")
        self._chats = {
            cid: _Chat(cid, cwd, model, random.Random(f"{seed}:{cid}"))
            for cid, cwd, model in _CHATS
        }
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reply_queue = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._quiet = False

    @classmethod
    async def start(cls, config: Config, seed: int, pace: Pace, tally: _Tally) -> _Simulation:
        """Connect, bind the orchestrator's queue and the reply queue, start the people."""
        names = Names.of(config.namespace)
        connection = await aio_pika.connect(config.amqp_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchanges = (
                await channel.get_exchange(names.lifecycle),
                await channel.get_exchange(names.commands),
            )
            simulation = cls(connection, channel, names, exchanges, seed, pace, tally)
            await simulation._listen()
        except BaseException:  # cancelled while starting, too
            await connection.close()
            raise
        for chat in simulation._chats.values():
            simulation._spawn(simulation._converse(chat), f"demo-chat-{chat.id}")
        return simulation

    async def _listen(self) -> None:
        warm = await self._channel.get_exchange(self._names.warm)
        orchestrator = await self._channel.declare_queue(
            f"{self._names.warm}.demo-orchestrator", exclusive=True, auto_delete=True
        )
        await orchestrator.bind(warm, WARM_ROUTING_KEY)
        await orchestrator.consume(self._on_warm_requested, no_ack=True)
        replies = await self._channel.declare_queue(
            f"{self._names.commands}.demo-replies", exclusive=True, auto_delete=True
        )
        await replies.consume(self._on_reply, no_ack=True)
        self._reply_queue = replies.name

    async def quiet(self) -> None:
        """Cancel the people and the pending answers and wait for them; answer no more."""
        self._quiet = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def disconnect(self) -> None:
        """Close the connection (its exclusive queues go with it)."""
        await self.quiet()
        with contextlib.suppress(Exception):
            await self._connection.close()

    def _spawn(self, work: Any, name: str) -> None:
        task: asyncio.Task[None] = log_failure(asyncio.create_task(work, name=name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the conversations ---------------------------------------------------------

    async def _converse(self, chat: _Chat) -> None:
        """Opt in, then turns and idle stretches, for ever."""
        pace, rng = self._pace, chat.rng
        await asyncio.sleep(rng.uniform(*pace.stagger_s))
        interval_ms = rng.randint(*pace.interval_s) * 1000
        await self._command(SetInterval(conversation_id=chat.id, interval_ms=interval_ms))
        await self._command(SetEnabled(conversation_id=chat.id, enabled=True))
        while True:
            await asyncio.sleep(rng.uniform(*pace.idle_s))
            chat.active = True
            started = _now_ms()
            await self._event(TurnStarted(conversation_id=chat.id, seq=chat.next_seq(), at=started))
            await asyncio.sleep(rng.uniform(*pace.turn_s))
            chat.prefix_tokens += rng.randint(300, 2_500)
            chat.active = False
            settled = TurnSettled(
                conversation_id=chat.id,
                cwd=chat.cwd,
                model_name=chat.model,
                last_request_at=started,
                seq=chat.next_seq(),
                at=_now_ms(),
            )
            await self._event(settled)
            self._tally.turns += 1

    # -- the orchestrator ----------------------------------------------------------

    async def _on_warm_requested(self, message: AbstractIncomingMessage) -> None:
        try:
            request = msgspec.json.decode(message.body)
            cid, token = request["conversationId"], request["token"]
        except (msgspec.DecodeError, KeyError, TypeError):
            return
        if self._quiet:
            return
        self._tally.warms += 1
        self._spawn(self._answer(str(cid), int(token)), f"demo-warm-{token}")

    async def _answer(self, cid: str, token: int) -> None:
        """Re-send the prefix, as an orchestrator would, and report the usage."""
        rng = self._rng
        await asyncio.sleep(rng.uniform(*self._pace.answer_s))
        chat = self._chats.get(cid)
        roll = rng.random()
        usage: Usage | None = None
        error: str | None = None
        if chat is None:
            error = "no history"
        elif chat.active:
            error = "conversation is generating"
        elif roll < 0.05:
            error = rng.choice(PROVIDER_ERRORS)
        else:
            usage = _usage(chat.prefix_tokens, rng, expired=roll < 0.15)
        completed = WarmCompleted(
            conversation_id=cid, token=token, usage=usage, error=error, at=_now_ms()
        )
        await self._event(completed)
        if usage is None:
            self._tally.errors += 1
        else:
            self._tally.completions += 1

    # -- the wire ------------------------------------------------------------------

    async def _event(self, event: LifecycleEvent) -> None:
        """Publish a lifecycle event as the contract says: routing key = its type."""
        body = _wire(event)
        message = aio_pika.Message(
            msgspec.json.encode(body),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"conversation-id": event.conversation_id},
        )
        await self._lifecycle.publish(message, body["type"])

    async def _command(self, command: Command) -> None:
        """Send a command with ``reply_to`` and check that its reply says ok."""
        correlation_id = uuid.uuid4().hex
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[correlation_id] = reply
        body = _wire(command)
        message = aio_pika.Message(
            msgspec.json.encode(body),
            content_type="application/json",
            headers={"conversation-id": command.conversation_id},
            reply_to=self._reply_queue,
            correlation_id=correlation_id,
        )
        try:
            await self._commands.publish(message, COMMAND_ROUTING_KEY)
            answer = await asyncio.wait_for(reply, REPLY_TIMEOUT_S)
        finally:
            self._replies.pop(correlation_id, None)
        if answer.get("ok") is not True:
            raise RuntimeError(f"the worker refused {body}: {answer}")

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        reply = self._replies.get(message.correlation_id or "")
        if reply is None or reply.done():  # replies are at least once: keep the first
            return
        try:
            reply.set_result(msgspec.json.decode(message.body))
        except msgspec.DecodeError as exc:
            reply.set_exception(exc)


def _usage(prefix: int, rng: random.Random, *, expired: bool) -> Usage:
    """A warm's usage: the prefix read from the cache, or written again once it expired."""
    fresh = rng.randint(3, 20)  # the warm's own few tokens, never cached
    if expired:
        return Usage(
            input_tokens=prefix + fresh,
            cache_read_tokens=0,
            cache_write_tokens=prefix,
            output_tokens=1,
        )
    tail = rng.randint(50, 250)  # the last message, cached by this read
    return Usage(
        input_tokens=prefix + fresh,
        cache_read_tokens=prefix - tail,
        cache_write_tokens=tail,
        output_tokens=1,
    )


def _wire(message: msgspec.Struct) -> dict[str, Any]:
    """The message as its JSON object, optional fields without a value left out."""
    body: dict[str, Any] = _without_nulls(msgspec.to_builtins(message))
    return body


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _delete_namespace(config: Config) -> None:
    """Delete every exchange and queue of the demo's namespace, on a fresh channel."""
    try:
        connection = await aio_pika.connect(config.amqp_url)
    except (OSError, aiormq.exceptions.AMQPError) as exc:
        print(f"warmer demo: could not delete {config.namespace}: {exc}", file=sys.stderr)
        return
    async with connection:
        await delete(await connection.channel(), Names.of(config.namespace))


# SIGHUP: the terminal went away (an SSH session dropped); the namespace is deleted still.
_STOP_SIGNALS: Final = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP set ``stop`` (so cleanup runs) instead of interrupting."""
    loop = asyncio.get_running_loop()
    installed: list[tuple[signal.Signals, Any]] = []
    if threading.current_thread() is threading.main_thread():
        for signum in _STOP_SIGNALS:
            previous = signal.getsignal(signum)
            try:
                loop.add_signal_handler(signum, stop.set)
            except (NotImplementedError, RuntimeError):  # not on this platform
                continue
            installed.append((signum, previous))
    try:
        yield
    finally:
        for signum, previous in installed:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> int:
    """``python -m warmer.demo [--seed N] [--duration S] [--fast]``; the exit code."""
    parser = argparse.ArgumentParser(prog="warmer demo", description=__doc__)
    parser.add_argument("--seed", type=int, help="seed of the simulation (default: random)")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--fast", action="store_true", help="2-3 s intervals, short idles")
    args = parser.parse_args(argv)
    try:
        config = Config.from_env(os.environ, isatty=sys.stderr.isatty())
    except ConfigError as error:
        print(f"warmer demo: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_format, "warning")
    try:
        return asyncio.run(demo(config, duration_s=args.duration, seed=args.seed, fast=args.fast))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
