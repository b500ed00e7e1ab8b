"""The cost rules on top of docs/semantics.md (issue 11), read as rules: TTL awareness, the
late-fire guard, the minimum prefix, misses, the cost policies, learning and the account."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from msgspec.structs import replace

from warmer.contract import (
    MAX_SAFE_INTEGER,
    CostPolicyName,
    Rejection,
    SettingsReply,
    StatField,
    Status,
    TurnSettled,
    TurnStarted,
    Usage,
    decode_event,
    encode,
)
from warmer.core import MODEL_KEY, GapModel, Hold, Policy, Record, Settings, Warmer
from warmer.core.costs import warm_cost
from warmer.core.gaps import EDGES
from warmer.core.panel import extra_stats
from warmer.core.policy import Prices
from warmer.core.records import decode_record, encode_changes, encode_record

C = "conv-1"
MINUTE = 60_000
HOUR = 60 * MINUTE
P = 100_000  # a prefix of 100,000 tokens


def read(tokens: int = P) -> Usage:
    """A warm that read the whole prefix from the cache."""
    return Usage(input_tokens=tokens + 10, cache_read_tokens=tokens, cache_write_tokens=0)


def wrote(tokens: int = P) -> Usage:
    """A warm that found the cache gone and wrote it again."""
    return Usage(input_tokens=tokens + 10, cache_read_tokens=0, cache_write_tokens=tokens)


def fields(shell: Any) -> dict[str, str]:
    """The last surface's cost fields, by label."""
    return {
        f.label: f.value
        for f in shell.last_surface.spec.fields[5:]
        if isinstance(f, StatField) and f.label not in ("Status", "Last error")
    }


def enabled(shell: Any, **settle: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, **settle)


# -- TTL awareness ------------------------------------------------------------------------


# The idle budget stays (45 minutes by default, shorter than the 1-hour cache's own life):
# these tests give it three hours so a 1-hour cache is warmed at all.
LONG_BUDGET = Policy(idle_max_ms=3 * HOUR)


def test_a_one_hour_cache_is_warmed_shortly_before_its_hour_not_every_four_minutes(
    make_shell: Any,
) -> None:
    shell = make_shell(LONG_BUDGET)
    enabled(shell, cache_ttl_s=3600, last_request_at=shell.now)
    margin = shell.warmer.policy.ttl_margin_ms
    assert shell.status(C) == "armed" and shell.due(C) == shell.now + HOUR - margin
    assert [(a.configured_ms, a.effective_ms, a.ttl_ms) for a in shell.adjusted] == [
        (240_000, HOUR - margin, HOUR)
    ]
    shown = fields(shell)
    assert shown["Cache lifetime"] == "1 h"
    assert shown["Effective interval"] == "59 min (for the 1 h cache)"
    # The completion arms one effective interval later, and says it only once.
    warm = shell.fire(C)
    assert shell.status(C) == "warming"
    shell.advance(2_000)
    shell.completed(C, token=shell.last_warm.token, usage=read())
    assert shell.due(C) == shell.now + HOUR - margin and len(shell.adjusted) == 1
    assert warm.verdict == "applied"


def test_a_configured_interval_too_long_for_the_cache_is_not_obeyed(shell: Any) -> None:
    shell.set_interval(C, 10 * MINUTE)
    enabled(shell, cache_ttl_s=300)
    assert shell.due(C) == shell.now + 4 * MINUTE  # 5 min - the 1-minute margin
    assert fields(shell)["Effective interval"] == "4 min (for the 5 min cache)"
    assert shell.adjusted[0].configured_ms == 10 * MINUTE


def test_the_warm_timeout_never_outlasts_the_effective_interval(make_shell: Any) -> None:
    shell = make_shell(Policy(ttl_margin_ms=295_000))
    enabled(shell, cache_ttl_s=300)
    shell.fire(C)
    assert shell.warms[-1].timeout_ms == 5_000


def test_with_the_default_idle_budget_a_one_hour_cache_is_not_warmed(shell: Any) -> None:
    # Its first warm would be due at 59 minutes, past the budget's 45: the cache outlives
    # the budget on its own.
    enabled(shell, cache_ttl_s=3600)
    assert shell.status(C) == "budget_exhausted" and shell.due(C) is None and shell.warms == []


