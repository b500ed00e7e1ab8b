"""The global knobs of the rules, read once at the edge (``WARMER_*`` settings)."""

from __future__ import annotations

from typing import Final

from msgspec import Struct

from warmer.config import Config
from warmer.contract import CostPolicyName

# Every default lives in the config; the policy takes its defaults from there.
_DEFAULTS: Final = Config()

HOUR_MS: Final = 3_600_000
"""A cache lifetime at least this long is priced as the 1-hour cache."""


class Prices(Struct, frozen=True, kw_only=True, gc=False):
    """Token prices relative to the base input price (1.0); Anthropic's by default."""

    read: float = _DEFAULTS.price_read
    write_5m: float = _DEFAULTS.price_write_5m
    write_1h: float = _DEFAULTS.price_write_1h
    output: float = _DEFAULTS.price_output

    def write(self, ttl_ms: int | None) -> float:
        """The price of a cache write that lives ``ttl_ms`` (the 5-minute one when unknown)."""
        return self.write_1h if ttl_ms is not None and ttl_ms >= HOUR_MS else self.write_5m


class Policy(Struct, frozen=True, kw_only=True):
    """The global knobs of the rules (``WARMER_*`` settings)."""

    warm_timeout_ms: int = _DEFAULTS.warm_timeout_ms
    max_failures: int = _DEFAULTS.max_failures
    idle_max_ms: int = _DEFAULTS.idle_max_ms
    idle_max_warms: int = _DEFAULTS.idle_max_warms
    cache_ttl_ms: int = _DEFAULTS.cache_ttl_ms
    """How long the provider keeps a cache after its last read, when a conversation does
    not say (recovery, and the adaptive policy's arithmetic)."""
    recovery_spread_ms: int = 5_000
    """The window over which recovery spreads the warms that fell due while down."""
    retention_ms: int = _DEFAULTS.retention_ms
    """A conversation without input for longer than this is forgotten (``prune``)."""
    cost_policy: CostPolicyName = _DEFAULTS.cost_policy
    """The deployment's cost policy; a conversation may override it."""
    ttl_margin_ms: int = _DEFAULTS.ttl_margin_ms
    """With a known cache lifetime, a warm is due this long before the cache expires."""
    min_prefix_tokens: int = _DEFAULTS.min_prefix_tokens
    """A known prefix below this is not cached by the provider: it is not warmed."""
    max_misses: int = _DEFAULTS.max_misses
    """Consecutive warms that found the cache gone before warming pauses."""
    spend_cap_tokens: int = _DEFAULTS.spend_cap_tokens
    """The budget policy's cap on warm cost per idle stretch (base-input-token units)."""
    prices: Prices = Prices()

    @classmethod
    def of(cls, config: Config) -> Policy:
        """The policy a config sets."""
        return cls(
            warm_timeout_ms=config.warm_timeout_ms,
            max_failures=config.max_failures,
            idle_max_ms=config.idle_max_ms,
            idle_max_warms=config.idle_max_warms,
            cache_ttl_ms=config.cache_ttl_ms,
            retention_ms=config.retention_ms,
            cost_policy=config.cost_policy,
            ttl_margin_ms=config.ttl_margin_ms,
            min_prefix_tokens=config.min_prefix_tokens,
            max_misses=config.max_misses,
            spend_cap_tokens=config.spend_cap_tokens,
            prices=Prices(
                read=config.price_read,
                write_5m=config.price_write_5m,
                write_1h=config.price_write_1h,
                output=config.price_output,
            ),
        )
