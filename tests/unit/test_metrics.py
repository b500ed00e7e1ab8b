"""The worker's metrics, through the in-memory bus: each moves when its event happens.

The pipeline is the real one (``tests/unit/test_pipeline.py``'s ``Rig``); the metrics are
read back from the worker's own registry, as a scrape would show them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_pipeline import Rig, closed, enable, outcome, settled, started
from warmer.bus.publisher import PublishFailed
from warmer.clock import ManualClock
from warmer.contract import (
    ConversationClosed,
    SetEnabled,
    Status,
    TurnSettled,
    TurnStarted,
    Usage,
    WarmCompleted,
)
from warmer.core import GapModel, Hold, Policy, Record, Settings, SettingsChange, Warmer
from warmer.core.gaps import PRIOR_ABANDONED, PRIOR_GAPS
from warmer.core.panel import TOGGLE_ACTION
from warmer.core.state import Conversation
from warmer.inputs import Fired
from warmer.observe.metrics import (
    CACHE_WAYS,
    COMMAND_OUTCOMES,
    ERROR_CODES,
    EVENT_TYPES,
    NAMES,
    SAVINGS_KINDS,
    SKIP_REASONS,
    CostGauges,
    Metrics,
    StateGauges,
)
from warmer.scheduler import Scheduler

T0 = 1_760_000_000_000
CONVERSATION_IDS = ("conv-7f3a9c2e", "conv-b81d", "c")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()
    yield rig
    rig.worker.abandon()
    await rig.worker.settled()


def usage(input_tokens: int = 1000, read: int = 800, write: int = 150) -> dict[str, int]:
    return {"inputTokens": input_tokens, "cacheReadTokens": read, "cacheWriteTokens": write}


def completion(cid: str, token: int | None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "warm.completed", "conversationId": cid, **fields}
    if token is not None:
        body["token"] = token
    return body


async def warming(rig: Rig, cid: str = "c") -> int:
    """Enable ``cid``, settle it and fire its timer: its warm request is out; the token."""
    await rig.batch(rig.command(enable(cid)), rig.event(settled(cid)))
    token = rig.core.get(cid).token  # type: ignore[union-attr]
    await rig.batch(Fired(cid, token))
    await rig.worker.settled()
    return token


async def rewarm(rig: Rig, cid: str = "c") -> int:
    """Fire ``cid``'s armed timer: its next warm request is out; the token."""
    token = rig.core.get(cid).token  # type: ignore[union-attr]
    await rig.batch(Fired(cid, token))
    await rig.worker.settled()
    return token


