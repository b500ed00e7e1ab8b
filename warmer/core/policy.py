"""The global knobs of the rules, read once at the edge (``WARMER_*`` settings)."""

from __future__ import annotations

from typing import Final

from msgspec import Struct

from warmer.config import Config

# Every default lives in the config; the policy takes its defaults from there.
_DEFAULTS: Final = Config()


class Policy(Struct, frozen=True, kw_only=True):
    """The global knobs of the rules (``WARMER_*`` settings)."""

    warm_timeout_ms: int = _DEFAULTS.warm_timeout_ms
    max_failures: int = _DEFAULTS.max_failures
    idle_max_ms: int = _DEFAULTS.idle_max_ms
    idle_max_warms: int = _DEFAULTS.idle_max_warms
    cache_ttl_ms: int = _DEFAULTS.cache_ttl_ms
    """How long the provider keeps a cache after its last read (recovery)."""
    recovery_spread_ms: int = 5_000
    """The window over which recovery spreads the warms that fell due while down."""
    retention_ms: int = _DEFAULTS.retention_ms
    """A conversation without input for longer than this is forgotten (``prune``)."""

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
        )
