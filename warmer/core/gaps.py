"""How long users stay away: the idle gaps a deployment observed, as a distribution.

An idle gap runs from a ``turn.settled`` to the conversation's next ``turn.started``; a
conversation closed, or forgotten after the retention time, without a next turn ends in an
abandoned gap, which never ends. The model keeps a histogram of finished gaps over
log-spaced bins (1 s to about 11.6 days, 16 bins per decade) and a count of abandoned ones,
seeded with a prior: the published reply-time distribution (of 1,967 replies, 27 % came
after more than 5 minutes and 10 % after more than 15: a lognormal through both points)
with half the gaps abandoned (where warming those gaps stops paying: a new deployment
does not warm until its own gaps show it pays), worth ``PRIOR_GAPS`` observations. Old
observations fade: when the weight passes ``MAX_WEIGHT`` every count is halved, so the
model follows a deployment whose users change.

``survival(t)`` is the share of gaps still open after ``t`` ms, abandoned ones included: the
probability the adaptive policy needs (``warmer.core.costs``). The model is kept in the
store under ``MODEL_KEY`` (a key no conversation id can be), so a restart keeps what was
learned.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from statistics import NormalDist
from typing import Final

import msgspec

MODEL_KEY: Final = "\x7fwarmer:gap-model"
"""The store key of the model: DEL is a control character, so no conversation id is this."""

_PER_DECADE: Final = 16
EDGES: Final[tuple[int, ...]] = tuple(
    round(1000 * 10 ** (i / _PER_DECADE)) for i in range(6 * _PER_DECADE + 1)
)
"""Bin edges in ms: bin 0 holds gaps under 1 s, bin k gaps in [EDGES[k-1], EDGES[k]), the
last bin gaps of EDGES[-1] or more."""

PRIOR_GAPS: Final = 20.0
"""The prior's weight, in observations: a handful of real gaps already move the model."""
PRIOR_ABANDONED: Final = 0.5
MAX_WEIGHT: Final = 20_000.0
"""Past this many (weighted) observations, every count is halved."""

# The published reply times: P(gap > 5 min) = 0.27, P(gap > 15 min) = 0.10.
_Z: Final = NormalDist()
PUBLISHED_SIGMA: Final = (math.log(900) - math.log(300)) / (_Z.inv_cdf(0.90) - _Z.inv_cdf(0.73))
PUBLISHED_MU: Final = math.log(300) - _Z.inv_cdf(0.73) * PUBLISHED_SIGMA
"""The lognormal (of seconds) through the published points: a median of about 110 s."""

_VERSION: Final = 1


class _Stored(msgspec.Struct, array_like=True):
    version: int
    counts: list[float]
    abandoned: float
    seen: int


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(_Stored)


class GapModelError(ValueError):
    """Stored bytes that are not a gap model; the message is one line."""


def lognormal_counts(mu: float, sigma: float, weight: float) -> list[float]:
    """``weight`` gaps spread over the bins as a lognormal of seconds (mu, sigma)."""
    dist = NormalDist(mu, sigma)
    cdf = [0.0] + [dist.cdf(math.log(edge / 1000)) for edge in EDGES] + [1.0]
    return [weight * (cdf[k + 1] - cdf[k]) for k in range(len(EDGES) + 1)]


class GapModel:
    """Finished and abandoned idle gaps, weighted, with a prior; mutable, cheap to copy."""

    __slots__ = ("_abandoned", "_counts", "_seen", "_tail", "_weight")

    def __init__(
        self, counts: list[float] | None = None, abandoned: float | None = None, seen: int = 0
    ) -> None:
        """The prior, or the given counts (``len(EDGES) + 1`` bins)."""
        if counts is None:
            prior = PRIOR_GAPS * (1 - PRIOR_ABANDONED)
            counts = lognormal_counts(PUBLISHED_MU, PUBLISHED_SIGMA, prior)
        if abandoned is None:
            abandoned = PRIOR_GAPS * PRIOR_ABANDONED
        if len(counts) != len(EDGES) + 1:
            raise GapModelError(f"gap model: {len(counts)} bins, not {len(EDGES) + 1}")
        self._counts = list(counts)
        self._abandoned = abandoned
        self._seen = seen
        self._weight = sum(self._counts) + abandoned
        self._tail: list[float] | None = None
        """``_tail[k]``: the weight of bins k and above plus the abandoned; built lazily."""

    # -- learning ---------------------------------------------------------------------

    def observe(self, gap_ms: int) -> None:
        """A gap ended: the user came back after ``gap_ms``."""
        self._counts[bisect_right(EDGES, gap_ms)] += 1.0  # a negative gap lands in bin 0
        self._weight += 1.0
        self._learned()

    def abandon(self) -> None:
        """A gap ended without a return (closed, or forgotten after the retention time)."""
        self._abandoned += 1.0
        self._weight += 1.0
        self._learned()

    def _learned(self) -> None:
        self._seen += 1
        self._tail = None
        if self._weight > MAX_WEIGHT:
            self._counts = [c / 2 for c in self._counts]
            self._abandoned /= 2
            self._weight = sum(self._counts) + self._abandoned

    # -- queries ----------------------------------------------------------------------

    @property
    def seen(self) -> int:
        """Gaps observed (the prior not included)."""
        return self._seen

    @property
    def weight(self) -> float:
        """The model's total weight: the prior's and the observations', faded."""
        return self._weight

    @property
    def abandoned_share(self) -> float:
        """The share of gaps that never end."""
        return self._abandoned / self.weight

    def survival(self, t_ms: float) -> float:
        """The share of gaps longer than ``t_ms`` (abandoned ones are longer than any)."""
        tail = self._tail
        if tail is None:
            tail = self._tail = self._build_tail()
        if t_ms < 0:
            return 1.0
        k = bisect_right(EDGES, t_ms)
        # Within a bin, the weight is spread evenly over log time.
        if 0 < k < len(EDGES):
            low, high = EDGES[k - 1], EDGES[k]
            inside = self._counts[k] * (math.log(high / t_ms) / math.log(high / low))
        elif k == 0:
            inside = self._counts[0] * (1 - t_ms / EDGES[0])
        else:
            inside = self._counts[k]  # the open last bin: all of it is beyond any t
        return (tail[k + 1] + inside) / tail[0]

    def _build_tail(self) -> list[float]:
        tail = [0.0] * (len(self._counts) + 1)
        tail[-1] = self._abandoned
        for k in range(len(self._counts) - 1, -1, -1):
            tail[k] = tail[k + 1] + self._counts[k]
        return tail

    def copy(self) -> GapModel:
        """An independent copy (a batch's snapshot)."""
        return GapModel(self._counts, self._abandoned, self._seen)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GapModel):
            return NotImplemented
        return (self._counts, self._abandoned, self._seen) == (
            other._counts,
            other._abandoned,
            other._seen,
        )

    __hash__ = None  # type: ignore[assignment]

    # -- storage ----------------------------------------------------------------------

    def encode(self) -> bytes:
        """The stored form (MessagePack)."""
        return _ENCODER.encode(_Stored(_VERSION, self._counts, self._abandoned, self._seen))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> GapModel:
        """A model from its stored form; GapModelError when it is not one."""
        try:
            stored = _DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise GapModelError(f"malformed gap model: {' '.join(str(exc).split())}") from None
        if stored.version != _VERSION:
            raise GapModelError(f"gap model version {stored.version}, not {_VERSION}")
        values = [*stored.counts, stored.abandoned]
        if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
            raise GapModelError("gap model: a count that is negative, not finite, or all zero")
        return cls(stored.counts, stored.abandoned, max(stored.seen, 0))
