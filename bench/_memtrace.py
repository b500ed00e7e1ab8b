"""Where the memory of a started worker goes: tracemalloc by line, N conversations.

``python -m bench._memtrace [N]`` (100,000 by default; a million takes about two
minutes): the ``bench.recovery`` mix encoded as a store would hand it back, then what
``App.start`` does with it (decode as the bytes are dropped, build the core, recover, arm
a scheduler), traced from the first decode. Prints the bytes per conversation still live
once the start-up garbage is gone (the ids, allocated by the load, are not counted: about
85 bytes each), the peak, and the lines that hold the most. Not a ``run()`` module: the
tracing makes it slow, and its figures are for finding where memory goes.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

from bench.recovery import _conversation_id, _decoded, _record
from warmer.clock import ManualClock
from warmer.core import Policy, Warmer
from warmer.core.records import encode_record
from warmer.core.rules import token_start
from warmer.scheduler import Scheduler

_NOW = 1_780_000_000_000


def _ignore(key: str, token: int) -> None:
    """The scheduler's callback: nothing fires here."""


def trace(n: int) -> None:
    """Start with ``n`` conversations under tracemalloc and print where the memory is."""
    loaded = {_conversation_id(i): encode_record(_record(i, _NOW)) for i in range(n)}
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    core = Warmer(Policy(), records=_decoded(loaded), adopt=True)
    core.tokens_from(token_start(0, _NOW))
    core.begin()
    recovery = core.recover(_NOW)
    core.touched()
    core.end()
    scheduler = Scheduler(ManualClock(_NOW), _ignore)
    scheduler.arm_many((arm.conversation_id, arm.due_at, arm.token) for arm in recovery.arms)
    peak = tracemalloc.get_traced_memory()[1]
    del recovery
    gc.collect()
    stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
    live = sum(stat.size_diff for stat in stats)
    print(f"live {live / n:.0f} B per conversation (ids not counted), peak {peak / n:.0f} B")
    for stat in stats[:12]:
        print(f"{stat.size_diff / n:8.1f} B {stat.count_diff / n:6.2f} blocks  {stat.traceback}")
    print(f"({len(core):,} conversations, {len(scheduler):,} timers)")


if __name__ == "__main__":
    trace(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