def test_a_usage_split_says_the_ttl_when_cache_ttl_s_does_not(make_shell: Any) -> None:
    shell = make_shell(LONG_BUDGET)
    usage = Usage(
        input_tokens=P, cache_read_tokens=0, cache_write_tokens=P, cache_write_1h_tokens=P
    )
    enabled(shell, usage=usage)
    assert shell.conv(C).cache_ttl_ms == HOUR
    assert shell.due(C) == shell.now + HOUR - shell.warmer.policy.ttl_margin_ms
    # cacheTtlS wins over the split.
    shell.settled(C, usage=usage, cache_ttl_s=300)
    assert shell.conv(C).cache_ttl_ms == 300_000


def test_a_warm_usage_split_updates_the_ttl(shell: Any) -> None:
    enabled(shell)
    shell.fire(C)
    usage = Usage(
        input_tokens=P, cache_read_tokens=P, cache_write_tokens=0, cache_write_5m_tokens=0
    )
    shell.completed(C, token=shell.last_warm.token, usage=usage)
    assert shell.conv(C).cache_ttl_ms is None  # reads only: the split says nothing
    split = Usage(
        input_tokens=P, cache_read_tokens=0, cache_write_tokens=P, cache_write_1h_tokens=P
    )
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token, usage=split)
    assert shell.conv(C).cache_ttl_ms == HOUR


def test_without_the_optional_fields_nothing_changes(shell: Any) -> None:
    enabled(shell)
    assert shell.due(C) == shell.now + 240_000 and shell.adjusted == []
    assert fields(shell) == {}


# -- the late-fire guard ------------------------------------------------------------------


def test_a_settle_whose_cache_already_died_is_not_warmed(shell: Any) -> None:
    # The example: lastRequestAt 400 s old, cacheTtlS 300.
    shell.set_enabled(C, True)
    out = shell.settled(C, last_request_at=shell.now - 400_000, cache_ttl_s=300)
    assert shell.status(C) == "expired" and shell.due(C) is None
    assert [(s.conversation_id, s.reason) for s in shell.skipped] == [(C, Hold.EXPIRED)]
    assert shell.last_surface.state.status == "expired" and len(out.effects) >= 1
    assert "expired" in fields(shell)["Not warming"]


def test_a_timer_that_fires_after_the_cache_expired_does_not_warm(shell: Any) -> None:
    enabled(shell, cache_ttl_s=300)
    shell.now = shell.due(C) + 60_000  # the loop stalled: the cache died at due + 60 s
    out = shell.fire(C)
    assert out.verdict == "applied" and shell.warms == []
    assert shell.status(C) == "expired" and shell.skipped[-1].reason is Hold.EXPIRED
    # A fire just before expiry still warms.
    shell.settled(C, cache_ttl_s=300)
    shell.now = shell.due(C) + 59_999
    shell.fire(C)
    assert shell.status(C) == "warming" and len(shell.warms) == 1


def test_the_next_turn_after_an_expiry_arms_again(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, last_request_at=shell.now - 400_000, cache_ttl_s=300)
    assert shell.status(C) == "expired"
    shell.started(C)
    shell.settled(C, cache_ttl_s=300)
    assert shell.status(C) == "armed" and shell.conv(C).hold is Hold.NONE
    assert "Not warming" not in fields(shell)


def test_a_retry_that_would_land_after_expiry_is_not_armed(make_shell: Any) -> None:
    shell = make_shell(Policy(ttl_margin_ms=2_000))
    enabled(shell, cache_ttl_s=5)
    shell.fire(C)  # at +3 s; the cache expires at +5 s
    shell.advance(1_500)
    shell.returned(C)  # the retry would be due at +5.5 s
    assert shell.status(C) == "expired" and shell.failed[-1].cause == "returned"


