"""The command line: `warmer run` starts the worker; the other verbs talk to a running one.

Every verb reads the same `WARMER_*` settings (`Config.from_env`). `state`, `enable`,
`disable`, `interval` and `policy` send a command and wait for the worker's reply; `send`
publishes a lifecycle event; `dead` lists, replays or purges dead letters. The bus work is
in `warmer.control`; here are the arguments and the output. Exit codes: see `_EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Coroutine
from decimal import Decimal
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast, get_args

import msgspec

from warmer.config import Config, ConfigError, settings_help, unknown_settings
from warmer.contract import (
    MAX_SAFE_INTEGER,
    CostPolicyName,
    LifecycleEvent,
    Rejection,
    UnknownType,
    decode_event,
)
from warmer.core.panel import extra_stats
from warmer.observe.log import configure_logging, get_logger

if TYPE_CHECKING:
    from warmer.control import Control, DeadLetter, DeadLetters, Replay
    from warmer.reshard import Summary

__all__ = ["main", "parse_interval"]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1  # the worker rejected the command; a replay or purge not done
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE: no broker, or no topology in the namespace
EXIT_TEMPFAIL: Final = 75  # EX_TEMPFAIL: no worker answered in time, or a publish not taken
_EXIT_CODES: Final = (
    "exit codes: 0 done; 1 refused (by the worker, or not confirmed); 2 usage;\n"
    "  69 broker unreachable or namespace not declared; 75 no worker answered in time"
)
_DEFAULT_TIMEOUT_S: Final = 10.0
_MAX_SHARDS: Final = 256
_BODY_SHOWN: Final = 120
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": 60_000}
_INTERVAL: Final = re.compile(r"(?P<amount>[0-9]{1,16}(?:\.[0-9]{1,6})?)(?P<unit>ms|s|m)")
_NUMBER: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_EVENT_TYPES: Final = [str(kind.__struct_config__.tag) for kind in get_args(LifecycleEvent)]
_POLICIES: Final = (*get_args(CostPolicyName), "default")

log = get_logger(__name__)

AppRun = Callable[[Config], Coroutine[Any, Any, int]]
T = TypeVar("T")


class _Exit(Exception):
    """Stop the verb with this exit code; its message is already printed."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    """Run the `warmer` command with `argv` (default: `sys.argv[1:]`); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already reported
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    command: Callable[[argparse.Namespace], int] | None = getattr(args, "command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return command(args)
    except _Exit as exit_:
        return exit_.code
    except SystemExit as exit_:  # a usage error found after parsing, already reported
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


def parse_interval(text: str) -> int:
    """``90s``, ``1500ms`` or ``2m`` as milliseconds; ArgumentTypeError naming the units."""
    match = _INTERVAL.fullmatch(text)
    if match is None:
        if _NUMBER.fullmatch(text):
            raise argparse.ArgumentTypeError(
                f"{text!r} has no unit: write {text}s or {text}ms (units: ms, s, m)"
            )
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an interval: write a number and a unit, such as 90s, 1500ms "
            "or 2m (units: ms, s, m)"
        )
    milliseconds = round(Decimal(match["amount"]) * _UNIT_MS[match["unit"]])
    if milliseconds > MAX_SAFE_INTEGER:
        raise argparse.ArgumentTypeError(f"{text!r} is too long (the worker takes at most 24 h)")
    return milliseconds


def _timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 3600")
    return seconds


def _conversation(text: str) -> str:
    """A conversation id from the command line: UTF-8 text, as the contract requires.

    Bytes that are not UTF-8 reach ``sys.argv`` surrogate-escaped: refused here as a
    usage error instead of failing in the JSON encoder once connected.
    """
    try:
        text.encode()
    except UnicodeEncodeError:
        raw = text.encode(errors="surrogateescape")
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not UTF-8: a conversation id is UTF-8 text"
        ) from None
    return text