def scrape(metrics: Metrics) -> dict[str, Any]:
    """The registry as ``/metrics`` renders it, parsed back: family name -> family."""
    text = generate_latest(metrics.registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


# -- names ------------------------------------------------------------------------------


HISTOGRAMS = {
    "warmer_timer_lateness_seconds",
    "warmer_batch_size",
    "warmer_commit_seconds",
    "warmer_warm_cache_ratio",
    "warmer_shard_takeover_seconds",
    "warmer_shard_handover_seconds",
}
GAUGES = {
    "warmer_build_info",
    "warmer_broker_connected",
    "warmer_conversations",
    "warmer_timers_armed",
    "warmer_idle_gaps_learned",
    "warmer_idle_gaps_abandoned_ratio",
    "warmer_cache_cost_per_gap",
    "warmer_ttl_1h_cheaper",
    "warmer_savings_tokens",
    "warmer_clock_offset_seconds",
    "warmer_shards_owned",
    "warmer_behind_seconds",
}
ADVICE = {"warmer_cache_cost_per_gap", "warmer_ttl_1h_cheaper"}


def gauges(metrics: Metrics, core: Warmer, timers: int = 0) -> None:
    """Register the scrape-time gauges over ``core``, as the app does."""
    metrics.registry.register(StateGauges(core.statuses, lambda: timers))
    metrics.registry.register(CostGauges(core.economy, core.savings))


def series_of(name: str) -> set[str]:
    """The sample names a metric shows in a scrape."""
    if name in HISTOGRAMS:
        return {f"{name}{suffix}" for suffix in ("_bucket", "_count", "_sum")}
    return {name}  # no `_created` series beside a counter or a histogram


def shown_names(metrics: Metrics) -> set[str]:
    return {
        sample.name
        for family in scrape(metrics).values()
        for sample in family.samples
        if sample.name.startswith("warmer_")
    }


def test_a_scrape_shows_every_metric_by_its_exact_name_and_no_other() -> None:
    metrics = Metrics()
    gauges(metrics, Warmer(model=GapModel(seen=100)))  # enough gaps for the advice
    assert shown_names(metrics) == set().union(*(series_of(name) for name in NAMES))
    assert all(name.endswith("_total") for name in NAMES if name not in HISTOGRAMS | GAUGES)


def test_the_advice_gauges_are_absent_before_enough_gaps() -> None:
    metrics = Metrics()
    gauges(metrics, Warmer(model=GapModel(seen=99)))
    expected = set().union(*(series_of(name) for name in NAMES if name not in ADVICE))
    assert shown_names(metrics) == expected


def test_every_label_value_is_shown_from_the_start_at_zero() -> None:
    metrics = Metrics()
    gauges(metrics, Warmer())
    for kind in EVENT_TYPES:
        assert (
            metrics.registry.get_sample_value("warmer_events_consumed_total", {"type": kind}) == 0
        )
    for code in ERROR_CODES:
        assert (
            metrics.registry.get_sample_value("warmer_messages_rejected_total", {"code": code}) == 0
        )
    for cause in ("error", "returned", "timeout"):
        assert metrics.registry.get_sample_value("warmer_warms_failed_total", {"cause": cause}) == 0
    for kind in ("set_enabled", "set_interval", "set_policy", "get_state", "surface.action"):
        for verdict in COMMAND_OUTCOMES:
            labels = {"type": kind, "outcome": verdict}
            assert metrics.registry.get_sample_value("warmer_commands_total", labels) == 0
    for status in Status:
        labels = {"status": status.value}
        assert metrics.registry.get_sample_value("warmer_conversations", labels) == 0
    assert "expired" in {status.value for status in Status}
    for reason in ("expired", "small_prefix", "misses", "spend_cap", "return_unlikely"):
        labels = {"reason": reason}
        assert metrics.registry.get_sample_value("warmer_warms_skipped_total", labels) == 0
    assert {hold.value for hold in SKIP_REASONS} == {hold.value for hold in Hold} - {""}


def test_each_app_has_a_registry_of_its_own() -> None:
    one, two = Metrics(), Metrics()
    one.retries.inc()
    assert one.value("warmer_retries_total") == 1
    assert two.value("warmer_retries_total") == 0


# -- lifecycle events -------------------------------------------------------------------


async def test_events_are_counted_by_type(rig: Rig) -> None:
    await rig.batch(
        rig.event(started("a")),
        rig.event(settled("a")),
        rig.event(settled("b")),
        rig.event(completion("a", None, usage=usage())),
        rig.event(closed("a")),
        rig.event({"type": "turn.paused", "conversationId": "a"}),
    )
    counted = {kind: rig.metric("warmer_events_consumed_total", type=kind) for kind in EVENT_TYPES}
    assert counted == {
        "turn.started": 1,
        "turn.settled": 2,
        "warm.completed": 1,
        "conversation.closed": 1,
        "unknown": 1,
    }


async def test_invalid_events_are_counted_by_code_not_as_consumed(rig: Rig) -> None:
    await rig.batch(
        rig.event(b"{not json"),
        rig.event(settled("a"), content_type="text/plain"),
        rig.event({"type": "turn.settled"}),
    )
    assert rig.metric("warmer_messages_rejected_total", code="invalid_json") == 1
    assert rig.metric("warmer_messages_rejected_total", code="invalid_content_type") == 1
    assert rig.metric("warmer_messages_rejected_total", code="invalid_field") == 1
    assert sum(rig.metric("warmer_events_consumed_total", type=k) for k in EVENT_TYPES) == 0


# -- commands ---------------------------------------------------------------------------


async def test_commands_are_counted_by_type_and_outcome(rig: Rig) -> None:
    toggle = {"type": "surface.action", "conversationId": "c", "actionId": TOGGLE_ACTION}
    await rig.batch(
        rig.command(enable("c")),
        rig.command({"type": "set_interval", "conversationId": "c", "intervalMs": 5000}),
        rig.command({"type": "get_state", "conversationId": "c"}),
        rig.command({**toggle, "payload": {"value": "yes"}}),
        rig.command({**toggle, "actionId": "warm-launch"}),
    )

    def commands(kind: str, verdict: str) -> float:
        return rig.metric("warmer_commands_total", type=kind, outcome=verdict)

    assert commands("set_enabled", "applied") == 1
    assert commands("set_interval", "applied") == 1
    assert commands("get_state", "answered") == 1
    assert commands("surface.action", "rejected") == 2
    assert rig.metric("warmer_messages_rejected_total", code="invalid_payload") == 1
    assert rig.metric("warmer_messages_rejected_total", code="unknown_action") == 1


async def test_commands_that_fail_decoding_count_as_rejections(rig: Rig) -> None:
    await rig.batch(
        rig.command({"type": "launch", "conversationId": "c"}, reply_to="r"),
        rig.command(b"[1, 2", reply_to="r"),
    )
    assert rig.metric("warmer_messages_rejected_total", code="unknown_type") == 1
    assert rig.metric("warmer_messages_rejected_total", code="invalid_json") == 1


async def test_a_store_error_on_a_command_counts_a_rejection_and_a_store_error(rig: Rig) -> None:
    rig.store.fail_next = 1
    await rig.batch(rig.command(enable("c"), reply_to="r"))
    assert rig.metric("warmer_store_errors_total") == 1
    assert rig.metric("warmer_messages_rejected_total", code="store_error") == 1
    assert rig.metric("warmer_commands_total", type="set_enabled", outcome="rejected") == 1
    assert rig.metric("warmer_commands_total", type="set_enabled", outcome="applied") == 0


# -- warms ------------------------------------------------------------------------------


async def test_a_warm_published_is_requested(rig: Rig) -> None:
    await warming(rig)
    assert rig.outbound.warms and rig.metric("warmer_warms_requested_total") == 1


async def test_a_completion_with_usage_counts_its_tokens_and_cache_ratio(rig: Rig) -> None:
    token = await warming(rig)
    await rig.batch(rig.event(completion("c", token, usage=usage(1000, 800, 150))))
    assert rig.metric("warmer_warms_completed_total") == 1
    assert rig.metric("warmer_cache_read_tokens_total") == 800
    assert rig.metric("warmer_cache_write_tokens_total") == 150
    assert rig.metric("warmer_warm_cache_ratio_count") == 1
    assert rig.metric("warmer_warm_cache_ratio_sum") == pytest.approx(0.8)
    assert rig.metric("warmer_warm_cache_ratio_bucket", le="0.7") == 0
    assert rig.metric("warmer_warm_cache_ratio_bucket", le="0.8") == 1


async def test_a_completion_without_input_tokens_has_no_ratio(rig: Rig) -> None:
    token = await warming(rig)
    await rig.batch(rig.event(completion("c", token, usage=usage(0, 0, 0))))
    assert rig.metric("warmer_warms_completed_total") == 1
    assert rig.metric("warmer_warm_cache_ratio_count") == 0


async def test_a_completion_with_an_error_fails_the_warm_with_cause_error(rig: Rig) -> None:
    token = await warming(rig)
    await rig.batch(rig.event(completion("c", token, error="provider error")))
    assert rig.metric("warmer_warms_failed_total", cause="error") == 1
    assert rig.metric("warmer_warms_completed_total") == 0


async def test_a_returned_warm_fails_with_cause_returned(rig: Rig) -> None:
    rig.outbound.routed = False
    await warming(rig)
    returned = await rig.inputs.take()
    assert returned is not None
    await rig.batch(*returned)
    assert rig.metric("warmer_warms_failed_total", cause="returned") == 1


async def test_a_warm_without_completion_in_time_fails_with_cause_timeout(rig: Rig) -> None:
    token = await warming(rig)
    await rig.batch(Fired("c", token))  # the warm timeout's timer: same token
    assert rig.metric("warmer_warms_failed_total", cause="timeout") == 1
    assert rig.metric("warmer_warms_failed_total", cause="error") == 0


async def test_a_duplicate_completion_is_stale(rig: Rig) -> None:
    token = await warming(rig)
    body = completion("c", token, usage=usage())
    await rig.batch(rig.event(body))
    await rig.batch(rig.event(body))
    assert rig.metric("warmer_warms_completed_total") == 1
    assert rig.metric("warmer_warms_stale_total") == 1


async def test_a_completion_while_generating_is_dropped(rig: Rig) -> None:
    token = await warming(rig)
    await rig.batch(rig.event(started("c")), rig.event(completion("c", token, usage=usage())))
    assert rig.metric("warmer_warms_dropped_total") == 1
    assert rig.metric("warmer_warms_completed_total") == 0


# -- publishing, batches, the store ------------------------------------------------------


async def test_surface_updates_count_once_confirmed(rig: Rig) -> None:
    rig.outbound.fail["surface"] = [PublishFailed("nack")]
    await rig.batch(rig.event(settled("a")), rig.event(settled("b")))
    assert rig.outbound.calls["surface"] == 3  # one refused, tried again
    assert rig.metric("warmer_surface_updates_total") == 2
    assert rig.metric("warmer_retries_total") == 1


async def test_batch_size_and_commit_duration_are_observed_per_batch(rig: Rig) -> None:
    await rig.batch(*(rig.event(settled(f"c{i}")) for i in range(5)))
    await rig.batch(rig.event(settled("c5")), rig.event(settled("c6")))
    assert rig.metric("warmer_batch_size_count") == 2
    assert rig.metric("warmer_batch_size_sum") == 7
    assert rig.metric("warmer_batch_size_bucket", le="4.0") == 1
    assert rig.metric("warmer_commit_seconds_count") == 2
    # A batch that changes no record commits nothing.
    await rig.batch(rig.event({"type": "turn.paused", "conversationId": "c0"}))
    assert rig.metric("warmer_batch_size_count") == 3
    assert rig.metric("warmer_commit_seconds_count") == 2


async def test_failed_commits_are_store_errors_and_observed_too(rig: Rig) -> None:
    rig.store.fail_next = 2
    await rig.batch(rig.event(settled("a")))
    assert rig.metric("warmer_store_errors_total") == 2
    assert rig.metric("warmer_retries_total") == 2
    assert rig.metric("warmer_commit_seconds_count") == 3


async def test_a_delivery_given_back_is_a_redelivery(rig: Rig) -> None:
    apply_event = rig.core.apply_event

    def buggy(now: int, event: Any) -> Any:
        if event.conversation_id == "b":
            raise RuntimeError("a bug in the core")
        return apply_event(now, event)

    rig.core.apply_event = buggy  # type: ignore[method-assign]
    items = [rig.event(settled("a")), rig.event(settled("b"))]
    await rig.batch(*items)
    assert [outcome(i) for i in items] == ["ack", "requeue"]
    assert rig.metric("warmer_redeliveries_total") == 1


# -- gauges and timers ------------------------------------------------------------------


async def test_conversations_by_status_and_timers_are_read_at_scrape(rig: Rig) -> None:
    rig.metrics.registry.register(StateGauges(rig.core.statuses, rig.scheduler.__len__))
    await rig.batch(
        rig.command(enable("a")),
        rig.command(enable("b")),
        rig.event(settled("a")),
        rig.event(settled("b")),
        rig.event(started("b")),
        rig.event(settled("d")),
    )
    assert rig.metric("warmer_conversations", status="armed") == 1
    assert rig.metric("warmer_conversations", status="active") == 1
    assert rig.metric("warmer_conversations", status="disabled") == 1
    assert rig.metric("warmer_conversations", status="paused") == 0
    assert rig.metric("warmer_timers_armed") == 1


def test_statuses_count_every_conversation_once() -> None:
    core = Warmer(Policy())
    assert core.statuses() == Counter()
    for cid in ("a", "b", "c"):
        core.apply_event(T0, TurnSettled(conversation_id=cid))
    assert core.statuses() == Counter({Status.DISABLED: 3})


_CENSUS_IDS = ("a", "b", "c", "d")
_census_steps = st.lists(
    st.one_of(
        st.tuples(st.just("settled"), st.sampled_from(_CENSUS_IDS)),
        st.tuples(st.just("started"), st.sampled_from(_CENSUS_IDS)),
        st.tuples(st.just("closed"), st.sampled_from(_CENSUS_IDS)),
        st.tuples(st.just("enable"), st.sampled_from(_CENSUS_IDS), st.booleans()),
        st.tuples(st.just("fire"), st.sampled_from(_CENSUS_IDS)),
        st.tuples(st.just("completed"), st.sampled_from(_CENSUS_IDS), st.integers(0, 5_000)),
        st.tuples(st.just("prune")),
        st.tuples(st.just("read")),  # a scrape in the middle of a batch
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_census_steps, st.booleans()), max_size=8), st.booleans())
def test_the_kept_counts_equal_a_walk_over_every_conversation_through_rollbacks(
    batches: list[tuple[list[tuple[Any, ...]], bool]], start_with_records: bool
) -> None:
    """``Warmer.statuses``/``savings`` are kept as the core changes, not walked: whatever the
    batches did (committed or rolled back, scraped in the middle), they equal a walk."""
    records: dict[str, Record] = {}
    if start_with_records:
        state = Conversation(enabled=True, interval_ms=60_000, idle_since=T0, spent=7)
        records["a"] = Record(settings=Settings(enabled=True), state=state)
    core = Warmer(Policy(retention_ms=60_000), records=records)
    now = T0

    def walked() -> tuple[Counter[Status], tuple[int, int, int]]:
        convs = [conv for cid in _CENSUS_IDS if (conv := core.get(cid)) is not None]
        spent, avoided, missed = (sum(getattr(c, kind) for c in convs) for kind in SAVINGS_KINDS)
        return Counter(c.status for c in convs), (spent, avoided, missed)

    for steps, commit in batches:
        core.begin()
        for step in steps:
            now += 30_000
            match step:
                case ("settled", cid):
                    core.apply_event(now, TurnSettled(conversation_id=cid))
                case ("started", cid):
                    core.apply_event(now, TurnStarted(conversation_id=cid))
                case ("closed", cid):
                    core.apply_event(now, ConversationClosed(conversation_id=cid))
                case ("enable", cid, enabled):
                    command = SetEnabled(conversation_id=cid, enabled=enabled)
                    change = core.plan_command(now, command)
                    assert isinstance(change, SettingsChange)
                    core.commit(now, change)
                case ("fire", cid):
                    conv = core.get(cid)
                    if conv is not None:
                        core.on_timer(now, cid, conv.token)
                case ("completed", cid, read):
                    conv = core.get(cid)
                    token = None if conv is None else conv.token
                    use = Usage(input_tokens=5_000, cache_read_tokens=read, cache_write_tokens=10)
                    core.apply_event(
                        now, WarmCompleted(conversation_id=cid, token=token, usage=use)
                    )
                case ("prune",):
                    core.prune(now)
                case ("read",):
                    assert (core.statuses(), core.savings()) == walked()
        if not commit:
            core.rollback()
        core.end()
        assert (core.statuses(), core.savings()) == walked()