def test_after_a_restart_a_warm_overdue_past_a_known_ttl_is_not_sent(make_shell: Any) -> None:
    shell = make_shell(LONG_BUDGET)
    enabled(shell, cache_ttl_s=3600)
    record = Record(settings=Settings(True), state=replace(shell.conv(C)))
    # Down for 30 minutes: longer than the default 5-minute TTL; its warm is not due yet.
    warmer = Warmer(LONG_BUDGET, records={C: record})
    warmer.begin()
    recovery = warmer.recover(shell.now + 30 * MINUTE)
    assert recovery.rearmed == 1 and warmer.get(C).status == "armed"  # type: ignore[union-attr]
    # Down for 62 minutes: the warm fell due and the cache is alive by its own TTL.
    warmer = Warmer(LONG_BUDGET, records={C: record})
    warmer.begin()
    recovery = warmer.recover(shell.now + HOUR - MINUTE // 2)
    assert recovery.warmed_now == 1
    # Down for 2 hours: the warm fell due and the cache died.
    warmer = Warmer(LONG_BUDGET, records={C: record})
    warmer.begin()
    recovery = warmer.recover(shell.now + 2 * HOUR)
    conv = warmer.get(C)
    assert recovery.expired == 1 and recovery.arms == []
    assert conv is not None and conv.status == "expired" and conv.hold is Hold.EXPIRED
    assert warmer.touched()[C] is not None  # the expiry is persisted


def test_enabling_an_expired_conversation_judges_the_cache_again(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, last_request_at=shell.now - 400_000, cache_ttl_s=300)
    shell.set_enabled(C, False)
    shell.set_enabled(C, True)
    assert shell.status(C) == "expired"  # still dead: enabling does not warm a dead cache


# -- the minimum prefix -------------------------------------------------------------------


@pytest.mark.parametrize(
    "settle",
    [
        {"prefix_tokens": 200},
        {"usage": Usage(input_tokens=200, cache_read_tokens=0, cache_write_tokens=0)},
    ],
)
def test_a_prefix_below_the_minimum_is_not_warmed(shell: Any, settle: dict[str, Any]) -> None:
    enabled(shell, **settle)
    assert shell.status(C) == "idle" and shell.due(C) is None
    assert shell.skipped[-1].reason is Hold.SMALL_PREFIX
    assert (
        fields(shell)["Not warming"]
        == "the prefix (200 tokens) is below the 1024 the provider caches"
    )


def test_the_minimum_prefix_can_be_turned_off(make_shell: Any) -> None:
    shell = make_shell(Policy(min_prefix_tokens=0))
    enabled(shell, prefix_tokens=200)
    assert shell.status(C) == "armed"


def test_a_warm_usage_never_makes_a_prefix_too_small(shell: Any) -> None:
    enabled(shell)
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token, usage=read(200))
    assert shell.status(C) == "armed"  # it was cached: it is cacheable


# -- misses -------------------------------------------------------------------------------


def test_warms_that_keep_finding_the_cache_gone_pause_warming(shell: Any) -> None:
    enabled(shell)
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token, usage=wrote())
    assert shell.status(C) == "armed" and shell.conv(C).misses == 1
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token, usage=wrote())
    assert shell.status(C) == "paused" and shell.conv(C).hold is Hold.MISSES
    assert shell.skipped[-1].reason is Hold.MISSES
    assert fields(shell)["Not warming"] == "2 warms in a row found the cache gone"
    shell.settled(C)  # the next turn starts again
    assert shell.status(C) == "armed" and shell.conv(C).misses == 0


def test_a_read_ends_a_run_of_misses(shell: Any) -> None:
    enabled(shell)
    for usage in (wrote(), read(), wrote()):
        shell.fire(C)
        shell.completed(C, token=shell.last_warm.token, usage=usage)
    assert shell.status(C) == "armed" and shell.conv(C).misses == 1


def test_a_warm_by_hand_that_wrote_is_not_our_miss(shell: Any) -> None:
    enabled(shell)
    shell.completed(C, usage=wrote())
    shell.completed(C, usage=wrote())
    assert shell.status(C) == "armed" and shell.conv(C).misses == 0


# -- the cost policies --------------------------------------------------------------------


def test_the_budget_policy_stops_at_its_spend_cap(make_shell: Any) -> None:
    shell = make_shell(Policy(cost_policy="budget", spend_cap_tokens=25_000))
    enabled(shell, prefix_tokens=P)
    for _ in range(2):  # two warms of about 10,005 each fit in 25,000
        shell.fire(C)
        shell.completed(C, token=shell.last_warm.token, usage=read())
    assert shell.status(C) == "budget_exhausted" and shell.conv(C).hold is Hold.SPEND_CAP
    assert shell.conv(C).stretch_cost == 20_020  # 10 uncached + 10,000 read, twice
    assert fields(shell)["Cost policy"] == "budget"
    assert "spend cap (25000 tokens)" in fields(shell)["Not warming"]
    shell.settled(C, prefix_tokens=P)  # a new idle stretch, a new budget
    assert shell.status(C) == "armed" and shell.conv(C).stretch_cost == 0


def _all_abandoned() -> GapModel:
    return GapModel([0.0] * (len(EDGES) + 1), abandoned=1000.0)


def _all_back_after(ms: int) -> GapModel:
    model = GapModel([0.0] * (len(EDGES) + 1), abandoned=0.0)
    for _ in range(100):
        model.observe(ms)
    return model


