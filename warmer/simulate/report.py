"""``warmer simulate``'s output: a table per distribution for people, or one JSON document."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from warmer.simulate import (
    HOUR,
    TARGET_VS_BEST_K,
    Table,
)

_HEADER = f"  {'policy':<16}{'cost/gap':>9}{'vs none':>9}{'found warm':>12}{'warms/gap':>11}"


def text(tables: Sequence[Table], *, prefix_tokens: int) -> str:
    """Every table, then a line on the target, for people."""
    blocks = [
        f"cost per idle gap, in prefixes of {prefix_tokens:,} tokens at the base input price; "
        "'found warm': returning turns that read a live cache"
    ]
    blocks += [_table(table) for table in tables]
    met = sum(table.target_met for table in tables)
    blocks.append(
        f"target (adaptive <= {TARGET_VS_BEST_K:.2f}x best k, and <= none): "
        f"met on {met} of {len(tables)} tables; worst: {_worst(tables)}"
    )
    return "\n\n".join(blocks)


def _table(table: Table) -> str:
    share = table.abandoned_share
    abandoned = (
        f"{_pct(share)} abandoned" if share is not None else f"{_abandoned_in(table)} abandoned"
    )
    gaps = table.row("none").gaps
    lines = [f"{table.name} ({table.description}): {gaps} gaps, {abandoned}", _HEADER]
    for row in table.rows:
        result = row.result
        label = row.policy if result.k is None else f"{row.policy} (k={result.k})"
        lines.append(
            f"  {label:<16}{result.per_gap:>9.3f}{_times(table.relative(row.policy)):>9}"
            f"{_pct(result.warm_share):>12}{result.warms / max(result.gaps, 1):>11.2f}"
        )
    lines += ["  " + line for line in _hour_lines(table)]
    lines.append("  " + _target_line(table))
    return "\n".join(lines)


def _hour_lines(table: Table) -> list[str]:
    hour = table.row(HOUR).per_gap
    best = table.cheapest_five_minute
    other = table.row(best).per_gap
    if abs(hour - other) < 1e-12:
        verdict = f"1-hour TTL: the same cost here, {hour:.3f} per gap, as {best}"
    elif hour < other:
        verdict = (
            f"1-hour TTL: cheaper here, {hour:.3f} per gap: {_pct(1 - hour / other)} less "
            f"than the cheapest 5-minute policy ({best}, {other:.3f})"
        )
    else:
        more = f"{_pct(hour / other - 1)} more" if other > 0 else "more"
        verdict = f"1-hour TTL: dearer here, {hour:.3f} per gap: {more} than {best} ({other:.3f})"
    advice = table.advice
    if advice is None:
        return [verdict]
    says = f"1-hour {advice.hour_saving_pct} % cheaper" if advice.hour_is_cheaper else "keep 5 min"
    return [
        verdict,
        f"the core's advice after learning: warming {advice.warming:.3f}, "
        f"1-hour {advice.hour:.3f}, none {advice.none:.3f}: {says}",
    ]


def _target_line(table: Table) -> str:
    versus = table.adaptive_vs_best_k
    none = table.relative("adaptive")
    return (
        f"adaptive: {_times(versus, 3)} the best k (target <= {TARGET_VS_BEST_K:.2f}: "
        f"{_verdict(versus, TARGET_VS_BEST_K)}), {_times(none, 3)} none (target <= 1: "
        f"{_verdict(none, 1.0)})"
    )


def _verdict(ratio: float, limit: float) -> str:
    if ratio <= limit + 1e-9:
        return "met"
    return f"MISSED by {100 * (ratio / limit - 1):.1f} %" if math.isfinite(ratio) else "MISSED"


def _times(ratio: float, digits: int = 2) -> str:
    """A ratio as ``0.62x``; a dash when the base is zero (nothing to compare with)."""
    return f"{ratio:.{digits}f}x" if math.isfinite(ratio) else "—"


def _worst(tables: Sequence[Table]) -> str:
    versus_k = max(tables, key=lambda t: t.adaptive_vs_best_k)
    versus_none = max(tables, key=lambda t: t.relative("adaptive"))
    return (
        f"{_times(versus_k.adaptive_vs_best_k, 3)} the best k ({_name(versus_k)}), "
        f"{_times(versus_none.relative('adaptive'), 3)} none ({_name(versus_none)})"
    )


def _name(table: Table) -> str:
    share = table.abandoned_share
    return table.name if share is None else f"{table.name}, {_pct(share)} abandoned"


def _abandoned_in(table: Table) -> str:
    result = table.row("none")
    return _pct((result.gaps - result.returns) / result.gaps) if result.gaps else "0 %"


def _pct(share: float) -> str:
    return f"{round(100 * share)} %"


def document(tables: Sequence[Table], *, prefix_tokens: int, seed: int | None) -> dict[str, Any]:
    """Every table as plain data (``--json``)."""
    return {
        "prefixTokens": prefix_tokens,
        "seed": seed,
        "tables": [_table_data(table) for table in tables],
    }


def _table_data(table: Table) -> dict[str, Any]:
    advice = table.advice
    return {
        "mix": table.name,
        "description": table.description,
        "abandonedShare": table.abandoned_share,
        "gaps": table.row("none").gaps,
        "rows": [
            {
                "policy": row.policy,
                "k": row.result.k,
                "costPerGap": row.result.per_gap,
                "relativeToNone": table.relative(row.policy),
                "foundWarm": row.result.warm_share,
                "warms": row.result.warms,
                "returns": row.result.returns,
            }
            for row in table.rows
        ],
        "hourIsCheaper": table.row(HOUR).per_gap < table.row(table.cheapest_five_minute).per_gap,
        "coreAdvice": None
        if advice is None
        else {
            "warming": advice.warming,
            "hour": advice.hour,
            "none": advice.none,
            "hourIsCheaper": advice.hour_is_cheaper,
        },
        "targetMet": table.target_met,
    }
