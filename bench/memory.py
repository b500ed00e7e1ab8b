"""Memory: RSS and bytes per conversation at 100,000 and 1,000,000 conversations, after
start and after an hour of simulated churn.

Each case runs in a fresh process. It builds the records a store would hand back (the
``bench.recovery`` mix: settings, a ``cwd`` and a model name, a last turn's figures, the
cost fields; 70% with a timer), then does what ``App.start`` does with them: decode each
record as its bytes are dropped, build the core, ``begin`` + ``recover``, encode what
recovery touched (as the commit would), arm a ``Scheduler`` on an injected clock. RSS is
read from ``/proc/self/statm`` after a ``gc.collect``; the growth is counted from just
after the imports, and bytes per conversation are that growth over the conversations
held.

The churn: an hour on the injected clock, in three rounds 20 minutes apart. In each, a
twentieth of the conversations (every twentieth id) take a turn (``turn.started``, then
``turn.settled`` with a ``cwd`` from a few thousand and one of three models), their timer
falls due (taken from the scheduler as its fire would) and the warm completes with usage;
1% of the conversations close and as many new ones take their first turn. Inputs go in
batches of 256 as the worker's do: ``begin``, apply, encode ``touched()``, ``end``, then
the batch's arms and cancels go to the scheduler. Timers of the other conversations stay
armed and never fire (firing them all would be ten million warms, not a memory question).

``python -m bench.memory [N ...]``; through the table: ``python -m bench memory``.
Fixed seeds (the ids and every choice follow from the conversation's number).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Final

from bench.recovery import _conversation_id, _decoded, _record
from warmer.clock import ManualClock
from warmer.contract import (
    ConversationClosed,
    LifecycleEvent,
    TurnSettled,
    TurnStarted,
    Usage,
    WarmCompleted,
)
from warmer.core import Arm, Cancel, Effect, Policy, Warmer
from warmer.core.records import encode_changes, encode_record
from warmer.core.rules import token_start
from warmer.scheduler import Scheduler

ESTIMATE_S: Final = 90.0
SIZES: Final = (100_000, 1_000_000)
PHASES: Final = ("start", "churn")
TARGET_BYTES_PER_CONVERSATION: Final = 600.0
TARGET_RSS_MB_AT_1M: Final = 1024.0
EPOCH_MS: Final = 1_780_000_000_000
ROUNDS: Final = 3
ROUND_MS: Final = 1_200_000
CHURN_EVERY: Final = 20
"""Every twentieth conversation takes part in each round."""
CLOSE_EVERY: Final = 100
"""Every hundredth conversation closes (and as many new ones arrive) in each round."""
BATCH: Final = 256
_USAGE: Final = Usage(
    input_tokens=48_000, cache_read_tokens=47_200, cache_write_tokens=800, output_tokens=1
)
_DISTINCT: Final = 99_700
"""``bench.recovery``'s mix repeats after this many: its ``cwd`` takes i % 100 and i % 997."""
_MODELS: Final = ("claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Worker:
    """The core and the scheduler, driven as the worker drives them, on a manual clock."""

    def __init__(self, n: int) -> None:
        self.clock = ManualClock(EPOCH_MS)
        now = self.clock.now_ms()
        loaded = _loaded(n, now)
        self.core = Warmer(Policy(), records=_decoded(loaded), adopt=True)
        self.core.tokens_from(token_start(0, now))
        self.core.begin()
        recovery = self.core.recover(now)
        encode_changes(self.core.touched())  # what the start-up commit would write
        self.core.end()
        self.scheduler = Scheduler(self.clock, _never_fired)
        self.scheduler.arm_many(
            (arm.conversation_id, arm.due_at, arm.token) for arm in recovery.arms
        )
        self.n = n
        self.seq = 1_000

    def churn(self) -> int:
        """An hour of turns, warms, closes and arrivals (the module's docstring); returns
        how many inputs were applied."""
        applied = 0
        for r in range(ROUNDS):
            self.clock.set(EPOCH_MS + (r + 1) * ROUND_MS)
            ids = [_conversation_id(i) for i in range(r, self.n, CHURN_EVERY)]
            applied += self._batches(self._turns(ids, r))
            self.clock.advance(30_000)
            applied += self._batches(self._warms(ids))
            gone = [_conversation_id(i) for i in range(r, self.n, CLOSE_EVERY)]
            new = [_conversation_id(self.n + r * len(gone) + k) for k in range(len(gone))]
            applied += self._batches(self._closes(gone))
            applied += self._batches(self._turns(new, r))
        return applied

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _turns(self, ids: list[str], r: int) -> Iterator[LifecycleEvent]:
        now = self.clock.now_ms()
        for k, cid in enumerate(ids):
            yield TurnStarted(conversation_id=cid, seq=self._next_seq(), at=now)
            yield TurnSettled(
                conversation_id=cid,
                cwd=f"/home/dev{k % 50:02d}/projects/service-{(k + r) % 97:02d}",
                model_name=_MODELS[(k + r) % 3],
                last_request_at=now - 1_500,
                seq=self._next_seq(),
                at=now,
            )

    def _closes(self, ids: list[str]) -> Iterator[LifecycleEvent]:
        now = self.clock.now_ms()
        for cid in ids:
            yield ConversationClosed(conversation_id=cid, seq=self._next_seq(), at=now)

    def _warms(self, ids: list[str]) -> Iterator[str | LifecycleEvent]:
        """Each one's timer falls due (its id: ``_batches`` fires it), then its warm's
        completion (built once the fire has issued the token)."""
        for cid in ids:
            yield cid
            conv = self.core.get(cid)
            if conv is not None and self.core.is_awaiting(cid, conv.token):
                yield WarmCompleted(
                    conversation_id=cid, token=conv.token, usage=_USAGE, at=self.clock.now_ms()
                )

    def _batches(self, inputs: Iterator[str | LifecycleEvent]) -> int:
        core, scheduler = self.core, self.scheduler
        applied = 0
        done = False
        while not done:
            now = self.clock.now_ms()
            core.begin()
            effects: list[Effect] = []
            for _ in range(BATCH):
                item = next(inputs, None)
                if item is None:
                    done = True
                    break
                applied += 1
                if isinstance(item, str):
                    pending = scheduler.pending(item)
                    if pending is None:
                        continue
                    scheduler.cancel(item)  # as its fire disarms it
                    effects += core.on_timer(now, item, pending[1]).effects
                else:
                    effects += core.apply_event(now, item).effects
            encode_changes(core.touched(), core.touched_model())  # the batch's commit
            core.end()
            for effect in effects:
                if isinstance(effect, Arm):
                    scheduler.arm(effect.conversation_id, effect.due_at, effect.token)
                elif isinstance(effect, Cancel):
                    scheduler.cancel(effect.conversation_id)
        return applied


def _loaded(n: int, now: int) -> dict[str, bytes]:
    """What the store hands back: ``n`` records of the ``bench.recovery`` mix, each its own
    bytes. The mix repeats every ``_DISTINCT`` conversations (its working directories do),
    so those are encoded once and copied: a copy decodes to objects of its own as well."""
    template = [encode_record(_record(i, now)) for i in range(min(n, _DISTINCT))]
    return {_conversation_id(i): bytes(bytearray(template[i % _DISTINCT])) for i in range(n)}


def _never_fired(key: str, token: int) -> None:
    """The scheduler's callback: the churn takes due timers from it by hand."""


def measure(n: int, phase: str) -> dict[str, float]:
    """One case in this process: start with ``n`` conversations, churn if ``phase`` says."""
    gc.collect()
    rss_before = _rss_bytes()
    started = time.perf_counter()
    worker = _Worker(n)
    figures: dict[str, float] = {"start_s": time.perf_counter() - started}
    if phase == "churn":
        started = time.perf_counter()
        figures["inputs"] = float(worker.churn())
        figures["churn_s"] = time.perf_counter() - started
    gc.collect()
    held = len(worker.core)
    growth = _rss_bytes() - rss_before
    figures["conversations"] = float(held)
    figures["timers"] = float(len(worker.scheduler))
    figures["rss_mb"] = _rss_bytes() / 2**20
    figures["rss_growth_mb"] = growth / 2**20
    figures["bytes_per_conversation"] = growth / held
    return figures


def case(n: int, phase: str) -> dict[str, float]:
    """``measure(n, phase)`` in a fresh process."""
    argv = [sys.executable, "-m", "bench.memory", "case", str(n), phase]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"case {n} {phase} failed ({done.returncode}): {done.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(done.stdout)
    return figures


def run(sizes: tuple[int, ...] = SIZES) -> dict[str, float]:
    """Every size after start and after churn (about a minute and a half in all)."""
    figures: dict[str, float] = {}
    for n in sizes:
        for phase in PHASES:
            for name, value in case(n, phase).items():
                figures[f"{phase}_{n}.{name}"] = value
    figures["target_bytes_per_conversation"] = TARGET_BYTES_PER_CONVERSATION
    figures["target_rss_mb_at_1m"] = TARGET_RSS_MB_AT_1M
    return figures


def _main(argv: list[str]) -> None:
    """``case N PHASE`` is the child process; ``[N ...]`` runs some sizes only."""
    if argv and argv[0] == "case":
        print(json.dumps(measure(int(argv[1]), argv[2])))
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory",
        description="RSS and bytes per conversation after start and after an hour of churn.",
    )
    parser.add_argument("sizes", nargs="*", type=int, help="conversations (100000 1000000)")
    sizes = tuple(parser.parse_args(argv).sizes) or SIZES
    for name, value in run(sizes).items():
        print(f"{name:<40} {value:>14,.1f}")


if __name__ == "__main__":
    _main(sys.argv[1:])
