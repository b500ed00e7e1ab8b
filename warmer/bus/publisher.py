"""The one publisher: warm requests, surface updates, replies and dead letters.

Every publish waits for the broker's confirm. A publish cut by a lost connection (or a
channel the broker closed) is retried once the robust channel is back, so a warm that
fell due while the worker was disconnected goes out after the reconnection instead of
being lost. A negative confirm raises ``PublishFailed``, a confirm that does not come
within the deadline (on the injected clock) ``ConfirmOverdue``: the caller retries it in
place and leaves the message that caused it unacknowledged meanwhile; an overdue confirm
may mean a connection that died without a word, which ``reset`` drops. The exceptions are
the port's (``warmer.bus.port``): aiormq's never leave this module.

Warm requests, surface updates and replies take the fast path (``warmer.bus.frames``,
``warmer.bus.wire``): their frames are prepared from templates, and a loop turn's
publishes leave in one socket write, their confirms tracked in aiormq's own bookkeeping.
Their properties, headers and message ids are what the aio-pika ``Message`` of each
carried before (checked byte for byte in ``tests/unit/test_publisher.py``).

Dead letters go out on a channel of their own: one the broker refuses (for something in
the message itself) closes only that channel, never the one good messages use, and
raises ``DeadLetterRefused`` so the caller rejects the original instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, cast

import aiormq
import msgspec
from aio_pika import Message
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    FieldValue,
)
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.channel import Channel

from warmer.bus import deadletter
from warmer.bus.frames import FRAME_OVERHEAD, KeyedTable, Properties, method_frame, publish_frames
from warmer.bus.port import (
    CONFIRM_BACKOFF_MAX,
    CONFIRM_TIMEOUT_MS,
    ConfirmOverdue,
    DeadLetterRefused,
    PublishFailed,
    PublishWithdrawn,
)
from warmer.bus.topology import SURFACE_ROUTING_KEY, WARM_ROUTING_KEY, Topology
from warmer.bus.wire import Wire
from warmer.clock import Clock, sleep, within
from warmer.contract import Rejection, Reply, SurfaceChanged, WarmRequested, encode
from warmer.observe.log import get_logger
from warmer.observe.tasks import watch

log = get_logger(__name__)

JSON: Final = "application/json"
_REOPEN_POLL_MS: Final = 20
_NUDGE_AFTER_S: Final = 1.0
REPLICA_HEADER: Final = "x-warmer-replica"
CONVERSATION_HEADER: Final = "conversation-id"
# The three kinds' properties: what the aio-pika Message of each carried.
_SURFACE: Final = Properties({"content_type": JSON, "delivery_mode": 1}, ("headers", "message_id"))
_WARM: Final = Properties(
    {"content_type": JSON, "delivery_mode": 2, "priority": 0},  # aio-pika's default priority
    ("headers", "expiration", "message_id", "timestamp"),
)
_REPLY: Final = Properties(
    {"content_type": JSON, "delivery_mode": 1}, ("headers", "correlation_id", "message_id")
)
# Errors that mean "the connection or channel went away": wait for it and publish again.
_CONNECTION_ERRORS: Final = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
)
# What the broker answers to a publish it refuses for the message's own sake (a user_id
# naming another user, an expiration that is not a number): the channel is closed.
_REFUSALS: Final = (
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelAccessRefused,
)


class Publisher:
    """Publishes with confirms on one robust channel."""

    def __init__(
        self,
        channel: AbstractRobustChannel,
        topology: Topology,
        dead_channel: AbstractRobustChannel,
        dead_letters: AbstractExchange,
        clock: Clock,
        confirm_timeout_ms: int = CONFIRM_TIMEOUT_MS,
        replica: str = "",
        reply_channel: AbstractRobustChannel | None = None,
    ) -> None:
        """Publish on ``channel``; dead letters to ``dead_letters`` on ``dead_channel``;
        ``confirm_timeout_ms``: how long a warm request or a dead letter waits for its
        confirm (the pipeline bounds the others with one deadline per batch); ``replica``:
        this replica's id, in the header ``x-warmer-replica`` of warm requests and surface
        updates (none when empty); ``reply_channel``: where command replies go (``channel``
        when None): a channel of their own does not queue them behind the warm requests and
        surface updates of a flood, at the broker (a process per channel) or for confirms."""
        self._channel = channel
        self._reply_channel = reply_channel or channel
        self._replica = replica
        self._told_waiting = False
        self._names = topology.names
        self._dlx = dead_letters
        self._dead_channel = dead_channel
        self.nudge_after_s = _NUDGE_AFTER_S
        """How long a refused dead-letter channel may stay closed before it is restored here."""
        self._clock = clock
        self._sent = 0
        self._dead_letter_lock = asyncio.Lock()
        self._confirm_timeout_ms = confirm_timeout_ms
        # The deadline now: doubled at each reset (at most CONFIRM_BACKOFF_MAX times the
        # setting), back to the setting once a confirm comes within it; as the pipeline's.
        self._deadline_ms = confirm_timeout_ms
        self._closing = False
        self._closed = asyncio.Event()
        self._resets: set[asyncio.Task[None]] = set()
        self.wire = Wire()
        """Where the fast path's publishes are written, a loop turn's together."""
        self._conversation_headers = KeyedTable(
            CONVERSATION_HEADER, {REPLICA_HEADER: replica} if replica else {}
        )
        self._reply_headers: dict[str, FieldValue] | None = (
            {REPLICA_HEADER: replica} if replica else None
        )
        self._links: dict[int, _Link] = {}
        """The link of each robust channel published on (by its id): publishes, replies."""

    def close(self) -> None:
        """Stop retrying publishes cut by a lost connection."""
        self._closing = True
        self._closed.set()

    async def reset(self, why: str) -> None:
        """Close the connection the publish channel is on, so aio-pika's robust connection
        reconnects and the broker redelivers what was not acknowledged.

        Closed from the side (aiormq's own close, with a connection error as the cause):
        publishes under way wait for the new connection and go out again on it. Returns at
        once: on a path that stopped forwarding the closing handshake takes its time. No-op
        when the channel is already down (a reconnection is under way). The confirm deadline
        of warm requests and dead letters doubles: confirms overdue on a broker slow but
        alive would otherwise be overdue again on the new connection.
        """
        limit = CONFIRM_BACKOFF_MAX * self._confirm_timeout_ms
        self._deadline_ms = min(2 * self._deadline_ms, limit)
        try:
            underlay = await self._channel.get_underlay_channel()
        except _CONNECTION_ERRORS:
            log.info("connection_reset_skipped", why=why[:300], reason="not connected")
            return
        connection = underlay.connection
        if connection.is_closed:
            log.info("connection_reset_skipped", why=why[:300], reason="not connected")
            return
        log.warning("connection_reset", why=why[:300])
        cause = ConnectionResetError(f"reset by the worker: {why}"[:300])
        closing = watch(asyncio.get_running_loop().create_task(connection.close(cause)))
        self._resets.add(closing)
        closing.add_done_callback(self._resets.discard)

    @property
    def closing(self) -> bool:
        """True once ``close()`` was called: no publish waits for the broker any more."""
        return self._closing

    async def warm(
        self, request: WarmRequested, timeout_ms: int, still_wanted: Callable[[], bool]
    ) -> bool:
        """Publish a warm request, mandatory; False when the broker returned it unroutable.

        Each attempt carries its real publish time as ``requestedAt`` and the warm
        timeout as its expiration, counted from then: a request the worker itself sent
        late (behind on its own work) still gets the whole timeout at the orchestrator, as
        its warm timeout waits for the worker (docs/semantics.md, addition 2). A request is
        published only while ``still_wanted()`` (once its warm timed out, its retry has a new
        token, and the old request must not run late beside it), and again after a lost
        connection only while its timeout has not passed since it was made: after a longer
        outage another replica may own the shard (PublishWithdrawn).
        """

        headers = self._conversation_headers.encode(request.conversation_id)
        message_id = f"{request.conversation_id}:{request.token}"

        attempts = 0

        def attempt(link: _Link) -> bytes | None:
            nonlocal attempts
            attempts += 1
            now = self._clock.now_ms()
            left = timeout_ms
            if not still_wanted():
                return None
            if attempts > 1 and now - request.requested_at >= timeout_ms:
                # Cut by a lost connection, and its time is up: the shard may have another
                # owner by now, whose warm this one would double; its timeout takes over.
                return None
            body = encode(msgspec.structs.replace(request, requested_at=now))
            # What aio-pika made of timedelta(milliseconds=left) and of now / 1000.
            expiration = str(int(left / 1000 * 1000))
            properties = _WARM.encode(headers, expiration, message_id, now // 1000)
            return publish_frames(link.number, link.max_body, link.warm, properties, body)

        result = await self._send(attempt, WARM_ROUTING_KEY, returnable=message_id)
        return not isinstance(result, DeliveredMessage)

    async def surface(self, update: SurfaceChanged) -> None:
        """Publish a surface update: not mandatory, not persistent.

        The hot path: one per applied input. Its confirm is awaited without a timer of its
        own: the pipeline bounds a whole batch's confirms with one deadline.
        """
        body = encode(update)
        headers = self._conversation_headers.encode(update.conversation_id)
        message_id = self._next_id()

        def attempt(link: _Link) -> bytes:
            properties = _SURFACE.encode(headers, message_id)
            return publish_frames(link.number, link.max_body, link.surface, properties, body)

        await self._send(attempt, SURFACE_ROUTING_KEY, deadline=False)

    async def reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        """Answer a command on its ``reply_to`` queue through the default exchange."""
        body = encode(reply)
        properties = _REPLY.encode(self._reply_headers, correlation_id, self._next_id())

        def attempt(link: _Link) -> bytes:
            method = method_frame(link.number, "", reply_to, mandatory=False)
            return publish_frames(link.number, link.max_body, method, properties, body)

        await self._send(attempt, reply_to, deadline=False, on=self._reply_channel)

    def _next_id(self) -> str:
        # aiormq needs a message id per publish and would draw a random UUID for each.
        self._sent += 1
        return f"warmer-{self._sent}"

    async def _linked(self, robust: AbstractRobustChannel) -> _Link:
        """The underlying channel of ``robust`` now, with the method frames prepared for
        it: the one of its last publish while it is open (a reopened robust channel has a
        new one)."""
        link = self._links.get(id(robust))
        if link is not None and not link.channel.is_closed:
            return link
        channel = await robust.get_underlay_channel()
        if link is None or link.channel is not channel:
            link = _Link(channel, self._names.surface, self._names.warm)
            self._links[id(robust)] = link
        return link

    async def _send(
        self,
        attempt: Callable[[_Link], bytes | None],
        routing_key: str,
        *,
        deadline: bool = True,
        returnable: str | None = None,
        on: AbstractRobustChannel | None = None,
    ) -> object:
        """Publish what ``attempt`` frames for the channel (of ``on``, else the publish
        channel), again after a lost connection (None withdraws it); with ``deadline``, its
        confirm within the publisher's own deadline (ConfirmOverdue past it).
        ``returnable``: the message id of a mandatory publish; the broker's return is then
        the result."""
        robust = on or self._channel
        while True:
            try:
                link = await self._linked(robust)
                payload = attempt(link)
                if payload is None:
                    raise PublishWithdrawn(routing_key[:255])
                confirm = self.wire.send(link.channel, payload, returnable=returnable)
                if not deadline:
                    result = await confirm
                    self._told_waiting = False
                    return result
                limit, sent = self._deadline_ms, self._clock.now_ms()
                try:
                    result = await within(self._clock, limit, confirm)
                except TimeoutError as exc:
                    raise ConfirmOverdue(f"no confirm from the broker within {limit} ms") from exc
                self._told_waiting = False
                if self._clock.now_ms() - sent <= self._confirm_timeout_ms:
                    self._deadline_ms = self._confirm_timeout_ms  # in time again
                return result
            except aiormq.exceptions.DeliveryError as exc:
                raise PublishFailed(f"broker refused the publish: {exc}") from exc
            except _REFUSALS as exc:
                raise PublishFailed(f"broker closed the channel: {exc}"[:300]) from exc
            except Exception as exc:
                if not _lost(exc, robust):
                    raise
                self._waiting(routing_key)
                await self._until_ready(exc, robust)

    async def dead_letter(self, incoming: AbstractIncomingMessage, rejection: Rejection) -> None:
        """Re-publish an invalid message to the dead-letter exchange, with its reasons.

        Raises DeadLetterRefused when it cannot go out as such (too large for a frame
        even without its headers, not encodable, or refused by the broker). One dead
        letter is out at a time: when the broker refuses one it closes the channel, and a
        second one already sent on it would cost the whole connection (the broker answers
        a frame on a closed channel with CHANNEL_ERROR).
        """
        async with self._dead_letter_lock:
            while True:
                try:
                    channel = await self._dead_channel.get_underlay_channel()
                    break
                except _CONNECTION_ERRORS as exc:
                    await self._until_ready(exc, self._dead_channel)
            frame_max = channel.connection.connection_tune.frame_max
            try:
                message = deadletter.build(incoming, rejection, frame_max)
            except deadletter.DeadLetterUnfit as exc:
                raise DeadLetterRefused(str(exc)) from exc
            routing_key = incoming.routing_key or ""
            try:
                await self._publish(self._dlx, lambda: message, routing_key, mandatory=False)
            except _REFUSALS as exc:
                await self._reopened(channel)
                raise DeadLetterRefused(f"the broker refused it: {exc}"[:300]) from exc
            except (TypeError, ValueError) as exc:  # the client could not encode it after all
                raise DeadLetterRefused(f"it cannot be encoded: {exc}"[:300]) from exc

    async def _reopened(self, refused: aiormq.abc.AbstractChannel) -> None:
        """Wait until the dead-letter channel the broker closed has been opened anew.

        aio-pika reopens it by itself; when that has not happened within
        ``nudge_after_s`` (its close callback can fail, seen once in a few hundred
        refusals: the channel then stays closed and every later dead letter waits on it),
        the channel is restored here (under aio-pika's own restore lock: when its restore
        is under way, this one waits for it and does nothing more).
        """
        polls = self._confirm_timeout_ms // _REOPEN_POLL_MS
        for poll in range(polls):
            if self._closing:
                return
            try:
                current = await self._dead_channel.get_underlay_channel()
            except _CONNECTION_ERRORS:
                current = refused
            if current is not refused and not current.is_closed:
                return
            if poll == int(self.nudge_after_s * 1000) // _REOPEN_POLL_MS:
                await self._nudge()
            await sleep(self._clock, _REOPEN_POLL_MS)

    async def _nudge(self) -> None:
        """Restore the dead-letter channel aio-pika did not; a failure is only logged."""
        log.warning("dead_letter_channel_restoring", why="not restored after a refusal")
        try:
            await self._dead_channel.restore()
        except Exception as exc:  # the connection may be going: its own recovery takes over
            log.warning("dead_letter_channel_restore_failed", error=str(exc)[:300])

    def _waiting(self, routing_key: str) -> None:
        """Say that publishes wait for the connection once an outage, not once a publish:
        the first since the last publish that went out says it."""
        if not self._told_waiting:
            self._told_waiting = True
            log.warning("publish_waiting_for_connection", routing_key=routing_key[:255])

    async def _until_ready(self, cause: BaseException, channel: AbstractRobustChannel) -> None:
        """Wait for the robust channel to be back; give up as soon as closing starts."""
        ready = asyncio.ensure_future(channel.ready())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait([ready, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            closed.cancel()
        if self._closing:
            raise PublishFailed(f"connection lost while closing: {cause!r}") from cause

    async def _publish(
        self,
        exchange: AbstractExchange,
        attempt: Callable[[], Message | None],
        routing_key: str,
        *,
        mandatory: bool,
    ) -> object:
        """Publish what ``attempt()`` builds, again after a lost connection; None withdraws."""
        while True:
            message = attempt()
            if message is None:
                raise PublishWithdrawn(routing_key[:255])
            publish = exchange.publish(message, routing_key, mandatory=mandatory, timeout=None)
            deadline, sent = self._deadline_ms, self._clock.now_ms()
            try:
                confirm = await within(self._clock, deadline, publish)
                self._told_waiting = False
                if self._clock.now_ms() - sent <= self._confirm_timeout_ms:
                    self._deadline_ms = self._confirm_timeout_ms  # in time again
                return confirm
            except aiormq.exceptions.DeliveryError as exc:
                raise PublishFailed(f"broker refused the publish: {exc}") from exc
            except TimeoutError as exc:
                raise ConfirmOverdue(f"no confirm from the broker within {deadline} ms") from exc
            except _REFUSALS as exc:
                if exchange is self._dlx:
                    raise
                raise PublishFailed(f"broker closed the channel: {exc}"[:300]) from exc
            except Exception as exc:
                channel = self._dead_channel if exchange is self._dlx else self._channel
                if not _lost(exc, channel):
                    raise
                self._waiting(routing_key)
                await self._until_ready(exc, channel)


class _Link:
    """An underlying channel with what the fast path prepares for it once."""

    __slots__ = ("channel", "max_body", "number", "surface", "warm")

    def __init__(self, channel: AbstractChannel, surface: str, warm: str) -> None:
        self.channel = cast(Channel, channel)  # aiormq's: the wire keeps its bookkeeping
        self.number: int = channel.number
        tune: Any = channel.connection.connection_tune
        self.max_body: int = tune.frame_max - FRAME_OVERHEAD
        self.surface = method_frame(self.number, surface, SURFACE_ROUTING_KEY, mandatory=False)
        self.warm = method_frame(self.number, warm, WARM_ROUTING_KEY, mandatory=True)


def _lost(exc: Exception, channel: AbstractRobustChannel) -> bool:
    """The connection or the channel went away under a publish: wait, publish again.

    aiormq fails a publish whose frame a closing connection cut (a reset, say) with a bare
    ``Exception`` (its futures' default rejection); that one counts as lost only while the
    channel is closed indeed, so a bare ``Exception`` of any other kind is not retried.
    """
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    return type(exc) is Exception and channel.is_closed


__all__ = [
    "ConfirmOverdue",
    "DeadLetterRefused",
    "PublishFailed",
    "PublishWithdrawn",
    "Publisher",
]
