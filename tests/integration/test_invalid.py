"""Invalid, unknown, dropped and failing lifecycle inputs over the real broker.

docs/contract.md, "Encoding": an invalid lifecycle event never stops the worker and never
changes a conversation; it is re-published unchanged to ``<ns>.dlx`` with the reason
headers, then acknowledged. An unknown event ``type`` is acknowledged and ignored.
docs/semantics.md: a completion during a turn is dropped, ``turn.started`` cancels, a stale
``seq`` is dropped, a warm request nobody takes is a failure that is retried with
backoff and then paused.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import msgspec
import pytest

from tests.integration.probe import Listener, Probe

pytestmark = pytest.mark.broker

WAIT_S = 5.0
QUIET_S = 0.5
VICTIM = "victim"
GOOD = "good"
NO_CONSUMER = "no consumer took the warm request"
USAGE = {"inputTokens": 1000, "cacheReadTokens": 800, "cacheWriteTokens": 200}
MAX_SAFE = 2**53 - 1


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode(body: object) -> bytes:
    return msgspec.json.encode(body)


def started(cid: str = VICTIM, **fields: Any) -> dict[str, Any]:
    return {"type": "turn.started", "conversationId": cid, **fields}


def settled(cid: str = VICTIM, **fields: Any) -> dict[str, Any]:
    return {"type": "turn.settled", "conversationId": cid, **fields}


def completed(cid: str = VICTIM, **fields: Any) -> dict[str, Any]:
    return {"type": "warm.completed", "conversationId": cid, **fields}


def closed(cid: str = VICTIM, **fields: Any) -> dict[str, Any]:
    return {"type": "conversation.closed", "conversationId": cid, **fields}


def padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` with an unknown ``pad`` field making it exactly ``size`` bytes."""
    head = len(encode({**body, "pad": ""}))
    raw = encode({**body, "pad": "x" * (size - head)})
    assert len(raw) == size
    return raw


async def surface_of(surfaces: Listener, cid: str) -> dict[str, Any]:
    """The next surface update, which must be about ``cid``; its state."""
    body = await surfaces.next_body(WAIT_S)
    assert body["type"] == "surface.changed"
    assert body["conversationId"] == cid, body
    return body["state"]  # type: ignore[no-any-return]


async def one_surface(surfaces: Listener, cid: str) -> dict[str, Any]:
    """The one surface update an applied input causes: no second one follows."""
    state = await surface_of(surfaces, cid)
    await surfaces.nothing(QUIET_S)
    return state


async def get_state(probe: Probe, cid: str) -> dict[str, Any]:
    reply = await probe.command({"type": "get_state", "conversationId": cid}, timeout=WAIT_S)
    assert reply["ok"] is True, reply
    return reply["state"]  # type: ignore[no-any-return]


async def enable(probe: Probe, cid: str, interval_ms: int | None = None) -> None:
    reply = await probe.command({"type": "set_enabled", "conversationId": cid, "enabled": True})
    assert reply["ok"] is True, reply
    if interval_ms is not None:
        reply = await probe.command(
            {"type": "set_interval", "conversationId": cid, "intervalMs": interval_ms}
        )
        assert reply["settings"]["intervalMs"] == interval_ms, reply


# -- every kind of invalid event ----------------------------------------------------

