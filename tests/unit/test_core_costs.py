"""The money rules and the gap model: ``warmer.core.costs`` and ``warmer.core.gaps``."""

from __future__ import annotations

import itertools
import math

import msgspec
import pytest

from warmer.contract import Usage
from warmer.core.costs import (
    TURN_GROWTH,
    estimated_warm_cost,
    rewrite_saving,
    ttl_advice,
    ttl_from_usage,
    warm_cost,
    worth_warming,
)
from warmer.core.gaps import (
    EDGES,
    MAX_WEIGHT,
    PRIOR_ABANDONED,
    PRIOR_GAPS,
    PUBLISHED_MU,
    PUBLISHED_SIGMA,
    GapModel,
    GapModelError,
    lognormal_counts,
)
from warmer.core.policy import HOUR_MS, Prices

PRICES = Prices()
MINUTE = 60_000


def only_returns(counts: list[float]) -> GapModel:
    """A model of finished gaps only, no prior's abandoned ones."""
    return GapModel(counts, abandoned=0.0)


# -- the gap model --------------------------------------------------------------------


def test_the_prior_is_the_published_reply_times_with_a_tenth_abandoned() -> None:
    model = GapModel()
    assert model.seen == 0
    assert model.weight == pytest.approx(PRIOR_GAPS)
    assert model.abandoned_share == pytest.approx(PRIOR_ABANDONED)
    returning = 1 - PRIOR_ABANDONED
    # Of 1,967 replies, 27 % came after more than 5 minutes and 10 % after more than 15.
    assert model.survival(5 * MINUTE) == pytest.approx(PRIOR_ABANDONED + returning * 0.27, abs=1e-3)
    assert model.survival(15 * MINUTE) == pytest.approx(
        PRIOR_ABANDONED + returning * 0.10, abs=1e-3
    )
    assert math.exp(PUBLISHED_MU) == pytest.approx(110, abs=1)  # a median of about 110 s


def test_survival_falls_from_one_to_the_abandoned_share() -> None:
    model = GapModel()
    times = [0, 500, 1_000, 30_000, 5 * MINUTE, HOUR_MS, 10**10, 10**13]
    values = [model.survival(t) for t in times]
    assert values[0] == 1.0 and model.survival(-5) == 1.0
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(PRIOR_ABANDONED)


def test_an_observed_gap_moves_the_mass_past_it() -> None:
    model = GapModel()
    before = model.survival(10 * MINUTE)
    for _ in range(100):
        model.observe(20 * MINUTE)
    assert model.seen == 100
    assert model.survival(10 * MINUTE) > before
    assert model.survival(25 * MINUTE) < model.survival(10 * MINUTE)


def test_abandoned_gaps_raise_the_floor() -> None:
    model = GapModel()
    for _ in range(180):
        model.abandon()
    assert model.seen == 180
    prior = PRIOR_GAPS * PRIOR_ABANDONED
    assert model.abandoned_share == pytest.approx((prior + 180) / (PRIOR_GAPS + 180))
    assert model.survival(10**13) == pytest.approx(model.abandoned_share)


def test_gaps_outside_the_bins_land_in_the_end_bins() -> None:
    model = only_returns([0.0] * (len(EDGES) + 1))
    model.observe(-5)
    model.observe(10**15)
    assert model.survival(EDGES[0]) == pytest.approx(0.5)
    assert model.survival(10**16) == pytest.approx(0.5)  # the open last bin never ends


def test_old_observations_fade_once_the_weight_passes_its_cap() -> None:
    model = GapModel()
    weights = []
    for _ in range(int(MAX_WEIGHT)):
        model.observe(MINUTE)
        weights.append(model.weight)
    assert max(weights) <= MAX_WEIGHT
    assert min(weights[-100:]) < MAX_WEIGHT / 2 + 100  # every count was halved at once
    for _ in range(int(MAX_WEIGHT / 2)):
        model.abandon()
    # Half the weight is now recent abandonment: the model follows the new users.
    assert model.abandoned_share > 0.4


def test_a_model_round_trips_through_its_stored_form() -> None:
    model = GapModel()
    model.observe(4 * MINUTE)
    model.abandon()
    again = GapModel.decode(model.encode())
    assert again == model and again.seen == 2
    assert again.survival(7 * MINUTE) == model.survival(7 * MINUTE)
    copy = model.copy()
    copy.observe(1)
    assert copy != model and model.seen == 2  # a copy is independent


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (b"\xc1", "malformed gap model"),
        (msgspec.msgpack.encode([2, [1.0] * (len(EDGES) + 1), 0.0, 0]), "version 2"),
        (msgspec.msgpack.encode([1, [1.0] * 3, 0.0, 0]), "3 bins"),
        (msgspec.msgpack.encode([1, [-1.0] + [1.0] * len(EDGES), 0.0, 0]), "negative"),
        (msgspec.msgpack.encode([1, [0.0] * (len(EDGES) + 1), 0.0, 0]), "all zero"),
        (msgspec.msgpack.encode([1, [math.nan] * (len(EDGES) + 1), 0.0, 0]), "not finite"),
    ],
)
def test_a_stored_model_that_is_not_one_is_refused(stored: bytes, message: str) -> None:
    with pytest.raises(GapModelError, match=message):
        GapModel.decode(stored)