async def test_timer_lateness_is_the_fire_time_minus_the_due_time() -> None:
    metrics = Metrics()
    clock = ManualClock(T0)
    fired: list[str] = []
    scheduler = Scheduler(
        clock, lambda key, _: fired.append(key), lateness=metrics.timer_lateness.observe
    )
    scheduler.arm("a", T0 + 1_000, 1)
    scheduler.arm("b", T0 + 1_200, 2)
    assert scheduler.fire_due(T0 + 1_500) == 2
    assert fired == ["a", "b"]
    assert metrics.value("warmer_timer_lateness_seconds_count") == 2
    assert metrics.value("warmer_timer_lateness_seconds_sum") == pytest.approx(0.8)
    assert metrics.value("warmer_timer_lateness_seconds_bucket", le="0.25") == 0
    assert metrics.value("warmer_timer_lateness_seconds_bucket", le="0.5") == 2


# -- the cost policy --------------------------------------------------------------------

MINUTE = 60_000


def read_usage(read: int, write: int = 0, uncached: int = 0) -> dict[str, int]:
    """A usage that read ``read`` and wrote ``write`` prompt tokens."""
    return usage(read + write + uncached, read, write)


async def test_a_warm_s_cost_is_counted_in_base_input_tokens(rig: Rig) -> None:
    token = await warming(rig)
    await rig.batch(rig.event(completion("c", token, usage=usage(1000, 800, 150))))
    # 50 uncached x 1 + 800 read x 0.1 + 150 written x 1.25 (the 5-minute price) = 317.5
    assert rig.metric("warmer_warm_cost_tokens_total") == 318
    assert rig.metric("warmer_rewrites_avoided_tokens_total") == 0


