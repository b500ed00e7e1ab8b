"""Run every benchmark module in bench/ (or those named) and print one table.

Usage: `python -m bench [module ...]`. A module takes part when it exposes
`run() -> dict[str, float]`; one that fails is reported and the others still run.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import bench

Benchmark = Callable[[], dict[str, float]]


def discover(selected: Sequence[str] = ()) -> dict[str, Benchmark]:
    """Return the `run` of each benchmark module in bench/, by module name."""
    names = sorted(
        info.name for info in pkgutil.iter_modules(bench.__path__) if not info.name.startswith("_")
    )
    unknown = set(selected) - set(names)
    if unknown:
        raise SystemExit(f"no benchmark module named {', '.join(sorted(unknown))}")
    found: dict[str, Benchmark] = {}
    for name in names:
        if selected and name not in selected:
            continue
        run = getattr(importlib.import_module(f"bench.{name}"), "run", None)
        if callable(run):
            found[name] = run
    return found


def format_value(value: float) -> str:
    """Render a figure: thousands separators for big ones, two decimals for small."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def main(argv: Sequence[str]) -> int:
    """Run the benchmarks, print the table, return the exit status."""
    failed = 0
    rows: list[tuple[str, str, str]] = []
    for name, run in discover(argv).items():
        print(f"running bench.{name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            figures = run()
        except Exception:
            traceback.print_exc()
            failed += 1
            rows.append((name, "FAILED", "-"))
            continue
        elapsed = time.perf_counter() - started
        rows.extend((name, metric, format_value(value)) for metric, value in figures.items())
        rows.append((name, "wall_s", format_value(elapsed)))

    headers = ("module", "metric", "value")
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(3)]
    line = "  ".join(f"{{:<{widths[0]}}} {{:<{widths[1]}}} {{:>{widths[2]}}}".split(" "))
    print(line.format(*headers))
    print(line.format(*("-" * width for width in widths)))
    for row in rows:
        print(line.format(*row))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
