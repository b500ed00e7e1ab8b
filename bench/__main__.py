"""Run every benchmark module in bench/ (or those named) and print one table.

Usage: ``python -m bench [--list] [--markdown FILE] [module ...]`` (``--list``: the
modules and their estimated times, nothing run; ``--markdown``: the machine, versions,
load, command and table written to FILE as well; ``python -m bench.<module> --help`` for
a module's options). A module takes part when it exposes ``run() -> dict[str, float]``;
one that fails is reported and the others still run. A ``run`` with a ``previous``
parameter is given the figures measured so far, as ``{"module.metric": value}`` (so
``overload`` and ``commands`` load the worker to twice what ``replicas`` found it
sustains). ``replicas`` runs before the modules that use its figures, the rest in name
order. Before it starts it prints each module's estimated time (its ``ESTIMATE_S``, else
the table below) and their total; at the end each module's ``wall_s`` and the total.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Final

import bench
from bench import _machine

Benchmark = Callable[..., dict[str, float]]

FIRST: Final = ("replicas",)
"""Modules run before the others: later ones read their figures."""
ESTIMATES_S: Final = {
    "core": 20.0,
    "memory": 120.0,
    "passthrough": 90.0,
    "recovery": 40.0,
    "scheduler": 25.0,
    "scrape": 20.0,
}
"""Seconds each module took on this machine, for those without an ``ESTIMATE_S``."""
_UNKNOWN_S: Final = 60.0


def discover(selected: Sequence[str] = ()) -> dict[str, Benchmark]:
    """Return the ``run`` of each benchmark module in bench/, by module name, in the
    order they run."""
    modules = [info.name for info in pkgutil.iter_modules(bench.__path__)]
    names = sorted(
        (name for name in modules if not name.startswith("_")),
        key=lambda name: (name not in FIRST, FIRST.index(name) if name in FIRST else 0, name),
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


def estimate_s(name: str) -> float:
    """The seconds module ``name`` is expected to take."""
    module = sys.modules.get(f"bench.{name}")
    value: Any = getattr(module, "ESTIMATE_S", None)
    return float(value) if value is not None else ESTIMATES_S.get(name, _UNKNOWN_S)


def format_value(value: float) -> str:
    """Render a figure: thousands separators for big ones, two decimals for small."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def main(argv: Sequence[str]) -> int:
    """Run the benchmarks, print the table, return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("modules", nargs="*", help="the modules to run (all by default)")
    parser.add_argument("--list", action="store_true", help="the estimates only, nothing run")
    parser.add_argument(
        "--markdown",
        metavar="FILE",
        help="also write the machine, the command and the table to FILE (Markdown)",
    )
    args = parser.parse_args(argv)
    listing = args.list
    found = discover(args.modules)
    estimates = {name: estimate_s(name) for name in found}
    for name, seconds in estimates.items():
        print(f"bench.{name}: about {_minutes(seconds)}", file=sys.stderr)
    print(f"estimated total: {_minutes(sum(estimates.values()))}", file=sys.stderr, flush=True)
    if listing:
        return 0

    failed = 0
    rows: list[tuple[str, str, str]] = []
    measured: dict[str, float] = {}
    before = _machine.describe() if args.markdown else ""
    began = time.perf_counter()
    for name, run in found.items():
        print(f"running bench.{name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            if "previous" in inspect.signature(run).parameters:
                figures = run(previous=dict(measured))
            else:
                figures = run()
        except Exception:
            traceback.print_exc()
            failed += 1
            rows.append((name, "FAILED", "-"))
            continue
        elapsed = time.perf_counter() - started
        measured |= {f"{name}.{metric}": value for metric, value in figures.items()}
        rows.extend((name, metric, format_value(value)) for metric, value in figures.items())
        rows.append((name, "wall_s", format_value(elapsed)))
    rows.append(("all", "wall_s", format_value(time.perf_counter() - began)))

    headers = ("module", "metric", "value")
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(3)]
    line = "  ".join(f"{{:<{widths[0]}}} {{:<{widths[1]}}} {{:>{widths[2]}}}".split(" "))
    print(line.format(*headers))
    print(line.format(*("-" * width for width in widths)))
    for row in rows:
        print(line.format(*row))
    spent = time.perf_counter() - began
    print(f"total: {_minutes(spent)}", file=sys.stderr)
    if args.markdown:
        command = " ".join(["python -m bench", *argv])
        text = [
            f"`{command}`: {_minutes(spent)} (estimated {_minutes(sum(estimates.values()))}).",
            "",
            f"Before: {before}",
            "",
            f"After: load average {_machine.load()} (1 / 5 / 15 min).",
            "",
            "| module | metric | value |",
            "| --- | --- | ---: |",
            *(f"| {m} | {metric} | {value} |" for m, metric, value in rows),
        ]
        with open(args.markdown, "w") as out:
            out.write("\n".join(text) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
