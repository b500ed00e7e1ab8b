"""The bus port: what the pipeline needs from the broker, in one place.

``Delivery`` is what a consumer hands over and how it is settled; ``Outbound`` is the one
publisher. ``warmer.bus.consumer.AmqpDelivery`` and ``warmer.bus.publisher.Publisher`` are
the real ones; ``warmer.bus.memory`` holds in-memory ones, so the pipeline (batching,
commit then acknowledge, rollback, redelivery, the failure of any effect) has fast unit
tests. The exceptions and the confirm deadline are the port's too: an adapter translates
its client's errors into these, so the pipeline never sees aiormq's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from warmer.contract import Rejection, Reply, SurfaceChanged, WarmRequested

CONFIRM_TIMEOUT_MS: Final = 10_000
"""How long a publish may wait for its confirm before the connection is judged dead."""

CONFIRM_BACKOFF_MAX: Final = 8
"""After resets in a row the confirm deadline is at most this many times the setting (a
broker slow but alive is given the time it takes instead of being dropped again)."""


class PublishFailed(Exception):
    """The broker refused a publish (negative confirm) or did not confirm it in time."""


class ConfirmOverdue(PublishFailed):
    """No confirm within the deadline: the connection may be silently dead."""


class PublishWithdrawn(Exception):
    """A publish cut by a lost connection was no longer wanted once it came back."""


class DeadLetterRefused(Exception):
    """A dead letter cannot be published as such; reject the original instead."""


class ChannelGone(Exception):
    """The channel a delivery came on is closed: the broker delivers it again."""


class PluginMissing(Exception):
    """The broker lacks an exchange type the topology needs (a plugin not enabled)."""


class ShardHeld(Exception):
    """Another connection holds the exclusive consumer of a shard's queue: try later."""


class Delivery(Protocol):
    """One message delivered by a consumer, until it is acknowledged or rejected."""

    @property
    def body(self) -> bytes: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def headers(self) -> Any: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def delivery_tag(self) -> int | None: ...

    @property
    def channel(self) -> Any:
        """The channel it came on (grouping acknowledgements); ChannelGone once closed."""

    async def ack(self, multiple: bool = False) -> None:
        """Acknowledge it (and, with ``multiple``, every earlier one on its channel)."""

    async def reject(self, requeue: bool = False) -> None:
        """Hand it back (``requeue``) or to the queue's dead-lettering."""


class Outbound(Protocol):
    """Publishes with confirms; raises PublishFailed when the broker does not confirm."""

    @property
    def closing(self) -> bool:
        """True once no publish waits for the broker any more (stopping)."""

    async def surface(self, update: SurfaceChanged) -> None:
        """Publish ``surface.changed``."""

    async def warm(
        self, request: WarmRequested, timeout_ms: int, still_wanted: Callable[[], bool]
    ) -> bool:
        """Publish ``warm.requested``, mandatory; False when returned unroutable."""

    async def reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        """Answer a command."""

    async def dead_letter(self, incoming: Any, rejection: Rejection) -> None:
        """Dead-letter an invalid message; DeadLetterRefused when it cannot go out."""

    async def reset(self, why: str) -> None:
        """Drop the connection (confirms are overdue: it may be dead without a word).

        The adapter reconnects; what was delivered and not acknowledged comes again, and
        publishes under way go out on the new connection. Returns without waiting for it.
        """


__all__ = [
    "CONFIRM_BACKOFF_MAX",
    "CONFIRM_TIMEOUT_MS",
    "ChannelGone",
    "ConfirmOverdue",
    "DeadLetterRefused",
    "Delivery",
    "Outbound",
    "PluginMissing",
    "PublishFailed",
    "PublishWithdrawn",
    "ShardHeld",
]
