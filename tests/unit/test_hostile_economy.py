"""The TTL edge rules (warmer.core.economy: ``latest_due``, a TTL no longer than the margin,
0 read as absent) at their exact instants, through the real worker (``Shell``).

Defaults: interval 240 s, TTL margin 60 s, idle budget 45 min and 10 warms, warm timeout
60 s. A settle at T0 with ``cacheTtlS: 300`` has its cache expire at T0 + 300 s.
"""

from __future__ import annotations

import pytest

from tests.unit.conftest import T0, Shell, build_usage

TTL_S = 300
EXPIRES = T0 + TTL_S * 1000


def _idle_with_cache(shell: Shell, **fields: object) -> None:
    """A disabled conversation settled at T0 with a known 5-minute cache."""
    shell.settled("c", cache_ttl_s=TTL_S, usage=build_usage(5_000, 4_000, 100), **fields)
    assert shell.status("c") == "disabled"


@pytest.mark.parametrize(
    ("at", "status", "due"),
    [
        (T0 + 239_999, "armed", T0 + 240_000),  # due at the latest point, not now + 240 s
        (T0 + 240_000, "armed", T0 + 240_000),  # that point is now
        (EXPIRES - 1, "armed", EXPIRES - 1),  # past it: at once, the cache alive for 1 ms
        (EXPIRES, "expired", None),  # at the expiry: nothing left to warm
    ],
)
def test_an_enable_around_the_expiry_instant(
    shell: Shell, at: int, status: str, due: int | None
) -> None:
    _idle_with_cache(shell)
    shell.now = at
    shell.set_enabled("c", True)
    assert shell.status("c") == status
    assert shell.due("c") == due


def test_an_enable_counts_from_an_earlier_last_request(shell: Shell) -> None:
    """lastRequestAt 100 s before the settle: the cache expires 100 s earlier."""
    _idle_with_cache(shell, last_request_at=T0 - 100_000)
    shell.now = EXPIRES - 100_000 - 1
    shell.set_enabled("c", True)
    assert shell.due("c") == shell.now
    shell.set_enabled("c", False)
    shell.now = EXPIRES - 100_000
    shell.set_enabled("c", True)
    assert shell.status("c") == "expired"


def test_a_new_interval_while_armed_keeps_the_warm_before_the_expiry(shell: Shell) -> None:
    shell.set_enabled("c", True)
    shell.settled("c", cache_ttl_s=TTL_S)
    assert shell.due("c") == T0 + 240_000
    shell.now = T0 + 230_000
    shell.set_interval("c", 1_000)  # the known lifetime rules: still 240 s after the read
    assert shell.due("c") == T0 + 240_000


@pytest.mark.parametrize(
    ("ttl_s", "status", "due"),
    [
        (59, "expired", None),  # shorter than the margin: the configured 240 s, too late
        (60, "expired", None),  # exactly the margin: the same
        (61, "armed", T0 + 1_000),  # just over: 1 s (the contract's formula, the floor)
        (3_600, "budget_exhausted", None),  # 59 min is past the 45-min idle budget
        (7 * 86_400, "budget_exhausted", None),  # a week: 24 h, past the budget too
    ],
)
def test_the_ttl_against_the_margin_and_the_caps(
    shell: Shell, ttl_s: int, status: str, due: int | None
) -> None:
    shell.set_enabled("c", True)
    shell.settled("c", cache_ttl_s=ttl_s)
    assert shell.status("c") == status
    assert shell.due("c") == due


def test_a_ttl_just_over_the_margin_warms_every_second_with_a_one_second_timeout(
    shell: Shell,
) -> None:
    """The cliff at the margin: 61 s gives a 1 s interval and (timeout = min(60 s,
    interval)) a 1 s deadline for the warm, shorter than most providers take to answer; a
    warm that takes longer times out and the conversation pauses after 3 failures. At
    most 3 warm requests (10 by the idle budget), so bounded; said in the report."""
    shell.set_enabled("c", True)
    shell.settled("c", cache_ttl_s=61)
    warms = 0
    for _ in range(5):
        if shell.scheduler.pending("c") is None:
            break
        before = len(shell.warms)
        shell.fire("c")  # the warm due in 1 s
        warms += len(shell.warms) - before
        if shell.status("c") == "warming":
            shell.fire("c")  # its timeout, 1 s later: the answer takes longer
    assert shell.status("c") == "paused"
    assert warms == 3


@pytest.mark.parametrize(
    ("ahead_ms", "due"),
    [
        (2_000, T0 + 240_000),  # within the 2 s skew: counts as now
        (2_001, T0 + 240_000),  # further: ignored, now
        (86_400_000, T0 + 240_000),  # a day ahead: ignored
    ],
)
def test_a_last_request_in_the_future_with_a_known_ttl_counts_from_now(
    shell: Shell, ahead_ms: int, due: int
) -> None:
    shell.set_enabled("c", True)
    shell.settled("c", cache_ttl_s=TTL_S, last_request_at=T0 + ahead_ms)
    assert shell.status("c") == "armed"
    assert shell.due("c") == due
    assert shell.conv("c").last_read_at == T0


def test_zero_after_a_known_ttl_and_prefix_keeps_them(shell: Shell) -> None:
    shell.set_enabled("c", True)
    shell.settled("c", cache_ttl_s=TTL_S, prefix_tokens=5_000)
    shell.advance(1_000)
    shell.settled("c", cache_ttl_s=0, prefix_tokens=0, usage=build_usage(0, 0, 0))
    conv = shell.conv("c")
    assert (conv.cache_ttl_ms, conv.prefix_tokens) == (TTL_S * 1000, 5_000)
    assert shell.status("c") == "armed"


@pytest.mark.parametrize(
    ("interval_ms", "status", "due"),
    [
        (20_000, "armed", T0 + 20_000),  # min(now + 20 s, read + 20 s): from the read
        (29_999, "armed", T0 + 29_999),  # 1 ms before the 30 s cache expires
        (30_000, "expired", None),  # at the expiry: nothing to warm
    ],
)
def test_a_new_interval_on_a_cache_shorter_than_the_margin(
    shell: Shell, interval_ms: int, status: str, due: int | None
) -> None:
    """A 30 s cache (no longer than the 60 s margin) keeps the configured interval; a new
    one while armed counts from the last read, and one reaching the expiry finds it dead."""
    shell.set_interval("c", 10_000)
    shell.set_enabled("c", True)
    shell.settled("c", cache_ttl_s=30)
    assert shell.due("c") == T0 + 10_000
    shell.now = T0 + 5_000
    shell.set_interval("c", interval_ms)
    assert shell.status("c") == status
    assert shell.due("c") == due
