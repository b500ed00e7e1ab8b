"""The cost judgement on top of the fixed rules: TTL awareness, holds, and the account.

The state machine (``warmer.core.machine``) asks this module three things:

- the effective interval: with a known cache lifetime, one warm per lifetime minus
  ``ttl_margin_ms``, whatever the configured interval (a 1-hour cache is warmed once an
  hour, not every 4 minutes; a configured interval too long to keep a 5-minute cache
  alive is not obeyed);
- whether an arm must be held (``hold``): a prefix too small to be cached, a warm that
  would land after the cache expired, the budget policy's spend cap, the adaptive
  policy's judgement (``warmer.core.costs``);
- what each input adds to the conversation's savings account.

It owns the deployment's gap model (``warmer.core.gaps``), learned from the idle gaps the
conversations show, snapshotted per batch as the journal snapshots conversations.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from warmer.contract import MAX_SAFE_INTEGER, CostPolicyName, StatField, TurnSettled, Usage
from warmer.core.costs import (
    MAX_LOOKAHEAD,
    TtlAdvice,
    estimated_warm_cost,
    rewrite_saving,
    ttl_advice,
    ttl_from_usage,
    warm_cost,
    worth_warming,
)
from warmer.core.effects import Accounted
from warmer.core.gaps import GapModel
from warmer.core.policy import HOUR_MS, Policy
from warmer.core.rules import MAX_INTERVAL_MS, MIN_INTERVAL_MS, round_half_up
from warmer.core.state import Conversation, Hold, Return

ADVICE_MIN_GAPS: Final = 100
"""Gaps to observe before the model's advice on the 1-hour cache is shown (not the prior's)."""
_ADVICE_EVERY: Final = 1000
"""The advice is worked out again when the gaps seen double, and at least every this many
(it walks the model: about a millisecond)."""


class Economy:
    """The deployment's prices, cost policy and gap model, and the judgements they make."""

    def __init__(self, policy: Policy, model: GapModel | None = None) -> None:
        """Judge with ``policy``'s knobs, learning into ``model`` (the prior when None)."""
        self.policy = policy
        self.prices = policy.prices
        self.model = model or GapModel()
        self._snapshot: GapModel | None = None
        self._in_batch = False
        self._advice: TtlAdvice | None = None
        self._advice_next = ADVICE_MIN_GAPS
        """The gaps seen at which the advice is worked out (again)."""
        self._advice_field: StatField | None = None
        self._policy_field = _POLICY_FIELDS.get(policy.cost_policy)

    # -- batches ----------------------------------------------------------------------

    def begin(self) -> None:
        """A batch opened: the model is snapshotted before it first learns."""
        self._in_batch = True
        self._snapshot = None

    def touched_model(self) -> GapModel | None:
        """The model, when the open batch changed it (to persist with the batch)."""
        if self._snapshot is None or self._snapshot == self.model:
            return None
        return self.model

    def rollback(self) -> None:
        """Forget what the batch learned."""
        if self._snapshot is not None:
            self.model = self._snapshot.copy()

    def end(self) -> None:
        """The batch was committed (or rolled back and closed)."""
        self._in_batch = False
        self._snapshot = None

    def _learning(self) -> GapModel:
        if self._in_batch and self._snapshot is None:
            self._snapshot = self.model.copy()
        return self.model

    # -- the interval and the holds ---------------------------------------------------

    def policy_of(self, conv: Conversation) -> CostPolicyName:
        """The conversation's cost policy: its own, else the deployment's."""
        return conv.policy or self.policy.cost_policy

    def interval(self, conv: Conversation) -> int:
        """The effective interval: a known cache lifetime minus the margin (1 s to 24 h, as
        any interval), else the configured one.

        A lifetime no longer than the margin is too short to keep alive by warming: it is
        never a reason to warm more often than configured (docs/contract.md). The configured
        interval applies, and the late-fire guard judges each warm against the lifetime.
        """
        ttl = conv.cache_ttl_ms
        margin = self.policy.ttl_margin_ms
        if ttl is None or ttl <= margin:
            return conv.interval_ms
        return min(MAX_INTERVAL_MS, max(MIN_INTERVAL_MS, ttl - margin))

    def latest_due(self, conv: Conversation) -> int | None:
        """With a known lifetime, the latest a warm is due: one effective interval after
        the last read (the margin before the expiry); None while the lifetime is unknown.

        An arm made long after the last read (an enable, a new interval) is due by then,
        not a whole interval from its own now, which would land past the expiry.
        """
        read = conv.last_read_at
        if conv.cache_ttl_ms is None or read is None:
            return None
        return read + self.interval(conv)

    def budget_spent(self, conv: Conversation, due: int) -> bool:
        """The idle budget (docs/semantics.md, addition 4) forbids the warm due at ``due``.

        It binds the ``fixed`` and ``budget`` policies, not ``adaptive`` (decision 46):
        the budget is the fixed rules' guess at when warming stops paying, which the
        adaptive rule works out. The running worker and restart recovery both ask here.
        """
        if self.policy_of(conv) == "adaptive":
            return False
        policy = self.policy
        return (
            due > conv.idle_since + policy.idle_max_ms or conv.idle_warms >= policy.idle_max_warms
        )

    def lifetime(self, conv: Conversation) -> int:
        """The cache lifetime the arithmetic assumes: the known one, else the deployment's
        (``WARMER_CACHE_TTL_MS``). The guards use only a known one (``expires_at``)."""
        return conv.cache_ttl_ms or self.policy.cache_ttl_ms

    def expires_at(self, conv: Conversation) -> int | None:
        """When the cache expires, when its lifetime is known (the late-fire guard)."""
        if conv.cache_ttl_ms is None or conv.last_read_at is None:
            return None
        return conv.last_read_at + conv.cache_ttl_ms

    def hold(self, conv: Conversation, due: int) -> Hold:
        """Whether the warm due at ``due`` is to be held, and why (``Hold.NONE``: warm)."""
        policy = self.policy
        prefix = conv.prefix_tokens
        if prefix is not None and prefix < policy.min_prefix_tokens:
            return Hold.SMALL_PREFIX
        expires = self.expires_at(conv)
        if expires is not None and due >= expires:
            return Hold.EXPIRED
        kind = self.policy_of(conv)
        if kind == "fixed":
            return Hold.NONE
        last = conv.last_warm_cost
        estimate = estimated_warm_cost(prefix, self.prices)
        if kind == "budget":
            cost = estimate if last is None else last
            return (
                Hold.SPEND_CAP if conv.stretch_cost + cost > policy.spend_cap_tokens else Hold.NONE
            )
        # With the prefix unknown, saving and cost are both per prefix token.
        cost = estimate if last is None or prefix is None else last
        ttl = self.lifetime(conv)
        start = conv.settled_at if conv.settled_at is not None else conv.idle_since
        read = conv.last_read_at if conv.last_read_at is not None else start
        due_age = due - start
        worth = worth_warming(
            self.model,
            due_age_ms=due_age,
            expiry_age_ms=max(read + ttl - start, due_age),
            ttl_ms=ttl,
            interval_ms=self.interval(conv),
            saving=rewrite_saving(prefix, self.prices, ttl),
            cost=cost,
            horizon=MAX_LOOKAHEAD,
        )
        return Hold.NONE if worth else Hold.RETURN_UNLIKELY

    # -- learning and accounting ------------------------------------------------------

    def started(self, now: int, conv: Conversation) -> None:
        """A turn started: the open gap ends (learned), and how it found the cache is noted."""
        settled_at = conv.settled_at
        if settled_at is None:
            return
        self._learning().observe(now - settled_at)
        conv.settled_at = None
        ttl = self.lifetime(conv)
        natural = (conv.settled_read_at if conv.settled_read_at is not None else settled_at) + ttl
        current = (conv.last_read_at if conv.last_read_at is not None else settled_at) + ttl
        if now < natural:
            conv.returned = Return.ALIVE
        elif now < current:
            conv.returned = Return.KEPT
        else:
            conv.returned = Return.LOST

    def abandoned(self, conv: Conversation) -> None:
        """The conversation closed or was forgotten: its open gap never ends."""
        if conv.settled_at is not None:
            self._learning().abandon()
            conv.settled_at = None

    def settled(self, cid: str, conv: Conversation, event: TurnSettled) -> Accounted | None:
        """A turn settled: credit what the return found, then learn the turn's TTL and prefix.

        Call it after ``last_read_at`` is set for the settle; it opens the next gap.
        """
        account = self._credit(cid, conv, event.usage)
        usage = event.usage
        # A 0 reads as absent: many publishers send a zero value for "not set" (Go's and
        # protobuf's defaults), and no provider grants a cache of 0 s or caches 0 tokens.
        if event.cache_ttl_s:
            conv.cache_ttl_ms = event.cache_ttl_s * 1000
        elif usage is not None:
            conv.cache_ttl_ms = ttl_from_usage(usage) or conv.cache_ttl_ms
        if event.prefix_tokens:
            conv.prefix_tokens = event.prefix_tokens
        elif usage is not None and usage.input_tokens:
            conv.prefix_tokens = usage.input_tokens  # the last request's prompt: the prefix
        conv.settled_at = conv.idle_since
        conv.settled_read_at = conv.last_read_at
        conv.misses = 0
        conv.stretch_cost = 0
        return account

    def _credit(self, cid: str, conv: Conversation, usage: Usage | None) -> Accounted | None:
        returned = conv.returned
        conv.returned = None
        if returned is None:
            return None
        ttl = self.lifetime(conv)
        unit = self.prices.write(ttl) - self.prices.read
        prefix = conv.prefix_tokens
        avoided = missed = 0.0
        if usage is not None:
            read, write = usage.cache_read_tokens, usage.cache_write_tokens
            if read > 0 and returned is Return.KEPT:
                avoided = min(read, prefix or read) * unit
            elif read == 0 and write > 0:
                missed = min(write, prefix or write) * unit
        elif prefix is not None:
            if returned is Return.KEPT:
                avoided = prefix * unit
            elif returned is Return.LOST:
                missed = prefix * unit
        avoided_tokens = _add(0, round_half_up(avoided))
        missed_tokens = _add(0, round_half_up(missed))
        if avoided_tokens <= 0 and missed_tokens <= 0:
            return None
        conv.avoided = _add(conv.avoided, avoided_tokens)
        conv.missed = _add(conv.missed, missed_tokens)
        return Accounted(cid, avoided=avoided_tokens, missed=missed_tokens)

    def warmed(self, cid: str, conv: Conversation, usage: Usage) -> Accounted:
        """One of our warms came back with its usage: learn from it and pay for it."""
        # The prefix is learned from what turns say, not from warms: a warm's usage is a
        # required field, and without the optional ones nothing may change (docs/contract.md).
        conv.cache_ttl_ms = ttl_from_usage(usage) or conv.cache_ttl_ms
        cost = _add(0, round_half_up(warm_cost(usage, self.prices, conv.cache_ttl_ms)))
        conv.spent = _add(conv.spent, cost)
        conv.stretch_cost = _add(conv.stretch_cost, cost)
        conv.last_warm_cost = cost
        if usage.cache_read_tokens == 0 and usage.cache_write_tokens > 0:
            conv.misses += 1
        elif usage.cache_read_tokens > 0:
            conv.misses = 0
        return Accounted(cid, spent=cost)

    # -- what the panel shows ---------------------------------------------------------

    def advice(self) -> TtlAdvice | None:
        """The 5-minute cache warmed against the 1-hour one, for the gaps seen; None before
        ``ADVICE_MIN_GAPS`` were."""
        if self.model.seen >= self._advice_next:
            self._work_out_advice()
        return self._advice

    def _work_out_advice(self) -> None:
        model, policy = self.model, self.policy
        interval = max(MIN_INTERVAL_MS, policy.cache_ttl_ms - policy.ttl_margin_ms)
        advice = ttl_advice(
            model,
            self.prices,
            ttl_ms=policy.cache_ttl_ms,
            interval_ms=interval,
            horizon=MAX_LOOKAHEAD,
        )
        self._advice = advice
        # Again when the gaps seen double, and at least every _ADVICE_EVERY.
        self._advice_next = model.seen + min(_ADVICE_EVERY, model.seen)
        self._advice_field = None
        if advice.hour_is_cheaper:
            text = f"a 1-hour cache would cost {advice.hour_saving_pct}% less for the gaps seen"
            self._advice_field = StatField(label="Advice", value=text)

    def fields(self, conv: Conversation) -> list[StatField]:
        """The panel's cost fields, each only when it has something to say.

        On the path of every applied input: the fixed texts are built once and shared.
        """
        fields: list[StatField] = []
        if conv.policy is not None or self._policy_field is not None:
            field = _POLICY_FIELDS.get(self.policy_of(conv))
            if field is not None:
                fields.append(field)
        ttl = conv.cache_ttl_ms
        if ttl is not None:
            fields.extend(_ttl_fields(ttl, conv.interval_ms, self.interval(conv)))
        if conv.hold is not Hold.NONE:
            fields.append(StatField(label="Not warming", value=self._why(conv)))
        if conv.spent or conv.avoided or conv.missed:
            fields.append(_savings(conv.spent, conv.avoided, conv.missed))
        if self.model.seen >= self._advice_next:
            self._work_out_advice()
        if self._advice_field is not None and (ttl is None or ttl < HOUR_MS):
            fields.append(self._advice_field)
        return fields

    def _why(self, conv: Conversation) -> str:
        match conv.hold:
            case Hold.EXPIRED:
                return "the cache expired before the warm was due; waiting for the next turn"
            case Hold.SMALL_PREFIX:
                return (
                    f"the prefix ({conv.prefix_tokens} tokens) is below the "
                    f"{self.policy.min_prefix_tokens} the provider caches"
                )
            case Hold.MISSES:
                return f"{conv.misses} warms in a row found the cache gone"
            case Hold.SPEND_CAP:
                cap = self.policy.spend_cap_tokens
                return f"this idle stretch reached the spend cap ({cap} tokens)"
            case Hold.RETURN_UNLIKELY:
                return "a return before the cache expires is too unlikely to pay for a warm"
            case _:
                return ""


