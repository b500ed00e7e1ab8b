"""Per-conversation settings and runtime state, and the status derived from them."""

from __future__ import annotations

import enum
from typing import Annotated, Final

from msgspec import Meta, Struct

from warmer.contract import (
    MAX_ERROR_CHARS,
    MAX_SAFE_INTEGER,
    CostPolicyName,
    Count,
    Cwd,
    ModelName,
    StateView,
    Status,
)
from warmer.core.rules import (
    DEFAULT_INTERVAL_MS,
    MAX_INTERVAL_MS,
    MIN_INTERVAL_MS,
    parse_stored_interval,
)

# The constraints only act when a record is decoded (``warmer.core.records``); the core
# never builds a value outside them. ``array_like``: a record is encoded as arrays, not
# maps (no field names on disk); a field is only ever added at the end, with a default.
Interval = Annotated[int, Meta(ge=MIN_INTERVAL_MS, le=MAX_INTERVAL_MS)]
Pct = Annotated[int, Meta(ge=0, le=100)]
LastError = Annotated[str, Meta(max_length=MAX_ERROR_CHARS)]
Money = Annotated[int, Meta(ge=0, le=MAX_SAFE_INTEGER)]
"""Base-input-token units (``warmer.core.costs``), rounded to whole tokens: a record stays
small, and a warm's rounding is well under one token."""


class Settings(Struct, frozen=True, gc=False, array_like=True):
    """What is persisted per conversation: warming is opt-in."""

    enabled: bool = False
    interval_ms: Interval = DEFAULT_INTERVAL_MS
    policy: CostPolicyName | None = None
    """The conversation's own cost policy; None: the deployment's."""


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


class Hold(enum.StrEnum):
    """Why the cost rules keep a conversation from being warmed ("" when they do not)."""

    NONE = ""
    EXPIRED = "expired"
    """The cache expired before the warm could reach it."""
    SMALL_PREFIX = "small_prefix"
    """The prefix is below the provider's minimum cacheable size."""
    MISSES = "misses"
    """Warms kept finding the cache gone (a write and no read)."""
    SPEND_CAP = "spend_cap"
    """The budget policy's spend cap for this idle stretch is reached."""
    RETURN_UNLIKELY = "return_unlikely"
    """The adaptive policy: the user is unlikely to come back before the next expiry."""


class Return(enum.StrEnum):
    """How a turn found the cache it came back to, as far as the worker knows."""

    ALIVE = "alive"
    """Within the lifetime of the last turn's read: no warm was needed."""
    KEPT = "kept"
    """Past that lifetime, but a warm kept the cache alive."""
    LOST = "lost"
    """The cache had expired."""


class Conversation(Struct, kw_only=True, gc=False, array_like=True):
    """One conversation's runtime state, settings merged in, and its last turn's context.

    Every field is an immutable value, so a shallow copy is a full snapshot (batches),
    and no field can make a reference cycle (``gc=False``: a million of these cost the
    garbage collector nothing).
    """

    enabled: bool
    interval_ms: Interval
    idle_since: int
    active: bool = False
    phase: Status = Status.IDLE
    token: Count = 0
    next_warm_at: int | None = None
    failures: Count = 0
    last_pct: Pct | None = None
    last_expected_pct: Pct | None = None
    last_warm_at: int | None = None
    last_error: LastError | None = None
    cwd: Cwd | None = None
    model_name: ModelName | None = None
    last_seq: Count | None = None
    idle_warms: Count = 0
    published_at: int = 0
    timeout_ms: Count = 0
    answered_token: Count = 0
    """The token of the last completion applied as current: a duplicate of it is stale."""
    last_read_at: int | None = None
    """When the provider last read the cache, as far as the worker knows (recovery)."""
    last_input_at: int = 0
    """When an input was last applied (retention); 0 when unknown (an older record)."""
    policy: CostPolicyName | None = None
    """The conversation's own cost policy (merged from its settings); None: the deployment's."""
    cache_ttl_ms: Count | None = None
    """The cache lifetime the provider granted, when a turn or a warm said so."""
    prefix_tokens: Count | None = None
    """The cached prefix's size, when a turn or a warm said so."""
    settled_at: int | None = None
    """When the open idle gap began (its ``turn.settled``); None while no gap is open."""
    settled_read_at: int | None = None
    """The provider's last read at that settle: the cache's expiry without warms."""
    returned: Return | None = None
    """How the turn under way found the cache (set at ``turn.started``, used at the settle)."""
    misses: Count = 0
    """Consecutive warms that found the cache gone."""
    hold: Hold = Hold.NONE
    """Why the cost rules stopped warming; cleared at the next arm."""
    stretch_cost: Money = 0
    """What this idle stretch's warms cost (base-input-token units)."""
    last_warm_cost: Money | None = None
    """What the last warm that reported its usage cost."""
    spent: Money = 0
    """Every warm's cost, in total."""
    avoided: Money = 0
    """Re-writes avoided: turns that read a cache a warm kept alive."""
    missed: Money = 0
    """Re-writes not avoided: turns that came back to an expired cache."""
    noted_interval_ms: Count = 0
    """The effective interval last reported as overriding the configured one."""

    @property
    def status(self) -> Status:
        """The status of docs/semantics.md: disabled, then active, then the schedule's phase."""
        if not self.enabled:
            return Status.DISABLED
        if self.active:
            return Status.ACTIVE
        return self.phase

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


def settings_of(conv: Conversation) -> Settings:
    """The settings merged into ``conv``: its persisted settings, unless the core keeps
    others for it (``Warmer.persisted``). Every change of settings is merged into the
    state it has, and a state is created from the persisted settings, so the core keeps
    settings apart only where a stored record said something else: at a million
    conversations that is a dict entry (about 40 bytes) each saved."""
    return Settings(conv.enabled, conv.interval_ms, conv.policy)


class Record(Struct, frozen=True, kw_only=True, gc=False, array_like=True):
    """What the store keeps per conversation: its settings and, once it has one, its state.

    A record without state is a conversation with persisted settings only (left by an
    older store); ``Warmer.recover`` gives it a state.
    """

    settings: Settings
    state: Conversation | None = None
