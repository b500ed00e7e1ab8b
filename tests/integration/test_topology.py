"""What the broker holds once a worker started is exactly ``definitions(namespace)``.

A passive declare only says a name exists. RabbitMQ checks arguments on a non-passive
declare instead: the same arguments succeed, different ones close the channel with
PRECONDITION_FAILED. So every exchange and queue of the definitions is re-declared with
exactly the definitions' arguments, each on a fresh channel, and one different argument
shows that the check bites. ``rabbitmqctl`` (when it talks to the same broker) adds what
AMQP cannot show: the queue type and the bindings.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection

from tests.integration.probe import Probe
from warmer.bus.topology import Names, declare, definitions, delete

pytestmark = pytest.mark.broker

RABBITMQCTL_TIMEOUT_S = 60
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    """A connection of the test's own, for declares that may close their channel."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield connection


def _vhost(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def _redeclare(connection: AbstractConnection, document: dict[str, Any]) -> None:
    """Declare every exchange and queue of ``document`` with exactly its arguments."""
    for exchange in document["exchanges"]:
        channel = await connection.channel()
        await channel.declare_exchange(exchange["name"], passive=True)
        await channel.declare_exchange(
            exchange["name"],
            aio_pika.ExchangeType(exchange["type"]),
            durable=exchange["durable"],
            auto_delete=exchange["auto_delete"],
            internal=exchange["internal"],
            arguments=exchange["arguments"],
        )
        await channel.close()
    for queue in document["queues"]:
        channel = await connection.channel()
        await channel.declare_queue(queue["name"], passive=True)
        await channel.declare_queue(
            queue["name"],
            durable=queue["durable"],
            auto_delete=queue["auto_delete"],
            arguments=queue["arguments"],
        )
        await channel.close()


async def _rabbitmqctl(amqp_url: str, *args: str) -> list[dict[str, Any]]:
    """``rabbitmqctl <args> --formatter json`` on the test broker; skips when it can't
    (fails instead in CI, where ``WARMER_REQUIRE_BROKER=1``: the check must run there)."""
    executable = shutil.which("rabbitmqctl")
    if executable is None:
        _cannot("rabbitmqctl is not installed: the queue types were not checked")
    parts = urlsplit(amqp_url)
    if parts.hostname not in LOCAL_HOSTS or (parts.port or 5672) != 5672:
        _cannot(f"rabbitmqctl talks to the local node, the tests to {parts.hostname}")
    process = await asyncio.create_subprocess_exec(
        executable,
        *args,
        "-p",
        _vhost(amqp_url),
        "--formatter",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), RABBITMQCTL_TIMEOUT_S)
    if process.returncode != 0:
        _cannot(f"rabbitmqctl failed: {stderr.decode(errors='replace').strip()[:300]}")
    return json.loads(stdout)  # type: ignore[no-any-return]


def _cannot(reason: str) -> NoReturn:
    if os.environ.get("WARMER_REQUIRE_BROKER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


async def test_the_worker_declares_exactly_the_definitions(
    probe: Probe, start_worker: Any, connection: AbstractConnection, namespace: str
) -> None:
    await start_worker()
    await _redeclare(connection, definitions(namespace))


async def test_a_different_argument_is_refused(
    probe: Probe, start_worker: Any, connection: AbstractConnection, namespace: str
) -> None:
    await start_worker()
    names = Names.of(namespace)
    lifecycle = next(q for q in definitions(namespace)["queues"] if q["name"] == names.lifecycle)
    arguments = {**lifecycle["arguments"], "x-delivery-limit": 21}
    channel = await connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-delivery-limit"):
        await channel.declare_queue(names.lifecycle, durable=True, arguments=arguments)
    channel = await connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="type"):
        await channel.declare_exchange(names.lifecycle, aio_pika.ExchangeType.DIRECT, durable=True)
    # The refusals changed nothing.
    await _redeclare(connection, definitions(namespace))


async def test_rabbitmqctl_shows_quorum_queues_with_the_arguments(
    probe: Probe, start_worker: Any, amqp_url: str, namespace: str
) -> None:
    await start_worker()
    listed = await _rabbitmqctl(amqp_url, "list_queues", "name", "type", "arguments")
    held = {
        queue["name"]: (queue["type"], {key: value for key, _kind, value in queue["arguments"]})
        for queue in listed
        if queue["name"].startswith(f"{namespace}.")
    }
    # Beside the topology, what the worker holds while it runs: the shard's lock and (on
    # SQLite) the embedded store's, both classic and exclusive, holding nothing.
    assert held.pop(f"{namespace}.lock.000") == ("classic", {"x-queue-type": "classic"})
    assert held.pop(f"{namespace}.embedded") == ("classic", {})
    expected = {
        queue["name"]: ("quorum", queue["arguments"]) for queue in definitions(namespace)["queues"]
    }
    assert held == expected


async def test_rabbitmqctl_shows_the_bindings(
    probe: Probe, start_worker: Any, amqp_url: str, namespace: str
) -> None:
    await start_worker()
    listed = await _rabbitmqctl(
        amqp_url, "list_bindings", "source_name", "destination_name", "routing_key"
    )
    held = {
        (binding["source_name"], binding["destination_name"], binding["routing_key"])
        for binding in listed
        # The default exchange's implicit bindings have an empty source.
        if binding["source_name"].startswith(f"{namespace}.")
    }
    expected = {
        (binding["source"], binding["destination"], binding["routing_key"])
        for binding in definitions(namespace)["bindings"]
    }
    assert held == expected


async def test_a_second_worker_on_the_same_namespace_starts(
    probe: Probe,
    start_worker: Any,
    connection: AbstractConnection,
    namespace: str,
    tmp_path: Path,
) -> None:
    # On a shareable store (an embedded one runs alone): the second stands by, the first
    # holds the only shard and consumes.
    await start_worker(store="memory://")
    await start_worker(store="memory://")
    await _redeclare(connection, definitions(namespace))
    names = Names.of(namespace)
    channel = await connection.channel()
    for name in (names.lifecycle, names.commands):
        queue = await channel.declare_queue(name, passive=True)
        assert queue.declaration_result.consumer_count == 1
    reply = await probe.command({"type": "get_state", "conversationId": "c-1"})
    assert reply["ok"] is True


async def test_delete_removes_every_name_of_the_namespace(
    probe: Probe, connection: AbstractConnection, namespace: str
) -> None:
    # What the probe fixture relies on to leave nothing behind.
    names = Names.of(namespace)
    await declare(await connection.channel(), names)
    await delete(await connection.channel(), names)
    document = definitions(namespace)
    for exchange in document["exchanges"]:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_exchange(exchange["name"], passive=True)
    for queue in document["queues"]:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(queue["name"], passive=True)
