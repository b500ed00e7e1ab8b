"""The rule for a schedule warmed twice, on warms written by hand (no broker)."""

from __future__ import annotations

import math

from tests.replicas.orchestrator import Warm
from tests.replicas.schedules import (
    Tenure,
    doubles,
    first_warms_after,
    outside_tenures,
    overlaps,
    owners,
)


def warm(token: int, at: int, replica: str = "r1", cid: str = "c") -> Warm:
    return Warm(cid, token, replica, requested_at=at, received_ms=at + 5)


def test_warms_one_interval_apart_with_growing_tokens_are_no_double() -> None:
    warms = [warm(1, 0), warm(2, 1010, "r2"), warm(3, 2030, "r2"), warm(9, 0, cid="other")]
    assert doubles(warms, 1000) == []


def test_two_warms_closer_than_half_an_interval_are_one_schedule_warmed_twice() -> None:
    warms = [warm(1, 0), warm(2, 1000, "r1"), warm(3, 1400, "r2")]
    assert [(d.first.token, d.second.token) for d in doubles(warms, 1000)] == [(2, 3)]


def test_a_token_not_above_the_last_is_a_double_however_late() -> None:
    warms = [warm(5, 0, "r2"), warm(5, 3000, "r1"), warm(4, 6000, "r1")]
    assert [(d.first.token, d.second.token) for d in doubles(warms, 1000)] == [(5, 5), (5, 4)]


def test_one_request_its_publisher_sent_again_is_no_double() -> None:
    # A publish cut before its confirm goes out again (at least once, docs/contract.md).
    warms = [warm(5, 0), warm(5, 120), warm(6, 1000)]
    assert doubles(warms, 1000) == []


def test_the_order_is_the_publishers_requested_at_not_arrival() -> None:
    late = Warm("c", 2, "r2", requested_at=1000, received_ms=99_000)
    assert doubles([late, warm(1, 0)], 1000) == []


def test_first_warm_after_a_moment_and_who_warmed_what() -> None:
    warms = [warm(1, 0), warm(3, 2000, "r3"), warm(2, 1000, "r2"), warm(4, 50, cid="d")]
    assert first_warms_after(warms, ["c", "d", "e"], 500) == {"c": warms[2]}
    in_flight = Warm("c", 1, "r1", requested_at=400, received_ms=600)
    assert first_warms_after([in_flight], ["c"], 500) == {}
    assert owners(warms) == {"c": {"r1", "r2", "r3"}, "d": {"r1"}}


def test_a_warm_outside_every_tenure_of_its_publisher_on_that_shard_is_found() -> None:
    tenures = [Tenure("r1", 0, 0, 5000), Tenure("r2", 0, 5000, math.inf), Tenure("r2", 1, 0, 9)]
    shard_of = {"c": 0}
    inside = [warm(1, 100), warm(2, 5100, "r2"), warm(3, 5200, "r1"), warm(4, 9000, "r2")]
    stray = warm(5, 7000, "r1")
    unjudged = [Warm("c", 6, None, 7000, 7005), warm(7, 7000, "r1", cid="unplaced")]
    found = outside_tenures([*inside, stray, *unjudged], tenures, shard_of, slack_ms=250)
    assert found == [stray]


def test_two_holders_of_one_shard_at_once_are_found() -> None:
    handed = [Tenure("r1", 0, 0, 5000), Tenure("r2", 0, 5100, math.inf), Tenure("r3", 1, 0, 1)]
    assert overlaps(handed, slack_ms=250) == []
    both = Tenure("r3", 0, 4000, 6000)
    assert overlaps([*handed, both], slack_ms=250) == [(handed[0], both), (both, handed[1])]
