"""The one publisher: warm requests, surface updates, replies and dead letters.

Every publish waits for the broker's confirm. A publish cut by a lost connection is
retried once the robust connection is back, so a warm that fell due while the worker
was disconnected goes out after the reconnection instead of being lost. A negative
confirm or a confirm timeout raises ``PublishFailed``: the caller leaves the message
that caused it unacknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

import aiormq
import structlog
from aio_pika import DeliveryMode, Message
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from warmer.bus.topology import SURFACE_ROUTING_KEY, WARM_ROUTING_KEY, Topology
from warmer.contract import Rejection, Reply, SurfaceChanged, WarmRequested, encode

log = structlog.get_logger("warmer.bus")

JSON: Final = "application/json"
CONFIRM_TIMEOUT_S: Final = 10.0
_RETRY_PAUSE_S: Final = 0.5
# Errors that mean "the connection or channel went away": wait for it and publish again.
_CONNECTION_ERRORS: Final = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)


class PublishFailed(Exception):
    """The broker refused a publish (negative confirm) or did not confirm it in time."""


class PublishWithdrawn(Exception):
    """A publish cut by a lost connection was no longer wanted once it came back."""


def _always() -> bool:
    return True


class Publisher:
    """Publishes with confirms on one robust channel."""

    def __init__(
        self,
        channel: AbstractRobustChannel,
        topology: Topology,
        confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
    ) -> None:
        self._channel = channel
        self._names = topology.names
        self._warm = topology.exchanges[topology.names.warm]
        self._surface = topology.exchanges[topology.names.surface]
        self._dlx = topology.exchanges[topology.names.dlx]
        self._confirm_timeout_s = confirm_timeout_s
        self._closing = False

    def close(self) -> None:
        """Stop retrying publishes cut by a lost connection."""
        self._closing = True

    async def warm(
        self, request: WarmRequested, timeout_ms: int, still_wanted: Callable[[], bool]
    ) -> bool:
        """Publish a warm request, mandatory; False when the broker returned it unroutable.

        A request cut by a lost connection is published again only while
        ``still_wanted()``: once its warm timed out, its retry has a new token, and the old
        request must not run late beside it.
        """
        message = Message(
            encode(request),
            content_type=JSON,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=f"{request.conversation_id}:{request.token}",
            headers={"conversation-id": request.conversation_id},
            timestamp=request.requested_at / 1000,
            expiration=timedelta(milliseconds=timeout_ms),
        )
        result = await self._publish(
            self._warm, message, WARM_ROUTING_KEY, mandatory=True, still_wanted=still_wanted
        )
        return not isinstance(result, DeliveredMessage)

    async def surface(self, update: SurfaceChanged) -> None:
        """Publish a surface update: not mandatory, not persistent."""
        message = Message(
            encode(update),
            content_type=JSON,
            delivery_mode=DeliveryMode.NOT_PERSISTENT,
            headers={"conversation-id": update.conversation_id},
        )
        await self._publish(self._surface, message, SURFACE_ROUTING_KEY, mandatory=False)

    async def reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        """Answer a command on its ``reply_to`` queue through the default exchange."""
        message = Message(
            encode(reply),
            content_type=JSON,
            correlation_id=correlation_id,
            delivery_mode=DeliveryMode.NOT_PERSISTENT,
        )
        exchange = self._channel.default_exchange
        await self._publish(exchange, message, reply_to, mandatory=False)

    async def dead_letter(self, incoming: AbstractIncomingMessage, rejection: Rejection) -> None:
        """Re-publish an invalid message unchanged to the dead-letter exchange, with reasons."""
        headers: dict[str, Any] = dict(incoming.headers or {})
        headers["x-warmer-reason"] = rejection.code
        headers["x-warmer-error"] = rejection.error
        headers["x-warmer-original-exchange"] = incoming.exchange or ""
        headers["x-warmer-original-routing-key"] = incoming.routing_key or ""
        message = Message(
            incoming.body,
            headers=headers,
            content_type=incoming.content_type,
            content_encoding=incoming.content_encoding,
            delivery_mode=DeliveryMode.PERSISTENT,
            priority=incoming.priority,
            correlation_id=incoming.correlation_id,
            reply_to=incoming.reply_to,
            message_id=incoming.message_id,
            timestamp=incoming.timestamp,
            type=incoming.type,
            user_id=incoming.user_id,
            app_id=incoming.app_id,
        )
        await self._publish(self._dlx, message, incoming.routing_key or "", mandatory=False)

    async def _until_ready(self, cause: BaseException) -> None:
        """Wait for the robust channel to be back; give up as soon as closing starts."""
        while True:
            if self._closing:
                raise PublishFailed(f"connection lost while closing: {cause!r}") from cause
            try:
                await asyncio.wait_for(self._channel.ready(), _RETRY_PAUSE_S)
                return
            except TimeoutError:
                continue

    async def _publish(
        self,
        exchange: AbstractExchange,
        message: Message,
        routing_key: str,
        *,
        mandatory: bool,
        still_wanted: Callable[[], bool] = _always,
    ) -> object:
        while True:
            try:
                return await exchange.publish(
                    message,
                    routing_key,
                    mandatory=mandatory,
                    timeout=self._confirm_timeout_s,
                )
            except aiormq.exceptions.DeliveryError as exc:
                raise PublishFailed(f"broker refused the publish: {exc}") from exc
            except TimeoutError as exc:
                raise PublishFailed("no confirm from the broker in time") from exc
            except _CONNECTION_ERRORS as exc:
                log.warning("publish_waiting_for_connection", routing_key=routing_key)
                await self._until_ready(exc)
                if not still_wanted():
                    raise PublishWithdrawn(routing_key) from exc
