"""Retention: a mass expiry is forgotten a bounded number at a time, none missed or twice."""

from __future__ import annotations

from warmer.core.retention import PRUNE_LIMIT, Retention
from warmer.core.state import Conversation

DAY = 86_400_000


def _idle_since(at: int) -> Conversation:
    return Conversation(enabled=True, interval_ms=240_000, last_input_at=at, idle_since=at)


def test_a_mass_expiry_is_forgotten_at_most_limit_at_a_time_and_none_is_missed() -> None:
    conversations = {f"c-{n}": _idle_since(1_000 + n) for n in range(25)}
    conversations["fresh"] = _idle_since(8 * DAY)
    retention = Retention(7 * DAY)
    now = 8 * DAY
    rounds: list[list[str]] = []
    while due := retention.due(conversations, now, limit=10):
        rounds.append(due)
        for cid in due:
            del conversations[cid]  # forgotten, as Warmer.prune does
    assert [len(due) for due in rounds] == [10, 10, 5]
    assert set(conversations) == {"fresh"}


def test_the_limit_keeps_one_commit_small() -> None:
    assert 1_000 <= PRUNE_LIMIT <= 10_000  # what one Redis script writes well within 2 s
    conversations = {f"c-{n}": _idle_since(1_000) for n in range(PRUNE_LIMIT + 1)}
    assert len(Retention(DAY).due(conversations, 2 * DAY)) == PRUNE_LIMIT
