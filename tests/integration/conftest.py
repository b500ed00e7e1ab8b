"""Fixtures for tests against a real RabbitMQ: a broker URL, a namespace, a running worker.

The broker: ``WARMER_TEST_AMQP_URL`` if set, else the local broker on 127.0.0.1:5672,
else a ``rabbitmq:3.10`` container when a Docker daemon answers. With none, the tests
fail when ``WARMER_REQUIRE_BROKER=1`` (CI sets it) and are skipped, with the reason,
otherwise. Every test gets its own namespace and deletes what it declared.

Sharded tests need the consistent-hash exchange: the fixture enables its plugin on the
local broker and in the container (idempotent); a broker given by ``WARMER_TEST_AMQP_URL``
must have it, else those tests fail with the error naming it (``PluginMissing``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import msgspec
import pytest

from tests.integration.probe import Probe
from warmer.app import App
from warmer.bus.port import PluginMissing
from warmer.bus.topology import HASH_PLUGIN, Names, declare_exchange, delete
from warmer.clock import Clock
from warmer.config import Config

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
RABBITMQ_IMAGE = "rabbitmq:3.10"
ENABLE_PLUGIN = ("rabbitmq-plugins", "enable", HASH_PLUGIN)
ENABLE_TIMEOUT_S = 120


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The broker every integration test talks to."""
    given = os.environ.get("WARMER_TEST_AMQP_URL")
    if given:
        yield given
        return
    if _answers(LOCAL_URL):
        if not asyncio.run(_has_hash_exchange(LOCAL_URL)) and shutil.which(ENABLE_PLUGIN[0]):
            subprocess.run(ENABLE_PLUGIN, check=True, capture_output=True, timeout=ENABLE_TIMEOUT_S)
        yield LOCAL_URL
        return
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer(RABBITMQ_IMAGE) as container:
            container.exec(list(ENABLE_PLUGIN))
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
        return
    reason = (
        "no RabbitMQ: set WARMER_TEST_AMQP_URL, start one on 127.0.0.1:5672 "
        "(`rabbitmq-server -detached`) or run a Docker daemon"
    )
    if os.environ.get("WARMER_REQUIRE_BROKER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


async def _has_hash_exchange(url: str) -> bool:
    """True when the broker knows the consistent-hash exchange type (a throwaway one)."""
    connection = await aio_pika.connect(url)
    async with connection:
        try:
            channel = await connection.channel()
            name = f"wt-probe-{uuid.uuid4().hex[:10]}"
            exchange = await declare_exchange(
                channel, name, aio_pika.ExchangeType.X_CONSISTENT_HASH
            )
        except PluginMissing:
            return False
        await exchange.delete()
        return True


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own."""
    return f"wt-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def probe(amqp_url: str, namespace: str) -> AsyncIterator[Probe]:
    """The test's side of the bus; deletes the namespace's topology afterwards."""
    probe = await Probe.connect(amqp_url, namespace)
    try:
        yield probe
    finally:
        await probe.close()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            await delete(await connection.channel(), Names.of(namespace))


def make_config(amqp_url: str, namespace: str, tmp_path: Path, **overrides: object) -> Config:
    """A worker config for tests: its own namespace and SQLite file."""
    fields: dict[str, object] = {
        "amqp_url": amqp_url,
        "namespace": namespace,
        "store": f"sqlite:///{tmp_path / 'warmer.db'}",
        "log_format": "console",
        "log_level": "warning",
    }
    fields.update(overrides)
    return msgspec.convert(fields, Config)


@pytest.fixture
async def start_worker(
    amqp_url: str, namespace: str, tmp_path: Path, probe: Probe
) -> AsyncIterator[object]:
    """Start a worker in this event loop (``await start_worker(clock=..., **config)``)."""
    apps: list[App] = []

    async def start(clock: Clock | None = None, **overrides: object) -> App:
        url = str(overrides.pop("amqp_url", amqp_url))
        app = App(make_config(url, namespace, tmp_path, **overrides), clock=clock)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await asyncio.wait_for(app.stop(), 30)