def test_the_adaptive_policy_does_not_warm_users_who_never_come_back(make_shell: Any) -> None:
    shell = make_shell(Policy(cost_policy="adaptive"))
    shell.warmer.economy.model = _all_abandoned()
    enabled(shell, prefix_tokens=P)
    assert shell.status(C) == "idle" and shell.conv(C).hold is Hold.RETURN_UNLIKELY
    assert "too unlikely" in fields(shell)["Not warming"]


def test_the_adaptive_policy_warms_users_who_come_back_after_the_ttl(make_shell: Any) -> None:
    shell = make_shell(Policy(cost_policy="adaptive"))
    shell.warmer.economy.model = _all_back_after(7 * MINUTE)
    enabled(shell, prefix_tokens=P)
    assert shell.status(C) == "armed"
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token, usage=read())
    # At 4 min the warm kept the cache to 9 min: everyone is back by then, so the next
    # warm (at 8 min, covering 9 to 13) gains nothing.
    assert shell.status(C) == "idle" and shell.conv(C).hold is Hold.RETURN_UNLIKELY


def test_a_conversation_overrides_the_deployment_policy(shell: Any) -> None:
    shell.warmer.economy.model = _all_abandoned()
    out = shell.set_policy(C, "adaptive")
    reply = out.effects[-1].reply
    assert isinstance(reply, SettingsReply) and reply.settings.policy == "adaptive"
    assert shell.warmer.persisted(C).policy == "adaptive"
    assert shell.stored(C).settings.policy == "adaptive"
    enabled(shell, prefix_tokens=P)
    assert shell.conv(C).hold is Hold.RETURN_UNLIKELY
    shell.set_policy(C, None)  # back to the deployment's (fixed)
    shell.settled(C, prefix_tokens=P)
    assert shell.status(C) == "armed" and shell.warmer.persisted(C).policy is None


def test_enable_and_interval_keep_the_policy_override(shell: Any) -> None:
    shell.set_policy(C, "budget")
    shell.set_interval(C, 60_000)
    shell.set_enabled(C, True)
    shell.closed(C)
    assert shell.warmer.persisted(C) == Settings(False, 60_000, "budget")
    enable = shell.set_enabled(C, True).effects[-1].reply
    assert enable.settings.policy == "budget"


def test_a_settings_reply_without_an_override_has_no_policy(shell: Any) -> None:
    reply = shell.set_enabled(C, True).effects[-1].reply
    assert encode(reply) == b'{"ok":true,"settings":{"enabled":true,"intervalMs":240000}}'


# -- learning the gaps --------------------------------------------------------------------


def test_a_gap_from_settle_to_next_start_is_learned(shell: Any) -> None:
    model = shell.warmer.economy.model
    shell.settled(C)
    shell.advance(7 * MINUTE)
    shell.started(C)
    assert model.seen == 1 and shell.conv(C).settled_at is None
    shell.started(C)  # no gap open: nothing learned
    assert model.seen == 1


@pytest.mark.parametrize("end", ["closed", "pruned"])
def test_a_gap_that_never_ends_is_learned_as_abandoned(shell: Any, end: str) -> None:
    model = shell.warmer.economy.model
    share = model.abandoned_share
    shell.settled(C)
    if end == "closed":
        shell.closed(C)
    else:
        shell.advance(shell.warmer.policy.retention_ms + 1)
        assert shell.warmer.prune(shell.now) == [C]
    assert model.seen == 1 and model.abandoned_share > share


def test_what_a_batch_learned_is_persisted_with_it_and_rolled_back_with_it() -> None:
    warmer = Warmer()
    warmer.apply_event(0, TurnSettled(conversation_id=C))
    warmer.begin()
    assert warmer.touched_model() is None  # nothing learned yet
    warmer.apply_event(60_000, TurnStarted(conversation_id=C))
    model = warmer.touched_model()
    assert model is not None and model.seen == 1
    changes = encode_changes(warmer.touched(), model)
    assert GapModel.decode(changes[MODEL_KEY] or b"") == model
    warmer.rollback()
    warmer.end()
    assert warmer.economy.model.seen == 0
    assert warmer.get(C).settled_at == 0  # type: ignore[union-attr]


def test_a_stored_model_is_where_a_new_worker_starts() -> None:
    learned = GapModel()
    for _ in range(5):
        learned.observe(MINUTE)
    assert Warmer(model=learned).economy.model.seen == 5


# -- the savings account ------------------------------------------------------------------


