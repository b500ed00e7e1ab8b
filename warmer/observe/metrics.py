"""The worker's Prometheus metrics, in a registry of its own (``Metrics.registry``).

Names follow Prometheus' conventions: the ``warmer_`` prefix, ``_total`` on counters, base
units (seconds), and labels with a handful of values each (an event type, an error code,
a cause, a status): never a conversation id. ``/metrics`` (``warmer.observe.http``)
renders the registry; the deploy files and the dashboard use these exact names.

A registry per ``App``, not prometheus-client's global one: tests run several workers in
one process, and each must count only its own.

The pipeline counts what a batch did into a ``Tally`` (a plain dict increment per input)
and adds it to the metrics only once the batch is committed, as a rolled-back batch is
applied again when it is redelivered and must not count twice. The labelled children it
uses are bound once here, never looked up with ``.labels()`` per input.

Figures that describe the worker's whole memory (conversations by status, the savings
accounts summed, what the gap model has learned) are read at each scrape instead
(``StateGauges``, ``CostGauges``) from what the core keeps as it changes
(``warmer.core.census``): a scrape costs the same at 300,000 conversations as at ten.
Token figures of the cost policy are in base-input-token units (one uncached prompt token
at the base input price, ``warmer.core.costs``).
"""

from __future__ import annotations

import collections
import platform
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import version
from typing import Final, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from warmer.contract import Command, ErrorCode, LifecycleEvent, Status
from warmer.core.economy import Economy
from warmer.core.effects import WarmFailedCause
from warmer.core.state import Hold

# No `_created` series beside every counter and histogram: they double a scrape and chart
# nothing a restart does not already show (process_start_time_seconds).
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it untyped

__all__ = [
    "CACHE_WAYS",
    "COMMAND_OUTCOMES",
    "COMMAND_TYPES",
    "ERROR_CODES",
    "EVENT_TYPES",
    "FAILURE_CAUSES",
    "LOSS_REASONS",
    "NAMES",
    "SAVINGS_KINDS",
    "SKIP_REASONS",
    "CostGauges",
    "Metrics",
    "StateGauges",
    "Tally",
]

EVENT_TYPES: Final[tuple[str, ...]] = (
    *(str(kind.__struct_config__.tag) for kind in get_args(LifecycleEvent)),
    "unknown",
)
"""``type`` of ``warmer_events_consumed_total``: the lifecycle events, and any other type."""
COMMAND_TYPES: Final[tuple[str, ...]] = tuple(
    str(kind.__struct_config__.tag) for kind in get_args(Command)
)
COMMAND_OUTCOMES: Final = ("applied", "answered", "rejected")
"""The verdicts a command can have (``warmer.core.machine.Verdict``), shown from the start."""
ERROR_CODES: Final[tuple[str, ...]] = get_args(ErrorCode)
FAILURE_CAUSES: Final[tuple[str, ...]] = get_args(WarmFailedCause)
SKIP_REASONS: Final[tuple[Hold, ...]] = tuple(hold for hold in Hold if hold is not Hold.NONE)
"""``reason`` of ``warmer_warms_skipped_total``: why the cost rules held a warm."""
CACHE_WAYS: Final = ("warmed_5m", "hour_1h", "unwarmed_5m")
"""``way`` of ``warmer_cache_cost_per_gap``: ``TtlAdvice``'s warming, hour and none."""
SAVINGS_KINDS: Final = ("spent", "avoided", "missed")
"""``kind`` of ``warmer_savings_tokens``: the three sums of ``Warmer.savings``."""

