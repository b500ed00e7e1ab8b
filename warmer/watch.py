"""`warmer watch`: a live table of every conversation, read from the surface updates.

It binds a queue of its own (exclusive, auto-delete) to ``<ns>.surface`` with ``#`` and
never touches the worker's queues, so it can run beside any deployment and leaves
nothing behind (a namespace without that exchange is reported, not created). It knows
only what was published since it started (surface updates are not persistent); a
conversation shows up at its next change. The table is drawn in place (not on the
alternate screen), so it works over SSH and in a plain pty.

``render`` is the pure part: states in, a table out, for tests without a broker. Beside
each state the board keeps the panel's extra stat fields by label (the cost policy's "Not
warming" and "Savings", docs/contract.md): the surface carries those only as panel text, so the
savings totals are read back from it, and a field that is missing or reads otherwise is
shown as a dash and left out of the totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import sys
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Final

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from rich import box
from rich.console import Console, JustifyMethod
from rich.live import Live
from rich.table import Table
from rich.text import Text

from warmer.bus.topology import Names
from warmer.clock import SystemClock
from warmer.config import Config, ConfigError, mask_password
from warmer.contract import Status
from warmer.core.economy import tokens_text
from warmer.core.panel import extra_stats

__all__ = ["MAX_CONVERSATIONS", "Board", "main", "render", "watch"]

MAX_CONVERSATIONS: Final = 10_000
EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE, as `warmer run`
CONNECT_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 2.0
DASH: Final = "—"
# Lines around the rows: the totals, the header, its rule, the "more" line, and one
# spare so the cursor line after a full-height frame does not scroll it.
_CHROME_LINES: Final = 5
_ERROR_CHARS: Final = 40
_ID_CHARS: Final = 40
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_KNOWN: Final = frozenset(s.value for s in Status)
_STYLES: Final[Mapping[str, str]] = {
    Status.DISABLED: "dim",
    Status.ACTIVE: "blue",
    Status.IDLE: "",
    Status.ARMED: "green",
    Status.WARMING: "bold cyan",
    Status.RETRYING: "yellow",
    Status.PAUSED: "bold red",
    Status.BUDGET_EXHAUSTED: "magenta",
    Status.EXPIRED: "dark_orange",
}
# The panel fields the board reads by label (the cost fields: `extra_stats`).
NOT_WARMING: Final = "Not warming"
SAVINGS: Final = "Savings"
_HOLD_CHARS: Final = 24
# The "Not warming" sentences of core/economy.py, by a word each has, as a short reason;
# a sentence none matches is shown shortened.
_HOLDS: Final = (
    ("expired", "cache expired"),
    ("prefix", "prefix too small"),
    ("in a row", "warms kept missing"),
    ("spend cap", "spend cap reached"),
    ("unlikely", "return unlikely"),
)
# "net +48.9k tokens: warms 15.4k, re-writes avoided 64.4k, not avoided 0" (core/economy.py)
_AMOUNT: Final = r"(\d+(?:\.\d+)?[kM]?)"
_NET: Final = re.compile(r"\bnet ([+-]\d+(?:\.\d+)?[kM]?)")
_SAVINGS: Final = re.compile(
    rf"\bwarms {_AMOUNT}, re-writes avoided {_AMOUNT}, not avoided {_AMOUNT}"
)
_SCALE: Final = {"k": 1e3, "M": 1e6}


class _Surface(msgspec.Struct, rename="camel"):
    """The part of a ``surface.changed`` body the view reads; anything else is ignored."""

    type: str
    conversation_id: str
    state: dict[str, Any]
    spec: Any = None


_DECODER: Final = msgspec.json.Decoder(_Surface)


class Board:
    """The latest state of each conversation, at most ``limit`` of them.

    Past the limit the conversation updated least recently is dropped, so memory stays
    bounded however many conversations a deployment has.
    """

    def __init__(self, limit: int = MAX_CONVERSATIONS) -> None:
        self.limit = limit
        self.states: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.stats: dict[str, dict[str, str]] = {}
        """The panel's extra stat fields of each conversation, by label (see the module)."""
        self.updates = 0
        """Surface updates applied since the board was made."""

    def apply(self, body: bytes) -> bool:
        """Record one ``surface.changed`` body; False (and no change) for anything else."""
        try:
            surface = _DECODER.decode(body)
        except msgspec.DecodeError:
            return False
        if surface.type != "surface.changed":
            return False
        self.states[surface.conversation_id] = surface.state
        self.states.move_to_end(surface.conversation_id)
        stats = extra_stats(surface.spec)
        if stats:
            self.stats[surface.conversation_id] = stats
        else:
            self.stats.pop(surface.conversation_id, None)
        while len(self.states) > self.limit:
            gone, _ = self.states.popitem(last=False)
            self.stats.pop(gone, None)
        self.updates += 1
        return True


