"""Core throughput: lifecycle events per second through the pure state machine, on one core.

Every conversation (10,000, opted in beforehand) goes round the everyday cycle:
``turn.started``, ``turn.settled`` (with ``cwd`` and ``modelName``), its timer firing
with the current token, and ``warm.completed`` with usage and that token. Each phase
sweeps all conversations before the next starts, so consecutive events touch different
conversations, as on a busy broker.

Three modes, each on a fresh ``Warmer`` with one untimed warm-up round:

- ``apply``: decoded events into ``apply_event`` / ``on_timer``;
- ``decode_apply``: JSON bodies through ``decode_event`` first (timers carry no body);
- ``decode_apply_encode``: as above, and every ``PublishSurface`` encoded, as the shell
  must before publishing.

Only the calls are timed: building the next round's events and bodies (their ``seq`` and
``token`` change every round) happens between timed sweeps. The garbage collector stays
on, as in the service. Each kind is reported from its fastest sweep (see ``run``).
Target (the issue): 200,000 core events/s on one core.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Final, Literal

from warmer.contract import (
    LifecycleEvent,
    Rejection,
    TurnSettled,
    TurnStarted,
    UnknownType,
    Usage,
    WarmCompleted,
    decode_event,
    encode,
)
from warmer.core import Effect, Policy, PublishSurface, Settings, Warmer

Mode = Literal["apply", "decode_apply", "decode_apply_encode"]
Kind = Literal["turn_started", "turn_settled", "timer_fired", "warm_completed"]

CONVERSATIONS: Final = 10_000
TARGET_EVENTS_PER_S: Final = 200_000
MODES: Final[tuple[Mode, ...]] = ("apply", "decode_apply", "decode_apply_encode")
KINDS: Final[tuple[Kind, ...]] = ("turn_started", "turn_settled", "timer_fired", "warm_completed")
_INTERVAL_MS: Final = 240_000
_EPOCH_MS: Final = 1_760_000_000_000
_USAGE: Final = Usage(
    input_tokens=48_000, cache_read_tokens=47_200, cache_write_tokens=800, output_tokens=1
)
_CWD: Final = "/home/dev/projects/warmer"
_MODEL: Final = "claude-sonnet-4-5"


@dataclass
class _Cycle:
    """One ``Warmer`` and its conversations, driven round after round."""

    mode: Mode
    conversations: int
    warmer: Warmer = field(init=False)
    ids: list[str] = field(init=False)
    now: int = _EPOCH_MS
    round: int = 0
    rounds: list[dict[Kind, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = [f"conv-{i:06d}-7f3a9c2e" for i in range(self.conversations)]
        enabled = Settings(enabled=True, interval_ms=_INTERVAL_MS)
        self.warmer = Warmer(Policy(), dict.fromkeys(self.ids, enabled), token_start=1)

    def run_round(self, timed: bool = True) -> None:
        """Every conversation once round the cycle; keep the sweeps' times if ``timed``."""
        r = self.round
        self.round += 1
        ids = self.ids
        spent: dict[Kind, float] = {}

        now = self._tick()
        started = [
            TurnStarted(conversation_id=cid, seq=2 * r + 1, at=now + i) for i, cid in enumerate(ids)
        ]
        spent["turn_started"] = self._sweep_events(now, started)
        self._expect("active")

        now = self._tick()
        settled = [
            TurnSettled(
                conversation_id=cid,
                cwd=_CWD,
                model_name=_MODEL,
                last_request_at=now + i - 1_500,
                seq=2 * r + 2,
                at=now + i,
            )
            for i, cid in enumerate(ids)
        ]
        spent["turn_settled"] = self._sweep_events(now, settled)
        self._expect("armed")

        now = self._tick()
        spent["timer_fired"] = self._sweep_timers(now)
        self._expect("warming")

        now = self._tick()
        warmer = self.warmer
        completed = [
            WarmCompleted(
                conversation_id=cid,
                token=warmer.get(cid).token,  # type: ignore[union-attr]
                usage=_USAGE,
                at=now + i,
            )
            for i, cid in enumerate(ids)
        ]
        spent["warm_completed"] = self._sweep_events(now, completed)
        self._expect("armed")

        if timed:
            self.rounds.append(spent)

    @property
    def timed_seconds(self) -> float:
        """The time spent in timed calls so far."""
        return sum(sum(spent.values()) for spent in self.rounds)

    def _tick(self) -> int:
        """The start of the next sweep: one ms per event, as a steady stream would space them."""
        self.now += len(self.ids)
        return self.now

    def _sweep_events(self, now: int, events: Sequence[LifecycleEvent]) -> float:
        apply = self.warmer.apply_event
        if self.mode == "apply":
            start = perf_counter()
            for i, event in enumerate(events):
                apply(now + i, event)
            return perf_counter() - start
        bodies = [encode(event) for event in events]
        surfaces = self.mode == "decode_apply_encode"
        start = perf_counter()
        for i, body in enumerate(bodies):
            decoded = decode_event(body, "application/json")
            if isinstance(decoded, UnknownType | Rejection):
                raise AssertionError(f"bench body did not decode: {decoded!r}")
            outcome = apply(now + i, decoded)
            if surfaces:
                _encode_surfaces(outcome.effects)
        return perf_counter() - start

    def _sweep_timers(self, now: int) -> float:
        warmer = self.warmer
        fires = [(cid, warmer.get(cid).token) for cid in self.ids]  # type: ignore[union-attr]
        on_timer = warmer.on_timer
        surfaces = self.mode == "decode_apply_encode"
        start = perf_counter()
        for i, (cid, token) in enumerate(fires):
            outcome = on_timer(now + i, cid, token)
            if surfaces:
                _encode_surfaces(outcome.effects)
        return perf_counter() - start

    def _expect(self, status: str) -> None:
        """Fail loudly if the cycle strayed from the path it is meant to measure."""
        for cid in (self.ids[0], self.ids[-1]):
            conv = self.warmer.get(cid)
            if conv is None or conv.status != status:
                got = None if conv is None else conv.status
                raise AssertionError(f"{cid}: status {got!r}, expected {status!r}")


