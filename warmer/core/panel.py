"""The panel (``spec``) of docs/contract.md, built from a conversation's state."""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from warmer.contract import (
    ActionRef,
    CustomField,
    NumberField,
    Panel,
    PanelField,
    StateView,
    StatField,
    TimerPayload,
    ToggleField,
)
from warmer.core.rules import interval_seconds

PANEL_ID: Final = "cache-warming"
TOGGLE_ACTION: Final = "cache-warming/toggle"
SET_INTERVAL_ACTION: Final = "cache-warming/set-interval"
_REGION: Final = "side"
_TITLE: Final = "Cache Warming"
_NONE: Final = "\u2014"
_TOGGLE: Final = ActionRef(TOGGLE_ACTION)
_SET_INTERVAL: Final = ActionRef(SET_INTERVAL_ACTION)

DEFAULT_PANEL: Final = Panel(
    id=PANEL_ID,
    region=_REGION,
    title=_TITLE,
    fields=[StatField(label="Status", value="No conversation focused")],
)


# Every field but the timer takes few values, and the structs are frozen: build each
# once and share it. Building the panel is on the path of every applied input.
_ENABLED: Final = {
    value: ToggleField(label="Enabled", value=value, action=_TOGGLE) for value in (False, True)
}


@lru_cache(maxsize=1024)
def _interval(interval_ms: int) -> NumberField:
    return NumberField(
        label="Refresh Interval",
        value=interval_seconds(interval_ms),
        min=1,
        step=1,
        unit="s",
        action=_SET_INTERVAL,
    )


@lru_cache(maxsize=512)
def _stat(label: str, value: str) -> StatField:
    return StatField(label=label, value=value)


def _pct(value: int | None) -> str:
    return _NONE if value is None else f"{value}%"


def build_panel(state: StateView, extra: list[StatField] | None = None) -> Panel:
    """The panel for one conversation: the five contract fields, Status, Last error, ``extra``.

    ``extra``: the cost fields (``warmer.core.economy``), appended last.
    """
    fields: list[PanelField] = [
        _ENABLED[state.enabled],
        _interval(state.interval_ms),
        _stat("Last Cache %", _pct(state.last_pct)),
        _stat("Cache retention", _pct(state.last_expected_pct)),
        CustomField(
            renderer_id="cache-warming-timer",
            payload=TimerPayload(next_warm_at=state.next_warm_at, last_warm_at=state.last_warm_at),
        ),
        _stat("Status", state.status),
    ]
    if state.last_error is not None:
        fields.append(StatField(label="Last error", value=state.last_error))
    if extra:
        fields.extend(extra)
    return Panel(id=PANEL_ID, region=_REGION, title=_TITLE, fields=fields)


STATE_LABELS: Final = frozenset({"Status", "Last error", "Last Cache %", "Cache retention"})
"""Stat fields that only repeat the state (a state view shows them in its own way)."""


def extra_stats(spec: object) -> dict[str, str]:
    """The stat fields of a panel as a dashboard received it (JSON), by label, but those that
    repeat the state: what ``warmer state`` and ``warmer watch`` add (the cost fields).

    Anything malformed is left out: the panel comes off the wire.
    """
    fields = spec.get("fields") if isinstance(spec, dict) else None
    if not isinstance(fields, list):
        return {}
    return {
        field["label"]: field["value"]
        for field in fields
        if isinstance(field, dict)
        and field.get("kind") == "stat"
        and isinstance(field.get("label"), str)
        and isinstance(field.get("value"), str)
        and field["label"] not in STATE_LABELS
    }
