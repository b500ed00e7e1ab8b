"""The panel (``spec``) of CONTRACT.md, built from a conversation's state."""

from __future__ import annotations

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


def _pct(value: int | None) -> str:
    return _NONE if value is None else f"{value}%"


def build_panel(state: StateView) -> Panel:
    """The panel for one conversation: the five contract fields, then Status, then Last error."""
    fields: list[PanelField] = [
        ToggleField(label="Enabled", value=state.enabled, action=_TOGGLE),
        NumberField(
            label="Refresh Interval",
            value=interval_seconds(state.interval_ms),
            min=1,
            step=1,
            unit="s",
            action=_SET_INTERVAL,
        ),
        StatField(label="Last Cache %", value=_pct(state.last_pct)),
        StatField(label="Cache retention", value=_pct(state.last_expected_pct)),
        CustomField(
            renderer_id="cache-warming-timer",
            payload=TimerPayload(next_warm_at=state.next_warm_at, last_warm_at=state.last_warm_at),
        ),
        StatField(label="Status", value=state.status),
    ]
    if state.last_error is not None:
        fields.append(StatField(label="Last error", value=state.last_error))
    return Panel(id=PANEL_ID, region=_REGION, title=_TITLE, fields=fields)