async def test_a_warm_s_cost_counts_once_when_its_commit_is_retried(rig: Rig) -> None:
    token = await warming(rig)
    rig.store.fail_next = 2
    await rig.batch(rig.event(completion("c", token, usage=usage(1000, 800, 150))))
    assert rig.metric("warmer_store_errors_total") == 2
    assert rig.metric("warmer_warm_cost_tokens_total") == 318


async def test_a_return_to_a_cache_a_warm_kept_alive_counts_the_re_write_avoided(
    rig: Rig,
) -> None:
    token = await warming(rig)  # settled at T0: without the warm the cache goes at T0 + 5 min
    rig.clock.advance(4 * MINUTE)
    await rig.batch(rig.event(completion("c", token, usage=read_usage(50_000))))
    rig.clock.advance(2 * MINUTE)  # past T0 + 5 min, within the warm's 5 minutes
    await rig.batch(rig.event(started("c")), rig.event(settled("c", usage=read_usage(50_000))))
    # 50,000 tokens read instead of written again: x (1.25 - 0.1)
    assert rig.metric("warmer_rewrites_avoided_tokens_total") == 57_500
    assert rig.metric("warmer_rewrites_missed_tokens_total") == 0


async def test_a_return_to_an_expired_cache_counts_the_re_write_missed(rig: Rig) -> None:
    await rig.batch(rig.event(settled("c")))  # not enabled: nothing keeps the cache
    rig.clock.advance(10 * MINUTE)
    await rig.batch(rig.event(started("c")), rig.event(settled("c", usage=read_usage(0, 50_000))))
    assert rig.metric("warmer_rewrites_missed_tokens_total") == 57_500
    assert rig.metric("warmer_rewrites_avoided_tokens_total") == 0
    assert rig.metric("warmer_warm_cost_tokens_total") == 0