NAMES: Final = (
    "warmer_events_consumed_total",
    "warmer_messages_rejected_total",
    "warmer_commands_total",
    "warmer_warms_requested_total",
    "warmer_warms_completed_total",
    "warmer_warms_failed_total",
    "warmer_warms_stale_total",
    "warmer_warms_dropped_total",
    "warmer_surface_updates_total",
    "warmer_conversations",
    "warmer_timers_armed",
    "warmer_timer_lateness_seconds",
    "warmer_batch_size",
    "warmer_commit_seconds",
    "warmer_warm_cache_ratio",
    "warmer_cache_read_tokens_total",
    "warmer_cache_write_tokens_total",
    "warmer_redeliveries_total",
    "warmer_store_errors_total",
    "warmer_store_data_lost_total",
    "warmer_dead_letters_refused_total",
    "warmer_retries_total",
    "warmer_broker_blocked_total",
    "warmer_broker_reconnections_total",
    "warmer_stalls_total",
    "warmer_connection_resets_total",
    "warmer_warm_cost_tokens_total",
    "warmer_rewrites_avoided_tokens_total",
    "warmer_rewrites_missed_tokens_total",
    "warmer_warms_skipped_total",
    "warmer_intervals_adjusted_total",
    "warmer_idle_gaps_learned",
    "warmer_idle_gaps_abandoned_ratio",
    "warmer_cache_cost_per_gap",
    "warmer_ttl_1h_cheaper",
    "warmer_savings_tokens",
    "warmer_clock_steps_total",
    "warmer_clock_offset_seconds",
    "warmer_shards_owned",
    "warmer_shard_takeovers_total",
    "warmer_shards_lost_total",
    "warmer_fenced_commits_total",
    "warmer_shard_takeover_seconds",
    "warmer_shard_handover_seconds",
    "warmer_messages_rerouted_total",
    "warmer_behind_seconds",
    "warmer_warm_timeouts_extended_total",
    "warmer_build_info",
    "warmer_broker_connected",
)
"""Every metric of the worker, as a scrape shows it (histograms add their suffixes)."""

_LATENESS_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOSS_REASONS: Final = ("handover", "connection", "fenced", "stopping", "take", "store")
"""Why a replica stops owning a shard (``warmer_shards_lost_total``'s label)."""
_TAKEOVER_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_COMMIT_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
)  # fmt: skip
_RATIO_BUCKETS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Tally:
    """What one batch counted, added to the metrics once the batch is committed."""

    __slots__ = ("counts", "ratios")

    def __init__(self) -> None:
        self.counts: collections.Counter[Counter] = collections.Counter()
        """Counter (or labelled child) -> how much to add."""
        self.ratios: list[float] = []
        """``warmer_warm_cache_ratio`` observations."""