def test_a_warm_is_paid_for_at_its_usage(shell: Any) -> None:
    enabled(shell, prefix_tokens=P)
    shell.fire(C)
    usage = replace(read(), output_tokens=1)
    shell.completed(C, token=shell.last_warm.token, usage=usage)
    # 10 uncached + 100,000 x 0.1 + 1 output x 5.
    assert shell.conv(C).spent == 10_015 and shell.accounts[-1].spent == 10_015
    assert fields(shell)["Savings"] == (
        "net -10.0k tokens: warms 10.0k, re-writes avoided 0, not avoided 0"
    )


def test_a_warm_by_hand_is_not_ours_to_pay(shell: Any) -> None:
    enabled(shell)
    shell.completed(C, usage=read())
    assert shell.conv(C).spent == 0 and shell.accounts == []


def _return_at(shell: Any, after_ms: int, settle: dict[str, Any]) -> None:
    """Settle, warm on time while away, come back ``after_ms`` after the settle."""
    start = shell.now
    shell.settled(C, prefix_tokens=P, cache_ttl_s=300)
    while shell.due(C) is not None and shell.due(C) < start + after_ms:
        shell.fire(C)
        shell.advance(1)
        shell.completed(C, token=shell.last_warm.token, usage=read())
    shell.now = start + after_ms
    shell.started(C)
    shell.settled(C, **settle)


def test_a_turn_that_read_a_cache_a_warm_kept_alive_counts_as_avoided(shell: Any) -> None:
    shell.set_enabled(C, True)
    _return_at(shell, 7 * MINUTE, {"usage": read()})
    # The cache would have died at 5 min; the warm at 4 min kept it: 100,000 x (1.25 - 0.1).
    assert shell.conv(C).avoided == 115_000 and shell.accounts[-1].avoided == 115_000
    assert fields(shell)["Savings"].startswith("net +105.0k tokens")


def test_without_usage_a_kept_cache_is_credited_at_the_known_prefix(shell: Any) -> None:
    shell.set_enabled(C, True)
    _return_at(shell, 7 * MINUTE, {})
    assert shell.conv(C).avoided == 115_000


def test_a_return_within_the_ttl_credits_nothing(shell: Any) -> None:
    shell.set_enabled(C, True)
    _return_at(shell, 2 * MINUTE, {"usage": read()})
    assert shell.conv(C).avoided == 0 and shell.conv(C).missed == 0


def test_a_turn_that_came_back_to_an_expired_cache_counts_as_not_avoided(shell: Any) -> None:
    # Warming off: nothing keeps the cache; the turn writes the prefix again.
    _return_at(shell, 7 * MINUTE, {"usage": wrote()})
    assert shell.conv(C).missed == 115_000 and shell.conv(C).avoided == 0
    assert shell.accounts[-1].missed == 115_000


def test_without_usage_an_expired_return_is_charged_at_the_known_prefix(shell: Any) -> None:
    _return_at(shell, 7 * MINUTE, {})
    assert shell.conv(C).missed == 115_000


def test_the_account_survives_in_the_record(shell: Any) -> None:
    shell.set_enabled(C, True)
    _return_at(shell, 7 * MINUTE, {"usage": read()})
    record = decode_record(encode_record(shell.stored(C)))
    assert record.state is not None
    assert (record.state.spent, record.state.avoided) == (shell.conv(C).spent, 115_000)


def test_an_older_record_reads_with_an_empty_account() -> None:
    # A record written before the cost fields existed: arrays end where they ended.
    old = msgspec.msgpack.encode([[True, 240_000], None])
    assert decode_record(old).settings == Settings(True, 240_000, None)


def test_a_status_the_contract_lists() -> None:
    assert Status.EXPIRED.value == "expired" and not Status.EXPIRED.pending


def test_the_reason_not_to_warm_goes_with_the_next_turn_or_disable(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, last_request_at=shell.now - 400_000, cache_ttl_s=300)
    assert "Not warming" in fields(shell)
    shell.started(C)
    assert shell.status(C) == "active" and "Not warming" not in fields(shell)
    shell.settled(C, last_request_at=shell.now - 400_000, cache_ttl_s=300)
    shell.set_enabled(C, False)
    assert shell.status(C) == "disabled" and "Not warming" not in fields(shell)


def test_nothing_to_warm_says_more_than_a_spent_idle_budget(make_shell: Any) -> None:
    shell = make_shell(Policy(idle_max_ms=60_000))  # every warm is past the budget's time
    enabled(shell, prefix_tokens=200)
    assert shell.status(C) == "idle" and shell.conv(C).hold is Hold.SMALL_PREFIX
    shell.settled(C, last_request_at=shell.now - 400_000, cache_ttl_s=300, prefix_tokens=P)
    assert shell.status(C) == "expired"
    shell.settled(C)
    assert shell.status(C) == "budget_exhausted" and shell.conv(C).hold is Hold.NONE


