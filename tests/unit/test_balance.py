"""The shard assignment: total, balanced within one, stable, and moving little."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from warmer.balance import assign

names = st.lists(st.text("abcdefgh0123456789", min_size=1, max_size=6), min_size=1, max_size=9)


@given(st.integers(1, 64), names)
def test_every_shard_has_exactly_one_owner_and_counts_differ_by_one_at_most(
    shards: int, replicas: list[str]
) -> None:
    result = assign(shards, replicas)
    owned = [shard for held in result.values() for shard in held]
    assert sorted(owned) == list(range(shards))
    counts = [len(held) for held in result.values()]
    assert max(counts) - min(counts) <= 1
    assert set(result) == set(replicas)


def test_the_answer_does_not_depend_on_the_order_replicas_are_seen_in() -> None:
    assert assign(16, ["a", "b", "c"]) == assign(16, ["c", "a", "b", "a"])


def test_a_replica_leaving_moves_only_its_own_shards() -> None:
    before = assign(12, ["a", "b", "c"])
    after = assign(12, ["a", "b"])
    for replica in ("a", "b"):
        assert before[replica] <= after[replica]


def test_a_replica_joining_takes_about_its_share_and_moves_little_else() -> None:
    before = assign(16, ["a", "b", "c", "d"])
    after = assign(16, ["a", "b", "c", "d", "e"])
    moved = sum(len(before[r] - after[r]) for r in before)
    assert len(after["e"]) == moved  # only what the newcomer took changed hands
    assert 3 <= moved <= 4


def test_no_replica_no_assignment() -> None:
    assert assign(4, []) == {}


@given(st.integers(1, 64), names, st.dictionaries(st.integers(0, 70), st.sampled_from("abcxyz")))
def test_with_current_holders_still_total_and_balanced(
    shards: int, replicas: list[str], current: dict[int, str]
) -> None:
    result = assign(shards, replicas, current)
    owned = [shard for held in result.values() for shard in held]
    assert sorted(owned) == list(range(shards))
    counts = [len(held) for held in result.values()]
    assert max(counts) - min(counts) <= 1


def test_a_replica_joining_a_lone_shard_stands_by() -> None:
    for holder, joiner in (("a", "b"), ("b", "a"), ("x", "standby")):
        assert assign(1, [holder, joiner], {0: holder})[holder] == {0}


def test_live_holders_keep_their_shards_and_a_joiner_takes_only_its_share() -> None:
    before = assign(12, ["a", "b", "c"])
    current = {shard: r for r, held in before.items() for shard in held}
    after = assign(12, ["a", "b", "c", "d"], current)
    assert len(after["d"]) == 3
    for replica in ("a", "b", "c"):
        assert after[replica] <= before[replica] and len(after[replica]) == 3


def test_a_dead_holders_shards_go_to_the_live() -> None:
    after = assign(6, ["a", "b"], {0: "gone", 1: "gone", 2: "a", 3: "a", 4: "b", 5: "b"})
    assert {2, 3} <= after["a"] and {4, 5} <= after["b"]