class Metrics:
    """Every instrument of the worker, in ``registry``; built once per ``App``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """A fresh registry (with the process' CPU and memory) unless one is given."""
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
        self.registry = registry
        r = registry

        events = Counter(
            "warmer_events_consumed_total",
            "Lifecycle events decoded, by type (unknown: a type this worker does not know).",
            ["type"],
            registry=r,
        )
        self.events: Final = {kind: events.labels(kind) for kind in EVENT_TYPES}
        rejected = Counter(
            "warmer_messages_rejected_total",
            "Inbound messages and commands refused, by contract error code.",
            ["code"],
            registry=r,
        )
        self.rejected: Final = {code: rejected.labels(code) for code in ERROR_CODES}
        self._commands = Counter(
            "warmer_commands_total",
            "Commands decoded, by type and outcome (applied, answered, rejected).",
            ["type", "outcome"],
            registry=r,
        )
        self._command_children: dict[tuple[str, str], Counter] = {
            (kind, outcome): self._commands.labels(kind, outcome)
            for kind in COMMAND_TYPES
            for outcome in COMMAND_OUTCOMES
        }
        self.warms_requested: Final = Counter(
            "warmer_warms_requested_total", "Warm requests published and confirmed.", registry=r
        )
        self.warms_completed: Final = Counter(
            "warmer_warms_completed_total",
            "Completions with usage applied (cache figures recorded).",
            registry=r,
        )
        failed = Counter(
            "warmer_warms_failed_total",
            "Failed warms, by cause: error (the completion said so), returned (unroutable), "
            "timeout (no completion in time).",
            ["cause"],
            registry=r,
        )
        self.warms_failed: Final = {cause: failed.labels(cause) for cause in FAILURE_CAUSES}
        self.warms_stale: Final = Counter(
            "warmer_warms_stale_total",
            "Completions dropped as stale (an older token, or a duplicate).",
            registry=r,
        )
        self.warms_dropped: Final = Counter(
            "warmer_warms_dropped_total",
            "Completions dropped because the conversation was generating a turn.",
            registry=r,
        )
        self.surface_updates: Final = Counter(
            "warmer_surface_updates_total",
            "surface.changed updates published and confirmed.",
            registry=r,
        )
        self.timer_lateness: Final = Histogram(
            "warmer_timer_lateness_seconds",
            "How late timers fire: fire time minus due time.",
            buckets=_LATENESS_BUCKETS,
            registry=r,
        )
        self.batch_size: Final = Histogram(
            "warmer_batch_size",
            "Inputs (deliveries, timer fires, returns) per committed batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds: Final = Histogram(
            "warmer_commit_seconds",
            "Duration of each store commit, failed ones included.",
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.warm_cache_ratio: Final = Histogram(
            "warmer_warm_cache_ratio",
            "Share of the prompt the cache served in completed warms: cacheRead / input.",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.cache_read_tokens: Final = Counter(
            "warmer_cache_read_tokens_total",
            "Cache read tokens of completed warms.",
            registry=r,
        )
        self.cache_write_tokens: Final = Counter(
            "warmer_cache_write_tokens_total",
            "Cache write tokens of completed warms.",
            registry=r,
        )
        self.redeliveries: Final = Counter(
            "warmer_redeliveries_total",
            "Deliveries given back with requeue, or left unacknowledged for redelivery.",
            registry=r,
        )
        self.store_errors: Final = Counter(
            "warmer_store_errors_total", "Store commits that failed.", registry=r
        )
        self.store_data_lost: Final = Counter(
            "warmer_store_data_lost_total",
            "Times the store was found without what was committed (restarted empty, or "
            "an older copy), and given every conversation held again.",
            registry=r,
        )
        self.dead_letters_refused: Final = Counter(
            "warmer_dead_letters_refused_total",
            "Dead letters the broker refused (the original rejected to the queue's own "
            "dead-lettering instead).",
            registry=r,
        )
        self.retries: Final = Counter(
            "warmer_retries_total",
            "Retries of a failed commit or publish, after a pause.",
            registry=r,
        )
        self.broker_blocked: Final = Counter(
            "warmer_broker_blocked_total",
            "Times the broker blocked the connection (connection.blocked: a resource alarm).",
            registry=r,
        )
        self.reconnections: Final = Counter(
            "warmer_broker_reconnections_total",
            "Times the broker connection was lost and made again.",
            registry=r,
        )
        self.warm_timeouts_extended: Final = Counter(
            "warmer_warm_timeouts_extended_total",
            "Warm timeouts that fired while the worker was behind: checked again later "
            "instead of failing the warm (the worker's lateness is not the orchestrator's).",
            registry=r,
        )
        self.behind: Final = Gauge(
            "warmer_behind_seconds",
            "How far behind the worker is: the most of how late its oldest due timer is, "
            "how long its oldest input has waited, and how long its oldest warm request "
            "has waited for its confirm (0 under 0.1 s: it keeps up).",
            registry=r,
        )
        self.build_info: Final = Gauge(
            "warmer_build_info",
            "Always 1; the running worker's version and Python in its labels.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(version=version("warmer"), python=platform.python_version()).set(1)
        self.broker_connected: Final = Gauge(
            "warmer_broker_connected",
            "1 while the worker's connection to the broker is up, else 0.",
            registry=r,
        )
        self.shards_owned: Final = Gauge(
            "warmer_shards_owned",
            "Shards this replica owns now (their timers armed here, their queues consumed).",
            registry=r,
        )
        self.takeovers: Final = Counter(
            "warmer_shard_takeovers_total",
            "Shards this replica took (at start, from a replica gone, or handed over).",
            registry=r,
        )
        lost = Counter(
            "warmer_shards_lost_total",
            "Shards this replica stopped owning, by reason: handover, connection, fenced, "
            "stopping, take (a take that failed half-way), store (unreachable while others "
            "reach it).",
            ["reason"],
            registry=r,
        )
        self.shards_lost: Final = {reason: lost.labels(reason) for reason in LOSS_REASONS}
        self.fenced_commits: Final = Counter(
            "warmer_fenced_commits_total",
            "Commits the store refused because another replica took the shard meanwhile.",
            registry=r,
        )
        self.handover_seconds: Final = Histogram(
            "warmer_shard_handover_seconds",
            "From deciding to hand a shard over to its lock released: consumers cancelled, "
            "what was delivered applied and acknowledged, timers dropped, view closed.",
            buckets=_TAKEOVER_BUCKETS,
            registry=r,
        )
        self.rerouted: Final = Counter(
            "warmer_messages_rerouted_total",
            "Messages that reached a shard without the conversation-id header of their "
            "body's conversation, published again to their own shard (with more shards).",
            registry=r,
        )
        self.takeover_seconds: Final = Histogram(
            "warmer_shard_takeover_seconds",
            "From holding a shard's lock to its timers armed: load, recover, commit.",
            buckets=_TAKEOVER_BUCKETS,
            registry=r,
        )
        self.connection_resets: Final = Counter(
            "warmer_connection_resets_total",
            "Times the worker dropped the broker connection because confirms were overdue.",
            registry=r,
        )
        self.stalls: Final = Counter(
            "warmer_stalls_total",
            "Times inputs waited WARMER_STALL_S while the pipeline took none (a stall).",
            registry=r,
        )
        self.warm_cost_tokens: Final = Counter(
            "warmer_warm_cost_tokens_total",
            "What completed warms cost at the configured prices, in base-input-token units.",
            registry=r,
        )
        self.rewrites_avoided_tokens: Final = Counter(
            "warmer_rewrites_avoided_tokens_total",
            "Cache re-writes avoided: turns that read a cache a warm kept alive, priced as "
            "prefix x (write - read), in base-input-token units.",
            registry=r,
        )
        self.rewrites_missed_tokens: Final = Counter(
            "warmer_rewrites_missed_tokens_total",
            "Cache re-writes not avoided: turns that came back to an expired cache, priced "
            "as prefix x (write - read), in base-input-token units.",
            registry=r,
        )
        skipped = Counter(
            "warmer_warms_skipped_total",
            "Warms the cost rules held, by reason: expired (the cache would be gone), "
            "small_prefix, misses (warms kept finding the cache gone), spend_cap (budget "
            "policy), return_unlikely (adaptive policy).",
            ["reason"],
            registry=r,
        )
        self.warms_skipped: Final = {hold: skipped.labels(hold.value) for hold in SKIP_REASONS}
        self.intervals_adjusted: Final = Counter(
            "warmer_intervals_adjusted_total",
            "Times a known cache lifetime overrode a conversation's configured interval.",
            registry=r,
        )
        self.clock_steps: Final = Counter(
            "warmer_clock_steps_total",
            "Steps of the wall clock against the worker's steady clock (more than 2 s at "
            "once); timers and the cost rules run on the steady clock and ignore them.",
            registry=r,
        )
        self.clock_offset: Final = Gauge(
            "warmer_clock_offset_seconds",
            "The wall clock minus the worker's steady clock (the wall clock at start plus "
            "the time elapsed): how far published times are from the wall after a step.",
            registry=r,
        )

    def command(self, kind: str, outcome: str) -> Counter:
        """The ``warmer_commands_total`` child of a command type and outcome."""
        child = self._command_children.get((kind, outcome))
        if child is None:
            child = self._command_children[kind, outcome] = self._commands.labels(kind, outcome)
        return child

    def add(self, tally: Tally, batch_size: int) -> None:
        """Add a committed batch's counts."""
        for counter, amount in tally.counts.items():
            counter.inc(amount)
        observe = self.warm_cache_ratio.observe
        for ratio in tally.ratios:
            observe(ratio)
        self.batch_size.observe(batch_size)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value, 0 when it has none yet (for tests and tools)."""
        return self.registry.get_sample_value(name, labels) or 0.0


class StateGauges:
    """``warmer_conversations{status}`` and ``warmer_timers_armed``, read at each scrape.

    The counts are the core's, kept as conversations change (``Warmer.statuses``): no
    walk over the conversations (that took 93 ms of event loop at 300,000).
    """

    def __init__(
        self, statuses: Callable[[], Mapping[Status, int]], timers: Callable[[], int]
    ) -> None:
        """``statuses``: conversations per status; ``timers``: how many are armed."""
        self._statuses = statuses
        self._timers = timers

    def describe(self) -> Iterable[Metric]:
        """The metrics' names, without computing them (what registering needs)."""
        return [_conversations(), GaugeMetricFamily("warmer_timers_armed", _ARMED)]

    def collect(self) -> Iterable[Metric]:
        """The metrics, read now."""
        conversations = _conversations()
        counts = self._statuses()
        for status in Status:
            conversations.add_metric([status.value], counts.get(status, 0))
        return [
            conversations,
            GaugeMetricFamily("warmer_timers_armed", _ARMED, value=self._timers()),
        ]


_ARMED: Final = "Timers armed: regular warms, retries and warm timeouts."


def _conversations() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "warmer_conversations", "Conversations the worker holds, by status.", labels=["status"]
    )


class CostGauges:
    """What the cost policy knows about the whole deployment, computed at each scrape.

    ``warmer_idle_gaps_learned`` and ``warmer_idle_gaps_abandoned_ratio`` from the gap
    model; ``warmer_cache_cost_per_gap{way}`` and ``warmer_ttl_1h_cheaper`` from its advice
    (absent until the advice exists: ``Economy.advice``, 100 gaps); and
    ``warmer_savings_tokens{kind}``, every conversation's savings account summed (kept by
    the core as they change, as the statuses are).
    """

    def __init__(
        self,
        economy: Economy | Callable[[], Economy],
        savings: Callable[[], tuple[int, int, int]],
    ) -> None:
        """``economy``: the core's (``Warmer.economy``), or what gives the one to show now
        (a replica with several shards shows the one that learned most); ``savings``: the
        accounts summed, (spent, avoided, missed) (``Warmer.savings``)."""
        self._economy: Callable[[], Economy] = (
            economy if not isinstance(economy, Economy) else lambda: economy
        )
        self._savings = savings

    def describe(self) -> Iterable[Metric]:
        """The metrics' names, without computing them (what registering needs)."""
        return [
            GaugeMetricFamily("warmer_idle_gaps_learned", _GAPS_LEARNED),
            GaugeMetricFamily("warmer_idle_gaps_abandoned_ratio", _GAPS_ABANDONED),
            _cost_per_gap(),
            GaugeMetricFamily("warmer_ttl_1h_cheaper", _HOUR_CHEAPER),
            _savings(),
        ]

    def collect(self) -> Iterable[Metric]:
        """The metrics, read now."""
        economy = self._economy()
        model = economy.model  # read now: a rollback replaces it
        families: list[Metric] = [
            GaugeMetricFamily("warmer_idle_gaps_learned", _GAPS_LEARNED, value=model.seen),
            GaugeMetricFamily(
                "warmer_idle_gaps_abandoned_ratio", _GAPS_ABANDONED, value=model.abandoned_share
            ),
        ]
        advice = economy.advice()
        if advice is not None:
            per_gap = _cost_per_gap()
            for way, cost in zip(
                CACHE_WAYS, (advice.warming, advice.hour, advice.none), strict=True
            ):
                per_gap.add_metric([way], cost)
            cheaper = GaugeMetricFamily(
                "warmer_ttl_1h_cheaper", _HOUR_CHEAPER, value=int(advice.hour_is_cheaper)
            )
            families += [per_gap, cheaper]
        savings = _savings()
        for kind, total in zip(SAVINGS_KINDS, self._savings(), strict=True):
            savings.add_metric([kind], total)
        families.append(savings)
        return families


_GAPS_LEARNED: Final = (
    "Idle gaps (a settle to the next turn, or abandoned) the gap model learned, the prior "
    "not included."
)
_GAPS_ABANDONED: Final = (
    "Share of idle gaps that never end (the conversation closed or forgotten without a next "
    "turn), the prior included, old gaps faded."
)
_HOUR_CHEAPER: Final = (
    "1 when a 1-hour cache would cost at least 5 % less per gap than the best 5-minute way "
    "for the gaps seen, else 0; absent before 100 gaps."
)


def _cost_per_gap() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "warmer_cache_cost_per_gap",
        "Expected cache cost per idle gap for the gaps seen, per prefix token at the base "
        "input price: warmed_5m (the 5-minute cache warmed by the adaptive rule), hour_1h "
        "(the 1-hour cache, not warmed), unwarmed_5m; absent before 100 gaps.",
        labels=["way"],
    )


def _savings() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "warmer_savings_tokens",
        "Savings accounts of the conversations in memory, summed, in base-input-token units: "
        "spent (warms), avoided (re-writes a warm avoided), missed (re-writes paid).",
        labels=["kind"],
    )