def test_the_adaptive_policy_judges_past_the_idle_budget(make_shell: Any) -> None:
    # Reads at 0.05: a warm of the prefix costs about 5,000, a re-write avoided saves
    # 120,000. Everyone is back after 60 minutes (in the log bin of 52.7 to 60.9 min): the
    # warms from 4 to 56 minutes carry the cache past the bin for 14 x 5,000. The idle
    # budget (10 warms, 45 min) stops the fixed policy at ten; the adaptive one goes on
    # while a warm pays, and no further.
    back = GapModel([0.0] * (len(EDGES) + 1), abandoned=0.0)
    for _ in range(1000):
        back.observe(HOUR)
    cheap = Prices(read=0.05)
    runs: list[tuple[CostPolicyName, int]] = [("fixed", 10), ("adaptive", 14)]
    for kind, warms in runs:
        shell = make_shell(Policy(cost_policy=kind, prices=cheap))
        shell.warmer.economy.model = back.copy()
        enabled(shell, prefix_tokens=P, cache_ttl_s=300)
        while shell.due(C) is not None:
            shell.fire(C)
            shell.completed(C, token=shell.last_warm.token, usage=read(P - 10))
        assert len(shell.warms) == warms, kind
    assert shell.conv(C).hold is Hold.RETURN_UNLIKELY  # the fifteenth would pay nobody


# -- reading the cost fields back (warmer state, warmer watch) ----------------------------


def test_the_cost_fields_read_back_from_a_received_panel(shell: Any) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, last_request_at=shell.now - 400_000, cache_ttl_s=300)
    received = msgspec.json.decode(encode(shell.last_surface))["spec"]
    stats = extra_stats(received)
    assert set(stats) == {"Cache lifetime", "Not warming"}  # not Status, not the percentages
    assert stats["Cache lifetime"] == "5 min"


@pytest.mark.parametrize(
    "spec",
    [
        None,
        [],
        {"fields": "x"},
        {"fields": [1, {"kind": "stat"}, {"kind": "stat", "label": 3, "value": "v"}]},
        {"fields": [{"kind": "toggle", "label": "Enabled", "value": True}]},
    ],
)
def test_a_malformed_received_panel_reads_as_no_cost_fields(spec: object) -> None:
    assert extra_stats(spec) == {}


# -- a hostile publisher ---------------------------------------------------------------------


def test_a_cache_lifetime_past_the_safe_integers_in_ms_is_an_invalid_field() -> None:
    # 2^53 - 1 seconds would store a lifetime in ms that no record may hold: the restart
    # would refuse the store. The contract bounds it so that ms stay safe integers.
    body = b'{"type":"turn.settled","conversationId":"c","cacheTtlS":%d}'
    top = MAX_SAFE_INTEGER // 1000
    assert isinstance(decode_event(body % top, None), TurnSettled)
    rejected = decode_event(body % (top + 1), None)
    assert isinstance(rejected, Rejection) and rejected.code == "invalid_field"
    assert "cacheTtlS" in rejected.error