def test_lognormal_counts_spread_the_whole_weight() -> None:
    counts = lognormal_counts(PUBLISHED_MU, PUBLISHED_SIGMA, 50.0)
    assert len(counts) == len(EDGES) + 1 and sum(counts) == pytest.approx(50.0)


# -- prices -----------------------------------------------------------------------------


def test_a_warm_costs_its_reads_writes_uncached_input_and_output() -> None:
    usage = Usage(input_tokens=101_010, cache_read_tokens=100_000, cache_write_tokens=1_000)
    usage = msgspec.structs.replace(usage, output_tokens=2)
    # 10 uncached + 100,000 x 0.1 + 1,000 x 1.25 (the 5-minute write) + 2 x 5.
    assert warm_cost(usage, PRICES, None) == pytest.approx(10 + 10_000 + 1_250 + 10)
    # Unsplit writes of a 1-hour cache are priced as 1-hour writes.
    assert warm_cost(usage, PRICES, HOUR_MS) == pytest.approx(10 + 10_000 + 2_000 + 10)


@pytest.mark.parametrize(
    ("five", "hour", "cost"),
    [
        (100, 200, 100 * 1.25 + 200 * 2.0),  # each write at its lifetime's price
        (None, 1_000, 300 * 2.0),  # a 1-hour share larger than the writes: all 1-hour
        (1_000, None, 300 * 1.25),
        (1_000, 1_000, 300 * 2.0),  # the 1-hour share first, nothing left for the rest
        (200, 200, 200 * 2.0 + 100 * 1.25),
    ],
)
def test_a_usage_split_prices_each_write_at_its_lifetime_within_the_writes(
    five: int | None, hour: int | None, cost: float
) -> None:
    # A publisher whose split does not add up: the writes counted are cacheWriteTokens.
    usage = Usage(
        input_tokens=300,
        cache_read_tokens=0,
        cache_write_tokens=300,
        cache_write_5m_tokens=five,
        cache_write_1h_tokens=hour,
    )
    assert warm_cost(usage, PRICES, None) == pytest.approx(cost)


@pytest.mark.parametrize(
    ("five", "hour", "ttl"),
    [(None, None, None), (0, 0, None), (10, None, 300_000), (0, 10, HOUR_MS), (5, 5, HOUR_MS)],
)
def test_the_ttl_a_usage_split_shows(five: int | None, hour: int | None, ttl: int | None) -> None:
    usage = Usage(
        input_tokens=10,
        cache_read_tokens=0,
        cache_write_tokens=10,
        cache_write_5m_tokens=five,
        cache_write_1h_tokens=hour,
    )
    assert ttl_from_usage(usage) == ttl


def test_estimates_before_any_warm_reported() -> None:
    assert estimated_warm_cost(100_000, PRICES) == pytest.approx(10_000 + 5)
    assert estimated_warm_cost(None, PRICES) == pytest.approx(0.1)  # per prefix token
    assert rewrite_saving(100_000, PRICES, None) == pytest.approx(115_000)
    assert rewrite_saving(100_000, PRICES, HOUR_MS) == pytest.approx(190_000)
    assert rewrite_saving(None, PRICES, None) == pytest.approx(1.15)


# -- the adaptive rule ------------------------------------------------------------------


WINDOW = {"ttl_ms": 5 * MINUTE, "interval_ms": 4 * MINUTE}


def test_at_break_even_there_is_no_warm_and_just_above_there_is() -> None:
    model = GapModel()
    due, expiry = 4 * MINUTE, 5 * MINUTE
    gained = model.survival(expiry) - model.survival(due + 5 * MINUTE)
    paid = model.survival(due)
    assert 0 < gained < paid
    # gained x saving == paid x cost, exactly: the expected saving of one warm is zero.
    at = {"due_age_ms": due, "expiry_age_ms": expiry, **WINDOW}
    assert not worth_warming(model, **at, saving=paid, cost=gained, confidence=0.0)
    assert worth_warming(model, **at, saving=paid * 1.000001, cost=gained, confidence=0.0)
    assert not worth_warming(model, **at, saving=paid * 0.999999, cost=gained, confidence=0.0)


