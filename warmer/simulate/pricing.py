"""The cost model of ``warmer simulate``, per idle gap, in prefixes at the base input price.

A warm costs its usage (a read of the prefix, its few new tokens, one output token:
``warmer.core.costs.warm_cost``). The turn that ends a gap reads the prefix when the
cache is alive and writes it again when it is not; an abandoned gap has no next turn.
The 1-hour cache writes at its dearer price, and every turn's new content too
(``TURN_GROWTH`` of the prefix, which the 5-minute cache writes at the cheaper price).

The reference rows need no core: the best "warm k times, then stop" rule and the
clairvoyant bound are computed here from the gaps themselves.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

from msgspec import Struct
from msgspec.structs import replace

from warmer.contract import Usage
from warmer.core.costs import FIVE_MINUTES_MS, TURN_GROWTH, warm_cost
from warmer.core.policy import HOUR_MS, Policy
from warmer.core.rules import MIN_INTERVAL_MS
from warmer.simulate.mixes import Gap

WARM_MESSAGE_TOKENS: Final = 10
"""The uncached tokens a warm request adds to the prefix (its short message)."""
MAX_K: Final = 10_000


class Tariff(Struct, frozen=True, kw_only=True):
    """What each thing costs, in prefixes at the base input price, and the cadence."""

    prefix_tokens: int
    warm: float
    """One warm that found the cache alive."""
    warm_miss: float
    """One warm that found the cache gone (it writes the prefix again)."""
    read: float
    write: float
    """The 5-minute cache's write."""
    write_hour: float
    growth_hour: float
    """What the 1-hour cache adds per returning turn: its new content at the dearer write."""
    ttl_ms: int
    interval_ms: int
    """The warm cadence for this lifetime: the core's effective interval."""

    @classmethod
    def of(cls, policy: Policy, prefix_tokens: int, ttl_ms: int = FIVE_MINUTES_MS) -> Tariff:
        """The tariff ``policy``'s prices and margin set, for a prefix and a 5-minute cache."""
        prices = policy.prices
        prefix = prefix_tokens
        return cls(
            prefix_tokens=prefix,
            warm=warm_cost(warm_usage(prefix, alive=True), prices, ttl_ms) / prefix,
            warm_miss=warm_cost(warm_usage(prefix, alive=False), prices, ttl_ms) / prefix,
            read=prices.read,
            write=prices.write(ttl_ms),
            write_hour=prices.write(HOUR_MS),
            growth_hour=TURN_GROWTH * (prices.write(HOUR_MS) - prices.write(ttl_ms)),
            ttl_ms=ttl_ms,
            interval_ms=max(MIN_INTERVAL_MS, ttl_ms - policy.ttl_margin_ms),
        )


def warm_usage(prefix_tokens: int, *, alive: bool) -> Usage:
    """What a warm reports: a read of the prefix while the cache lives, else a write."""
    cached = prefix_tokens
    return Usage(
        input_tokens=prefix_tokens + WARM_MESSAGE_TOKENS,
        cache_read_tokens=cached if alive else 0,
        cache_write_tokens=0 if alive else cached,
        output_tokens=1,
    )


class Result(Struct, frozen=True, kw_only=True):
    """One row: cost per gap (prefixes), and how the returns found the cache."""

    cost: float
    gaps: int
    returns: int
    warm_returns: int
    """Returning turns that found the cache alive."""
    warms: int
    k: int | None = None
    """The best-k row's k."""

    @property
    def per_gap(self) -> float:
        """Cost per idle gap, in prefixes at the base input price."""
        return self.cost / self.gaps if self.gaps else 0.0

    @property
    def warm_share(self) -> float:
        """The share of returning turns that found a warm cache."""
        return self.warm_returns / self.returns if self.returns else 0.0


def no_warming(gaps: Sequence[Gap], tariff: Tariff) -> Result:
    """The closed form of ``none``: a read back within the lifetime, a write after."""
    back = [g for g in gaps if g is not None]
    alive = sum(1 for g in back if g < tariff.ttl_ms)
    cost = alive * tariff.read + (len(back) - alive) * tariff.write
    return Result(cost=cost, gaps=len(gaps), returns=len(back), warm_returns=alive, warms=0)


def warm_k(gaps: Sequence[Gap], k: int, tariff: Tariff) -> Result:
    """ "Warm k times, then stop": warm j goes out at j intervals if the user is still away."""
    interval, ttl = tariff.interval_ms, tariff.ttl_ms
    cost = 0.0
    returns = alive = warms = 0
    for gap in gaps:
        sent = k if gap is None else min(k, max(0, (gap - 1) // interval))
        warms += sent
        cost += sent * tariff.warm
        if gap is None:
            continue
        returns += 1
        if gap < k * interval + ttl:
            alive += 1
            cost += tariff.read
        else:
            cost += tariff.write
    return Result(cost=cost, gaps=len(gaps), returns=returns, warm_returns=alive, warms=warms)


def best_k(gaps: Sequence[Gap], tariff: Tariff) -> Result:
    """The cheapest "warm k times, then stop" rule for these gaps (k searched)."""
    interval, ttl = tariff.interval_ms, tariff.ttl_ms
    assert interval < ttl, "warms every interval keep the cache alive only if interval < ttl"
    back = sorted(g for g in gaps if g is not None)
    abandoned = len(gaps) - len(back)
    # cost(k) = cost(k - 1) + a warm for every gap still open at k intervals, minus the
    # re-writes it turns into reads: returns in [(k - 1) interval + ttl, k interval + ttl).
    unit = tariff.write - tariff.read
    cost = no_warming(gaps, tariff).cost
    best, best_cost = 0, cost
    top = back[-1] if back else 0
    for k in range(1, MAX_K + 1):
        still_away = abandoned + len(back) - bisect_left(back, k * interval + 1)
        saved = bisect_left(back, k * interval + ttl) - bisect_left(back, (k - 1) * interval + ttl)
        cost += still_away * tariff.warm - saved * unit
        if cost < best_cost - 1e-12:
            best, best_cost = k, cost
        if (k - 1) * interval + ttl > top:
            break  # every return is covered: more warms only cost
    return replace(warm_k(gaps, best, tariff), k=best)


def clairvoyant(gaps: Sequence[Gap], tariff: Tariff) -> Result:
    """The bound of a policy that knows each gap: the cheaper of no warming and of warming
    just enough (at the same cadence) to bridge it; nothing for an abandoned gap."""
    interval, ttl = tariff.interval_ms, tariff.ttl_ms
    cost = 0.0
    returns = alive = warms = 0
    for gap in gaps:
        if gap is None:
            continue
        returns += 1
        if gap < ttl:
            alive += 1
            cost += tariff.read
            continue
        needed = (gap - ttl) // interval + 1  # the fewest warms with gap < n interval + ttl
        bridged = needed * tariff.warm + tariff.read
        if bridged < tariff.write:
            alive += 1
            warms += needed
            cost += bridged
        else:
            cost += tariff.write
    return Result(cost=cost, gaps=len(gaps), returns=returns, warm_returns=alive, warms=warms)
