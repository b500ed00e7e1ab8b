"""The pure rules of docs/semantics.md: rounding, clamping, conversions, parsing, texts, tokens."""

from __future__ import annotations

import math

import pytest

from warmer.core import Settings, parse_settings
from warmer.core.rules import (
    DEFAULT_INTERVAL_MS,
    MAX_INTERVAL_MS,
    MIN_INTERVAL_MS,
    NO_CONSUMER,
    cache_pct,
    clamp_interval,
    cut_error,
    effective_request_start,
    expected_pct,
    interval_seconds,
    parse_stored_interval,
    round_half_up,
    seconds_to_interval,
    timeout_error,
    token_start,
)

NOW = 1_760_000_000_000


def test_the_defaults_and_bounds_of_an_interval() -> None:
    assert (DEFAULT_INTERVAL_MS, MIN_INTERVAL_MS, MAX_INTERVAL_MS) == (240_000, 1_000, 86_400_000)
    assert Settings() == Settings(enabled=False, interval_ms=240_000)


# -- rounding: half up, as JavaScript's Math.round ---------------------------------------


@pytest.mark.parametrize(
    ("x", "rounded"),
    [
        (0.5, 1),
        (1.5, 2),
        (2.5, 3),
        (3.5, 4),
        (14.5, 15),
        (0.49999999999999994, 0),
        (14.499999999999998, 14),
        (0.0, 0),
        (1.4, 1),
        (1.6, 2),
        (99.5, 100),
        (-0.5, 0),
        (-1.5, -1),
        (-2.5, -2),
        (-2.6, -3),
        (7, 7),
    ],
)
def test_round_half_up_is_javascript_math_round(x: float, rounded: int) -> None:
    assert round_half_up(x) == rounded
    assert isinstance(round_half_up(x), int)


def test_round_half_up_differs_from_python_round_on_even_halves() -> None:
    assert (round(0.5), round(2.5)) == (0, 2)
    assert (round_half_up(0.5), round_half_up(2.5)) == (1, 3)


# -- percentages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_tokens", "read", "pct"),
    [
        (1000, 800, 80),
        (1000, 1200, 100),
        (1000, -100, 0),
        (1000, 333, 33),
        (0, 500, 0),
        (200, 29, 14),
        (1000, 5, 1),
        (-5, 5, 0),
        (1000, 0, 0),
        (1000, 1000, 100),
        (1000, 995, 100),
        (1000, 994, 99),
        (200, 1, 1),
    ],
)
def test_last_pct_examples(input_tokens: int, read: int, pct: int) -> None:
    assert cache_pct(input_tokens, read) == pct


def test_last_pct_rounds_the_double_computed_in_the_written_order() -> None:
    # 29 / 200 * 100 is 14.499999999999998, not 14.5: half up of the double gives 14.
    assert 29 / 200 * 100 == 14.499999999999998
    assert cache_pct(200, 29) == 14


@pytest.mark.parametrize(
    ("read", "write", "pct"),
    [
        (333, 667, 33),
        (0, 0, 0),
        (0, 1000, 0),
        (1000, 0, 100),
        (1, 1, 50),
        (1, 199, 1),  # 0.5 -> 1
        (5, 995, 1),
        (29, 171, 14),  # 29 / 200 * 100 again
        (-10, 5, 0),  # read + write <= 0
    ],
)
def test_cache_retention_examples(read: int, write: int, pct: int) -> None:
    assert expected_pct(read, write) == pct


# -- clamping an interval ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "ms"),
    [
        (0, 1000),
        (-5, 1000),
        (500, 1000),
        (-0.0, 1000),
        (-1e300, 1000),
        (0.1, 1000),
        (999.4, 1000),
        (1000, 1000),
        (1000.4, 1000),
        (1000.5, 1001),
        (1500.5, 1501),
        (2500.5, 2501),
        (240_000, 240_000),
        (86_399_999, 86_399_999),
        (86_399_999.4, 86_399_999),
        (86_399_999.5, 86_400_000),
        (86_400_000, 86_400_000),
        (86_400_001, 86_400_000),
        (86_400_000.7, 86_400_000),
        (10**30, 86_400_000),
        (2**64, 86_400_000),
        (1e300, 86_400_000),
        (math.inf, 86_400_000),
        (-(10**30), 1000),
    ],
)
def test_clamp_interval(x: float, ms: int) -> None:
    assert clamp_interval(x) == ms
    assert isinstance(clamp_interval(x), int)


# -- seconds from a dashboard -------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "ms"),
    [
        (1, 1000),
        (30, 30_000),
        (240, 240_000),
        (1.5, 1500),
        (0.0005, 1000),  # round(0.5) = 1 ms, clamped up to 1000
        (0.001, 1000),
        (0.5, 1000),
        (2.0004, 2000),
        (1.0005, 1001),  # 1.0005 * 1000 is exactly 1000.5 as a double: half up
        (2.0005, 2001),  # 2.0005 * 1000 is 2000.5000000000002
        (86_400, 86_400_000),
        (86_401, 86_400_000),
        (1e300, 86_400_000),
        (10**30, 86_400_000),
    ],
)
def test_seconds_to_interval_for_a_positive_number(seconds: float, ms: int) -> None:
    assert seconds_to_interval(seconds) == clamp_interval(round_half_up(seconds * 1000))
    assert seconds_to_interval(seconds) == ms


@pytest.mark.parametrize(
    "seconds",
    ["30", "1.5", True, False, None, {}, {"value": 30}, [], [30], 0, 0.0, -0.0, -1, -0.5, math.nan],
)
def test_seconds_to_interval_refuses_anything_but_a_number_above_zero(seconds: object) -> None:
    assert seconds_to_interval(seconds) is None


