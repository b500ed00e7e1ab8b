"""Pure helpers of the broker benchmarks: percentiles, when a worker falls behind, the next
K of a capacity search. No broker, no process: unit-tested in tests/unit/test_bench_stats.py.
It has no ``run()``: ``python -m bench`` skips it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, NamedTuple

LATE_P99_LIMIT_MS: Final = 250.0
"""A window whose warms' p99 lateness exceeds this fell behind (the issue's target)."""
COMPLETED_SHARE: Final = 0.95
"""... or whose completions applied were fewer than this share of the warms requested ..."""
FAILED_SHARE: Final = 0.01
"""... or whose failed warms (any cause) were more than this share of the warms requested."""


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``; NaN when there are none.

    Nearest rank: the smallest value with at least ``q`` of the values at or below it, so
    a p99 of 100 values is the 99th smallest, and the p100 (max) is the largest.
    """
    if not values:
        return math.nan
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Window(NamedTuple):
    """What one measured window of a warm-rate case saw."""

    requested: float
    """Warms requested in the window (the worker's counter)."""
    completed: float
    """Completions applied in the window (the worker's counter)."""
    failed: float
    """Warms failed in the window, any cause (the worker's counter)."""
    late_p99_ms: float
    """p99 lateness of the warms the orchestrator received in the window."""


def behind(window: Window) -> str | None:
    """Why the worker fell behind in ``window``, or None if it kept up.

    Falls behind = p99 lateness above ``LATE_P99_LIMIT_MS``, or completions under
    ``COMPLETED_SHARE`` of requests, or failures over ``FAILED_SHARE`` of requests, or no
    warm at all (nothing measured is not keeping up).
    """
    if window.requested <= 0 or math.isnan(window.late_p99_ms):
        return "no warms"
    if window.late_p99_ms > LATE_P99_LIMIT_MS:
        return f"p99 lateness {window.late_p99_ms:.0f} ms > {LATE_P99_LIMIT_MS:.0f}"
    if window.completed < COMPLETED_SHARE * window.requested:
        return f"completed {window.completed:.0f} < {COMPLETED_SHARE:.0%} of {window.requested:.0f}"
    if window.failed > FAILED_SHARE * window.requested:
        return f"failed {window.failed:.0f} > {FAILED_SHARE:.0%} of {window.requested:.0f}"
    return None


def next_k(k: int, step: float) -> int:
    """The next K of a search that multiplies by ``step`` (> 1): at least one more."""
    if step <= 1:
        raise ValueError(f"step must be > 1, got {step}")
    return max(k + 1, math.ceil(k * step))


def search_next(
    history: Sequence[tuple[int, bool]], step: float, max_k: int, down_steps: int = 3
) -> int | None:
    """The next K of a capacity search, or None when it is over, from the ``(K, kept up)``
    of its windows so far: up by ``step`` while every K kept up (at most ``max_k``); down
    by ``step`` while every K fell behind (at most ``down_steps`` times); over at the first
    K that falls behind after one that kept up, or the first that keeps up after coming
    down, or at ``max_k``."""
    if not history:
        raise ValueError("no window measured yet")
    k, kept = history[-1]
    any_kept = any(ok for _, ok in history)
    if kept:
        if not all(ok for _, ok in history) or k >= max_k:
            return None
        return min(max_k, next_k(k, step))
    if any_kept or len(history) > down_steps or k <= 1:
        return None
    return max(1, math.floor(k / step))


def first_k(previous: Sequence[tuple[int, bool]] | None, start: int, step: float) -> int:
    """Where a run's search starts: ``start`` for the first run; for the next ones, the
    highest K the previous run kept up at (so it measures about two windows: that K and
    the next), or one step below its lowest if it kept up at none."""
    if not previous:
        return start
    kept = [k for k, ok in previous if ok]
    if kept:
        return max(kept)
    return max(1, math.floor(min(k for k, _ in previous) / step))
