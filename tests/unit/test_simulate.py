"""`warmer simulate`: the reference rows, traces, the replay through the core, the target.

The reference rows are checked on hand-made gaps whose costs are worked out below with a
round tariff (a warm costs 0.1 of a prefix, a read 0.1, a write 1.25; the cache lives
300 s; a warm every 240 s). The replay rows are checked against closed forms and the
issue's anchors; the target (adaptive <= 1.05 x the best k, and <= none) is measured on
the published distribution.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from statistics import NormalDist

import pytest

from warmer.cli import main
from warmer.contract import CostPolicyName
from warmer.core import Policy
from warmer.core.gaps import PUBLISHED_MU, PUBLISHED_SIGMA
from warmer.simulate import (
    BEST_K,
    HOUR,
    MIXES,
    Gap,
    TraceError,
    mixes_named,
    parse_trace,
    read_trace,
    simulate,
    simulate_gaps,
)
from warmer.simulate.mixes import conversations, sample
from warmer.simulate.pricing import Tariff, best_k, clairvoyant, no_warming, warm_k
from warmer.simulate.replay import Replay

S = 1000  # ms in a second
ROUND = Tariff(
    prefix_tokens=100_000,
    warm=0.1,
    warm_miss=1.25,
    read=0.1,
    write=1.25,
    write_hour=2.0,
    growth_hour=0.075,
    ttl_ms=300 * S,
    interval_ms=240 * S,
)
PREFIX = 100_000
POLICY = Policy()
TARIFF = Tariff.of(POLICY, PREFIX)
PUBLISHED = mixes_named(["published"])[0]
MODERATE = 4000  # the default run's size: these are its published tables
"""Gaps per table where the anchors and the target are measured (a few seconds in all)."""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No WARMER_* from the outer environment: the prices are the defaults."""
    for name in list(os.environ):
        if name.startswith("WARMER_"):
            monkeypatch.delenv(name)
    yield


def published(share: float, count: int = MODERATE, seed: int = 1) -> list[Gap]:
    return sample(PUBLISHED, share, count, random.Random(f"{seed}/published/{share}"))


def replay(gaps: list[Gap], cost_policy: CostPolicyName | None, ttl_ms: int = 300 * S) -> Replay:
    run = Replay(POLICY, TARIFF, cost_policy=cost_policy, ttl_ms=ttl_ms)
    run.run(conversations(gaps))
    return run


# -- the reference rows, by hand ----------------------------------------------------

HAND: list[Gap] = [100 * S, 400 * S, 700 * S, None]


def test_warm_k_prices_each_k_as_worked_out_by_hand() -> None:
    # k=0: reads 0.1 (100 s), writes 1.25 + 1.25 (400 s, 700 s), nothing for the abandoned.
    # k=1: a warm at 240 s for 400 s, 700 s and the abandoned (0.3); 400 s is kept alive.
    # k=2: a second warm at 480 s for 700 s and the abandoned (0.2); 700 s is kept alive.
    # k=3: a third at 720 s for the abandoned only: 0.1 more.
    costs = [warm_k(HAND, k, ROUND).cost for k in range(4)]

    assert costs == pytest.approx([2.6, 1.75, 0.8, 0.9])
    assert warm_k(HAND, 2, ROUND).warms == 5


def test_best_k_is_the_cheapest_k() -> None:
    best = best_k(HAND, ROUND)

    assert best.k == 2
    assert best.per_gap == pytest.approx(0.8 / 4)
    assert (best.returns, best.warm_returns) == (3, 3)


def test_a_warm_goes_out_only_while_the_user_is_away_and_a_cache_lives_strictly_less_than_ttl() -> (
    None
):
    # Back at exactly 240 s: the warm due then does not go out; back at exactly 300 s
    # without warms: the cache has just expired.
    assert warm_k([240 * S], 1, ROUND).warms == 0
    assert no_warming([300 * S], ROUND).cost == pytest.approx(1.25)
    assert warm_k([540 * S], 1, ROUND).cost == pytest.approx(0.1 + 1.25)


def test_best_k_stops_at_zero_when_every_gap_is_abandoned_or_short() -> None:
    assert best_k([None, None, 10 * S], ROUND).k == 0
    assert best_k([None], ROUND).cost == 0


def test_best_k_agrees_with_a_search_over_every_k() -> None:
    rng = random.Random(5)
    gaps: list[Gap] = [
        None if rng.random() < 0.2 else rng.randrange(0, 4000 * S) for _ in range(300)
    ]

    searched = min(warm_k(gaps, k, TARIFF).cost for k in range(40))

    assert best_k(gaps, TARIFF).cost == pytest.approx(searched)