def _shards(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= _MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of shards from 1 to 256")
    return int(text)


def _positive(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1")
    return int(text)


# -- the parser ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmer",
        description="A RabbitMQ sidecar that keeps LLM prompt caches warm.",
        epilog="Every verb reads the WARMER_* settings (see `warmer run --help`).\n" + _EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('warmer')}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the worker",
        description="Run the worker until interrupted. Settings come from the environment.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.set_defaults(command=_run)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as one JSON line")
    asking = argparse.ArgumentParser(add_help=False, parents=[common])
    asking.add_argument(
        "--timeout",
        type=_timeout,
        default=_DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="how long to wait for the worker's reply (default: 10)",
    )
    asking.add_argument(
        "conversation", metavar="CONV", type=_conversation, help="the conversation id"
    )

    def verb(
        name: str, summary: str, description: str, examples: str, *, asks: bool = True
    ) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            parents=[asking if asks else common],
            help=summary,
            description=textwrap.fill(description, 88),
            epilog=f"examples:\n{examples}\n\n{_EXIT_CODES}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    state = verb(
        "state",
        "show a conversation's state",
        "Ask the running worker for a conversation's state (get_state).",
        "  warmer state demo\n  warmer state demo --json | jq .state.status",
    )
    state.set_defaults(command=_state)
    for name, enabled in (("enable", True), ("disable", False)):
        toggle = verb(
            name,
            f"{name} warming a conversation",
            f"{name.capitalize()} warming a conversation (set_enabled).",
            f"  warmer {name} demo",
        )
        toggle.set_defaults(command=_set_enabled, enabled=enabled)
    interval = verb(
        "interval",
        "set a conversation's warm interval",
        "Set how often an idle conversation is warmed (set_interval). The worker clamps it "
        "to 1 s .. 24 h.",
        "  warmer interval demo 90s\n  warmer interval demo 1500ms\n  warmer interval demo 4m",
    )
    interval.add_argument(
        "interval", metavar="INTERVAL", type=parse_interval, help="a number and ms, s or m"
    )
    interval.set_defaults(command=_interval)
    policy = verb(
        "policy",
        "set a conversation's cost policy",
        "Choose how warming a conversation is judged (set_policy): fixed (on the interval, "
        "within the idle budget), budget (also a spend cap per idle stretch), adaptive (only "
        "while a warm is expected to pay), or default (the deployment's WARMER_COST_POLICY). "
        "docs/cost-policy.md has the rules and their maths.",
        "  warmer policy demo adaptive\n  warmer policy demo default",
    )
    policy.add_argument("policy", metavar="POLICY", choices=_POLICIES, help=" | ".join(_POLICIES))
    policy.set_defaults(command=_policy)
    send = verb(
        "send",
        "publish a lifecycle event",
        "Publish a lifecycle event, checked against the contract first (an invalid one is "
        "refused with exit code 2 and never published).",
        '  warmer send \'{"type": "turn.settled", "conversationId": "demo", '
        '"cwd": "/srv/app"}\'\n  echo \'{"type": "turn.started", '
        '"conversationId": "demo"}\' | warmer send -',
        asks=False,
    )
    send.add_argument("event", metavar="EVENT-JSON", help="the event's JSON, or - for stdin")
    send.set_defaults(command=_send)
    dead = verb(
        "dead",
        "list, replay or purge dead letters",
        "List the dead letters of <namespace>.dead, oldest first, without consuming them; "
        "or replay them to where they were first published (they leave the queue once the "
        "broker confirmed the replay); or delete them.",
        "  warmer dead\n  warmer dead --replay 3\n  warmer dead --replay --all\n"
        "  warmer dead --purge --yes",
        asks=False,
    )
    dead.add_argument(
        "--limit", type=_positive, default=100, metavar="N", help="list at most N (default: 100)"
    )
    mode = dead.add_mutually_exclusive_group()
    mode.add_argument(
        "--replay",
        type=_positive,
        nargs="?",
        const=0,
        metavar="N",
        help="re-publish the oldest N (default: 1)",
    )
    mode.add_argument("--purge", action="store_true", help="delete every dead letter")
    dead.add_argument("--all", action="store_true", help="with --replay: every dead letter")
    dead.add_argument("--yes", action="store_true", help="with --purge: do not ask")
    dead.set_defaults(command=_dead, usage=dead.error)
    watch = verb(
        "watch",
        "a live table of conversations",
        "Show every conversation the worker publishes a panel for, live, sorted by next "
        "warm, with the totals on top. It binds a queue of its own and never disturbs the "
        "worker; works over SSH. Ctrl-C ends it.",
        "  warmer watch\n  WARMER_NAMESPACE=staging warmer watch",
        asks=False,
    )
    watch.set_defaults(command=_watch)
    demo = verb(
        "demo",
        "see the whole mechanism in a minute",
        "On the local broker: start a worker, a simulated orchestrator that answers warm "
        "requests (mostly cache reads, now and then an expired cache or an error) and a few "
        "simulated conversations taking turns at human pace, and show the live view. "
        "Ctrl-C stops everything it started and deletes its namespace.",
        "  warmer demo\n  warmer demo --seed 7 --duration 60",
        asks=False,
    )
    demo.add_argument("--seed", type=int, default=None, help="replay the same run")
    demo.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS", help="stop after this long"
    )
    demo.set_defaults(command=_demo)
    simulate = verb(
        "simulate",
        "price the cost policies on idle-gap distributions",
        "Replay idle gaps (settle to next turn) through the real core with a fake clock and "
        "print what each cost policy costs per gap, in prefixes at the base input price: "
        "none, fixed, budget, adaptive, and a 1-hour cache without warming, beside the best "
        "'warm k times, then stop' rule and a clairvoyant bound; with the share of returning "
        "turns that found a warm cache. The gaps: built-in distributions (published, quick, "
        "coffee, split), each with 0, 20 and 50 % of gaps abandoned, or a trace file (seconds "
        "one a line, 'abandoned' or 'inf' for a user who never came back, # comments). "
        "Prices, margin, idle budget and spend cap come from the WARMER_* settings; no broker "
        "is needed. docs/economics.md explains the model.",
        "  warmer simulate\n  warmer simulate --mix published --gaps 20000 --seed 7\n"
        "  warmer simulate --trace gaps.txt --prefix-tokens 40000 --json",
        asks=False,
    )
    simulate.add_argument(
        "--gaps", type=_positive, metavar="N", help="gaps per distribution (default: 4000)"
    )
    simulate.add_argument("--seed", type=int, default=1, help="the sampling seed (default: 1)")
    simulate.add_argument(
        "--prefix-tokens",
        type=_positive,
        default=100_000,
        metavar="TOKENS",
        help="the cached prefix's size (default: 100000)",
    )
    simulate.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="NAME",
        help="only this distribution (repeatable): published, quick, coffee or split",
    )
    simulate.add_argument("--trace", metavar="FILE", help="replay the gaps of this file instead")
    simulate.set_defaults(command=_simulate, usage=simulate.error)
    reshard = verb(
        "reshard",
        "move the namespace to another number of shards",
        "Move the namespace's queues and stored conversations to S shards, losing nothing "
        "queued: from today's single queues (S = 1) to S shards, from S shards to another "
        "number, or back to one. Run it while no worker of the namespace runs (it refuses "
        "when a queue has a consumer), then start the workers with WARMER_SHARDS=S. It "
        "declares the queues of S shards and routes new messages to them, moves every "
        "queued message to its shard (a message with no readable conversation id goes to "
        "<namespace>.dead, as the worker would send it), deletes the emptied old queues, "
        "then records each stored conversation's shard, found by asking the broker. Safe to "
        "run again after it stopped half-way. Needs the broker plugin "
        "rabbitmq_consistent_hash_exchange for S > 1. Shows progress every 10 s and a "
        "summary at the end. Choose S a multiple of the replicas you expect (16 for up to "
        "8); deploy/README.md says more.",
        "  warmer reshard --shards 16\n  WARMER_NAMESPACE=staging warmer reshard --shards 4 --json",
        asks=False,
    )
    reshard.add_argument(
        "--shards",
        type=_shards,
        required=True,
        metavar="S",
        help=f"the number of shards, 1 to {_MAX_SHARDS}",
    )
    reshard.set_defaults(command=_reshard)

    shards = verb(
        "shards",
        "list the shards and their owners",
        "Read the store's record of who owns each shard of the namespace (the epoch taken, "
        "since when, released or not) and which replicas are alive (their last beat). "
        "Reads the store only: works while the broker is down.",
        "  warmer shards \n  WARMER_STORE=redis://cache:6379/0 warmer shards --json",
        asks=False,
    )
    shards.set_defaults(command=_shards_verb)
    return parser