def test_the_longest_lifetime_and_absurd_usages_still_make_a_storable_record(
    shell: Any,
) -> None:
    enabled(shell)
    huge = Usage(
        input_tokens=MAX_SAFE_INTEGER,
        cache_read_tokens=0,
        cache_write_tokens=0,
        output_tokens=MAX_SAFE_INTEGER,
    )
    for _ in range(3):  # each warm costs about 5 x 2^53: the account saturates
        shell.fire(C)
        shell.completed(C, token=shell.last_warm.token, usage=huge)
    shell.settled(C, cache_ttl_s=MAX_SAFE_INTEGER // 1000)
    stored = shell.stored(C)  # decoding checks every bound a restart checks
    assert stored is not None and stored.state is not None
    assert stored.state.spent == stored.state.last_warm_cost == MAX_SAFE_INTEGER
    assert stored.state.cache_ttl_ms == MAX_SAFE_INTEGER // 1000 * 1000


# -- the edges (issue 15) ----------------------------------------------------------------------

TTL_5M = 300  # cacheTtlS: expires 5 minutes after the last read; warmed 4 minutes after it


def idle_since_settle(shell: Any, **settle: Any) -> int:
    """A turn settles with warming off; returns its moment (the provider's last read)."""
    shell.settled(C, **settle)
    assert shell.status(C) == "disabled"
    return int(shell.now)


@pytest.mark.parametrize(
    ("later_s", "due_after_read_s"),
    [
        (30, 240),  # within the margin of the read: one effective interval after it
        (120, 240),  # the case: past the margin, the cache alive until 300 s
        (239, 240),
        (240, 240),  # the last moment the margin allows: now
        (270, 270),  # past it, the cache still alive: warmed at once
        (299.999, 299.999),
    ],
)
def test_enabling_an_idle_conversation_warms_its_live_cache_before_it_expires(
    shell: Any, later_s: float, due_after_read_s: float
) -> None:
    read_at = idle_since_settle(shell, cache_ttl_s=TTL_5M)
    shell.advance(round(later_s * 1000))
    shell.set_enabled(C, True)
    assert shell.status(C) == "armed"
    assert shell.due(C) == read_at + round(due_after_read_s * 1000)
    shell.fire(C)
    assert shell.status(C) == "warming" and len(shell.warms) == 1


def test_enabling_at_the_instant_the_cache_expires_does_not_warm(shell: Any) -> None:
    read_at = idle_since_settle(shell, cache_ttl_s=TTL_5M)
    shell.now = read_at + TTL_5M * 1000  # due now, at the expiry: the late-fire guard
    shell.set_enabled(C, True)
    assert shell.status(C) == "expired" and shell.due(C) is None
    assert shell.skipped[-1].reason is Hold.EXPIRED


def test_enabling_times_the_warm_from_an_earlier_last_request(shell: Any) -> None:
    # The provider read the prompt at lastRequestAt (a long answer streamed after it):
    # the cache lives from there, not from the settle.
    settled_at = shell.now
    idle_since_settle(shell, cache_ttl_s=TTL_5M, last_request_at=settled_at - 100_000)
    shell.advance(30_000)
    shell.set_enabled(C, True)
    assert shell.due(C) == settled_at - 100_000 + 240_000
    shell.advance(200_000)  # 230 s after the settle: 330 s after the read
    shell.set_enabled(C, False)
    shell.set_enabled(C, True)
    assert shell.status(C) == "expired"


def test_a_new_interval_long_after_the_last_read_keeps_the_armed_warm_in_time(
    shell: Any,
) -> None:
    shell.set_enabled(C, True)
    shell.settled(C, cache_ttl_s=TTL_5M)
    read_at = shell.now
    shell.advance(90_000)  # past the margin
    shell.set_interval(C, 120_000)  # re-arms: the known lifetime still sets the interval
    assert shell.status(C) == "armed" and shell.due(C) == read_at + 240_000


def test_a_new_interval_without_a_known_lifetime_counts_from_now(shell: Any) -> None:
    other = "conv-2"
    shell.set_enabled(other, True)
    shell.settled(other)
    shell.advance(90_000)
    shell.set_interval(other, 120_000)
    assert shell.due(other) == shell.now + 120_000


@pytest.mark.parametrize("ttl_s", [1, 30, 59, 60])
def test_a_lifetime_no_longer_than_the_margin_never_warms_more_often_than_configured(
    shell: Any, ttl_s: int
) -> None:
    # docs/contract.md: too short to keep alive by warming. The configured interval applies;
    # the late-fire guard finds its warm past the cache's life: nothing to warm.
    shell.set_enabled(C, True)
    armed = len(shell.arms)  # never settled: enabling armed it
    shell.settled(C, cache_ttl_s=ttl_s)
    assert shell.status(C) == "expired" and shell.due(C) is None and len(shell.arms) == armed
    assert shell.adjusted == [] and shell.warms == []
    assert fields(shell)["Cache lifetime"] in {f"{ttl_s} s", "1 min"}


def test_a_lifetime_shorter_than_the_margin_is_warmed_at_a_configured_interval_inside_it(
    shell: Any,
) -> None:
    shell.set_interval(C, 10_000)
    enabled(shell, cache_ttl_s=30)
    assert shell.status(C) == "armed" and shell.due(C) == shell.now + 10_000
    shell.fire(C)
    shell.advance(1_000)
    shell.completed(C, token=shell.last_warm.token, usage=read())
    assert shell.due(C) == shell.now + 10_000 and shell.adjusted == []


def test_a_lifetime_just_over_the_margin_warms_no_more_than_once_a_second(shell: Any) -> None:
    enabled(shell, cache_ttl_s=60 + 1)  # the contract's TTL - margin: 1 s
    assert shell.due(C) == shell.now + 1_000
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token, usage=read())
    assert shell.due(C) == shell.now + 1_000


