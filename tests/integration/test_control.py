"""`warmer.control` through the verbs, against a real worker and broker.

`warmer state | enable | disable | interval | policy | send | dead` run in-process
(``warmer.cli.main`` in a thread, with its own event loop) with ``WARMER_NAMESPACE`` and
``WARMER_AMQP_URL`` pointing at the test's worker. (Not ``test_cli_verbs.py``: pytest
imports test modules by their base name, and the unit tests have that one.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import msgspec
import pytest
import structlog

from tests.integration.probe import Probe, header
from warmer.bus.topology import Names, declare
from warmer.cli import main
from warmer.observe.log import configure_logging

pytestmark = pytest.mark.broker

CID = "conv-cli"
WAIT_S = 10.0


class Result(msgspec.Struct, frozen=True):
    """What one run of the command printed, and its exit code."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Warmer = Callable[..., Awaitable[Result]]


@pytest.fixture
def warmer(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
    namespace: str,
) -> Iterator[Warmer]:
    """``await warmer("state", CID)``: run the command as a shell would, capture its output."""
    for name in list(os.environ):
        if name.startswith("WARMER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WARMER_AMQP_URL", amqp_url)
    monkeypatch.setenv("WARMER_NAMESPACE", namespace)
    # The worker runs in this process: its log lines go to stderr, as `warmer run`'s do,
    # never into the command's standard output.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    level = root.level
    configure_logging("console", "warning")

    async def run(*argv: str) -> Result:
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    yield run
    root.setLevel(level)
    structlog.reset_defaults()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = WAIT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not so within {timeout} s")
        await asyncio.sleep(0.05)


async def dead_count_is(probe: Probe, count: int) -> None:
    async def check() -> bool:
        return await probe.dead_count() == count

    await eventually(check)


# -- commands -----------------------------------------------------------------------


async def test_state_of_an_unseen_conversation(start_worker: Any, warmer: Warmer) -> None:
    await start_worker()

    result = await warmer("state", CID, "--json")

    assert result.code == 0, result.err
    reply = result.json()
    assert reply["ok"] is True
    assert reply["state"]["enabled"] is False
    assert reply["state"]["status"] == "disabled"
    assert reply["spec"]["id"] == "cache-warming"
    text = await warmer("state", CID)
    assert text.code == 0
    assert "enabled:      no" in text.out
    assert "status:       disabled" in text.out
    assert "next warm in: —" in text.out


async def test_enable_then_state_shows_enabled(start_worker: Any, warmer: Warmer) -> None:
    await start_worker()

    enabled = await warmer("enable", CID)
    state = await warmer("state", CID, "--json")

    assert enabled.code == 0, enabled.err
    assert enabled.out.startswith(f"{CID}: enabled, interval ")
    assert state.json()["state"]["enabled"] is True


async def test_interval_takes_units(start_worker: Any, warmer: Warmer) -> None:
    await start_worker()

    seconds = await warmer("interval", CID, "90s", "--json")
    milliseconds = await warmer("interval", CID, "1500ms", "--json")
    clamped = await warmer("interval", CID, "0s", "--json")

    assert seconds.json()["settings"]["intervalMs"] == 90_000
    assert milliseconds.json()["settings"]["intervalMs"] == 1500
    assert clamped.json()["settings"]["intervalMs"] == 1000  # clamped, not refused
    state = await warmer("state", CID)
    assert "interval:     1 s" in state.out


async def test_policy_overrides_the_deployment_s_and_default_restores_it(
    start_worker: Any, warmer: Warmer
) -> None:
    await start_worker()

    adaptive = await warmer("policy", CID, "adaptive")
    budget = await warmer("policy", CID, "budget", "--json")
    budget_state = await warmer("state", CID)
    default = await warmer("policy", CID, "default")
    default_json = await warmer("policy", CID, "default", "--json")
    default_state = await warmer("state", CID, "--json")

    assert adaptive.code == 0, adaptive.err
    assert adaptive.out == f"{CID}: disabled, interval 240 s, cost policy adaptive\n"
    assert budget.json() == {
        "ok": True,
        "settings": {"enabled": False, "intervalMs": 240000, "policy": "budget"},
    }
    assert "cost policy:  budget" in budget_state.out.splitlines()
    assert default.code == 0, default.err
    assert default.out == f"{CID}: disabled, interval 240 s, the deployment's cost policy\n"
    assert default_json.json() == {"ok": True, "settings": {"enabled": False, "intervalMs": 240000}}
    labels = [field.get("label") for field in default_state.json()["spec"]["fields"]]
    assert "Cost policy" not in labels  # the deployment's (fixed) is not shown


async def test_a_policy_the_worker_does_not_know_is_refused_before_sending(
    start_worker: Any, warmer: Warmer
) -> None:
    await start_worker()

    unknown = await warmer("policy", CID, "cheap")
    refused = await warmer("policy", "x" * 300, "adaptive")

    assert unknown.code == 2
    assert "invalid choice: 'cheap'" in unknown.err
    assert refused.code == 1
    assert "the worker refused it: invalid_field: set_policy: conversationId" in refused.err


