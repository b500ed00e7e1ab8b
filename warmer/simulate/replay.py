"""Idle gaps replayed through the real core (``warmer.core.Warmer``) with a fake clock.

Each conversation is a run of gaps. A gap opens with ``turn.settled`` (its
``lastRequestAt`` now, the cache lifetime and the prefix size given); the armed timer
fires while it falls due before the user's return; every warm the core publishes
completes at once, its usage a read while the provider's cache lives and a write after
(the provider keeps a cache ``ttl`` after its last read). The return is a
``turn.started``, and the next gap's settle follows at the same time. An abandoned gap
lets the timers run out, then the conversation is closed, or forgotten by ``prune``
after the retention time (every other one), so the core learns abandonment both ways.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import assert_never

from msgspec.structs import replace

from warmer.contract import (
    ConversationClosed,
    CostPolicyName,
    SetEnabled,
    TurnSettled,
    TurnStarted,
    WarmCompleted,
)
from warmer.core import (
    Accounted,
    Arm,
    Cancel,
    IntervalAdjusted,
    Outcome,
    Policy,
    PublishSurface,
    PublishWarm,
    SendReply,
    SettingsChange,
    Warmer,
    WarmFailed,
    WarmSkipped,
)
from warmer.core.policy import HOUR_MS
from warmer.simulate.mixes import Gap
from warmer.simulate.pricing import Result, Tariff, warm_usage

_START_MS = 1_760_000_000_000
"""The fake clock's start: a plausible epoch time (0 is "unknown" to retention)."""
_BETWEEN_MS = 3_600_000
"""The clock moves on this much between one conversation and the next."""


class Replay:
    """One row's run: one ``Warmer`` learning over every conversation, one after another."""

    def __init__(
        self,
        policy: Policy,
        tariff: Tariff,
        *,
        cost_policy: CostPolicyName | None,
        ttl_ms: int,
    ) -> None:
        """Warm with ``cost_policy`` (None: warming disabled) a cache that lives ``ttl_ms``."""
        self.warmer = Warmer(
            replace(policy, cost_policy=cost_policy) if cost_policy is not None else policy
        )
        self.tariff = tariff
        self.warming = cost_policy is not None
        self.ttl_ms = ttl_ms
        self.hour = ttl_ms >= HOUR_MS
        self.now = _START_MS
        self.skipped: Counter[str] = Counter()
        """Why the core held warms (``WarmSkipped`` reasons)."""
        self.accounted = 0
        """The core's own account of what the warms cost (base-input-token units)."""
        self._cost = 0.0
        self._gaps = self._returns = self._warm_returns = self._warms = 0
        self._timer: tuple[int, int] | None = None  # (due, token) of the one armed timer
        self._read_at = self.now  # the provider's last read of the cache

    def result(self) -> Result:
        """What the conversations replayed so far cost."""
        return Result(
            cost=self._cost,
            gaps=self._gaps,
            returns=self._returns,
            warm_returns=self._warm_returns,
            warms=self._warms,
        )

    def run(self, conversations: Sequence[Sequence[Gap]]) -> Result:
        """Replay every conversation; what they cost."""
        for number, gaps in enumerate(conversations):
            self.conversation(f"c{number}", gaps, prune=number % 2 == 1)
        return self.result()

    def conversation(self, cid: str, gaps: Sequence[Gap], *, prune: bool = False) -> None:
        """One conversation: its gaps in turn; abandoned, it is pruned or closed."""
        warmer = self.warmer
        self._timer = None
        self._read_at = self.now  # the first turn wrote the cache
        if self.warming:
            change = warmer.plan_command(self.now, SetEnabled(conversation_id=cid, enabled=True))
            assert isinstance(change, SettingsChange)
            self._apply(cid, warmer.commit(self.now, change))
        for gap in gaps:
            settled = TurnSettled(
                conversation_id=cid,
                last_request_at=self.now,
                cache_ttl_s=self.ttl_ms // 1000,
                prefix_tokens=self.tariff.prefix_tokens,
            )
            self._apply(cid, warmer.apply_event(self.now, settled))
            self._gaps += 1
            if gap is None:
                self._run_timers(cid, until=None)
                if prune:
                    self.now += warmer.policy.retention_ms + 1
                    assert cid in warmer.prune(self.now)
                    return
                break
            back = self.now + gap
            self._run_timers(cid, until=back)
            self.now = back
            self._returned()
            self._apply(cid, warmer.apply_event(self.now, TurnStarted(conversation_id=cid)))
        self._apply(cid, warmer.apply_event(self.now, ConversationClosed(conversation_id=cid)))
        self.now += _BETWEEN_MS

    def _returned(self) -> None:
        """The user is back: the turn reads the cache if it lives, else writes it again."""
        tariff = self.tariff
        self._returns += 1
        if self.now < self._read_at + self.ttl_ms:
            self._warm_returns += 1
            self._cost += tariff.read
        else:
            self._cost += tariff.write_hour if self.hour else tariff.write
        if self.hour:
            self._cost += tariff.growth_hour
        self._read_at = self.now

    def _run_timers(self, cid: str, until: int | None) -> None:
        """Fire the armed timer while it falls due before ``until`` (None: until none is)."""
        while self._timer is not None and (until is None or self._timer[0] < until):
            due, token = self._timer
            self._timer = None
            self.now = max(self.now, due)
            for warm in self._apply(cid, self.warmer.on_timer(self.now, cid, token)):
                self._warm(cid, warm)

    def _warm(self, cid: str, warm: PublishWarm) -> None:
        """The provider answers a warm at once: a read while the cache lives, else a write."""
        alive = self.now < self._read_at + self.ttl_ms
        tariff = self.tariff
        self._warms += 1
        self._cost += tariff.warm if alive else tariff.warm_miss
        self._read_at = self.now
        completed = WarmCompleted(
            conversation_id=cid,
            token=warm.request.token,
            usage=warm_usage(tariff.prefix_tokens, alive=alive),
        )
        self._apply(cid, self.warmer.apply_event(self.now, completed))

    def _apply(self, cid: str, outcome: Outcome) -> list[PublishWarm]:
        """Carry out the timers the core asks for; the warms it publishes, to answer."""
        warms: list[PublishWarm] = []
        for effect in outcome.effects:
            match effect:
                case Arm():
                    assert effect.conversation_id == cid
                    self._timer = (effect.due_at, effect.token)
                case Cancel():
                    self._timer = None
                case PublishWarm():
                    warms.append(effect)
                case WarmSkipped():
                    self.skipped[str(effect.reason)] += 1
                case Accounted():
                    self.accounted += effect.spent
                case WarmFailed():
                    raise AssertionError(f"a simulated warm failed: {effect.error}")
                case PublishSurface() | SendReply() | IntervalAdjusted():
                    pass
                case _:
                    assert_never(effect)
        return warms
