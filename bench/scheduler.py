"""Scheduler throughput (arm, re-arm, cancel, fire) and memory at a million conversations."""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

from warmer.clock import ManualClock
from warmer.scheduler import Scheduler

N = 1_000_000
T0 = 1_760_000_000_000
_SPREAD_MS = 600_000


def _ignore(key: str, token: int) -> None:
    """An on_fire that does nothing, so the figures are the scheduler's own."""


def _arm_all(scheduler: Scheduler, keys: list[str], offset_ms: int, first_token: int) -> float:
    """Arm every key, dues spread over ten minutes; return the seconds it took."""
    started = time.perf_counter()
    for i, key in enumerate(keys):
        scheduler.arm(key, T0 + offset_ms + (i * 7919) % _SPREAD_MS, first_token + i)
    return time.perf_counter() - started


def _bytes_per_armed(keys: list[str], churn: bool) -> float:
    """Bytes tracemalloc sees per armed key; keys exist before it starts counting.

    With `churn`, every key is armed once more, so the heap also holds the dead entries
    that compaction has not dropped yet.
    """
    scheduler = Scheduler(ManualClock(T0), _ignore)
    gc.collect()
    tracemalloc.start()
    try:
        _arm_all(scheduler, keys, 300_000, 0)
        if churn:
            _arm_all(scheduler, keys, 900_000, len(keys))
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return used / len(keys)


def run() -> dict[str, float]:
    """Measure the scheduler at N armed conversations."""
    keys = [f"conv-{i:07d}-5f0c2a" for i in range(N)]
    figures: dict[str, float] = {}

    scheduler = Scheduler(ManualClock(T0), _ignore)
    figures["arm_per_s"] = N / _arm_all(scheduler, keys, 300_000, 0)
    figures["rearm_per_s"] = N / _arm_all(scheduler, keys, 900_000, N)
    in_bulk = Scheduler(ManualClock(T0), _ignore)
    timers = [(key, T0 + 300_000 + (i * 7919) % _SPREAD_MS, i) for i, key in enumerate(keys)]
    started = time.perf_counter()
    in_bulk.arm_many(timers)  # start-up's way
    figures["arm_many_per_s"] = N / (time.perf_counter() - started)
    del in_bulk, timers

    started = time.perf_counter()
    for key in keys:
        scheduler.cancel(key)
    figures["cancel_per_s"] = N / (time.perf_counter() - started)

    _arm_all(scheduler, keys, 300_000, 2 * N)
    started = time.perf_counter()
    fired = scheduler.fire_due(T0 + 300_000 + _SPREAD_MS)
    figures["fire_per_s"] = fired / (time.perf_counter() - started)
    del scheduler

    figures["bytes_per_armed"] = _bytes_per_armed(keys, churn=False)
    figures["bytes_per_armed_after_rearm_all"] = _bytes_per_armed(keys, churn=True)
    return figures


if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="python -m bench.scheduler",
        description=f"Scheduler throughput and memory at {N:,} armed conversations.",
    ).parse_args()
    for name, value in run().items():
        print(f"{name:32} {value:14,.2f}")
