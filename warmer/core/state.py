"""Per-conversation settings and runtime state, and the status derived from them."""

from __future__ import annotations

import enum
from typing import Final

from msgspec import Struct

from warmer.contract import StateView, Status
from warmer.core.rules import DEFAULT_INTERVAL_MS, parse_stored_interval


class Settings(Struct, frozen=True, gc=False):
    """What is persisted per conversation: warming is opt-in."""

    enabled: bool = False
    interval_ms: int = DEFAULT_INTERVAL_MS


DEFAULT_SETTINGS: Final = Settings()


def parse_settings(raw: object) -> Settings:
    """Stored settings as the rules read them: whatever is malformed reads as its default."""
    if not isinstance(raw, dict):
        return DEFAULT_SETTINGS
    enabled = raw.get("enabled")
    return Settings(
        enabled=enabled if isinstance(enabled, bool) else False,
        interval_ms=parse_stored_interval(raw.get("intervalMs")),
    )


class Phase(enum.Enum):
    """Where an enabled, idle conversation's schedule stands; its value is the status."""

    IDLE = "idle"
    ARMED = "armed"
    WARMING = "warming"
    RETRYING = "retrying"
    PAUSED = "paused"
    BUDGET_EXHAUSTED = "budget_exhausted"

    @property
    def pending(self) -> bool:
        """True when a timer (regular warm, retry or warm timeout) is pending."""
        return self in _PENDING


_PENDING: Final = frozenset({Phase.ARMED, Phase.WARMING, Phase.RETRYING})
# Enum's ``.value`` is a slow descriptor; status is read on every applied input.
_STATUS: Final[dict[Phase, Status]] = {
    Phase.IDLE: "idle",
    Phase.ARMED: "armed",
    Phase.WARMING: "warming",
    Phase.RETRYING: "retrying",
    Phase.PAUSED: "paused",
    Phase.BUDGET_EXHAUSTED: "budget_exhausted",
}


class Conversation(Struct, kw_only=True):
    """One conversation's runtime state, settings merged in, and its last turn's context."""

    enabled: bool
    interval_ms: int
    idle_since: int
    active: bool = False
    phase: Phase = Phase.IDLE
    token: int = 0
    next_warm_at: int | None = None
    failures: int = 0
    last_pct: int | None = None
    last_expected_pct: int | None = None
    last_warm_at: int | None = None
    last_error: str | None = None
    cwd: str | None = None
    model_name: str | None = None
    last_seq: int | None = None
    idle_warms: int = 0
    published_at: int = 0
    timeout_ms: int = 0

    @property
    def status(self) -> Status:
        """The status of SEMANTICS.md: disabled, then active, then the schedule's phase."""
        if not self.enabled:
            return "disabled"
        if self.active:
            return "active"
        return _STATUS[self.phase]

    def view(self) -> StateView:
        """The state as dashboards see it."""
        return StateView(
            enabled=self.enabled,
            interval_ms=self.interval_ms,
            active=self.active,
            status=self.status,
            last_pct=self.last_pct,
            last_expected_pct=self.last_expected_pct,
            last_warm_at=self.last_warm_at,
            next_warm_at=self.next_warm_at,
            last_error=self.last_error,
            failures=self.failures,
        )
