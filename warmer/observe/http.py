"""Health and metrics over HTTP (``WARMER_HTTP``), served by aiohttp on the worker's loop.

- ``/healthz``: 200 ``ok``. It is answered by the event loop the worker runs on, so an
  answer proves the process and its loop are alive; a loop stuck in a long computation
  answers late or not at all.
- ``/readyz``: 200 ``ready``, or 503 with the reason as text (``starting``, ``broker
  connection lost``, ...), as ``ready()`` says; then, on a second line, which shards this
  replica owns (``replica r1 owns shards [0, 3] of 6``).
- ``/metrics``: the Prometheus text format of one registry (``warmer.observe.metrics``),
  rendered at most once per ``METRICS_FRESH_S``: scrapes within that time share one
  rendering, so a flood of them costs the loop little more than the HTTP itself.

Access is not logged: probes and scrapes every few seconds would drown the worker's
own events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["METRICS_FRESH_S", "HttpEndpoint", "Readiness"]

Readiness = Callable[[], str | None]
"""None when the worker is ready, else why it is not (one short line)."""

_TEXT: Final = "text/plain"
_monotonic = time.monotonic  # an age, not a wait: not the Clock's business (tests set it)
METRICS_FRESH_S: Final = 1.0
"""How long one rendering of ``/metrics`` answers scrapes (Prometheus scrapes every 15 s
or so: a lone scraper always gets a fresh one)."""


class HttpEndpoint:
    """``/healthz``, ``/readyz`` and ``/metrics`` on one host and port."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: Readiness,
        registry: CollectorRegistry,
        about: Callable[[], str] | None = None,
    ) -> None:
        """``port`` 0 takes any free port (``port`` tells which, once started); ``about``:
        a second line for ``/readyz`` (which shards this replica owns)."""
        self._about = about
        self._host = host
        self._port = port
        self._ready = ready
        self._registry = registry
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._rendered: tuple[float, bytes] | None = None  # (monotonic s, body)
        self._started = False

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        await self._runner.setup()
        self._started = True
        try:
            await web.TCPSite(self._runner, self._host, self._port).start()
        except BaseException:
            await self.stop()
            raise

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose when asked for 0)."""
        addresses = self._runner.addresses
        if not addresses:
            raise RuntimeError("the HTTP endpoint is not listening")
        return int(addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and close open connections; harmless when not started."""
        if self._started:
            self._started = False
            await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok", content_type=_TEXT)

    async def _readyz(self, _: web.Request) -> web.Response:
        reason = self._ready()
        about = "" if self._about is None else f"\n{self._about()}"
        if reason is None:
            return web.Response(text=f"ready{about}", content_type=_TEXT)
        return web.Response(status=503, text=f"{reason}{about}", content_type=_TEXT)

    async def _metrics(self, _: web.Request) -> web.Response:
        # On the loop, not in a thread: the gauges read the core, which only the loop may
        # touch.
        now = _monotonic()
        rendered = self._rendered
        if rendered is None or now - rendered[0] >= METRICS_FRESH_S:
            rendered = self._rendered = (now, generate_latest(self._registry))
        return web.Response(body=rendered[1], headers={"Content-Type": CONTENT_TYPE_LATEST})
