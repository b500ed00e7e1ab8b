"""The live view's pure parts: ``render`` (states in, a table out) and the bounded ``Board``."""

from __future__ import annotations

import io
from typing import Any

import msgspec
from rich.console import Console

from warmer.watch import Board, render

NOW = 1_800_000_000_000
DASH = "\u2014"


def state(**overrides: Any) -> dict[str, Any]:
    """A surface ``state`` as the worker publishes it, with ``overrides``."""
    fields: dict[str, Any] = {
        "enabled": True,
        "intervalMs": 240_000,
        "active": False,
        "status": "idle",
        "lastPct": None,
        "lastExpectedPct": None,
        "lastWarmAt": None,
        "nextWarmAt": None,
        "lastError": None,
        "failures": 0,
    }
    fields.update(overrides)
    return fields


def text(states: dict[str, dict[str, Any]], height: int = 40, width: int = 160) -> list[str]:
    """The rendered table as plain lines."""
    console = Console(width=width, height=height, file=io.StringIO(), record=True)
    console.print(render(states, NOW, height))
    return console.export_text().splitlines()


def row_of(lines: list[str], cid: str) -> str:
    return next(line for line in lines if line.split()[:1] == [cid])


def surface(cid: str, **overrides: Any) -> bytes:
    body = {"type": "surface.changed", "conversationId": cid, "state": state(**overrides)}
    return msgspec.json.encode({**body, "spec": {}, "at": NOW})


def test_rows_are_sorted_by_next_warm_with_nulls_last() -> None:
    lines = text(
        {
            "later": state(status="armed", nextWarmAt=NOW + 90_000),
            "none": state(status="warming"),
            "soon": state(status="armed", nextWarmAt=NOW + 4_200),
        }
    )
    ids = [line.split()[0] for line in lines if line.split()[0] in {"later", "none", "soon"}]
    assert ids == ["soon", "later", "none"]


def test_a_row_shows_every_figure() -> None:
    lines = text(
        {
            "c1": state(
                status="armed",
                intervalMs=5_000,
                nextWarmAt=NOW + 4_200,
                lastPct=98,
                lastExpectedPct=99,
                failures=2,
                lastError="provider overloaded",
            )
        }
    )
    assert row_of(lines, "c1").split() == [
        "c1", "yes", "armed", "5", "5", "s", "98%", "99%", "2", "provider", "overloaded"
    ]  # fmt: skip


def test_null_figures_show_a_dash() -> None:
    cells = row_of(text({"c1": state(enabled=False, status="disabled")}), "c1").split()
    assert cells == ["c1", "no", "disabled", "240", DASH, DASH, DASH, "0", DASH]


def test_the_countdown_reads_in_seconds_minutes_or_hours() -> None:
    lines = text(
        {
            "a": state(status="armed", nextWarmAt=NOW - 10),
            "b": state(status="armed", nextWarmAt=NOW + 245_000),
            "c": state(status="armed", nextWarmAt=NOW + 3_720_000),
        }
    )
    assert "due" in row_of(lines, "a").split()
    assert "4m 05s" in row_of(lines, "b")
    assert "1h 02m" in row_of(lines, "c")


def test_the_totals_count_statuses_and_warms_in_flight() -> None:
    lines = text(
        {
            "a": state(status="armed", nextWarmAt=NOW + 1000),
            "b": state(status="warming"),
            "c": state(status="warming"),
            "d": state(enabled=False, status="disabled"),
        }
    )
    assert lines[0].strip() == (
        "4 conversations · 1 disabled · 1 armed · 2 warming · warms in flight: 2"
    )


def test_an_unknown_status_is_shown_as_it_is() -> None:
    lines = text({"c1": state(status="hibernating")})
    assert "1 hibernating" in lines[0]
    assert row_of(lines, "c1").split()[2] == "hibernating"


def test_a_long_error_is_shortened_and_kept_on_one_line() -> None:
    error = "provider overloaded\n" + "x" * 300
    row = row_of(text({"c1": state(lastError=error)}), "c1")
    shown = row[row.index("provider") :].rstrip()
    assert shown.startswith("provider overloaded x")
    assert shown.endswith("…")
    assert len(shown) == 40


def test_rows_past_the_height_are_counted_not_drawn() -> None:
    states = {f"c{i:02d}": state(status="armed", nextWarmAt=NOW + i * 1000) for i in range(50)}
    lines = text(states, height=20)
    assert len(lines) < 20
    assert "c00" in lines[3]
    assert lines[-1].strip() == "… and 35 more"
    assert not any(line.startswith("c49") for line in lines)


def test_odd_values_never_break_the_view() -> None:
    lines = text({"[bold]x": {"status": 7, "enabled": "yes", "nextWarmAt": "soon"}, "e": {}})
    assert "[bold]x" in lines[3]
    assert row_of(lines, "e").split()[1:] == [DASH] * 8


def test_an_empty_board_says_what_it_waits_for() -> None:
    lines = text({})
    assert lines[0].strip().startswith("0 conversations")
    assert "no surface update yet" in lines[-1]


def test_the_board_keeps_the_latest_state_of_each_conversation() -> None:
    board = Board()
    assert board.apply(surface("c1", status="armed"))
    assert board.apply(surface("c1", status="warming"))
    assert board.states["c1"]["status"] == "warming"
    assert board.updates == 2


def test_the_board_ignores_what_is_not_a_surface_update() -> None:
    board = Board()
    assert not board.apply(b"not json")
    assert not board.apply(b'{"type": "warm.requested", "conversationId": "c1", "state": {}}')
    assert not board.apply(b'{"type": "surface.changed", "conversationId": "c1"}')
    assert board.states == {}


def test_the_board_drops_the_least_recently_updated_past_its_limit() -> None:
    board = Board(limit=2)
    board.apply(surface("a"))
    board.apply(surface("b"))
    board.apply(surface("a"))
    board.apply(surface("c"))
    assert list(board.states) == ["a", "c"]