async def test_warms_held_by_the_cost_rules_are_counted_by_reason(rig: Rig) -> None:
    lost = rig.clock.now_ms() - 6 * MINUTE  # its cache is gone before any warm is due
    await rig.batch(
        rig.command(enable("small")),
        rig.command(enable("expired")),
        rig.command(enable("capped")),
        rig.command({"type": "set_policy", "conversationId": "capped", "policy": "budget"}),
        rig.event(settled("small", prefixTokens=100)),
        rig.event(settled("expired", cacheTtlS=300, lastRequestAt=lost)),
        rig.event(settled("capped", prefixTokens=2_000_000)),  # one warm: 200,005 > 100,000
    )

    def skipped(reason: str) -> float:
        return rig.metric("warmer_warms_skipped_total", reason=reason)

    assert skipped("small_prefix") == 1
    assert skipped("expired") == 1
    assert skipped("spend_cap") == 1
    assert skipped("misses") == 0
    assert rig.metric("warmer_commands_total", type="set_policy", outcome="applied") == 1
    assert rig.core.get("expired").status is Status.EXPIRED  # type: ignore[union-attr]


async def test_warms_that_keep_finding_the_cache_gone_are_skipped_as_misses(rig: Rig) -> None:
    token = await warming(rig)
    await rig.batch(rig.event(completion("c", token, usage=read_usage(0, 50_000))))
    token = await rewarm(rig)  # the second miss in a row: WARMER_MAX_MISSES
    await rig.batch(rig.event(completion("c", token, usage=read_usage(0, 50_000))))
    assert rig.metric("warmer_warms_skipped_total", reason="misses") == 1
    assert rig.core.get("c").status is Status.PAUSED  # type: ignore[union-attr]


