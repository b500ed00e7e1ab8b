"""The broker's flow control, surfaced: ``connection.blocked`` and ``connection.unblocked``.

When a resource alarm goes off (memory or disk), RabbitMQ stops reading from the
connections that publish and, to clients that advertise the ``connection.blocked``
capability, says so with ``connection.blocked`` (and a reason such as ``low on memory``),
then ``connection.unblocked`` once the alarm clears. aiormq 7.2 advertises the capability
in its client properties (the worker's own ``connection_name`` leaves it in place) and
handles both methods, but only logs them and holds its own writers: there is nothing a
caller can subscribe to.

``install()`` wraps aiormq's two handlers so that each also tells the listeners
``subscribe`` registered, with the aiormq connection it came on and the broker's reason
(None for unblocked). The wrap is pinned to the aiormq version it was written for, like
``warmer.bus.lenient``: with another, ``install()`` refuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiormq.connection
from pamqp import commands as spec

from warmer.bus.pinned import check_pinned
from warmer.observe.log import get_logger

__all__ = ["Listener", "install", "release", "subscribe"]

log = get_logger(__name__)

PINNED: Final = ("aiormq", "7.2.")
_BLOCKED: Final = "_Connection__handle_connection_blocked"
_UNBLOCKED: Final = "_Connection__handle_connection_unblocked"
_UNBLOCKED_EVENT: Final = "_Connection__connection_unblocked"

Listener = Callable[[object, str | None], None]
"""Told ``(aiormq connection, reason)`` on blocked, ``(aiormq connection, None)`` on unblocked."""

_listeners: list[Listener] = []


def install() -> None:
    """Tell listeners about blocked and unblocked connections from now on; idempotent."""
    check_pinned(dict([PINNED]), "warmer.bus.flow", "how it handles connection.blocked")
    connection = aiormq.connection.Connection
    for name, reason in ((_BLOCKED, _reason), (_UNBLOCKED, _no_reason)):
        handler = getattr(connection, name)
        if not getattr(handler, "_warmer_flow", False):
            setattr(connection, name, _wrapped(handler, reason))


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener`` on every blocked and unblocked; returns what unsubscribes it."""
    _listeners.append(listener)

    def unsubscribe() -> None:
        if listener in _listeners:
            _listeners.remove(listener)

    return unsubscribe


def release(connection: object) -> None:
    """Let the writer of a blocked aiormq connection that was lost go on (to fail).

    aiormq 7.2 holds its writer until ``connection.unblocked``, which a lost connection
    never sends; aio-pika's restore of the channels on the next connection waits for the
    old ones to close, so consumers came back about 25 s late after a block never lifted.
    """
    event = getattr(connection, _UNBLOCKED_EVENT, None)
    if isinstance(event, asyncio.Event):
        event.set()


def _reason(frame: Any) -> str | None:
    assert isinstance(frame, spec.Connection.Blocked)
    return frame.reason or "no reason given"


def _no_reason(_frame: Any) -> str | None:
    return None


def _wrapped(
    handler: Callable[[Any, Any], Awaitable[None]], reason: Callable[[Any], str | None]
) -> Callable[[Any, Any], Awaitable[None]]:
    async def handle(self: Any, frame: Any) -> None:
        await handler(self, frame)
        said = reason(frame)
        for listener in list(_listeners):
            try:
                listener(self, said)
            except Exception:  # one listener's bug must not cost the connection
                log.exception("flow_listener_failed")

    handle._warmer_flow = True  # type: ignore[attr-defined]
    return handle