def test_a_lifetime_over_a_day_is_warmed_at_least_daily(make_shell: Any) -> None:
    # The effective interval stays within an interval's own bounds (1 s to 24 h).
    shell = make_shell(Policy(idle_max_ms=30 * 24 * HOUR))
    enabled(shell, cache_ttl_s=7 * 24 * 3600)
    assert shell.due(C) == shell.now + 24 * HOUR
    assert fields(shell)["Effective interval"] == "24 h (for the 168 h cache)"


def test_a_zero_lifetime_or_prefix_reads_as_not_given(shell: Any) -> None:
    # Zero is what many publishers send for "not set" (Go's and protobuf's defaults);
    # no provider grants a 0-second cache or caches 0 tokens.
    enabled(shell, cache_ttl_s=0, prefix_tokens=0)
    conv = shell.conv(C)
    assert (conv.cache_ttl_ms, conv.prefix_tokens) == (None, None)
    assert shell.status(C) == "armed" and shell.due(C) == shell.now + 240_000
    # A known lifetime and prefix are kept, as when the fields are absent.
    shell.settled(C, cache_ttl_s=TTL_5M, prefix_tokens=P)
    shell.settled(C, cache_ttl_s=0, prefix_tokens=0)
    assert (conv.cache_ttl_ms, conv.prefix_tokens) == (300_000, P)
    assert shell.due(C) == shell.now + 240_000 and shell.status(C) == "armed"


def test_a_turn_usage_of_zero_input_does_not_make_the_prefix_zero(shell: Any) -> None:
    nothing = Usage(input_tokens=0, cache_read_tokens=0, cache_write_tokens=0)
    enabled(shell, usage=nothing)
    assert shell.conv(C).prefix_tokens is None and shell.status(C) == "armed"


# -- the boundaries of the rules ------------------------------------------------------------


def test_a_prefix_of_exactly_the_minimum_is_warmed(shell: Any) -> None:
    minimum = shell.warmer.policy.min_prefix_tokens
    enabled(shell, prefix_tokens=minimum)
    assert shell.status(C) == "armed"
    shell.settled(C, prefix_tokens=minimum - 1)
    assert shell.status(C) == "idle" and shell.conv(C).hold is Hold.SMALL_PREFIX


def test_the_spend_cap_allows_a_warm_that_reaches_it_exactly(make_shell: Any) -> None:
    cost = round(warm_cost(read(), Prices(), None))  # a warm's cost, whole tokens
    shell = make_shell(Policy(cost_policy="budget", spend_cap_tokens=2 * cost))
    enabled(shell, prefix_tokens=P)
    while shell.due(C) is not None:
        shell.fire(C)
        shell.completed(C, token=shell.last_warm.token, usage=read())
    # The second warm brings the stretch to the cap exactly: within it. A third would not.
    assert len(shell.warms) == 2 and shell.conv(C).stretch_cost == 2 * cost
    assert shell.status(C) == "budget_exhausted" and shell.conv(C).hold is Hold.SPEND_CAP


def test_a_return_at_the_instant_the_cache_expires_found_it_expired(shell: Any) -> None:
    # The settle's cache lives [read, read + TTL): a turn at read + TTL finds a warm's
    # cache (kept: a re-write avoided) or none (lost: a re-write not avoided).
    enabled(shell, cache_ttl_s=TTL_5M, prefix_tokens=P)
    read_at = shell.now
    shell.fire(C)
    shell.completed(C, token=shell.last_warm.token, usage=read())
    shell.now = read_at + TTL_5M * 1000
    shell.started(C)
    back = Usage(input_tokens=P + 10, cache_read_tokens=P, cache_write_tokens=0)
    shell.settled(C, usage=back)
    assert shell.conv(C).avoided > 0 and shell.conv(C).missed == 0
    # One millisecond earlier the cache was the settle's own: nothing is credited.
    shell.advance(1000)
    read_at = shell.now
    shell.now = read_at + TTL_5M * 1000 - 1
    avoided = shell.conv(C).avoided
    shell.started(C)
    shell.settled(C, usage=back)
    assert shell.conv(C).avoided == avoided


def test_a_return_past_an_earlier_last_request_found_the_cache_expired(shell: Any) -> None:
    # Not warmed, the cache died TTL after lastRequestAt, before TTL after the settle.
    settled_at = shell.now
    shell.settled(C, cache_ttl_s=TTL_5M, prefix_tokens=P, last_request_at=settled_at - 100_000)
    shell.now = settled_at + 250_000  # 350 s after the read
    shell.started(C)
    shell.settled(C)
    assert shell.conv(C).missed > 0 and shell.conv(C).avoided == 0