async def test_an_adaptive_warm_past_any_likely_return_is_skipped(rig: Rig) -> None:
    await rig.batch(
        rig.command({"type": "set_policy", "conversationId": "c", "policy": "adaptive"}),
        # A first warm 40 minutes into the gap: by then most users who come back have.
        rig.command({"type": "set_interval", "conversationId": "c", "intervalMs": 2_400_000}),
        rig.event(settled("c")),
        rig.command(enable("c")),  # the one arm
    )
    assert rig.metric("warmer_warms_skipped_total", reason="return_unlikely") == 1


async def test_a_known_cache_lifetime_overriding_the_interval_is_counted(rig: Rig) -> None:
    await rig.batch(
        rig.command(enable("c")),
        rig.event(settled("c", cacheTtlS=3600)),  # warmed every 59 minutes, not every 4
        rig.event(settled("c", cacheTtlS=3600)),  # the same override: reported once
    )
    assert rig.metric("warmer_intervals_adjusted_total") == 1


async def test_idle_gaps_are_learned_and_abandoned_at_scrape(rig: Rig) -> None:
    gauges(rig.metrics, rig.core)
    prior = rig.metric("warmer_idle_gaps_abandoned_ratio")
    assert rig.metric("warmer_idle_gaps_learned") == 0
    assert prior == pytest.approx(PRIOR_ABANDONED)  # the prior's share of gaps that never end
    await rig.batch(rig.event(settled("a")), rig.event(started("a")))
    assert rig.metric("warmer_idle_gaps_learned") == 1
    assert rig.metric("warmer_idle_gaps_abandoned_ratio") < prior
    await rig.batch(rig.event(settled("b")), rig.event(closed("b")))
    assert rig.metric("warmer_idle_gaps_learned") == 2
    # One of two new gaps abandoned: the share moves towards a half from the prior's.
    assert rig.metric("warmer_idle_gaps_abandoned_ratio") == pytest.approx(
        (PRIOR_ABANDONED * PRIOR_GAPS + 1) / (PRIOR_GAPS + 2)
    )