# (case id, body, content type, x-warmer-reason, a word x-warmer-error must contain)
INVALID: list[tuple[str, bytes, str | None, str, str | None]] = [
    ("text/plain", encode(started()), "text/plain", "invalid_content_type", None),
    ("octet-stream", encode(started()), "application/octet-stream", "invalid_content_type", None),
    ("jsonx", encode(started()), "application/jsonx", "invalid_content_type", None),
    ("over 64 KiB", padded(started(), 64 * 1024 + 1), "application/json", "too_large", None),
    ("not JSON", b"{turn.started", "application/json", "invalid_json", None),
    ("truncated", b'{"type": "turn.started", "conver', "application/json", "invalid_json", None),
    ("empty body", b"", "application/json", "invalid_json", None),
    (
        "not UTF-8",
        b'{"type": "turn.started", "conversationId": "\xff"}',
        None,
        "invalid_json",
        None,
    ),
    ("JSON array", encode([started()]), "application/json", "invalid_json", None),
    ("JSON string", b'"turn.started"', "application/json", "invalid_json", None),
    ("JSON number", b"42", "application/json", "invalid_json", None),
    ("JSON null", b"null", "application/json", "invalid_json", None),
    ("no type", encode({"conversationId": VICTIM}), None, "invalid_field", "type"),
    ("type null", encode({"type": None, "conversationId": VICTIM}), None, "invalid_field", "type"),
    ("type number", encode({"type": 7, "conversationId": VICTIM}), None, "invalid_field", "type"),
    ("id missing", encode({"type": "turn.started"}), None, "invalid_field", "conversationId"),
    ("id null", encode(started(None)), None, "invalid_field", "conversationId"),  # type: ignore[arg-type]
    ("id number", encode(started(42)), None, "invalid_field", "conversationId"),  # type: ignore[arg-type]
    ("id empty", encode(started("")), None, "invalid_field", "conversationId"),
    ("id 201 bytes", encode(started("v" * 201)), None, "invalid_field", "conversationId"),
    (
        "id 201 bytes multibyte",
        encode(started("\u00e9" * 100 + "v")),
        None,
        "invalid_field",
        "conversationId",
    ),
    ("id NUL", encode(started("vic\x00tim")), None, "invalid_field", "conversationId"),
    ("id newline inside", encode(started("vic\ntim")), None, "invalid_field", "conversationId"),
    ("id C1 control", encode(started("vic\x85tim")), None, "invalid_field", "conversationId"),
    (
        "closed id missing",
        encode({"type": "conversation.closed"}),
        None,
        "invalid_field",
        "conversationId",
    ),
    ("seq negative", encode(started(seq=-1)), None, "invalid_field", "seq"),
    ("seq 2^53", encode(started(seq=MAX_SAFE + 1)), None, "invalid_field", "seq"),
    ("seq string", encode(started(seq="4")), None, "invalid_field", "seq"),
    ("seq float", encode(started(seq=1.5)), None, "invalid_field", "seq"),
    ("closed seq bool", encode(closed(seq=True)), None, "invalid_field", "seq"),
    ("at negative", encode(started(at=-1)), None, "invalid_field", "at"),
    ("at string", encode(settled(at="2024-01-01")), None, "invalid_field", "at"),
    ("cwd too long", encode(settled(cwd="/" * 4097)), None, "invalid_field", "cwd"),
    ("cwd number", encode(settled(cwd=5)), None, "invalid_field", "cwd"),
    (
        "modelName too long",
        encode(settled(modelName="m" * 257)),
        None,
        "invalid_field",
        "modelName",
    ),
    (
        "lastRequestAt string",
        encode(settled(lastRequestAt="now")),
        None,
        "invalid_field",
        "lastRequestAt",
    ),
    (
        "settled usage incomplete",
        encode(settled(usage={"inputTokens": 10})),
        None,
        "invalid_field",
        "cacheReadTokens",
    ),
    ("cacheTtlS negative", encode(settled(cacheTtlS=-5)), None, "invalid_field", "cacheTtlS"),
    (
        "prefixTokens string",
        encode(settled(prefixTokens="many")),
        None,
        "invalid_field",
        "prefixTokens",
    ),
    ("completed neither", encode(completed(token=5)), None, "invalid_field", "usage"),
    ("completed error empty", encode(completed(error="")), None, "invalid_field", "error"),
    ("completed error number", encode(completed(error=5)), None, "invalid_field", "error"),
    ("completed token 0", encode(completed(token=0, usage=USAGE)), None, "invalid_field", "token"),
    (
        "completed token 2^53",
        encode(completed(token=MAX_SAFE + 1, usage=USAGE)),
        None,
        "invalid_field",
        "token",
    ),
    (
        "completed inputTokens negative",
        encode(completed(usage={**USAGE, "inputTokens": -1})),
        None,
        "invalid_field",
        "inputTokens",
    ),
    (
        "completed cacheWrite5mTokens float",
        encode(completed(usage={**USAGE, "cacheWrite5mTokens": 1.5})),
        None,
        "invalid_field",
        "cacheWrite5mTokens",
    ),
]