def test_clairvoyant_warms_just_enough_or_not_at_all() -> None:
    # 100 s: a read. 400 s: one warm bridges it (0.1 + 0.1). 700 s: two (0.2 + 0.1).
    # 540 s: a warm at 240 s keeps the cache until just before 540 s: two are needed.
    # 4000 s: 16 warms (1.6 + 0.1) cost more than a write (1.25). Abandoned: nothing.
    gaps: list[Gap] = [100 * S, 400 * S, 700 * S, 540 * S, 4000 * S, None]

    result = clairvoyant(gaps, ROUND)

    assert result.cost == pytest.approx(0.1 + 0.2 + 0.3 + 0.3 + 1.25)
    assert (result.returns, result.warm_returns, result.warms) == (5, 4, 5)


def test_the_tariff_prices_a_warm_as_the_core_does() -> None:
    # A read of the prefix at 0.1, the warm's 10 new tokens at 1, one output token at 5.
    assert TARIFF.warm == pytest.approx(0.1 + 15 / PREFIX)
    assert TARIFF.warm_miss == pytest.approx(1.25 + 15 / PREFIX)
    assert (TARIFF.interval_ms, TARIFF.ttl_ms) == (240 * S, 300 * S)
    assert TARIFF.growth_hour == pytest.approx(0.1 * (2.0 - 1.25))


# -- traces -------------------------------------------------------------------------


def test_a_trace_reads_seconds_abandoned_gaps_comments_and_blank_lines() -> None:
    text = "# a user's week\n95\n\n12.5  # quick\nabandoned\nINF\n  0\n"

    assert parse_trace(text) == [95 * S, 12_500, None, None, 0]


@pytest.mark.parametrize(
    ("text", "line", "shown"),
    [
        ("95\nsoon\n", 2, "'soon'"),
        ("-3\n", 1, "'-3'"),
        ("# header\n\n1e999\n", 3, "'1e999'"),
        ("nan\n", 1, "'nan'"),
        ("12 s\n", 1, "'12 s'"),
    ],
)
def test_a_bad_trace_line_is_named(text: str, line: int, shown: str) -> None:
    with pytest.raises(TraceError) as caught:
        parse_trace(text, "gaps.txt")

    message = str(caught.value)
    assert message.startswith(f"gaps.txt:{line}: {shown} is not a gap")
    assert "abandoned" in message and "\n" not in message


def test_a_trace_without_gaps_or_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no gaps"):
        parse_trace("# nothing\n\n", "empty.txt")
    with pytest.raises(TraceError, match="cannot read the trace"):
        read_trace(str(tmp_path / "missing.txt"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe12\n")
    with pytest.raises(TraceError, match="not UTF-8"):
        read_trace(str(binary))


def test_conversations_end_at_an_abandoned_gap_or_after_max_turns() -> None:
    gaps: list[Gap] = [1, 2, None, 3, 4, 5, 6, None]

    assert conversations(gaps, max_turns=3) == [[1, 2, None], [3, 4, 5], [6, None]]


def test_an_unknown_mix_names_the_choices() -> None:
    with pytest.raises(ValueError, match="published, quick, coffee, split"):
        mixes_named(["published", "lunch"])


# -- the replay through the core ----------------------------------------------------


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5])
def test_none_costs_its_closed_form(share: float) -> None:
    gaps = published(share, 2000)

    result = replay(gaps, None).result()

    # Exactly the closed form on these gaps, and about its expectation:
    # (1 - abandoned) x (P(gap < 300 s) x 0.1 + P(gap >= 300 s) x 1.25), P(gap >= 300 s) = 0.27.
    assert result.cost == pytest.approx(no_warming(gaps, TARIFF).cost)
    assert result.warms == 0
    longer = 1 - NormalDist(PUBLISHED_MU, PUBLISHED_SIGMA).cdf(math.log(300))
    expected = (1 - share) * (0.1 + longer * (1.25 - 0.1))
    assert result.per_gap == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5])
def test_fixed_through_the_core_is_the_warm_10_times_rule(share: float) -> None:
    # The idle budget (45 min, 10 warms) with a warm every 240 s: the 10th at 2400 s.
    gaps = published(share, 600)

    run = replay(gaps, "fixed")

    assert run.result().cost == pytest.approx(warm_k(gaps, 10, TARIFF).cost)
    assert not run.skipped  # no late fire, no miss: the provider model agrees with the core
    assert run.accounted == round(run.result().warms * TARIFF.warm * PREFIX)


def test_the_hour_row_pays_the_dearer_write_and_the_growth_of_every_turn() -> None:
    # 100 s: a read, 4000 s: the hour is over, a write at 2.0; both turns' new content
    # written at the dearer price (0.1 x (2.0 - 1.25)); the abandoned gap costs nothing.
    result = replay([100 * S, 4000 * S, None], None, ttl_ms=3_600 * S).result()

    assert result.cost == pytest.approx(0.1 + 2.0 + 2 * 0.075)
    assert (result.returns, result.warm_returns) == (2, 1)


def test_adaptive_learns_abandonment_from_a_close_and_from_a_prune() -> None:
    run = Replay(POLICY, TARIFF, cost_policy="adaptive", ttl_ms=300 * S)
    model = run.warmer.economy.model

    run.conversation("closed", [60 * S, None])
    closed = run.warmer.get("closed")
    assert closed is not None and not closed.enabled
    assert (model.seen, model.abandoned_share > 0.1) == (2, True)

    run.conversation("forgotten", [None], prune=True)
    assert run.warmer.get("forgotten") is None
    assert model.seen == 3