async def test_the_ttl_advice_is_shown_once_enough_gaps_were_seen(rig: Rig) -> None:
    gauges(rig.metrics, rig.core)
    assert not ADVICE & set(scrape(rig.metrics))
    for i in range(100):
        await rig.batch(rig.event(settled(f"c{i}")), rig.event(started(f"c{i}")))
    advice = rig.core.economy.advice()
    assert advice is not None
    figures = {way: rig.metric("warmer_cache_cost_per_gap", way=way) for way in CACHE_WAYS}
    assert figures == {
        "warmed_5m": pytest.approx(advice.warming),
        "hour_1h": pytest.approx(advice.hour),
        "unwarmed_5m": pytest.approx(advice.none),
    }
    assert rig.metric("warmer_ttl_1h_cheaper") == int(advice.hour_is_cheaper)
    # Every gap came back at once: warming a 5-minute cache beats paying for an hour.
    assert rig.metric("warmer_ttl_1h_cheaper") == 0


async def test_the_savings_accounts_are_summed_at_scrape(rig: Rig) -> None:
    gauges(rig.metrics, rig.core)
    token = await warming(rig)
    rig.clock.advance(MINUTE)
    await rig.batch(rig.event(completion("c", token, usage=usage(1000, 800, 150))))
    await rig.batch(rig.event(settled("lost")))
    rig.clock.advance(10 * MINUTE)
    await rig.batch(
        rig.event(started("lost")), rig.event(settled("lost", usage=read_usage(0, 1000)))
    )
    totals = {kind: rig.metric("warmer_savings_tokens", kind=kind) for kind in SAVINGS_KINDS}
    assert totals == {"spent": 318, "avoided": 0, "missed": 1150}
    assert rig.core.savings() == (318, 0, 1150)
    await rig.batch(rig.event(closed("lost")))  # closed, still in memory: still summed
    assert rig.metric("warmer_savings_tokens", kind="missed") == 1150


# -- cardinality ------------------------------------------------------------------------


async def test_no_label_value_is_ever_a_conversation_id(rig: Rig) -> None:
    rig.metrics.registry.register(StateGauges(rig.core.statuses, rig.scheduler.__len__))
    rig.metrics.registry.register(CostGauges(rig.core.economy, rig.core.savings))
    for cid in CONVERSATION_IDS:
        token = await warming(rig, cid)
        await rig.batch(
            rig.event(completion(cid, token, usage=usage())),
            rig.event(completion(cid, token, usage=usage())),
            rig.command({"type": "get_state", "conversationId": cid}),
            rig.command({"type": "set_interval", "conversationId": cid, "intervalMs": "x"}),
            rig.event(closed(cid)),
        )
    values = {
        value
        for family in scrape(rig.metrics).values()
        for sample in family.samples
        for value in sample.labels.values()
    }
    assert values.isdisjoint(CONVERSATION_IDS)
    assert not any(cid in value for value in values for cid in CONVERSATION_IDS if len(cid) > 1)
