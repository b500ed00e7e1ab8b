"""The pure rules of docs/semantics.md: rounding, clamping, parsing, percentages, texts."""

from __future__ import annotations

import math
from typing import Final

from warmer.contract import MAX_ERROR_CHARS

DEFAULT_INTERVAL_MS: Final = 240_000
MIN_INTERVAL_MS: Final = 1_000
MAX_INTERVAL_MS: Final = 86_400_000
CLOCK_SKEW_MS: Final = 2_000
NO_CONSUMER: Final = "no consumer took the warm request"
GENERATING: Final = "conversation is generating"


def round_half_up(x: float) -> int:
    """Round as JavaScript's Math.round: halves go up (0.5 -> 1, -2.5 -> -2)."""
    floor = math.floor(x)
    return floor + 1 if x - floor >= 0.5 else floor


def clamp_interval(x: float) -> int:
    """Clamp any number to an interval: <= 0 gives 1000, then round into [1000, 86400000]."""
    if x <= 0:
        return MIN_INTERVAL_MS
    if x >= MAX_INTERVAL_MS:
        return MAX_INTERVAL_MS
    return max(MIN_INTERVAL_MS, round_half_up(x))


def is_number(x: object) -> bool:
    """True for a JSON number: an int or float that is not a bool."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def seconds_to_interval(seconds: object) -> int | None:
    """A dashboard's seconds as an interval in ms; None unless a number > 0."""
    if not is_number(seconds) or not seconds > 0:  # type: ignore[operator]
        return None
    return clamp_interval(seconds * 1000)  # type: ignore[operator]


def interval_seconds(interval_ms: int) -> int:
    """Milliseconds shown as whole seconds, rounded half up."""
    return (interval_ms + 500) // 1000


def cache_pct(input_tokens: int, cache_read_tokens: int) -> int:
    """``lastPct``: the share of the prompt the cache served, in percent."""
    if input_tokens <= 0:
        return 0
    return round_half_up(min(max(cache_read_tokens / input_tokens, 0.0), 1.0) * 100)


def expected_pct(cache_read_tokens: int, cache_write_tokens: int) -> int:
    """``lastExpectedPct`` (cache retention): reads over reads plus writes, in percent."""
    if cache_read_tokens + cache_write_tokens <= 0:
        return 0
    return round_half_up(cache_read_tokens / (cache_read_tokens + cache_write_tokens) * 100)


def parse_stored_interval(x: object) -> int:
    """A stored interval: a finite number is clamped, anything else is the default."""
    if is_number(x) and math.isfinite(x):  # type: ignore[arg-type]
        return clamp_interval(x)  # type: ignore[arg-type]
    return DEFAULT_INTERVAL_MS


def cut_error(error: str) -> str:
    """A ``lastError`` text: at most 500 characters."""
    return error[:MAX_ERROR_CHARS]


def timeout_error(timeout_ms: int) -> str:
    """The ``lastError`` of a warm that timed out."""
    return f"no completion within {interval_seconds(timeout_ms)} s"


def effective_request_start(last_request_at: int | None, now: int) -> int | None:
    """``lastRequestAt`` as the arm uses it: up to 2 s ahead counts as now, further is ignored."""
    if last_request_at is None or last_request_at > now + CLOCK_SKEW_MS:
        return None
    return min(last_request_at, now)


def token_start(highest_stored: int, now_ms: int) -> int:
    """Where the token counter starts: above every token issued before, across restarts."""
    return max(highest_stored, now_ms * 1000)
