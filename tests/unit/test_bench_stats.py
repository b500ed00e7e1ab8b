"""The benchmarks' pure helpers: percentiles, falling behind, the capacity search's K."""

from __future__ import annotations

import math

import pytest

from bench.stats import Window, behind, first_k, next_k, percentile, search_next


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unordered on purpose
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([1.0, 2.0], 0.5) == 1.0


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile([1.0], 0.0)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_a_window_kept_up_only_when_every_bound_holds() -> None:
    assert behind(Window(requested=1000, completed=1000, failed=0, late_p99_ms=250)) is None
    assert behind(Window(1000, 950, 10, 100.0)) is None
    late = behind(Window(1000, 1000, 0, 251.0))
    assert late is not None and "p99 lateness" in late
    short = behind(Window(1000, 949, 0, 100.0))
    assert short is not None and "completed" in short
    failing = behind(Window(1000, 1000, 11, 100.0))
    assert failing is not None and "failed" in failing
    assert behind(Window(0, 0, 0, math.nan)) == "no warms"
    assert behind(Window(10, 10, 0, math.nan)) == "no warms"


def test_next_k_always_grows() -> None:
    assert next_k(500, 1.25) == 625
    assert next_k(1, 1.25) == 2
    with pytest.raises(ValueError):
        next_k(10, 1.0)


def test_search_goes_up_until_the_first_k_that_falls_behind() -> None:
    assert search_next([(500, True)], 1.25, 10_000) == 625
    assert search_next([(500, True), (625, True)], 1.25, 10_000) == 782
    assert search_next([(500, True), (625, False)], 1.25, 10_000) is None
    assert search_next([(8_000, True)], 1.25, 9_000) == 9_000
    assert search_next([(8_000, True), (9_000, True)], 1.25, 9_000) is None


def test_search_comes_down_while_every_k_fell_behind_then_stops() -> None:
    assert search_next([(1000, False)], 1.25, 10_000) == 800
    assert search_next([(1000, False), (800, True)], 1.25, 10_000) is None
    history = [(1000, False), (800, False), (640, False)]
    assert search_next(history, 1.25, 10_000, down_steps=3) == 512
    assert search_next([*history, (512, False)], 1.25, 10_000, down_steps=3) is None
    assert search_next([(1, False)], 1.25, 10_000) is None
    with pytest.raises(ValueError):
        search_next([], 1.25, 10_000)


def test_a_later_run_starts_at_the_previous_runs_best_k() -> None:
    assert first_k(None, 500, 1.25) == 500
    assert first_k([], 500, 1.25) == 500
    assert first_k([(500, True), (625, True), (782, False)], 500, 1.25) == 625
    assert first_k([(1000, False), (800, False)], 500, 1.25) == 640
