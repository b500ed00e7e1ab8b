"""The bus port: what the pipeline needs from the broker, in one place.

``Delivery`` is what a consumer hands over and how it is settled; ``Outbound`` is the one
publisher. aio-pika's ``IncomingMessage`` and ``warmer.bus.publisher.Publisher`` are the
real ones; ``warmer.bus.memory`` holds in-memory ones, so the pipeline (batching, commit
then acknowledge, rollback, redelivery, the failure of any effect) has fast unit tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from warmer.contract import Rejection, Reply, SurfaceChanged, WarmRequested


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
        """The channel it came on (grouping acknowledgements); raises once it is closed."""

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


__all__ = ["Delivery", "Outbound"]