async def test_state_shows_why_the_cost_rules_stop_warming(
    start_worker: Any, warmer: Warmer
) -> None:
    await start_worker()
    await warmer("enable", CID)
    settled = {
        "type": "turn.settled",
        "conversationId": CID,
        "cacheTtlS": 600,
        "prefixTokens": 100,
    }
    sent = await warmer("send", json.dumps(settled))
    assert sent.code == 0, sent.err

    async def held() -> bool:
        return "not warming:" in (await warmer("state", CID)).out

    await eventually(held)
    lines = (await warmer("state", CID)).out.splitlines()
    assert "status:             idle" in lines
    assert lines[-4:-1] == [
        "cache lifetime:     10 min",
        "effective interval: 9 min (for the 10 min cache)",
        "not warming:        the prefix (100 tokens) is below the 1024 the provider caches",
    ]
    assert lines[-1].startswith("answered by:  replica ")  # the reply's x-warmer-replica


async def test_disable(start_worker: Any, warmer: Warmer) -> None:
    await start_worker()
    await warmer("enable", CID)

    result = await warmer("disable", CID, "--json")

    assert result.code == 0
    assert result.json() == {"ok": True, "settings": {"enabled": False, "intervalMs": 240000}}


async def test_a_rejected_command_exits_1_with_its_code(start_worker: Any, warmer: Warmer) -> None:
    await start_worker()

    result = await warmer("enable", "x" * 300)

    assert result.code == 1
    assert result.out == ""
    assert "the worker refused it: invalid_field: set_enabled: conversationId" in result.err
    as_json = await warmer("enable", "x" * 300, "--json")
    assert as_json.code == 1
    assert as_json.json()["code"] == "invalid_field"


async def test_no_worker_answering_exits_75_and_the_command_expires(
    amqp_url: str, namespace: str, probe: Probe, warmer: Warmer
) -> None:
    # The namespace's topology, declared as a stopped worker would have left it.
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await declare(await connection.channel(), Names.of(namespace))

    result = await warmer("enable", CID, "--timeout", "0.5")

    assert result.code == 75
    assert result.err == (
        f"warmer: no worker answered within 0.5 s: is `warmer run` running with "
        f"WARMER_NAMESPACE={namespace} on amqp://guest:***@{amqp_url.split('@')[1]}?\n"
    )
    # Nobody took it in time: dead-lettered as expired, never applied later.
    await dead_count_is(probe, 1)
    listed = (await warmer("dead", "--json")).json()["deadLetters"]
    assert listed[0]["deathReason"] == "expired"
    assert listed[0]["exchange"] == f"{namespace}.commands"
    assert json.loads(listed[0]["body"])["type"] == "set_enabled"
    # Replayed where x-death says it came from, for a worker to apply once it runs.
    replayed = await warmer("dead", "--replay")
    assert replayed.code == 0, replayed.err
    assert await probe.dead_count() == 0
    commands = await probe.channel.declare_queue(probe.names.commands, passive=True)
    assert commands.declaration_result.message_count == 1


async def test_a_namespace_nobody_declared_exits_69(
    warmer: Warmer, monkeypatch: pytest.MonkeyPatch, namespace: str
) -> None:
    monkeypatch.setenv("WARMER_NAMESPACE", f"{namespace}-none")

    result = await warmer("state", CID)

    assert result.code == 69
    assert f"'{namespace}-none.commands' does not exist" in result.err


