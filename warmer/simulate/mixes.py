"""The idle gaps to replay: distributions to sample, and trace files of real ones.

A gap is in milliseconds, from a ``turn.settled`` to the next ``turn.started``; ``None``
is an abandoned gap (the user never came back). A sampled run draws each gap from a
mix and makes it abandoned with the run's abandoned share; conversations are cut from
the list: one ends at an abandoned gap, or after ``MAX_TURNS`` gaps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from typing import Final

from msgspec import Struct

from warmer.core.gaps import PUBLISHED_MU, PUBLISHED_SIGMA

Gap = int | None
"""An idle gap in ms; None: abandoned."""

MAX_TURNS: Final = 20
"""Gaps per conversation at most: a conversation nobody abandons ends after this many."""

ABANDONED_SHARES: Final = (0.0, 0.2, 0.5)
"""The abandoned shares every mix is run with."""

ABANDONED_WORDS: Final = frozenset({"abandoned", "inf", "infinity"})


class Mix(Struct, frozen=True):
    """A distribution of idle gaps, in seconds."""

    name: str
    description: str
    draw: Callable[[random.Random], float]


def _published(rng: random.Random) -> float:
    return rng.lognormvariate(PUBLISHED_MU, PUBLISHED_SIGMA)


def _quick(rng: random.Random) -> float:
    return rng.uniform(5, 120) if rng.random() < 0.9 else _published(rng)


def _coffee(rng: random.Random) -> float:
    return rng.uniform(600, 2400)


def _split(rng: random.Random) -> float:
    return rng.uniform(5, 120) if rng.random() < 0.6 else rng.uniform(600, 2400)


MIXES: Final = (
    Mix(
        "published",
        "lognormal through the published reply times: 27 % after 5 min, 10 % after 15",
        _published,
    ),
    Mix("quick", "90 % within 5-120 s, the rest as the published lognormal", _quick),
    Mix("coffee", "coffee breaks: every gap 10-40 min", _coffee),
    Mix("split", "60 % within 5-120 s, 40 % coffee breaks of 10-40 min", _split),
)
"""The distributions ``warmer simulate`` runs by default."""


def sample(mix: Mix, abandoned_share: float, count: int, rng: random.Random) -> list[Gap]:
    """``count`` gaps of ``mix``, each abandoned with probability ``abandoned_share``."""
    gaps: list[Gap] = []
    for _ in range(count):
        if rng.random() < abandoned_share:
            gaps.append(None)
        else:
            gaps.append(round(mix.draw(rng) * 1000))
    return gaps


def conversations(gaps: Iterable[Gap], max_turns: int = MAX_TURNS) -> list[list[Gap]]:
    """The gaps cut into conversations: each ends at an abandoned gap or after ``max_turns``."""
    cut: list[list[Gap]] = []
    current: list[Gap] = []
    for gap in gaps:
        current.append(gap)
        if gap is None or len(current) >= max_turns:
            cut.append(current)
            current = []
    if current:
        cut.append(current)
    return cut


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


def read_trace(path: str) -> list[Gap]:
    """The gaps of the trace file at ``path`` (``parse_trace``); TraceError when unreadable."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise TraceError(f"{path}: cannot read the trace: {why}") from None
    return parse_trace(text, path)


def mixes_named(names: Iterable[str]) -> list[Mix]:
    """The mixes of these names, in the order given; ValueError naming the choices."""
    known = {mix.name: mix for mix in MIXES}
    chosen: list[Mix] = []
    for name in names:
        if name not in known:
            raise ValueError(f"unknown mix {name!r}: choose from {', '.join(known)}")
        chosen.append(known[name])
    return chosen


def parse_trace(text: str, name: str = "trace") -> list[Gap]:
    """A trace's gaps: seconds, one a line, or ``abandoned``/``inf`` for an abandoned gap.

    Blank lines and ``#`` comments (whole-line or trailing) are ignored.
    """
    gaps: list[Gap] = []
    for number, line in enumerate(text.splitlines(), start=1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        if word.lower() in ABANDONED_WORDS:
            gaps.append(None)
            continue
        try:
            seconds = float(word)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            shown = word if len(word) <= 40 else word[:40] + "…"
            raise TraceError(
                f"{name}:{number}: {shown!r} is not a gap: write seconds (such as 95 or "
                "12.5), or 'abandoned' (or 'inf') for a user who never came back"
            )
        gaps.append(round(seconds * 1000))
    if not gaps:
        raise TraceError(f"{name}: no gaps (one a line, in seconds)")
    return gaps