def _watch(args: argparse.Namespace) -> int:
    """`warmer watch`: the live table, until Ctrl-C."""
    from warmer.watch import watch

    config = _config()
    try:
        return asyncio.run(watch(config))
    except KeyboardInterrupt:
        return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    """`warmer demo`: a worker, a simulated orchestrator and conversations, the live view."""
    from warmer.demo import demo

    config = _config()
    configure_logging(config.log_format, "warning")
    try:
        return asyncio.run(demo(config, duration_s=args.duration, seed=args.seed))
    except KeyboardInterrupt:
        return EXIT_OK


def _simulate(args: argparse.Namespace) -> int:
    """`warmer simulate`: the cost policies priced on idle-gap distributions (no broker)."""
    from warmer.simulate import MIXES, TraceError, mixes_named, simulate, simulate_trace
    from warmer.simulate.report import document, text

    if args.trace is not None and (args.gaps is not None or args.mix):
        args.usage("--trace replays the file as it is: no --gaps or --mix with it")
    try:
        mixes = mixes_named(args.mix) if args.mix else MIXES
    except ValueError as error:
        args.usage(str(error))
    policy, prefix = _config().policy(), args.prefix_tokens
    try:
        if args.trace is not None:
            tables = [simulate_trace(args.trace, policy=policy, prefix_tokens=prefix)]
        else:
            tables = simulate(
                policy=policy, prefix_tokens=prefix, seed=args.seed, mixes=mixes, gaps=args.gaps
            )
    except TraceError as error:
        print(f"warmer: {error}", file=sys.stderr)
        return EXIT_USAGE
    seed = None if args.trace is not None else args.seed
    if args.json:
        print(_json(document(tables, prefix_tokens=prefix, seed=seed)))
    else:
        print(text(tables, prefix_tokens=prefix))
    return EXIT_OK