async def test_no_broker_exits_69(warmer: Warmer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMER_AMQP_URL", "amqp://guest:s3cr3t@127.0.0.1:1/")

    result = await warmer("state", CID)

    assert result.code == 69
    assert result.err.startswith("warmer: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/")
    assert "s3cr3t" not in result.err


# -- send ---------------------------------------------------------------------------


async def test_send_publishes_an_event_the_worker_applies(
    start_worker: Any, warmer: Warmer, probe: Probe
) -> None:
    await start_worker()
    await warmer("enable", CID)
    surfaces = await probe.surfaces()

    event = {"type": "turn.settled", "conversationId": CID, "cwd": "/srv/app"}
    result = await warmer("send", json.dumps(event))

    assert result.code == 0, result.err
    assert result.out == f"sent turn.settled for {CID}\n"
    surface = await surfaces.until(lambda body: body["conversationId"] == CID)
    assert surface["state"]["status"] == "armed"
    assert (await warmer("state", CID, "--json")).json()["state"]["status"] == "armed"


async def test_send_refuses_an_invalid_event_without_publishing(
    start_worker: Any, warmer: Warmer, probe: Probe
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()

    result = await warmer("send", '{"type": "turn.settled", "cwd": 5}')

    assert result.code == 2
    assert result.err.startswith("warmer: not a valid event: invalid_field: turn.settled: ")
    await surfaces.nothing()
    assert await probe.dead_count() == 0


# -- dead letters -------------------------------------------------------------------


async def test_dead_lists_without_consuming(
    start_worker: Any, warmer: Warmer, probe: Probe, namespace: str
) -> None:
    await start_worker()
    await probe.event(b"{bad")
    await dead_count_is(probe, 1)

    result = await warmer("dead", "--json")

    assert result.code == 0, result.err
    listing = result.json()
    assert listing["total"] == 1
    [letter] = listing["deadLetters"]
    assert letter["reason"] == "invalid_json"
    assert letter["error"].startswith("body is not JSON")
    assert letter["exchange"] == f"{namespace}.lifecycle"
    assert letter["routingKey"] == "unknown"
    assert letter["body"] == "{bad"
    assert await probe.dead_count() == 1
    text = await warmer("dead")
    assert text.out.splitlines()[:2] == [
        f"1 dead letter in {namespace}.dead",
        f"#1  invalid_json  from {namespace}.lifecycle / unknown",
    ]
    assert await probe.dead_count() == 1


async def test_dead_keeps_the_order(start_worker: Any, warmer: Warmer, probe: Probe) -> None:
    await start_worker()
    for index in range(4):
        await probe.event(f"bad {index}".encode())
    await dead_count_is(probe, 4)

    async def bodies() -> list[str]:
        result = await warmer("dead", "--json")
        return [letter["body"] for letter in result.json()["deadLetters"]]

    first = await bodies()
    assert first == ["bad 0", "bad 1", "bad 2", "bad 3"]
    await warmer("dead", "--limit", "1")
    assert await bodies() == first
    # Replaying the oldest one (still invalid) sends it to the back.
    replayed = await warmer("dead", "--replay", "--json")
    assert [letter["body"] for letter in replayed.json()["replayed"]] == ["bad 0"]
    await dead_count_is(probe, 4)
    assert await bodies() == ["bad 1", "bad 2", "bad 3", "bad 0"]


async def test_a_replayed_invalid_event_comes_back_with_its_reason(
    start_worker: Any, warmer: Warmer, probe: Probe, namespace: str
) -> None:
    await start_worker()
    await probe.event(b"{bad", routing_key="turn.settled", headers={"trace": "t-1"})
    await dead_count_is(probe, 1)

    result = await warmer("dead", "--replay")

    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        f"replayed 1, kept 0 in {namespace}.dead",
        f"#1  replayed to {namespace}.lifecycle / turn.settled",
    ]
    message = await probe.dead_letter()  # the worker dead-lettered it again
    assert message.body == b"{bad"
    assert header(message, "x-warmer-reason") == "invalid_json"
    assert header(message, "x-warmer-original-routing-key") == "turn.settled"
    assert header(message, "trace") == "t-1"  # its own headers kept
    assert await probe.dead_count() == 0


async def test_a_replayed_dead_letter_is_applied_and_leaves_the_queue(
    start_worker: Any, warmer: Warmer, probe: Probe, namespace: str
) -> None:
    await start_worker()
    await warmer("enable", CID)
    surfaces = await probe.surfaces()
    # A dead letter an operator fixed by hand: a valid body, the worker's reason headers.
    event = {"type": "turn.settled", "conversationId": CID, "cwd": "/srv/app"}
    dlx = await probe.channel.get_exchange(probe.names.dlx)
    await dlx.publish(
        aio_pika.Message(
            json.dumps(event).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={
                "conversation-id": CID,
                "x-warmer-reason": "invalid_field",
                "x-warmer-error": "turn.settled: conversationId: missing",
                "x-warmer-original-exchange": probe.names.lifecycle,
                "x-warmer-original-routing-key": "turn.settled",
            },
        ),
        "",
    )
    await dead_count_is(probe, 1)

    result = await warmer("dead", "--replay", "--all", "--json")

    assert result.code == 0, result.err
    assert [letter["reason"] for letter in result.json()["replayed"]] == ["invalid_field"]
    surface = await surfaces.until(lambda body: body["conversationId"] == CID)
    assert surface["state"]["status"] == "armed"
    assert await probe.dead_count() == 0


async def test_a_dead_letter_with_nowhere_to_go_is_kept(
    start_worker: Any, warmer: Warmer, probe: Probe
) -> None:
    await start_worker()
    dlx = await probe.channel.get_exchange(probe.names.dlx)
    await dlx.publish(aio_pika.Message(b"{}", headers={"x-warmer-reason": "invalid_json"}), "")
    await dead_count_is(probe, 1)

    result = await warmer("dead", "--replay")

    assert result.code == 1
    assert "kept: it does not say which exchange and routing key it came from" in result.out
    assert await probe.dead_count() == 1


async def test_purge_with_yes_empties_the_queue(
    start_worker: Any, warmer: Warmer, probe: Probe, namespace: str
) -> None:
    await start_worker()
    await probe.event(b"{bad")
    await probe.event(b"{worse")
    await dead_count_is(probe, 2)

    refused = await warmer("dead", "--purge")  # not a terminal, no --yes
    assert refused.code == 2
    assert await probe.dead_count() == 2

    result = await warmer("dead", "--purge", "--yes")

    assert result.code == 0, result.err
    assert result.out == f"deleted 2 from {namespace}.dead\n"
    assert await probe.dead_count() == 0
    assert (await warmer("dead")).out == f"no dead letters in {namespace}.dead\n"