def test_the_confidence_takes_standard_errors_off_the_return_chance() -> None:
    model = GapModel()
    at = {"due_age_ms": 4 * MINUTE, "expiry_age_ms": 5 * MINUTE, **WINDOW}
    gained = model.survival(5 * MINUTE) - model.survival(9 * MINUTE)
    paid = model.survival(4 * MINUTE)
    se = math.sqrt(gained * (1 - gained) / model.weight)
    # Worth it on the estimate, not once one standard error is taken off it.
    saving = paid / (gained - se / 2)
    assert worth_warming(model, **at, saving=saving, cost=1.0, confidence=0.0)
    assert not worth_warming(model, **at, saving=saving, cost=1.0, confidence=1.0)
    # The same shares from a hundred times the gaps: the error is a tenth, and it pays.
    counts = lognormal_counts(PUBLISHED_MU, PUBLISHED_SIGMA, 100 * PRIOR_GAPS * 0.5)
    big = GapModel(counts, 100 * PRIOR_GAPS * 0.5)
    assert big.survival(4 * MINUTE) == pytest.approx(paid)
    assert worth_warming(big, **at, saving=saving, cost=1.0, confidence=1.0)


def test_users_who_never_come_back_are_never_worth_a_warm() -> None:
    gone = GapModel([0.0] * (len(EDGES) + 1), abandoned=100.0)
    args = {"due_age_ms": 4 * MINUTE, "expiry_age_ms": 5 * MINUTE, **WINDOW}
    assert not worth_warming(gone, **args, saving=1e9, cost=1.0, horizon=64)


def test_users_who_come_back_in_the_window_the_warm_adds_are_worth_it() -> None:
    # Everyone comes back after 6 to 7 minutes: the warm at 4 min keeps the cache to 9.
    back = only_returns([0.0] * (len(EDGES) + 1))
    for _ in range(100):
        back.observe(6 * MINUTE + 30_000)
    args = {"due_age_ms": 4 * MINUTE, "expiry_age_ms": 5 * MINUTE, **WINDOW}
    assert worth_warming(back, **args, saving=1.15, cost=0.1)
    # A warm due after everyone came back is paid by nobody and saves nobody.
    late = {"due_age_ms": 8 * MINUTE, "expiry_age_ms": 9 * MINUTE, **WINDOW}
    assert not worth_warming(back, **late, saving=1.15, cost=0.1, horizon=64)


def test_a_run_of_warms_pays_where_the_next_one_alone_does_not() -> None:
    # Everyone comes back after 30 minutes: the first warm's window (5 to 9 min) holds
    # nobody, but seven warms carry the cache to 33 minutes for everyone, at 0.7 a gap.
    back = only_returns([0.0] * (len(EDGES) + 1))
    for _ in range(1000):
        back.observe(30 * MINUTE)
    args = {"due_age_ms": 4 * MINUTE, "expiry_age_ms": 5 * MINUTE, **WINDOW}
    assert not worth_warming(back, **args, saving=1.15, cost=0.1, horizon=1)
    assert worth_warming(back, **args, saving=1.15, cost=0.1, horizon=10)
    # Twelve warms would cost more than the re-write they avoid: no run pays.
    assert not worth_warming(back, **args, saving=1.15, cost=0.2, horizon=10)


# -- the 1-hour advice --------------------------------------------------------------------


def _uniform_minutes(low: int, high: int) -> GapModel:
    model = only_returns([0.0] * (len(EDGES) + 1))
    for k in range(1000):
        model.observe(int((low + (high - low) * k / 999) * MINUTE))
    return model


def test_gaps_of_ten_to_forty_minutes_favour_the_one_hour_cache() -> None:
    advice = ttl_advice(
        _uniform_minutes(10, 40), PRICES, ttl_ms=5 * MINUTE, interval_ms=4 * MINUTE, horizon=64
    )
    # The hour: a read per gap plus the dearer write of each turn's new content.
    assert advice.hour == pytest.approx(0.1 + TURN_GROWTH * (2.0 - 1.25), rel=1e-6)
    assert advice.none == pytest.approx(1.25, rel=1e-6)  # every turn re-writes
    assert advice.warming > advice.hour
    assert advice.hour_is_cheaper and advice.hour_saving_pct > 50


def test_quick_replies_do_not_favour_the_one_hour_cache() -> None:
    advice = ttl_advice(
        _uniform_minutes(0, 3), PRICES, ttl_ms=5 * MINUTE, interval_ms=4 * MINUTE, horizon=64
    )
    assert advice.none == pytest.approx(0.1, rel=1e-6)
    assert not advice.hour_is_cheaper and advice.hour_saving_pct < 0


def test_the_published_gaps_without_abandonment_match_the_issue_figures() -> None:
    # "warming every 240 s with today's idle budget costs 0.23 against 0.41": the adaptive
    # rule warms the same first ten times or more, so it costs about the same.
    model = only_returns(lognormal_counts(PUBLISHED_MU, PUBLISHED_SIGMA, 1000.0))
    advice = ttl_advice(model, PRICES, ttl_ms=5 * MINUTE, interval_ms=4 * MINUTE, horizon=10)
    assert advice.none == pytest.approx(0.41, abs=0.005)
    assert advice.warming == pytest.approx(0.23, abs=0.01)
