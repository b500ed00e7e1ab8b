"""The money rules: what a warm costs, what a kept cache saves, and when warming pays.

Units: base-input-token units (one uncached prompt token at the base input price is 1;
a cache read of a 100,000-token prefix at Anthropic's 0.1 is 10,000). docs/economics.md
derives the rules; in short:

- A warm costs its usage at the configured prices (``warm_cost``).
- A cache kept alive saves the next turn a re-write: ``prefix x (write - read)``.
- The adaptive policy warms at due time D, when the cache would otherwise expire at E
  (D <= E), only while a run of warms starting then is expected to pay (``worth_warming``;
  docs/cost-policy.md derives it): with S the survival of idle gaps (``warmer.core.gaps``)
  measured from the settle, the users who come back in the time the run adds save more
  than its warms cost, each paid only if its user is still away. Gaps that never end
  (abandoned) are in S, so the rule stops warming where abandonment dominates.
"""

from __future__ import annotations

import math
from typing import Final

from msgspec import Struct

from warmer.contract import Usage
from warmer.core.gaps import GapModel
from warmer.core.policy import HOUR_MS, Prices

FIVE_MINUTES_MS: Final = 300_000
TURN_GROWTH: Final = 0.1
"""The share of its prefix a turn adds (written to the cache whatever its lifetime): what
the 1-hour cache pays on top, at its dearer write price, on every turn."""


def ttl_from_usage(usage: Usage) -> int | None:
    """The cache lifetime a usage split shows: 1 h when it wrote any 1-hour tokens."""
    if usage.cache_write_1h_tokens:
        return HOUR_MS
    if usage.cache_write_5m_tokens:
        return FIVE_MINUTES_MS
    return None


def warm_cost(usage: Usage, prices: Prices, ttl_ms: int | None) -> float:
    """What a request cost, in base-input-token units.

    Writes the usage does not split by lifetime are priced at ``ttl_ms``'s write price.
    """
    read, write = usage.cache_read_tokens, usage.cache_write_tokens
    uncached = max(usage.input_tokens - read - write, 0)
    write_1h = min(usage.cache_write_1h_tokens or 0, write)
    write_5m = min(usage.cache_write_5m_tokens or 0, write - write_1h)
    rest = write - write_1h - write_5m
    return (
        uncached
        + read * prices.read
        + write_5m * prices.write_5m
        + write_1h * prices.write_1h
        + rest * prices.write(ttl_ms)
        + (usage.output_tokens or 0) * prices.output
    )


def estimated_warm_cost(prefix: int | None, prices: Prices) -> float:
    """A warm's cost before any came back: a read of the prefix and one output token.

    Without a known prefix the figures are per prefix token (a prefix of 1).
    """
    return (prefix or 1) * prices.read + (prices.output if prefix else 0.0)


def rewrite_saving(prefix: int | None, prices: Prices, ttl_ms: int | None) -> float:
    """What a turn saves by reading its prefix instead of writing it again."""
    return (prefix or 1) * (prices.write(ttl_ms) - prices.read)


CONFIDENCE: Final = 0.85
"""How many standard errors of its estimate the adaptive rule takes off the chance of a
return: a young model's noise must not start warming (tuned with ``warmer simulate`` on
seeds 1 to 4, docs/economics.md)."""
MAX_LOOKAHEAD: Final = 64
"""The most warms ahead the adaptive rule weighs: 4 hours and 16 minutes at 4 minutes."""


def worth_warming(
    model: GapModel,
    *,
    due_age_ms: int,
    expiry_age_ms: int,
    ttl_ms: int,
    interval_ms: int,
    saving: float,
    cost: float,
    horizon: int = 1,
    confidence: float = CONFIDENCE,
) -> bool:
    """The adaptive rule: the warm due ``due_age_ms`` into the gap starts a run that pays.

    ``expiry_age_ms``: when, into the gap, the cache expires without this warm. The run of
    ``n`` warms, one every ``interval_ms`` from the due time (``n`` up to ``horizon``),
    keeps the cache alive to the last one's read plus
    ``ttl_ms``. It pays when the users who come back in the time it adds save more than the
    warms cost, each warm paid only if its user is still away:

        (S(E) - S(D + (n - 1) I + T) - z se) x saving  >  sum(S(D + i I), i < n) x cost

    with ``se`` the standard error of the return chance over the model's weight, ``z`` the
    ``confidence``. True when some ``n`` pays; at break-even there is no warm.
    Looking one warm ahead would stop before a stretch where nobody comes back yet (gaps
    of 10 to 40 minutes: nobody is back in the first warm's window, all are in the
    ninth's).
    """
    gone_by_expiry = model.survival(expiry_age_ms)
    weight = model.weight
    paid = 0.0
    for n in range(min(horizon, MAX_LOOKAHEAD)):
        due = due_age_ms + n * interval_ms
        away = model.survival(due)
        if away <= 0.0:
            return False  # nobody is left to come back: no later warm can pay
        paid += away
        gained = gone_by_expiry - model.survival(due + ttl_ms)
        # Below the estimate by a share of its standard error: a few gaps never start warming.
        gained -= confidence * math.sqrt(max(gained * (1.0 - gained), 0.0) / weight)
        if gained * saving > paid * cost:
            return True
    return False


class TtlAdvice(Struct, frozen=True, kw_only=True):
    """Expected cost per idle gap, in prefixes at the base input price, for the gaps seen."""

    warming: float
    """The 5-minute cache, warmed by the adaptive rule."""
    hour: float
    """The 1-hour cache, never warmed."""
    none: float
    """The 5-minute cache, never warmed."""

    @property
    def hour_is_cheaper(self) -> bool:
        """The 1-hour cache costs at least 5 % less than the best of the other two."""
        return self.hour < 0.95 * min(self.warming, self.none)

    @property
    def hour_saving_pct(self) -> int:
        """How much less the 1-hour cache costs, in percent of the best of the other two."""
        best = min(self.warming, self.none)
        return round(100 * (1 - self.hour / best)) if best > 0 else 0


_MAX_ADVICE_WARMS: Final = 1000


def ttl_advice(
    model: GapModel, prices: Prices, *, ttl_ms: int, interval_ms: int, horizon: int
) -> TtlAdvice:
    """What each way costs per gap (a prefix of 1) under the gaps ``model`` holds.

    The next turn reads the prefix (``read``) while the cache is alive and writes it again
    otherwise; an abandoned gap has no next turn. Warming: a warm every ``interval_ms``
    while ``worth_warming`` says so (at most ``horizon`` warms: the idle budget's), each
    costing a read.
    """
    ended = 1.0 - model.abandoned_share

    def turn(alive_ms: int, write: float) -> float:
        open_after = model.survival(alive_ms) - model.abandoned_share
        return (ended - open_after) * prices.read + open_after * write

    warms = 0.0
    alive = ttl_ms
    saving = prices.write_5m - prices.read
    for k in range(1, _MAX_ADVICE_WARMS + 1):
        due = k * interval_ms
        if due >= alive or not worth_warming(
            model,
            due_age_ms=due,
            expiry_age_ms=alive,
            ttl_ms=ttl_ms,
            interval_ms=interval_ms,
            saving=saving,
            cost=prices.read,
            horizon=horizon - k + 1,
        ):
            break
        warms += model.survival(due) * prices.read
        alive = due + ttl_ms
    return TtlAdvice(
        warming=warms + turn(alive, prices.write_5m),
        hour=turn(HOUR_MS, prices.write_1h)
        + ended * TURN_GROWTH * (prices.write_1h - prices.write_5m),
        none=turn(ttl_ms, prices.write_5m),
    )