async def test_invalid_events_are_dead_lettered_while_good_ones_keep_flowing(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await enable(probe, VICTIM, 60000)
    await surface_of(surfaces, VICTIM)
    await surface_of(surfaces, VICTIM)
    before = await get_state(probe, VICTIM)
    assert before["status"] == "armed"

    # Bad and good interleaved: every good event is applied, every bad one dead-lettered.
    for i, (name, body, content_type, _, _) in enumerate(INVALID):
        await probe.event(
            body,
            routing_key=f"case.{i}",
            content_type=content_type,
            headers={"conversation-id": VICTIM, "x-case": name, "x-number": i},
        )
        good = started(GOOD) if i % 2 == 0 else settled(GOOD)
        await probe.event(good)
    for i, (name, *_) in enumerate(INVALID):
        state = await surface_of(surfaces, GOOD)
        assert state["active"] is (i % 2 == 0), f"good event after {name!r}"
    await surfaces.nothing(QUIET_S)

    for i, (name, body, content_type, reason, word) in enumerate(INVALID):
        dead = await probe.dead_letter(WAIT_S)
        headers = dead.headers
        assert headers.get("x-case") == name, f"dead letter #{i}: {headers}"
        assert headers["x-warmer-reason"] == reason, name
        error = headers["x-warmer-error"]
        assert isinstance(error, str) and error, name
        assert "\n" not in error, f"{name}: {error!r} is not one line"
        if word is not None:
            assert word in error, f"{name}: {error!r} does not name {word}"
        assert headers["x-warmer-original-exchange"] == probe.names.lifecycle, name
        assert headers["x-warmer-original-routing-key"] == f"case.{i}", name
        assert headers["conversation-id"] == VICTIM, name
        assert headers["x-number"] == i, name
        assert dead.body == body, name
        assert dead.content_type == content_type, name
        assert dead.delivery_mode == aio_pika.DeliveryMode.PERSISTENT, name
    assert await probe.dead_count() == 0
    assert await get_state(probe, VICTIM) == before


async def test_a_dead_letter_keeps_every_property(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    body = encode(started(seq=-3))
    stamp = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    exchange = await probe.channel.get_exchange(probe.names.lifecycle)
    await exchange.publish(
        aio_pika.Message(
            body,
            content_type="application/json; charset=utf-8",
            content_encoding="identity",
            message_id="m-1",
            correlation_id="corr-1",
            reply_to="nowhere",
            app_id="orchestrator",
            type="turn.started",
            priority=3,
            timestamp=stamp,
            headers={"conversation-id": VICTIM, "x-trace": "abc"},
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        ),
        "turn.started",
    )
    dead = await probe.dead_letter(WAIT_S)
    assert dead.body == body
    assert dead.headers["x-warmer-reason"] == "invalid_field"
    assert "seq" in str(dead.headers["x-warmer-error"])
    assert dead.headers["x-warmer-original-routing-key"] == "turn.started"
    assert dead.headers["x-trace"] == "abc"
    assert dead.content_type == "application/json; charset=utf-8"
    assert dead.content_encoding == "identity"
    assert dead.message_id == "m-1"
    assert dead.correlation_id == "corr-1"
    assert dead.reply_to == "nowhere"
    assert dead.app_id == "orchestrator"
    assert dead.type == "turn.started"
    assert dead.priority == 3
    assert dead.timestamp == stamp
    assert dead.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_a_number_beyond_the_double_range_is_dead_lettered(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    body = b'{"type": "turn.started", "conversationId": "victim", "seq": 1e400}'
    await probe.event(body, routing_key="turn.started")
    dead = await probe.dead_letter(3)
    assert dead.body == body
    assert dead.headers["x-warmer-reason"] == "invalid_field"


# Python's re `$` matches before a final newline: a pattern alone lets it pass.
async def test_a_conversation_id_ending_in_a_newline_is_dead_lettered(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    body = encode(started("victim\n"))
    await probe.event(body)
    await surfaces.nothing(QUIET_S)
    dead = await probe.dead_letter(3)
    assert dead.body == body
    assert dead.headers["x-warmer-reason"] == "invalid_field"


async def test_an_invalid_event_does_not_stop_the_worker_or_touch_the_schedule(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    warms = await probe.warms()
    surfaces = await probe.surfaces()
    await enable(probe, VICTIM, 1000)
    await probe.event(settled(cwd="/repo"))
    await surface_of(surfaces, VICTIM)
    await surface_of(surfaces, VICTIM)
    armed = await surface_of(surfaces, VICTIM)
    assert armed["status"] == "armed"
    # An invalid turn.started would cancel the warm were it applied.
    await probe.event(started(seq="1"))
    await probe.event(b"{", routing_key="turn.started")
    request = await warms.next_body(3)
    assert request["conversationId"] == VICTIM and request["cwd"] == "/repo"
    assert (await probe.dead_letter(WAIT_S)).headers["x-warmer-reason"] == "invalid_field"
    assert (await probe.dead_letter(WAIT_S)).headers["x-warmer-reason"] == "invalid_json"


# -- what is valid: limits are inclusive, content types, routing keys ---------------

VALID: list[tuple[str, bytes, str | None]] = [
    ("exactly 64 KiB", padded(started("lim-1"), 64 * 1024), "application/json"),
    ("id 200 bytes", encode(started("\u00e9" * 100)), "application/json"),
    ("id 200 ASCII", encode(started("i" * 200)), "application/json"),
    ("cwd 4096", encode(settled("lim-2", cwd="/" * 4096)), "application/json"),
    ("modelName 256", encode(settled("lim-3", modelName="m" * 256)), "application/json"),
    ("seq 2^53 - 1", encode(started("lim-4", seq=MAX_SAFE, at=0)), "application/json"),
    ("no content type", encode(started("lim-5")), None),
    ("charset", encode(started("lim-6")), "application/json; charset=utf-8"),
    ("upper case", encode(started("lim-7")), "Application/JSON"),
    ("unknown fields", encode(started("lim-8", future={"x": [1]}, color="red")), None),
    (
        "by-hand completion, token 2^53 - 1",
        encode(completed("lim-9", token=MAX_SAFE, usage={**USAGE, "outputTokens": 1})),
        None,
    ),
]


async def test_values_at_the_limits_are_valid(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    for name, body, content_type in VALID:
        await probe.event(body, routing_key="some.key", content_type=content_type)
        update = await surfaces.next_body(WAIT_S)
        assert update["type"] == "surface.changed", name
    await surfaces.nothing(QUIET_S)
    assert await probe.dead_count() == 0


async def test_the_body_type_decides_not_the_routing_key(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await probe.event(started(GOOD), routing_key="turn.settled")
    assert (await one_surface(surfaces, GOOD))["active"] is True
    await probe.event(settled(GOOD), routing_key="anything")
    assert (await one_surface(surfaces, GOOD))["active"] is False


# -- unknown event types ------------------------------------------------------------


async def test_an_unknown_event_type_is_acknowledged_and_ignored(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await enable(probe, VICTIM)
    before = await surface_of(surfaces, VICTIM)
    for body in (
        {"type": "turn.paused", "conversationId": VICTIM},
        {"type": "turn.paused", "conversationId": VICTIM},
        {"type": "conversation.renamed", "conversationId": VICTIM, "title": "x"},
        {"type": "future.thing"},
        {"type": "future.thing", "conversationId": 5, "seq": "x"},
        {"type": "set_enabled", "conversationId": VICTIM, "enabled": False},
    ):
        await probe.event(body)
    await probe.event(started(GOOD))
    assert (await one_surface(surfaces, GOOD))["active"] is True
    # A marker that must be dead-lettered: events are applied in order, so were an
    # unknown one dead-lettered, it would come out of the dead-letter queue first.
    marker = b"not json " + uuid.uuid4().hex.encode()
    await probe.event(marker)
    assert (await probe.dead_letter(WAIT_S)).body == marker
    await asyncio.sleep(0.3)
    assert await probe.dead_count() == 0
    assert await get_state(probe, VICTIM) == before


# -- dropped inputs -----------------------------------------------------------------


async def test_a_completion_during_a_turn_is_dropped(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await enable(probe, VICTIM)
    await surface_of(surfaces, VICTIM)
    await probe.event(started())
    active = await one_surface(surfaces, VICTIM)
    assert active["status"] == "active"
    await probe.event(completed(usage=USAGE))
    await probe.event(completed(error="provider error"))
    await probe.event(completed(usage=USAGE, token=MAX_SAFE))
    await surfaces.nothing(QUIET_S)
    assert await get_state(probe, VICTIM) == active

    # Once the turn settled, the same completion is applied.
    await probe.event(settled())
    await one_surface(surfaces, VICTIM)
    await probe.event(completed(usage=USAGE))
    state = await one_surface(surfaces, VICTIM)
    assert state["lastPct"] == 80 and state["lastExpectedPct"] == 80
    assert state["lastWarmAt"] is not None


async def test_turn_started_cancels_the_pending_warm(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    warms = await probe.warms()
    surfaces = await probe.surfaces()
    await enable(probe, VICTIM, 1000)
    await probe.event(settled())
    await surface_of(surfaces, VICTIM)
    await surface_of(surfaces, VICTIM)
    armed = await surface_of(surfaces, VICTIM)
    assert armed["status"] == "armed" and armed["nextWarmAt"] is not None
    await probe.event(started())
    active = await one_surface(surfaces, VICTIM)
    assert active["status"] == "active"
    assert active["active"] is True and active["nextWarmAt"] is None
    await warms.nothing(2.0)
    await surfaces.nothing(0.1)

    # The same setup warms once the turn settles.
    await probe.event(settled())
    assert (await surface_of(surfaces, VICTIM))["status"] == "armed"
    request = await warms.next_body(3)
    assert request["conversationId"] == VICTIM


async def test_a_stale_seq_is_dropped(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await enable(probe, VICTIM)
    await surface_of(surfaces, VICTIM)
    await probe.event(settled(seq=5))
    settled_state = await one_surface(surfaces, VICTIM)
    assert settled_state["status"] == "armed"

    for stale in (started(seq=5), started(seq=3), closed(seq=4), settled(seq=0), closed(seq=5)):
        await probe.event(stale)
    await surfaces.nothing(QUIET_S)
    assert await get_state(probe, VICTIM) == settled_state

    await probe.event(started(seq=6))
    assert (await one_surface(surfaces, VICTIM))["active"] is True
    await probe.event(settled())  # without seq: always applied
    assert (await one_surface(surfaces, VICTIM))["active"] is False
    await probe.event(started(seq=6))  # not greater than the last applied
    await surfaces.nothing(QUIET_S)
    await probe.event(closed(seq=7))
    state = await one_surface(surfaces, VICTIM)
    assert state["enabled"] is False and state["status"] == "disabled"


# -- a warm request nobody takes ----------------------------------------------------


def assert_panel_shows(update: dict[str, Any], status: str, last_error: str | None) -> None:
    fields = update["spec"]["fields"]
    tail = [{"kind": "stat", "label": "Status", "value": status}]
    if last_error is not None:
        tail.append({"kind": "stat", "label": "Last error", "value": last_error})
    assert fields[5:] == tail


async def test_an_unroutable_warm_is_retried_with_backoff_then_paused(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()  # max_failures 3; no listener on the warm exchange
    surfaces = await probe.surfaces()
    await enable(probe, VICTIM, 3000)
    await surface_of(surfaces, VICTIM)
    await surface_of(surfaces, VICTIM)
    # Timed from a request 3 s ago: the first warm is due at once.
    await probe.event(settled(lastRequestAt=now_ms() - 3000))

    updates = [await surfaces.next_body(WAIT_S) for _ in range(7)]
    await surfaces.nothing(1.0)
    assert all(u["conversationId"] == VICTIM for u in updates)
    states = [u["state"] for u in updates]
    assert [s["status"] for s in states] == [
        "armed",
        "warming",
        "retrying",
        "warming",
        "retrying",
        "warming",
        "paused",
    ]
    assert [s["failures"] for s in states] == [0, 0, 1, 1, 2, 2, 3]
    armed, warming1, retry1, warming2, retry2, warming3, paused = updates
    for retry in (retry1, retry2, paused):
        assert retry["state"]["lastError"] == NO_CONSUMER
    # Backoff 1 s, then 2 s, from the failure (both well inside one interval of 3 s).
    assert retry1["state"]["nextWarmAt"] - retry1["at"] == 1000
    assert retry2["state"]["nextWarmAt"] - retry2["at"] == 2000
    assert warming2["at"] >= retry1["state"]["nextWarmAt"]
    assert warming3["at"] >= retry2["state"]["nextWarmAt"]
    assert warming1["state"]["nextWarmAt"] is None
    assert paused["state"]["nextWarmAt"] is None
    assert_panel_shows(retry1, "retrying", NO_CONSUMER)
    assert_panel_shows(paused, "paused", NO_CONSUMER)
    assert armed["state"]["lastError"] is None
    assert await get_state(probe, VICTIM) == paused["state"]


async def test_a_paused_conversation_resumes_at_the_next_turn(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker(max_failures=2)
    surfaces = await probe.surfaces()
    await enable(probe, VICTIM, 1000)
    await probe.event(settled(cwd="/repo"))
    await surface_of(surfaces, VICTIM)
    await surface_of(surfaces, VICTIM)
    assert (await surface_of(surfaces, VICTIM))["status"] == "armed"

    assert (await surface_of(surfaces, VICTIM))["status"] == "warming"
    retrying = await surfaces.next_body(WAIT_S)
    state = retrying["state"]
    assert state["status"] == "retrying"
    assert state["failures"] == 1 and state["lastError"] == NO_CONSUMER
    assert 0 <= state["nextWarmAt"] - retrying["at"] <= 1000  # never beyond one interval
    assert (await surface_of(surfaces, VICTIM))["status"] == "warming"
    paused = await surface_of(surfaces, VICTIM)
    assert paused["status"] == "paused"
    assert paused["failures"] == 2 and paused["lastError"] == NO_CONSUMER
    assert paused["nextWarmAt"] is None
    await surfaces.nothing(2.0)  # paused: no more attempts

    # An orchestrator binds; the next turn clears the pause and warms again.
    warms = await probe.warms()
    await probe.event(settled(cwd="/repo"))
    resumed = await surface_of(surfaces, VICTIM)
    assert resumed["status"] == "armed" and resumed["failures"] == 0
    request = await warms.next_body(3)
    assert request["conversationId"] == VICTIM and request["cwd"] == "/repo"
    assert (await surface_of(surfaces, VICTIM))["status"] == "warming"
