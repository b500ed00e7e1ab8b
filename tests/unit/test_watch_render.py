"""The live view's pure parts: ``render`` (states in, a table out) and the bounded ``Board``."""

from __future__ import annotations

import io
from typing import Any

import msgspec
import pytest
from rich.console import Console

from warmer.contract import Status
from warmer.watch import _STYLES, Board, render

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


SAVINGS = "net +48.9k tokens: warms 15.4k, re-writes avoided 64.4k, not avoided 1.2k"
EXPIRED = "the cache expired before the warm was due; waiting for the next turn"


def text(
    states: dict[str, dict[str, Any]],
    height: int = 40,
    width: int = 200,
    stats: dict[str, dict[str, str]] | None = None,
) -> list[str]:
    """The rendered table as plain lines."""
    console = Console(width=width, height=height, file=io.StringIO(), record=True)
    console.print(render(states, NOW, height, stats=stats))
    return console.export_text().splitlines()


def row_of(lines: list[str], cid: str) -> str:
    return next(line for line in lines if line.split()[:1] == [cid])


def surface(cid: str, *stats: tuple[str, str], **overrides: Any) -> bytes:
    """A surface update whose panel ends with the stat fields ``stats`` (label, value)."""
    fields = [
        {"kind": "toggle", "label": "Enabled", "value": True, "action": {"actionId": "t"}},
        {"kind": "stat", "label": "Status", "value": "idle"},
        *({"kind": "stat", "label": label, "value": value} for label, value in stats),
    ]
    body = {"type": "surface.changed", "conversationId": cid, "state": state(**overrides)}
    return msgspec.json.encode({**body, "spec": {"fields": fields}, "at": NOW})


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
        "c1", "yes", "armed", "5", "5", "s", "98%", "99%", "2", DASH, "provider", "overloaded",
        DASH,
    ]  # fmt: skip


def test_null_figures_show_a_dash() -> None:
    cells = row_of(text({"c1": state(enabled=False, status="disabled")}), "c1").split()
    assert cells == ["c1", "no", "disabled", "240", DASH, DASH, DASH, "0", DASH, DASH, DASH]


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
    shown = row[row.index("provider") :].rstrip().removesuffix(DASH).rstrip()
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
    assert row_of(lines, "e").split()[1:] == [DASH] * 10


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


# -- the cost policy ----------------------------------------------------------------------


def test_every_status_has_a_style_and_expired_is_counted() -> None:
    assert set(_STYLES) == set(Status)
    assert _STYLES[Status.EXPIRED]
    lines = text({"a": state(status="expired"), "b": state(status="armed", nextWarmAt=NOW)})
    assert "1 armed · 1 expired" in lines[0]
    assert row_of(lines, "a").split()[2] == "expired"


def test_a_row_shows_the_net_saved_and_why_it_is_not_warming() -> None:
    stats = {"c1": {"Savings": SAVINGS, "Not warming": EXPIRED, "Cost policy": "adaptive"}}
    row = row_of(text({"c1": state(status="expired")}, stats=stats), "c1")
    cells = row.split()
    assert cells[8] == "+48.9k"
    assert row.rstrip().endswith("   cache expired")


@pytest.mark.parametrize(
    ("sentence", "shown"),
    [
        ("the prefix (500 tokens) is below the 1024 the provider caches", "prefix too small"),
        ("2 warms in a row found the cache gone", "warms kept missing"),
        ("this idle stretch reached the spend cap (100000 tokens)", "spend cap reached"),
        ("a return before the cache expires is too unlikely to pay for a warm", "return unlikely"),
        ("a reason a later worker gives, at some length", "a reason a later worker…"),
    ],
)
def test_why_it_is_not_warming_reads_in_a_few_words(sentence: str, shown: str) -> None:
    row = row_of(text({"c1": state()}, stats={"c1": {"Not warming": sentence}}), "c1")
    assert row.rstrip().endswith("   " + shown)


def test_a_net_loss_shows_with_its_sign() -> None:
    savings = "net -300 tokens: warms 300, re-writes avoided 0, not avoided 0"
    cells = row_of(text({"c1": state()}, stats={"c1": {"Savings": savings}}), "c1").split()
    assert cells[8] == "-300"


def test_the_totals_sum_the_savings_of_the_conversations_shown() -> None:
    other = "net -300 tokens: warms 300, re-writes avoided 0, not avoided 2.0M"
    stats = {"a": {"Savings": SAVINGS}, "b": {"Savings": other}, "gone": {"Savings": SAVINGS}}
    lines = text({"a": state(), "b": state(), "c": state()}, stats=stats)
    assert (
        lines[0]
        .strip()
        .endswith("· tokens: warms 15.7k, re-writes avoided 64.4k, not avoided 2.0M, net +48.6k")
    )


def test_savings_that_do_not_parse_show_as_sent_and_stay_out_of_the_totals() -> None:
    stats = {"a": {"Savings": "a lot"}, "b": {"Not warming": ""}}
    lines = text({"a": state(), "b": state()}, stats=stats)
    assert "tokens:" not in lines[0]
    assert row_of(lines, "a").split()[8:] == ["a", "lot", DASH, DASH]
    assert row_of(lines, "b").split()[8:] == [DASH, DASH, DASH]


def test_without_cost_fields_the_totals_say_nothing_of_tokens() -> None:
    lines = text({"a": state(status="armed", nextWarmAt=NOW + 1000)})
    assert lines[0].strip() == "1 conversation · 1 armed · warms in flight: 0"


def test_the_board_keeps_the_panel_s_extra_stat_fields_by_label() -> None:
    board = Board()
    assert board.apply(surface("c1", ("Not warming", EXPIRED), ("Savings", SAVINGS)))
    assert board.stats["c1"] == {"Not warming": EXPIRED, "Savings": SAVINGS}
    assert board.apply(surface("c1", ("Savings", SAVINGS)))  # the hold is over
    assert board.stats["c1"] == {"Savings": SAVINGS}
    assert board.apply(surface("c1"))
    assert "c1" not in board.stats


def test_the_board_reads_a_surface_whatever_its_panel() -> None:
    board = Board()
    body = {"type": "surface.changed", "conversationId": "c1", "state": state()}
    for spec in (None, "odd", {"fields": "odd"}, {"fields": [1, {"kind": "stat"}]}):
        assert board.apply(msgspec.json.encode({**body, "spec": spec}))
        assert board.stats == {}
    assert board.apply(msgspec.json.encode(body))  # no spec at all
    assert board.states["c1"]["status"] == "idle"


def test_the_board_drops_the_fields_of_the_conversations_it_drops() -> None:
    board = Board(limit=1)
    board.apply(surface("a", ("Savings", SAVINGS)))
    board.apply(surface("b"))
    assert list(board.states) == ["b"]
    assert board.stats == {}