def _add(total: int, tokens: int) -> int:
    """An account figure grown by ``tokens``, saturated at the largest safe integer: a
    publisher's absurd usage (2^53 tokens a warm) must not make a record unstorable."""
    return min(total + tokens, MAX_SAFE_INTEGER)


_POLICY_FIELDS: Final[dict[str, StatField]] = {
    kind: StatField(label="Cost policy", value=kind) for kind in ("budget", "adaptive")
}
"""The policy is shown when it is not ``fixed`` (the rules of docs/semantics.md alone)."""


@lru_cache(maxsize=64)
def _ttl_fields(ttl: int, configured: int, effective: int) -> tuple[StatField, ...]:
    lifetime = StatField(label="Cache lifetime", value=_duration(ttl))
    if effective == configured:
        return (lifetime,)
    value = f"{_duration(effective)} (for the {_duration(ttl)} cache)"
    return lifetime, StatField(label="Effective interval", value=value)


def _duration(ms: int) -> str:
    """Milliseconds for people: 1 h, 5 min, 59 min, 90 s."""
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000} h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000} min"
    return f"{(ms + 500) // 1000} s"


def tokens_text(x: float) -> str:
    """A token figure as the panel writes it (``warmer watch`` sums them): 950, 12.3k, 4.5M."""
    if x >= 999_950:
        return f"{x / 1e6:.1f}M"
    if x >= 1000:
        return f"{x / 1e3:.1f}k"
    return str(round(x))


@lru_cache(maxsize=4096)
def _savings(spent: int, avoided: int, missed: int) -> StatField:
    """The account as one line; cached: most inputs leave a conversation's account as it was."""
    net = avoided - spent
    value = (
        f"net {'+' if net >= 0 else '-'}{tokens_text(abs(net))} tokens: "
        f"warms {tokens_text(spent)}, re-writes avoided {tokens_text(avoided)}, "
        f"not avoided {tokens_text(missed)}"
    )
    return StatField(label="Savings", value=value)