def _encode_surfaces(effects: list[Effect]) -> None:
    for effect in effects:
        if type(effect) is PublishSurface:
            encode(effect.update)


def measure(mode: Mode, seconds: float, conversations: int = CONVERSATIONS) -> _Cycle:
    """Run ``mode`` for at least ``seconds`` of timed calls, after one warm-up round."""
    cycle = _Cycle(mode, conversations)
    cycle.run_round(timed=False)
    while cycle.timed_seconds < seconds or len(cycle.rounds) < 3:
        cycle.run_round()
    return cycle


def run(seconds: float = 3.0, conversations: int = CONVERSATIONS) -> dict[str, float]:
    """Core events per second in each mode, and the microseconds per event of each kind.

    Each kind's figure is its fastest sweep, as timeit advises (a slower one measures
    what else ran on the machine, not the core); the rate is over the four together.
    """
    result: dict[str, float] = {}
    for mode in MODES:
        cycle = measure(mode, seconds, conversations)
        best = {kind: min(spent[kind] for spent in cycle.rounds) for kind in KINDS}
        result[f"{mode}_events_per_s"] = len(KINDS) * conversations / sum(best.values())
        for kind in KINDS:
            result[f"{mode}.{kind}_us"] = best[kind] / conversations * 1e6
    result["target_events_per_s"] = float(TARGET_EVENTS_PER_S)
    return result


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.core", description="Core events per second, on one core."
    )
    parser.add_argument(
        "seconds", nargs="?", type=float, default=3.0, help="timed seconds per mode (3)"
    )
    seconds = parser.parse_args(argv).seconds
    width = max(len(name) for name in MODES) + len(".warm_completed_us")
    for name, value in run(seconds).items():
        print(f"{name:<{width}}  {value:>12,.2f}")


if __name__ == "__main__":
    _main(sys.argv[1:])