def _reshard(args: argparse.Namespace) -> int:
    """`warmer reshard`: the broker and the store moved to ``--shards`` shards."""
    config = _config()
    configure_logging(config.log_format, "warning")  # the store's warnings, as the worker's
    _quiet_client_logs()
    import aiormq  # the broker client and the store: imported only by the verbs that use them

    from warmer.bus.reshard import PLUGIN, PluginMissing, Refused
    from warmer.reshard import reshard
    from warmer.store import StoreError, open_shared

    def say(line: str) -> None:
        print(f"reshard: {line}", file=sys.stderr, flush=True)

    async def run() -> Summary:
        shared = open_shared(config.store, timeout_ms=config.store_timeout_ms)
        await shared.open()
        try:
            return await reshard(config.amqp_url, config.namespace, args.shards, shared, say=say)
        finally:
            await shared.close()

    try:
        summary = asyncio.run(run())
    except KeyboardInterrupt:
        print("warmer: reshard interrupted: run it again to finish", file=sys.stderr)
        return 130
    except Refused as refused:
        print(f"warmer: {refused}", file=sys.stderr)
        return EXIT_REFUSED
    except PluginMissing:
        print(
            f"warmer: the broker lacks the plugin {PLUGIN}: rabbitmq-plugins enable {PLUGIN}",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    except (OSError, aiormq.exceptions.AMQPError) as exc:
        print(f"warmer: the broker failed: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StoreError as exc:
        print(f"warmer: the store failed: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(_json(summary) if args.json else _reshard_text(summary))
    if config.shards != summary.shards:
        say(f"WARMER_SHARDS is {config.shards} here: give the workers {summary.shards}")
    return EXIT_OK


def _shards_verb(args: argparse.Namespace) -> int:
    """`warmer shards`: each shard's owner and the live replicas, from the store."""
    config = _config()
    configure_logging(config.log_format, "warning")
    from warmer.store import StoreError, open_shared
    from warmer.store.base import Owner, Replica

    async def read() -> tuple[int | None, list[Owner], list[Replica]]:
        shared = open_shared(config.store, timeout_ms=config.store_timeout_ms)
        await shared.open()
        try:
            # A zero ttl would expire everyone: read the live ones without beating.
            return await shared.layout(), await shared.owners(), await shared.replicas()
        finally:
            await shared.close()

    try:
        layout, owners, live = asyncio.run(read())
    except StoreError as exc:
        print(f"warmer: the store failed: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        print(_json({"ok": True, "layout": layout, "owners": owners, "replicas": live}))
    else:
        print(_shards_text(layout, owners, live, time.time_ns() // 1_000_000))
    return EXIT_OK


def _shards_text(layout: int | None, owners: list[Any], live: list[Any], now_ms: int) -> str:
    """The shards' owners for people: one line a shard, then the live replicas."""
    alive = {replica.id for replica in live}
    lines = [f"{layout or 0} shard(s) in the store's layout"]
    held = {owner.shard: owner for owner in owners}
    for shard in range(max([layout or 0, *(k + 1 for k in held)])):
        owner = held.get(shard)
        if owner is None:
            lines.append(f"  shard {shard:3d}: never taken")
            continue
        state = "released" if owner.released else ("held" if owner.replica in alive else "gone")
        age = max(0, now_ms - owner.since_ms) // 1000
        lines.append(
            f"  shard {shard:3d}: {owner.replica} ({state}, epoch {owner.epoch}, for {age} s)"
        )
    lines.append(f"{len(live)} replica(s) alive:")
    lines += [f"  {r.id}: {r.info} (beat {max(0, now_ms - r.seen_ms)} ms ago)" for r in live]
    return "\n".join(lines)


def _reshard_text(summary: Summary) -> str:
    moved = sum(summary.moved.values())
    previous = summary.previous
    before = "none" if previous is None else f"{previous} shard{'s' * (previous != 1)}"
    per_shard = ", ".join(f"{k}: {n}" for k, n in enumerate(summary.records))
    lines = [
        f"namespace {summary.namespace}: {summary.shards} shards (the store's layout was "
        f"{before}), in {summary.seconds:g} s",
        f"messages moved: {moved}, dead-lettered (no readable id): {summary.dead}",
        *(f"  {queue}: {count}" for queue, count in summary.moved.items()),
        f"old queues deleted: {', '.join(summary.deleted) or 'none'}",
        f"records: {sum(summary.records)}, {summary.reassigned} moved to another shard; "
        f"per shard: {per_shard}",
        f"start the workers with WARMER_SHARDS={summary.shards}",
    ]
    return "\n".join(lines)


# -- `warmer run` -------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    """`warmer run`: read the config, set up logging, run the app until it returns."""
    config = _config()
    configure_logging(config.log_format, config.log_level)
    for name in unknown_settings(os.environ):
        log.warning("config_unknown_setting", name=name)
    log.info("config_loaded", **config.as_log_fields())
    loop_factory = _loop_factory(config)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_app_run()(config))
    except KeyboardInterrupt:
        log.info("worker_interrupted")
        return EXIT_OK


def _loop_factory(config: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when ``WARMER_LOOP=uvloop`` (exit 2 when it is not installed);
    None: asyncio's own."""
    if config.loop == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        print(
            "warmer: WARMER_LOOP=uvloop needs the uvloop package (pip install 'warmer[uvloop]')",
            file=sys.stderr,
        )
        raise _Exit(EXIT_USAGE) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _app_run() -> AppRun:
    # Imported late: the app pulls in the broker client and the store, which neither
    # `--help` nor a config error needs.
    app = importlib.import_module("warmer.app")
    return cast(AppRun, app.run)


# -- the verbs ----------------------------------------------------------------------


def _state(args: argparse.Namespace) -> int:
    body = {"type": "get_state", "conversationId": args.conversation}
    answered: list[str | None] = []

    async def ask(control: Control) -> dict[str, Any]:
        reply = await control.command(body, timeout=args.timeout, expire=False)
        answered.append(control.answered_by)
        return reply

    def shown(reply: dict[str, Any]) -> str:
        block = _state_block(args.conversation, reply)
        by = answered[0] if answered else None
        return block if by is None else f"{block}\n{'answered by:':<14}replica {by}"

    return _command(args, body, shown, ask=ask)


def _set_enabled(args: argparse.Namespace) -> int:
    body = {"type": "set_enabled", "conversationId": args.conversation, "enabled": args.enabled}
    return _command(args, body, lambda reply: _settings_line(args.conversation, reply))


def _interval(args: argparse.Namespace) -> int:
    body = {
        "type": "set_interval",
        "conversationId": args.conversation,
        "intervalMs": args.interval,
    }

    def shown(reply: dict[str, Any]) -> str:
        line = _settings_line(args.conversation, reply)
        clamped = reply.get("settings", {}).get("intervalMs")
        if clamped != args.interval:
            line += f" (asked {_seconds(args.interval)}, the worker keeps 1 s .. 24 h)"
        return line

    return _command(args, body, shown)


def _policy(args: argparse.Namespace) -> int:
    chosen = None if args.policy == "default" else args.policy
    body = {"type": "set_policy", "conversationId": args.conversation, "policy": chosen}

    def shown(reply: dict[str, Any]) -> str:
        line = _settings_line(args.conversation, reply)
        if "policy" not in reply.get("settings", {}):
            line += ", the deployment's cost policy"
        return line

    return _command(args, body, shown)


def _command(
    args: argparse.Namespace,
    body: dict[str, Any],
    shown: Callable[[dict[str, Any]], str],
    *,
    expire: bool = True,
    ask: Callable[[Control], Awaitable[dict[str, Any]]] | None = None,
) -> int:
    """Send ``body``, print the reply; 0 when the worker applied it, 1 when it refused."""
    reply = _on_bus(
        ask or (lambda control: control.command(body, timeout=args.timeout, expire=expire))
    )
    ok = reply.get("ok") is True
    if args.json:
        print(_json(reply))
    elif ok:
        print(shown(reply))
    else:
        code, error = reply.get("code", "?"), reply.get("error", "?")
        print(f"warmer: the worker refused it: {code}: {error}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_REFUSED


def _send(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.event == "-" else args.event
    body = text.encode("utf-8", "surrogateescape")
    decoded = decode_event(body, "application/json")
    if isinstance(decoded, Rejection):
        print(f"warmer: not a valid event: {decoded.code}: {decoded.error}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(decoded, UnknownType):
        print(
            f"warmer: not a valid event: unknown type {decoded.shown!r} (the worker ignores "
            f"it): expected one of {', '.join(_EVENT_TYPES)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    event = decoded
    _on_bus(lambda control: control.send(event, body))
    kind = str(event.__struct_config__.tag)
    if args.json:
        print(_json({"ok": True, "type": kind, "conversationId": event.conversation_id}))
    else:
        print(f"sent {kind} for {event.conversation_id}")
    return EXIT_OK


def _dead(args: argparse.Namespace) -> int:
    if args.all and args.replay is None:
        args.usage("--all goes with --replay")
    if args.yes and not args.purge:
        args.usage("--yes goes with --purge")
    if args.replay is not None and args.replay > 0 and args.all:
        args.usage("give --replay N or --replay --all, not both")
    if args.purge:
        return _purge(args)
    if args.replay is not None:
        count = None if args.all else (args.replay or 1)
        replay = _on_bus(lambda control: control.replay(count))
        print(_json(_replay_json(replay)) if args.json else _replay_text(replay))
        return EXIT_REFUSED if replay.kept else EXIT_OK
    letters = _on_bus(lambda control: control.dead_letters(limit=args.limit))
    print(_json(_letters_json(letters)) if args.json else _letters_text(letters))
    return EXIT_OK


def _purge(args: argparse.Namespace) -> int:
    queue = f"{_config().namespace}.dead"
    if not args.yes:
        if not sys.stdin.isatty():
            print(
                "warmer: `dead --purge` deletes for good: run it on a terminal to confirm, "
                "or add --yes",
                file=sys.stderr,
            )
            return EXIT_USAGE
        count = _on_bus(lambda control: control.dead_count())
        if count == 0:
            print(f"no dead letters in {queue}")
            return EXIT_OK
        print(f"type 'purge' to delete {count} dead letters: ", end="", file=sys.stderr)
        sys.stderr.flush()
        if sys.stdin.readline().strip() != "purge":
            print("nothing deleted", file=sys.stderr)
            return EXIT_REFUSED
    deleted = _on_bus(lambda control: control.purge())
    print(
        _json({"ok": True, "deleted": deleted}) if args.json else f"deleted {deleted} from {queue}"
    )
    return EXIT_OK


# -- the bus ------------------------------------------------------------------------


def _config() -> Config:
    try:
        return Config.from_env(os.environ, isatty=sys.stderr.isatty())
    except ConfigError as error:
        print(f"warmer: {error}", file=sys.stderr)
        raise _Exit(EXIT_USAGE) from None


def _on_bus(operation: Callable[[Control], Awaitable[T]]) -> T:
    """Connect, run ``operation``, close; a failure printed and raised as `_Exit`."""
    config = _config()
    from warmer import control  # the broker client: imported only by the verbs that use it

    _quiet_client_logs()

    async def session() -> T:
        connected: Control = await control.Control.connect(config.amqp_url, config.namespace)
        try:
            return await operation(connected)
        finally:
            await connected.close()

    try:
        return asyncio.run(session())
    except KeyboardInterrupt:
        raise _Exit(130) from None
    except (control.NoAnswer, control.NotDelivered) as exc:
        print(f"warmer: {exc}", file=sys.stderr)
        raise _Exit(EXIT_TEMPFAIL) from None
    except control.ControlError as exc:
        print(f"warmer: {exc}", file=sys.stderr)
        raise _Exit(EXIT_UNAVAILABLE) from None


def _quiet_client_logs() -> None:
    """Python would print the broker client's warnings (a failed connect) beside our line."""
    for name in ("aiormq", "aio_pika"):
        client_log = logging.getLogger(name)
        if not client_log.handlers:
            client_log.addHandler(logging.NullHandler())


# -- output -------------------------------------------------------------------------


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def _state_block(conversation: str, reply: dict[str, Any], now_ms: int | None = None) -> str:
    """A get_state reply as a short key: value block for people."""
    state: dict[str, Any] = reply.get("state", {})
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    next_at = state.get("nextWarmAt")
    rows = [
        ("conversation", conversation),
        ("enabled", "yes" if state.get("enabled") else "no"),
        ("status", str(state.get("status", "—"))),
        ("interval", _seconds(state.get("intervalMs"))),
        ("next warm in", "—" if next_at is None else _countdown(next_at - now)),
        ("last cache", _percent(state.get("lastPct"))),
        ("retention", _percent(state.get("lastExpectedPct"))),
        ("failures", str(state.get("failures", 0))),
        ("last error", state.get("lastError") or "—"),
        *((label.lower(), value) for label, value in extra_stats(reply.get("spec")).items()),
    ]
    width = max(14, *(len(key) + 2 for key, _ in rows))
    return "\n".join(f"{key + ':':<{width}}{value}" for key, value in rows)


def _settings_line(conversation: str, reply: dict[str, Any]) -> str:
    settings: dict[str, Any] = reply.get("settings", {})
    enabled = "enabled" if settings.get("enabled") else "disabled"
    line = f"{conversation}: {enabled}, interval {_seconds(settings.get('intervalMs'))}"
    policy = settings.get("policy")
    return line if policy is None else f"{line}, cost policy {policy}"


def _seconds(ms: object) -> str:
    return f"{ms / 1000:g} s" if isinstance(ms, int | float) else "—"


def _percent(value: object) -> str:
    return f"{value}%" if isinstance(value, int | float) else "—"


def _countdown(ms: int) -> str:
    """``ms`` from now as ``42 s``, ``3 min 5 s`` or ``2 h 5 min``; ``due`` when past."""
    if ms <= 0:
        return "due"
    seconds = -(-ms // 1000)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _body(body: bytes, limit: int = _BODY_SHOWN) -> str:
    """The start of ``body`` as one printable line, with its size when cut."""
    text = body[: limit * 4].decode("utf-8", "replace")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    whole = len(text) <= limit and len(body) <= limit * 4
    return shown if whole else f"{shown}… ({len(body)} bytes)"


def _origin(letter: DeadLetter) -> str:
    if letter.exchange is None:
        return "unknown"
    return f"{letter.exchange or '(default)'} / {letter.routing_key}"


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "position": letter.position,
        "reason": letter.reason,
        "error": letter.error,
        "exchange": letter.exchange,
        "routingKey": letter.routing_key,
        "deathReason": letter.death_reason,
        "contentType": letter.content_type,
        "body": _body(letter.body),
        "bodyBytes": len(letter.body),
    }


def _letters_json(letters: DeadLetters) -> dict[str, Any]:
    return {
        "queue": letters.queue,
        "total": letters.total,
        "deadLetters": [_letter_json(letter) for letter in letters.letters],
    }


def _letters_text(letters: DeadLetters) -> str:
    if letters.total == 0:
        return f"no dead letters in {letters.queue}"
    shown = len(letters.letters)
    more = f", the oldest {shown} shown" if shown < letters.total else ""
    plural = "" if letters.total == 1 else "s"
    lines = [f"{letters.total} dead letter{plural} in {letters.queue}{more}"]
    for letter in letters.letters:
        why = letter.reason or (f"x-death {letter.death_reason}" if letter.death_reason else "?")
        lines.append(f"#{letter.position}  {why}  from {_origin(letter)}")
        if letter.error:
            lines.append(f"    error: {letter.error}")
        if letter.reason and letter.death_reason:
            lines.append(f"    x-death: {letter.death_reason}")
        lines.append(f"    body:  {_body(letter.body)}")
    return "\n".join(lines)


def _replay_json(replay: Replay) -> dict[str, Any]:
    return {
        "queue": replay.queue,
        "replayed": [_letter_json(letter) for letter in replay.replayed],
        "kept": [{**_letter_json(kept.letter), "why": kept.why} for kept in replay.kept],
    }


def _replay_text(replay: Replay) -> str:
    if not replay.replayed and not replay.kept:
        return f"no dead letters in {replay.queue}"
    lines = [f"replayed {len(replay.replayed)}, kept {len(replay.kept)} in {replay.queue}"]
    lines += [f"#{letter.position}  replayed to {_origin(letter)}" for letter in replay.replayed]
    lines += [f"#{kept.letter.position}  kept: {kept.why}" for kept in replay.kept]
    return "\n".join(lines)