@pytest.mark.parametrize(
    ("share", "fixed", "none"), [(0.0, 0.23, 0.41), (0.2, 0.38, 0.33), (0.5, 0.61, 0.20)]
)
def test_the_issues_anchors_on_the_published_distribution(
    share: float, fixed: float, none: float
) -> None:
    gaps = published(share)

    assert replay(gaps, "fixed").result().per_gap == pytest.approx(fixed, abs=0.02)
    assert replay(gaps, None).result().per_gap == pytest.approx(none, abs=0.02)


def test_a_run_is_the_same_for_the_same_seed() -> None:
    quick = mixes_named(["quick"])

    def run(seed: int) -> list[float]:
        tables = simulate(policy=POLICY, prefix_tokens=PREFIX, gaps=150, seed=seed, mixes=quick)
        return [row.result.cost for table in tables for row in table.rows]

    assert run(3) == run(3)
    assert run(3) != run(4)


# -- the target ---------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5])
def test_adaptive_costs_at_most_the_best_k_plus_5_pct_on_the_published_gaps(share: float) -> None:
    gaps = published(share)

    adaptive = replay(gaps, "adaptive").result().per_gap

    assert adaptive <= 1.05 * best_k(gaps, TARIFF).per_gap


@pytest.mark.parametrize(
    "share",
    [0.0, 0.2, 0.5],
)
def test_adaptive_costs_no_more_than_none_on_the_published_gaps(share: float) -> None:
    gaps = published(share)

    adaptive = replay(gaps, "adaptive").result().per_gap

    assert adaptive <= no_warming(gaps, TARIFF).per_gap + 1e-9  # sums in another order


def test_adaptive_warms_through_coffee_breaks_when_that_pays() -> None:
    coffee = mixes_named(["coffee"])[0]
    gaps = sample(coffee, 0.0, 1000, random.Random(1))

    adaptive = replay(gaps, "adaptive").result().per_gap

    assert adaptive <= 1.05 * best_k(gaps, TARIFF).per_gap


# -- the tables and the verb --------------------------------------------------------


def test_a_table_has_every_row_on_the_same_gaps() -> None:
    table = simulate_gaps("hand", "by hand", HAND * 30, policy=POLICY, prefix_tokens=PREFIX)

    names = [row.policy for row in table.rows]
    assert names == ["none", "fixed", "budget", "adaptive", HOUR, BEST_K, "clairvoyant"]
    assert {row.result.gaps for row in table.rows} == {120}
    assert table.relative("none") == 1.0


def test_the_verb_prints_a_table_per_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--mix", "coffee", "--gaps", "100", "--seed", "2"]) == 0

    out = capsys.readouterr().out
    assert out.count("coffee (coffee breaks") == 3  # 0, 20 and 50 % abandoned
    for label in ("none", "fixed", "budget", "adaptive", "1-hour TTL", "best k (k=", "clairvoyant"):
        assert f"\n  {label}" in out
    assert "1-hour TTL: cheaper here" in out
    assert "target (adaptive <= 1.05x best k, and <= none)" in out


def test_the_verb_replays_a_trace_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "gaps.txt"
    trace.write_text("# seconds\n30\n400\nabandoned\n1500\n", encoding="utf-8")

    assert main(["simulate", "--trace", str(trace), "--json", "--prefix-tokens", "50000"]) == 0

    document = json.loads(capsys.readouterr().out)
    assert document["prefixTokens"] == 50_000 and document["seed"] is None
    (table,) = document["tables"]
    assert (table["mix"], table["gaps"], table["abandonedShare"]) == ("gaps.txt", 4, None)
    rows = {row["policy"]: row for row in table["rows"]}
    assert rows["none"]["costPerGap"] == pytest.approx((0.1 + 1.25 + 1.25) / 4)
    assert rows["none"]["relativeToNone"] == 1.0


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--mix", "lunch"], "unknown mix 'lunch'"),
        (["--trace", "t.txt", "--gaps", "10"], "--trace replays the file as it is"),
        (["--gaps", "0"], "not a whole number"),
    ],
)
def test_the_verb_refuses_bad_options(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *argv]) == 2

    assert error in capsys.readouterr().err


def test_the_verb_names_the_bad_line_of_a_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "gaps.txt"
    trace.write_text("30\nlater\n", encoding="utf-8")

    assert main(["simulate", "--trace", str(trace)]) == 2

    assert f"warmer: {trace}:2: 'later' is not a gap" in capsys.readouterr().err


def test_the_verb_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--help"]) == 0

    out = " ".join(capsys.readouterr().out.split())
    assert "through the real core with a fake clock" in out
    assert "clairvoyant" in out and "best 'warm k times, then stop'" in out
    assert "warmer simulate --trace gaps.txt" in out
    assert [mix.name for mix in MIXES] == ["published", "quick", "coffee", "split"]
