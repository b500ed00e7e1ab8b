"""A TCP proxy between a worker and the broker that a test can cut, like a failing network.

``cut()`` aborts every open connection, both directions, with a TCP reset, so neither
end gets a chance to close cleanly; ``cut(refuse_for=s)`` also refuses new connections
(accepted, then reset) for ``s`` seconds or until ``resume()``. ``cut_on_client_method``
waits for the client to send one AMQP method (a ``basic.ack``, say), swallows that frame
and cuts: the broker never sees it, which makes "the ack was lost" deterministic.

``blackhole()`` stops forwarding in both directions without closing anything, as a network
path that silently drops packets would: what either end sends waits in the sockets'
buffers (a new connection is accepted but not forwarded), and ``restore()`` forwards it
all, like TCP retransmitting once the path heals. ``to_clients(frame)`` sends an AMQP frame
of the proxy's own to every client, between two of the broker's frames (a
``connection.blocked`` the broker did not send, say). ``client_control`` keeps the
clients' first channel-0 method frames (their ``connection.start-ok``, with the client
properties).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from urllib.parse import urlsplit, urlunsplit

__all__ = ["BASIC_ACK", "TcpProxy"]

_PROTOCOL_HEADER_SIZE = 8  # b"AMQP\x00\x00\x09\x01", sent by the client before any frame
_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
_FRAME_END_SIZE = 1
_METHOD_FRAME = 1
_METHOD_ID = struct.Struct(">HH")  # class id, method id
_READ_SIZE = 65536
_CONTROL_KEPT = 32

BASIC_ACK = (60, 80)
"""The AMQP 0-9-1 ``basic.ack`` method (class 60, method 80)."""


class _Link:
    """One proxied connection: the client's socket and ours to the broker."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.downstream = bytearray()
        """The broker's bytes read but not yet forwarded: empty between two frames."""
        self.injected: list[bytes] = []
        """Frames of the proxy's own, for the client at the next frame boundary."""

    def abort(self) -> None:
        """Reset both sockets at once (no FIN, no flush) and stop the pumps."""
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.upstream):
            _reset(writer)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class TcpProxy:
    """Listens on 127.0.0.1 (a free port) and forwards every connection to the broker."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.accepted = 0
        """Connections forwarded to the broker so far."""
        self.refused = 0
        """Connections reset on arrival while refusing."""
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._linked = asyncio.Event()
        self._refusing = False
        self._refuse_timer: asyncio.TimerHandle | None = None
        self._trap: tuple[tuple[int, int], asyncio.Future[int]] | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.client_control: list[bytes] = []
        """The first channel-0 method frames clients sent, whole (header and end)."""
        self.after_broker_method: tuple[tuple[int, int], bytes] | None = None
        """``(method, frame)``: ``frame`` sent to the client right after each broker frame
        carrying ``method`` (a ``connection.blocked`` right after ``connection.open-ok``)."""

    @classmethod
    async def to_broker(cls, amqp_url: str) -> TcpProxy:
        """A started proxy in front of the broker of ``amqp_url``."""
        parts = urlsplit(amqp_url)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 5672)
        await proxy.start()
        return proxy

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1, on ``port`` (0: one the system picks)."""
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", port)

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        assert self._server is not None, "start() the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(amqp_url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def open_connections(self) -> int:
        """Connections currently forwarded."""
        return sum(1 for link in self._links if not link.closed)

    def cut(self, refuse_for: float = 0.0) -> int:
        """Reset every open connection; refuse new ones for ``refuse_for`` s. How many cut."""
        links = [link for link in self._links if not link.closed]
        for link in links:
            link.abort()
        self._links.clear()
        self._linked.clear()
        self.cuts += 1
        if refuse_for > 0:
            self._refusing = True
            if self._refuse_timer is not None:
                self._refuse_timer.cancel()
            self._refuse_timer = asyncio.get_running_loop().call_later(refuse_for, self.resume)
        return len(links)

    def resume(self) -> None:
        """Accept and forward connections again."""
        self._refusing = False
        if self._refuse_timer is not None:
            self._refuse_timer.cancel()
            self._refuse_timer = None

    def blackhole(self) -> None:
        """Stop forwarding, both ways, on every connection and on new ones; close nothing."""
        self._flowing.clear()

    def restore(self) -> None:
        """Forward again, what waited first."""
        self._flowing.set()

    def to_clients(self, frame: bytes) -> int:
        """Send ``frame`` (one whole AMQP frame) to every client; how many it went to."""
        links = [link for link in self._links if not link.closed]
        for link in links:
            if link.downstream:
                link.injected.append(frame)  # mid-frame: after the broker's frame ends
            else:
                link.client.write(frame)
        return len(links)

    def cut_on_client_method(self, method: tuple[int, int]) -> asyncio.Future[int]:
        """Cut every connection when a client next sends ``method``, swallowing that frame.

        The future resolves to the AMQP channel number the frame was sent on.
        """
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._trap = (method, future)
        return future

    async def wait_connected(self, timeout: float) -> None:
        """Wait until at least one connection is forwarded."""
        await asyncio.wait_for(self._linked.wait(), timeout)

    async def close(self) -> None:
        """Stop listening and reset whatever is still open."""
        self.resume()
        self.restore()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # -- the forwarding ---------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.refused += 1
            _reset(writer)
            return
        await self._flowing.wait()  # blackholed: the client's handshake goes unanswered
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            _reset(writer)
            return
        self.accepted += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        self._linked.set()
        loop = asyncio.get_running_loop()
        link.tasks = [
            loop.create_task(self._client_to_broker(reader, up_writer, link)),
            loop.create_task(self._pump(up_reader, writer, link)),
        ]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Broker to client, whole frames, with the proxy's own frames between them."""
        buffer = link.downstream
        try:
            while data := await reader.read(_READ_SIZE):
                await self._flowing.wait()
                buffer += data
                while len(buffer) >= _FRAME_HEADER.size:
                    _, _, size = _FRAME_HEADER.unpack_from(buffer)
                    end = _FRAME_HEADER.size + size + _FRAME_END_SIZE
                    if len(buffer) < end:
                        break
                    writer.write(bytes(buffer[:end]))
                    if self._follows(buffer, size):
                        assert self.after_broker_method is not None
                        writer.write(self.after_broker_method[1])
                    del buffer[:end]
                if not buffer:
                    for frame in link.injected:
                        writer.write(frame)
                    link.injected.clear()
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        link.abort()

    async def _client_to_broker(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Client to broker, frame by frame, so a trapped method can be swallowed."""
        buffer = bytearray()
        header_sent = False
        try:
            while data := await reader.read(_READ_SIZE):
                await self._flowing.wait()
                buffer += data
                if not header_sent:
                    if len(buffer) < _PROTOCOL_HEADER_SIZE:
                        continue
                    writer.write(bytes(buffer[:_PROTOCOL_HEADER_SIZE]))
                    del buffer[:_PROTOCOL_HEADER_SIZE]
                    header_sent = True
                forward, trapped_channel = self._split_frames(buffer)
                if forward:
                    writer.write(forward)
                    await writer.drain()
                if trapped_channel is not None:
                    self._spring(trapped_channel)
                    return
        except (OSError, asyncio.IncompleteReadError):
            pass
        link.abort()

    def _follows(self, buffer: bytearray, size: int) -> bool:
        """Whether the whole frame at the start of ``buffer`` is ``after_broker_method``'s."""
        if self.after_broker_method is None or buffer[0] != _METHOD_FRAME:
            return False
        if size < _METHOD_ID.size:
            return False
        return _METHOD_ID.unpack_from(buffer, _FRAME_HEADER.size) == self.after_broker_method[0]

    def _split_frames(self, buffer: bytearray) -> tuple[bytes, int | None]:
        """Complete frames to forward from ``buffer`` (consumed), up to a trapped one."""
        out = bytearray()
        while len(buffer) >= _FRAME_HEADER.size:
            kind, channel, size = _FRAME_HEADER.unpack_from(buffer)
            end = _FRAME_HEADER.size + size + _FRAME_END_SIZE
            if len(buffer) < end:
                break
            if kind == _METHOD_FRAME and channel == 0 and len(self.client_control) < _CONTROL_KEPT:
                self.client_control.append(bytes(buffer[:end]))
            if self._trap is not None and kind == _METHOD_FRAME and size >= _METHOD_ID.size:
                method = _METHOD_ID.unpack_from(buffer, _FRAME_HEADER.size)
                if method == self._trap[0]:
                    del buffer[:end]
                    return bytes(out), channel
            out += buffer[:end]
            del buffer[:end]
        return bytes(out), None

    def _spring(self, channel: int) -> None:
        assert self._trap is not None
        _, future = self._trap
        self._trap = None
        self.cut()
        if not future.done():
            future.set_result(channel)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a socket with a TCP reset: SO_LINGER 0, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
