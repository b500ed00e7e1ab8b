"""What the core asks the shell to do; the shell carries these out in order.

What must be persisted is not an effect: the shell persists a batch's records
(``Warmer.touched``) before it carries out the effects that depend on them.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from warmer.contract import Reply, SurfaceChanged, WarmRequested
from warmer.core.state import Hold


class Arm(Struct, frozen=True, gc=False):
    """Start (or replace) the conversation's one timer."""

    conversation_id: str
    due_at: int
    token: int


class Cancel(Struct, frozen=True, gc=False):
    """Stop the conversation's pending timer."""

    conversation_id: str


class PublishWarm(Struct, frozen=True):
    """Publish ``warm.requested``; ``timeout_ms`` is its expiration."""

    request: WarmRequested
    timeout_ms: int


class PublishSurface(Struct, frozen=True):
    """Publish ``surface.changed``."""

    update: SurfaceChanged


class SendReply(Struct, frozen=True):
    """Answer the command (when it has a ``reply_to``)."""

    reply: Reply


WarmFailedCause = Literal["error", "returned", "timeout"]
"""Why a warm failed: its completion carried an error, the broker returned the request
as unroutable, or no completion came in time."""


class WarmFailed(Struct, frozen=True, gc=False):
    """A warm failed (error, unroutable, timeout): for logs and counters."""

    conversation_id: str
    token: int
    error: str
    failures: int
    paused: bool
    cause: WarmFailedCause


class WarmSkipped(Struct, frozen=True, gc=False):
    """The cost rules kept a conversation from being warmed: for logs and counters."""

    conversation_id: str
    reason: Hold


class Accounted(Struct, frozen=True, gc=False):
    """What an input added to the conversation's savings account (base-input-token units)."""

    conversation_id: str
    spent: int = 0
    """A warm's cost."""
    avoided: int = 0
    """A re-write a warm avoided."""
    missed: int = 0
    """A re-write the turn paid: the cache had expired."""


class IntervalAdjusted(Struct, frozen=True, gc=False):
    """A known cache lifetime overrides the configured interval (logged once per change)."""

    conversation_id: str
    configured_ms: int
    effective_ms: int
    ttl_ms: int


Effect = (
    Arm
    | Cancel
    | PublishWarm
    | PublishSurface
    | SendReply
    | WarmFailed
    | WarmSkipped
    | Accounted
    | IntervalAdjusted
)


Verdict = Literal[
    "applied", "answered", "stale", "dropped_active", "ignored", "rejected", "extended"
]


class Outcome(Struct, frozen=True):
    """What one input caused: the effects in order, and a verdict for logs and counters."""

    effects: list[Effect]
    verdict: Verdict = "applied"
