"""``warmer simulate``: idle-gap distributions replayed through the real core, priced.

For each distribution (``warmer.simulate.mixes``) and abandoned share, the same sampled
gaps go through one ``Warmer`` per policy row (``warmer.simulate.replay``) and through
the two reference rows computed from the gaps themselves (``warmer.simulate.pricing``).
docs/economics.md describes the cost model and records a run.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from typing import Final

from msgspec import Struct

from warmer.contract import CostPolicyName
from warmer.core import Policy
from warmer.core.costs import FIVE_MINUTES_MS, TtlAdvice
from warmer.core.policy import HOUR_MS
from warmer.simulate.mixes import (
    ABANDONED_SHARES,
    MIXES,
    Gap,
    Mix,
    TraceError,
    conversations,
    mixes_named,
    parse_trace,
    read_trace,
    sample,
)
from warmer.simulate.pricing import Result, Tariff, best_k, clairvoyant
from warmer.simulate.replay import Replay

__all__ = [
    "ABANDONED_SHARES",
    "DEFAULT_GAPS",
    "MIXES",
    "Gap",
    "Mix",
    "Row",
    "Table",
    "TraceError",
    "mixes_named",
    "parse_trace",
    "read_trace",
    "simulate",
    "simulate_gaps",
    "simulate_trace",
]

DEFAULT_GAPS: Final = 4000
"""Gaps per table: the default run (12 tables) takes about 20 s on one core."""
TARGET_VS_BEST_K: Final = 1.05
"""The issue's target: adaptive costs at most the best "warm k times" rule plus 5 %."""

_CORE_ROWS: Final[tuple[tuple[str, CostPolicyName | None], ...]] = (
    ("none", None),
    ("fixed", "fixed"),
    ("budget", "budget"),
    ("adaptive", "adaptive"),
)
FIVE_MINUTE_POLICIES: Final = tuple(name for name, _ in _CORE_ROWS)
HOUR: Final = "1-hour TTL"
BEST_K: Final = "best k"
CLAIRVOYANT: Final = "clairvoyant"


class Row(Struct, frozen=True):
    """One policy's result on one table's gaps."""

    policy: str
    result: Result


class Table(Struct, frozen=True, kw_only=True):
    """One distribution at one abandoned share: every row on the same gaps."""

    name: str
    description: str
    abandoned_share: float | None
    """The share asked for (None: a trace, whose abandoned gaps are its own)."""
    rows: list[Row]
    advice: TtlAdvice | None
    """The core's own estimate after the adaptive run learned the gaps (None: too few)."""

    def row(self, policy: str) -> Result:
        """The result of the row named ``policy`` (``best k`` for the best-k row)."""
        for row in self.rows:
            if row.policy == policy:
                return row.result
        raise KeyError(policy)

    @property
    def none(self) -> float:
        """Cost per gap without warming: what the relative figures are relative to."""
        return self.row("none").per_gap

    def relative(self, policy: str) -> float:
        """A row's cost per gap relative to no warming (0.62 for 0.62x)."""
        none, cost = self.none, self.row(policy).per_gap
        if none > 0:
            return cost / none
        return 1.0 if cost <= 0 else math.inf

    @property
    def cheapest_five_minute(self) -> str:
        """The cheapest of the policies the worker offers, on the 5-minute cache."""
        return min(FIVE_MINUTE_POLICIES, key=lambda name: self.row(name).per_gap)

    @property
    def adaptive_vs_best_k(self) -> float:
        """Adaptive's cost per gap over the best k's (the target: at most 1.05)."""
        adaptive, best = self.row("adaptive").per_gap, self.row(BEST_K).per_gap
        if best > 0:
            return adaptive / best
        return 1.0 if adaptive <= 0 else math.inf

    @property
    def target_met(self) -> bool:
        """Adaptive costs at most the best k plus 5 %, and no more than no warming."""
        return (
            self.adaptive_vs_best_k <= TARGET_VS_BEST_K + 1e-9
            and self.row("adaptive").per_gap <= self.none + 1e-9
        )


def simulate_gaps(
    name: str,
    description: str,
    gaps: Sequence[Gap],
    *,
    policy: Policy,
    prefix_tokens: int,
    abandoned_share: float | None = None,
) -> Table:
    """Every row on ``gaps``: the policies through the core, then the reference rows."""
    tariff = Tariff.of(policy, prefix_tokens, FIVE_MINUTES_MS)
    cut = conversations(gaps)
    rows: list[Row] = []
    advice: TtlAdvice | None = None
    for label, cost_policy in _CORE_ROWS:
        replay = Replay(policy, tariff, cost_policy=cost_policy, ttl_ms=FIVE_MINUTES_MS)
        rows.append(Row(label, replay.run(cut)))
        if cost_policy == "adaptive":
            advice = replay.warmer.economy.advice()
    rows.append(Row(HOUR, Replay(policy, tariff, cost_policy=None, ttl_ms=HOUR_MS).run(cut)))
    rows.append(Row(BEST_K, best_k(gaps, tariff)))
    rows.append(Row(CLAIRVOYANT, clairvoyant(gaps, tariff)))
    return Table(
        name=name,
        description=description,
        abandoned_share=abandoned_share,
        rows=rows,
        advice=advice,
    )


def simulate(
    *,
    policy: Policy,
    prefix_tokens: int,
    gaps: int | None = None,
    seed: int = 1,
    mixes: Sequence[Mix] = MIXES,
    abandoned_shares: Sequence[float] = ABANDONED_SHARES,
) -> list[Table]:
    """Every mix at every abandoned share, ``gaps`` sampled gaps each (seeded)."""
    count = DEFAULT_GAPS if gaps is None else gaps
    tables: list[Table] = []
    for mix in mixes:
        for share in abandoned_shares:
            rng = random.Random(f"{seed}/{mix.name}/{share}")
            tables.append(
                simulate_gaps(
                    mix.name,
                    mix.description,
                    sample(mix, share, count, rng),
                    policy=policy,
                    prefix_tokens=prefix_tokens,
                    abandoned_share=share,
                )
            )
    return tables


def simulate_trace(path: str, *, policy: Policy, prefix_tokens: int) -> Table:
    """Every row on the gaps of a trace file, in its order; TraceError when it is not one."""
    gaps = read_trace(path)
    return simulate_gaps(
        os.path.basename(path) or path,
        "trace file",
        gaps,
        policy=policy,
        prefix_tokens=prefix_tokens,
    )