@pytest.mark.parametrize(
    ("ms", "seconds"),
    [
        (1000, 1),
        (1499, 1),
        (1500, 2),
        (2500, 3),  # half up, not to even
        (2499, 2),
        (240_000, 240),
        (86_400_000, 86_400),
        (999, 1),
        (500, 1),
        (499, 0),
    ],
)
def test_milliseconds_shown_as_seconds_round_half_up(ms: int, seconds: int) -> None:
    assert interval_seconds(ms) == seconds


# -- persisted settings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "settings"),
    [
        (None, Settings(False, 240_000)),
        ({}, Settings(False, 240_000)),
        ([], Settings(False, 240_000)),
        ("garbage", Settings(False, 240_000)),
        (42, Settings(False, 240_000)),
        ([True, 5000], Settings(False, 240_000)),
        ({"enabled": True, "intervalMs": 5000}, Settings(True, 5000)),
        ({"enabled": False, "intervalMs": 5000}, Settings(False, 5000)),
        ({"enabled": True}, Settings(True, 240_000)),
        ({"intervalMs": 5000}, Settings(False, 5000)),
        ({"enabled": "true", "intervalMs": 5000}, Settings(False, 5000)),
        ({"enabled": 1, "intervalMs": 5000}, Settings(False, 5000)),
        ({"enabled": None}, Settings(False, 240_000)),
        ({"enabled": [True]}, Settings(False, 240_000)),
        ({"enabled": True, "intervalMs": 500}, Settings(True, 1000)),
        ({"enabled": True, "intervalMs": 0}, Settings(True, 1000)),
        ({"enabled": True, "intervalMs": -5}, Settings(True, 1000)),
        ({"enabled": True, "intervalMs": 1e12}, Settings(True, 86_400_000)),
        ({"enabled": True, "intervalMs": 10**30}, Settings(True, 86_400_000)),
        ({"enabled": True, "intervalMs": 1500.5}, Settings(True, 1501)),
        ({"enabled": True, "intervalMs": True}, Settings(True, 240_000)),
        ({"enabled": True, "intervalMs": False}, Settings(True, 240_000)),
        ({"enabled": True, "intervalMs": math.inf}, Settings(True, 240_000)),
        ({"enabled": True, "intervalMs": -math.inf}, Settings(True, 240_000)),
        ({"enabled": True, "intervalMs": math.nan}, Settings(True, 240_000)),
        ({"enabled": True, "intervalMs": "5000"}, Settings(True, 240_000)),
        ({"enabled": True, "intervalMs": None}, Settings(True, 240_000)),
        ({"enabled": True, "intervalMs": {}}, Settings(True, 240_000)),
        ({"enabled": True, "intervalMs": 5000, "extra": 1}, Settings(True, 5000)),
    ],
)
def test_stored_settings_parse_to_the_defaults_where_malformed(
    raw: object, settings: Settings
) -> None:
    assert parse_settings(raw) == settings


@pytest.mark.parametrize(
    ("raw", "ms"),
    [
        (5000, 5000),
        (5000.4, 5000),
        (0, 1000),
        (True, 240_000),
        (math.inf, 240_000),
        (math.nan, 240_000),
        ("5000", 240_000),
        (None, 240_000),
        ([5000], 240_000),
    ],
)
def test_stored_interval(raw: object, ms: int) -> None:
    assert parse_stored_interval(raw) == ms


# -- texts ------------------------------------------------------------------------------------


def test_last_error_is_cut_to_500_characters() -> None:
    assert cut_error("x" * 499) == "x" * 499
    assert cut_error("x" * 500) == "x" * 500
    assert cut_error("x" * 501) == "x" * 500
    assert cut_error("é" * 10_000) == "é" * 500  # characters, not bytes
    assert cut_error("no history") == "no history"


def test_unroutable_text() -> None:
    assert NO_CONSUMER == "no consumer took the warm request"


@pytest.mark.parametrize(
    ("timeout_ms", "text"),
    [
        (60_000, "no completion within 60 s"),
        (1_000, "no completion within 1 s"),
        (1_499, "no completion within 1 s"),
        (1_500, "no completion within 2 s"),
        (2_500, "no completion within 3 s"),
        (59_999, "no completion within 60 s"),
    ],
)
def test_timeout_text_rounds_seconds_half_up(timeout_ms: int, text: str) -> None:
    assert timeout_error(timeout_ms) == text


# -- lastRequestAt and clock skew -------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_request_at", "start"),
    [
        (None, None),
        (NOW - 90_000, NOW - 90_000),
        (NOW, NOW),
        (NOW + 1, NOW),  # up to 2 s ahead counts as now
        (NOW + 2_000, NOW),
        (NOW + 2_001, None),  # further ahead is ignored
        (NOW + 3_600_000, None),
        (0, 0),
    ],
)
def test_last_request_at_skew(last_request_at: int | None, start: int | None) -> None:
    assert effective_request_start(last_request_at, NOW) == start


# -- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("highest", "now", "start"),
    [
        (0, NOW, NOW * 1000),
        (NOW * 1000 + 5, NOW, NOW * 1000 + 5),
        (NOW * 1000 - 5, NOW, NOW * 1000),
        (7, 0, 7),
    ],
)
def test_token_counter_starts_above_every_stored_token_and_now_times_1000(
    highest: int, now: int, start: int
) -> None:
    assert token_start(highest, now) == start


def test_token_start_fits_a_safe_integer_for_centuries() -> None:
    year_2200 = 7_258_118_400_000
    assert token_start(0, year_2200) <= 2**53 - 1
