"""Start-up (docs/semantics.md, addition 3): which timer each restored schedule gets.

A schedule due later is re-armed as it was, but never more than one effective interval
from now: one due further ahead was armed on a time line ahead of this run's (the wall
clock stepped back before the restart by more than ``SystemClock.resume`` goes on from).
A warm that was out is awaited until its own timeout, at most a whole timeout from now.
A warm that fell due while the worker was down goes out at once if the cache can still
be alive (read within its known TTL, else ``cache_ttl_ms``), the burst spread over
``recovery_spread_ms``, with the token it was armed with; otherwise the conversation
waits, ``expired`` (the late-fire guard), for its next turn. Moving a warm later is
checked against the idle budget as any arm is (addition 4), by the same rule as the
running worker (``Economy.budget_spent``: not under ``adaptive``): past it, the status
is ``budget_exhausted``. Everything else has no timer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from msgspec import Struct

from warmer.contract import Status
from warmer.core.economy import Economy
from warmer.core.effects import Arm
from warmer.core.state import Conversation

_STEP_MS: Final = 50
"""The gap between two warms of a burst, while the burst fits its window."""


class Recovery(Struct, frozen=True, kw_only=True):
    """What recovery did: the timers to arm, and how many conversations went which way."""

    arms: list[Arm]
    loaded: int
    """Conversations in memory (settings-only records included)."""
    rearmed: int
    """Armed or retrying, due later: re-armed as they were."""
    awaited: int
    """A warm was out: its timeout armed again."""
    warmed_now: int
    """Fell due while down, cache still alive: warmed at once, spread over a short window."""
    expired: int
    """Fell due while down, not warmed (cache gone, or the idle budget's time spent)."""
    moved_earlier: int = 0
    """Of ``rearmed``: due more than one effective interval ahead (stored on a time line
    ahead of this run's), moved to one interval from now."""
    retention_paused_ms: int = 0
    """How long ago the newest stored input was, when more than `RETENTION_PAUSE_MS`:
    not counted against retention (every loaded last input moved on by it)."""


class RecoveryPlan(Struct, frozen=True, kw_only=True):
    """The recovery, and the two changes it makes to the state (to persist)."""

    recovery: Recovery
    warm_now: list[Arm]
    """Overdue, cache alive: ``nextWarmAt`` becomes the arm's due time."""
    moved: list[Arm]
    """Due more than an interval ahead: ``nextWarmAt`` becomes the arm's due time."""
    expired: list[str]
    """Overdue, cache gone: idle, ``nextWarmAt`` null."""
    exhausted: list[str]
    """Overdue, cache alive, but due beyond the idle budget's time: ``budget_exhausted``."""


def plan_recovery(
    conversations: Mapping[str, Conversation], now: int, economy: Economy
) -> RecoveryPlan:
    """The timer of every restored conversation at ``now``; nothing is changed here."""
    arms: list[Arm] = []
    overdue: list[tuple[int, str, Conversation]] = []
    expired: list[str] = []
    moved: list[Arm] = []
    rearmed = awaited = 0
    for cid, conv in conversations.items():
        phase = conv.phase
        if not phase.pending or not conv.enabled or conv.active:
            continue
        if phase is Status.WARMING:
            # Never later than a whole timeout from now (a clock that stepped back).
            timeout = conv.timeout_ms
            timeout_at = max(now, min(conv.published_at + timeout, now + timeout))
            arms.append(Arm(cid, timeout_at, conv.token))
            awaited += 1
            continue
        due = conv.next_warm_at
        assert due is not None, "armed or retrying without a due time"
        if due >= now:
            interval = economy.interval(conv)
            if due > now + interval:
                # Every schedule is due within one effective interval of when it was
                # armed: this one was armed on a time line ahead of this run's (the
                # wall clock stepped back more than SystemClock.resume goes on from).
                due = now + interval
                moved.append(Arm(cid, due, conv.token))
            arms.append(Arm(cid, due, conv.token))
            rearmed += 1
        elif now - (
            conv.idle_since if conv.last_read_at is None else conv.last_read_at
        ) < economy.lifetime(conv):
            overdue.append((due, cid, conv))
        else:
            expired.append(cid)
    overdue.sort(key=lambda item: item[:2])  # the longest overdue first
    count = len(overdue)
    window = min(_STEP_MS * count, economy.policy.recovery_spread_ms)
    warm_now: list[Arm] = []
    exhausted: list[str] = []
    for k, (_, cid, conv) in enumerate(overdue):
        due = now + k * window // count
        if economy.budget_spent(conv, due):
            exhausted.append(cid)
        else:
            warm_now.append(Arm(cid, due, conv.token))
    recovery = Recovery(
        arms=arms + warm_now,
        loaded=len(conversations),
        rearmed=rearmed,
        awaited=awaited,
        warmed_now=len(warm_now),
        expired=len(expired) + len(exhausted),
        moved_earlier=len(moved),
    )
    return RecoveryPlan(
        recovery=recovery,
        warm_now=warm_now,
        moved=moved,
        expired=expired,
        exhausted=exhausted,
    )