def render(
    states: Mapping[str, Mapping[str, Any]],
    now_ms: int,
    height: int,
    *,
    connected: bool = True,
    stats: Mapping[str, Mapping[str, str]] | None = None,
) -> Table:
    """The conversations as a table that fits ``height`` lines, soonest warm first.

    ``stats``: the panel's extra stat fields of each conversation, by label
    (``Board.stats``). Totals go in the title; rows past the height are counted in the
    caption. Never raises on odd values: a field missing or of the wrong type shows as a
    dash.
    """
    stats = stats or {}
    ordered = sorted(states.items(), key=_by_next_warm)
    room = max(1, height - _CHROME_LINES)
    shown, hidden = ordered[:room], len(ordered) - room
    table = Table(
        title=_totals(states, connected, stats),
        title_justify="left",
        caption=_caption(hidden, empty=not states),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for header, justify in _COLUMNS:
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis")
    for cid, state in shown:
        table.add_row(*_row(cid, state, now_ms, stats.get(cid, {})))
    return table


def _caption(hidden: int, *, empty: bool) -> Text | None:
    if empty:
        # Surface updates are not kept: a conversation shows up at its next change.
        return Text("no surface update yet: conversations appear when they change", "dim")
    return Text(f"… and {hidden} more", style="dim") if hidden > 0 else None


_COLUMNS: Final[tuple[tuple[str, JustifyMethod], ...]] = (
    ("conversation", "left"),
    ("enabled", "left"),
    ("status", "left"),
    ("interval (s)", "right"),
    ("next warm", "right"),
    ("cache %", "right"),
    ("retention %", "right"),
    ("failures", "right"),
    ("net saved", "right"),
    ("last error", "left"),
    ("not warming", "left"),
)


def _by_next_warm(item: tuple[str, Mapping[str, Any]]) -> tuple[bool, int, str]:
    cid, state = item
    due = _int(state.get("nextWarmAt"))
    return (due is None, due or 0, cid)


def _totals(
    states: Mapping[str, Mapping[str, Any]],
    connected: bool,
    stats: Mapping[str, Mapping[str, str]],
) -> Text:
    counts = Counter(_status(state) for state in states.values())
    known = [s.value for s in Status if counts[s.value]]
    unknown = sorted(s for s in counts if s not in _KNOWN)
    text = Text(no_wrap=True, overflow="ellipsis")
    noun = "conversation" if len(states) == 1 else "conversations"
    text.append(f"{len(states)} {noun}", style="bold")
    for status in known + unknown:
        text.append(" · ")
        text.append(f"{counts[status]} {status}", style=_STYLES.get(status, ""))
    text.append(f" · warms in flight: {counts[Status.WARMING.value]}", style="bold")
    savings = _savings_totals(stats[cid] for cid in states if cid in stats)
    if savings is not None:
        spent, avoided, missed, net = savings
        text.append(
            f" · tokens: warms {tokens_text(spent)}, re-writes avoided {tokens_text(avoided)}, "
            f"not avoided {tokens_text(missed)}, net "
        )
        text.append(f"{'+' if net >= 0 else '-'}{tokens_text(abs(net))}", style=_net_style(net))
    if not connected:
        text.append(" · reconnecting…", style="bold red")
    return text


def _row(cid: str, state: Mapping[str, Any], now_ms: int, stats: Mapping[str, str]) -> list[Text]:
    status = _status(state)
    enabled = state.get("enabled")
    failures = _int(state.get("failures"))
    hold = _hold(stats.get(NOT_WARMING, ""))
    return [
        Text(_shorten(_printable(cid), _ID_CHARS)),
        Text("yes" if enabled is True else "no" if enabled is False else DASH),
        Text(status, style=_STYLES.get(status, "")),
        Text(_seconds(_int(state.get("intervalMs")))),
        Text(_countdown(_int(state.get("nextWarmAt")), now_ms)),
        Text(_percent(state.get("lastPct"))),
        Text(_percent(state.get("lastExpectedPct"))),
        Text(DASH if failures is None else str(failures), style="red" if failures else "dim"),
        _net_saved(stats.get(SAVINGS)),
        Text(_shorten(_printable(state.get("lastError") or ""), _ERROR_CHARS) or DASH),
        Text(hold or DASH, style="dark_orange" if hold else ""),
    ]


def _hold(sentence: str) -> str:
    """Why the cost rules stopped warming, in a few words ("" when they did not)."""
    for word, reason in _HOLDS:
        if word in sentence:
            return reason
    return _shorten(_printable(sentence), _HOLD_CHARS)


def _net_saved(savings: str | None) -> Text:
    """The net of a "Savings" field (``+48.9k``), a dash without one."""
    if savings is None:
        return Text(DASH)
    match = _NET.search(savings)
    if match is None:
        return Text(_shorten(_printable(savings), 12))
    net = match[1]
    return Text(net, style=_net_style(-1 if net.startswith("-") else 1))


def _net_style(net: float) -> str:
    return "green" if net > 0 else "red" if net < 0 else ""


def _savings_totals(
    fields: Iterable[Mapping[str, str]],
) -> tuple[float, float, float, float] | None:
    """Warms, re-writes avoided, not avoided and net, summed over the "Savings" fields that
    parse (the net of each as its panel says it: the difference of rounded figures is not)."""
    spent = avoided = missed = net = 0.0
    found = False
    for stats in fields:
        savings = stats.get(SAVINGS, "")
        match, net_match = _SAVINGS.search(savings), _NET.search(savings)
        if match is None or net_match is None:
            continue
        found = True
        spent += _amount(match[1])
        avoided += _amount(match[2])
        missed += _amount(match[3])
        net += _amount(net_match[1].lstrip("+-")) * (-1 if net_match[1][0] == "-" else 1)
    return (spent, avoided, missed, net) if found else None


def _amount(text: str) -> float:
    """``15.4k`` as 15400.0: a figure of the panel, already rounded by the worker."""
    scale = _SCALE.get(text[-1], 1.0)
    return float(text.rstrip("kM")) * scale


def _status(state: Mapping[str, Any]) -> str:
    # Shown as sent: later versions of the contract may add statuses.
    status = state.get("status")
    return DASH if status is None else _printable(status)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _seconds(ms: int | None) -> str:
    if ms is None:
        return DASH
    return str(ms // 1000) if ms % 1000 == 0 else f"{ms / 1000:.1f}"


def _countdown(due_ms: int | None, now_ms: int) -> str:
    """Time until ``due_ms``: ``7 s``, ``4m 05s``, ``1h 02m``; ``due`` once it passed."""
    if due_ms is None:
        return DASH
    left = math.ceil((due_ms - now_ms) / 1000)
    if left <= 0:
        return "due"
    if left < 60:
        return f"{left} s"
    if left < 3600:
        return f"{left // 60}m {left % 60:02d}s"
    return f"{left // 3600}h {left % 3600 // 60:02d}m"


def _percent(value: object) -> str:
    number = _int(value)
    return DASH if number is None else f"{number}%"


def _printable(value: object) -> str:
    return _CONTROL.sub(" ", str(value))


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def watch(
    config: Config,
    *,
    console: Console | None = None,
    refresh_s: float = 0.5,
    until: asyncio.Event | None = None,
    board: Board | None = None,
) -> int:
    """Draw the conversations of ``config.namespace`` live until ``until`` is set.

    Returns 0 when ``until`` is set or the task is cancelled (Ctrl-C under
    ``asyncio.run``); 69 with a message on stderr when the broker cannot be reached or
    the namespace has no surface exchange (no worker ever ran there).
    ``board`` (optional) receives the states, for a caller that wants them afterwards.
    """
    console = console or Console()
    board = board or Board()
    names = Names.of(config.namespace)
    try:
        connection = await asyncio.wait_for(
            aio_pika.connect_robust(
                config.amqp_url,
                client_properties={"connection_name": f"warmer watch {config.namespace}"},
            ),
            CONNECT_TIMEOUT_S,
        )
    except asyncio.CancelledError:
        return EXIT_OK
    except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
        print(_unreachable(config.amqp_url, exc), file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        try:
            await _follow(connection, names, board)
        except aiormq.exceptions.ChannelNotFoundEntity:
            print(_no_worker(config), file=sys.stderr)
            return EXIT_UNAVAILABLE
        await _draw(console, board, connection, until, refresh_s)
    except asyncio.CancelledError:
        pass
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT_S)
    return EXIT_OK


async def _draw(
    console: Console,
    board: Board,
    connection: AbstractRobustConnection,
    until: asyncio.Event | None,
    refresh_s: float,
) -> None:
    """Redraw the table every ``refresh_s`` (the countdowns move) until ``until`` is set."""
    clock = SystemClock()
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            frame = render(
                board.states,
                clock.now_ms(),
                console.size.height,
                connected=connection.connected.is_set(),
                stats=board.stats,
            )
            live.update(frame, refresh=True)
            if until is not None and until.is_set():
                break
            await _pause(until, refresh_s)
    if not console.is_terminal:  # Live ends a terminal's last frame with a newline only
        console.line()


async def _follow(connection: AbstractRobustConnection, names: Names, board: Board) -> None:
    """Bind a queue of the watch's own to the surface exchange and feed ``board``."""
    channel = await connection.channel()
    # Passive: a mistyped namespace is reported instead of creating a durable exchange
    # nobody publishes to.
    surface = await channel.get_exchange(names.surface, ensure=True)
    # Named (not server-named) so the robust connection can declare it again after a
    # reconnection; exclusive, so it goes with the connection.
    queue = await channel.declare_queue(
        f"{names.surface}.watch.{uuid.uuid4().hex[:12]}", exclusive=True, auto_delete=True
    )
    await queue.bind(surface, "#")

    async def on_message(message: AbstractIncomingMessage) -> None:
        board.apply(message.body)

    await queue.consume(on_message, no_ack=True)


async def _pause(until: asyncio.Event | None, seconds: float) -> None:
    if until is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(until.wait(), seconds)


def _unreachable(url: str, exc: BaseException) -> str:
    reason = (str(exc) or type(exc).__name__).splitlines()[0][:200]
    return (
        f"warmer watch: cannot reach RabbitMQ at {mask_password(url)} ({reason}); start a "
        "broker (`rabbitmq-server -detached`) or set WARMER_AMQP_URL"
    )


def _no_worker(config: Config) -> str:
    return (
        f"warmer watch: no exchange {config.namespace}.surface at {config.amqp_url_masked}; "
        "start the worker (`warmer run`) first, or set WARMER_NAMESPACE to its namespace"
    )


def main() -> int:
    """``python -m warmer.watch``: the settings from the environment; the exit code."""
    try:
        config = Config.from_env(os.environ, isatty=sys.stderr.isatty())
    except ConfigError as error:
        print(f"warmer watch: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(watch(config))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
