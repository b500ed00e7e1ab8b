"""What the core asks the shell to do; the shell carries these out in order.

What must be persisted is not an effect: the shell persists a batch's records
(``Warmer.touched``) before it carries out the effects that depend on them.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from warmer.contract import Reply, SurfaceChanged, WarmRequested


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


Effect = Arm | Cancel | PublishWarm | PublishSurface | SendReply | WarmFailed
