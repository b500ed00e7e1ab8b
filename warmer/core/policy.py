"""The global knobs of the rules, read once at the edge (``WARMER_*`` settings)."""

from __future__ import annotations

from msgspec import Struct


class Policy(Struct, frozen=True, kw_only=True):
    """The global knobs of the rules (``WARMER_*`` settings)."""

    warm_timeout_ms: int = 60_000
    max_failures: int = 3
    idle_max_ms: int = 2_700_000
    idle_max_warms: int = 10
    cache_ttl_ms: int = 300_000
    """How long the provider keeps a cache after its last read (recovery)."""
    recovery_spread_ms: int = 5_000
    """The window over which recovery spreads the warms that fell due while down."""
    retention_ms: int = 7 * 24 * 3600 * 1000
    """A conversation without input for longer than this is forgotten (``prune``)."""
