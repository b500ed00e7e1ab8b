"""The global knobs of the rules: the core's defaults, set from the ``WARMER_*`` settings
by the edge (``warmer.config.Config.policy``), which hands the result down."""

from __future__ import annotations

from typing import Final

from msgspec import Struct

from warmer.contract import CostPolicyName

HOUR_MS: Final = 3_600_000
"""A cache lifetime at least this long is priced as the 1-hour cache."""


class Prices(Struct, frozen=True, kw_only=True, gc=False):
    """Token prices relative to the base input price (1.0); Anthropic's by default."""

    read: float = 0.1
    write_5m: float = 1.25
    write_1h: float = 2.0
    output: float = 5.0

    def write(self, ttl_ms: int | None) -> float:
        """The price of a cache write that lives ``ttl_ms`` (the 5-minute one when unknown)."""
        return self.write_1h if ttl_ms is not None and ttl_ms >= HOUR_MS else self.write_5m


class Policy(Struct, frozen=True, kw_only=True):
    """The global knobs of the rules; the defaults are the ``WARMER_*`` settings' defaults."""

    warm_timeout_ms: int = 60_000
    max_failures: int = 3
    idle_max_ms: int = 2_700_000
    idle_max_warms: int = 10
    cache_ttl_ms: int = 300_000
    """How long the provider keeps a cache after its last read, when a conversation does
    not say (recovery, and the adaptive policy's arithmetic)."""
    recovery_spread_ms: int = 5_000
    """The window over which recovery spreads the warms that fell due while down."""
    retention_ms: int = 7 * 24 * HOUR_MS
    """A conversation without input for longer than this is forgotten (``prune``)."""
    cost_policy: CostPolicyName = "fixed"
    """The deployment's cost policy; a conversation may override it."""
    ttl_margin_ms: int = 60_000
    """With a known cache lifetime, a warm is due this long before the cache expires."""
    min_prefix_tokens: int = 1024
    """A known prefix below this is not cached by the provider: it is not warmed."""
    max_misses: int = 2
    """Consecutive warms that found the cache gone before warming pauses."""
    spend_cap_tokens: int = 100_000
    """The budget policy's cap on warm cost per idle stretch (base-input-token units)."""
    prices: Prices = Prices()
