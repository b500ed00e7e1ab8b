"""What keeps the pipeline from making progress, as ``/readyz`` reports it.

The parts that can stall the worker (the store, the broker's confirms, the broker's flow
control, the pipeline itself) say so here when trouble starts and when it ends; the app's
readiness reads the reasons. ``/healthz`` stays about the process: a worker waiting for its
store is alive and should not be restarted, only taken out of rotation.

Each part has at most one reason at a time, so what this holds is bounded by the number of
parts, whatever happens. A change of readiness is logged once (``not_ready`` with the
reason, ``ready_again`` with how long it lasted), never once per retry.
"""

from __future__ import annotations

import time
from typing import Final, Literal

from warmer.observe.log import get_logger

__all__ = ["PARTS", "Health", "Part"]

log = get_logger(__name__)

Part = Literal["store", "store_lost", "confirms", "broker_blocked", "stall"]
"""Who reports trouble: one reason each."""

PARTS: Final[tuple[Part, ...]] = ("store", "store_lost", "confirms", "broker_blocked", "stall")

_REASON_CHARS: Final = 300


class Health:
    """The current trouble of each part; empty when nothing holds the pipeline up."""

    def __init__(self) -> None:
        self._reasons: dict[Part, str] = {}
        self._since: dict[Part, float] = {}

    def trouble(self, part: Part, reason: str) -> None:
        """``part`` cannot make progress, because of ``reason`` (one short line)."""
        reason = " ".join(reason.split())[:_REASON_CHARS]
        if part not in self._reasons:
            self._since[part] = time.monotonic()  # a duration, not a wait: not the Clock's
            log.warning("not_ready", part=part, reason=reason)
        self._reasons[part] = reason

    def cleared(self, part: Part) -> None:
        """``part`` makes progress again; no-op when it had no trouble."""
        if self._reasons.pop(part, None) is not None:
            lasted = time.monotonic() - self._since.pop(part)
            log.info("ready_again", part=part, lasted_s=round(lasted, 3))

    def reason(self, part: Part) -> str | None:
        """The trouble ``part`` reported last, None when it has none."""
        return self._reasons.get(part)

    def reasons(self) -> list[str]:
        """Every current reason, ``part: reason``, in a fixed order of parts."""
        return [f"{part}: {self._reasons[part]}" for part in PARTS if part in self._reasons]
