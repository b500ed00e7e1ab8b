"""Commands over the real broker: every command, its reply, its surface, and every rejection.

docs/contract.md, "Inbound: commands": a command with ``reply_to`` is answered on that queue;
one that cannot be applied is answered ``{"ok": false, "error", "code"}``, changes
nothing and publishes no surface; one that fails the encoding rules is also
dead-lettered; exactly one ``surface.changed`` follows every applied command but
``get_state``.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

import aio_pika
import msgspec
import pytest

from tests.integration.probe import Listener, Probe
from warmer.bus.topology import COMMAND_ROUTING_KEY
from warmer.store import StoreError

pytestmark = pytest.mark.broker

CID = "conv-1"
WAIT_S = 5.0
QUIET_S = 0.5
DASH = "\u2014"
DEFAULT_STATE: dict[str, Any] = {
    "enabled": False,
    "intervalMs": 240000,
    "active": False,
    "status": "disabled",
    "lastPct": None,
    "lastExpectedPct": None,
    "lastWarmAt": None,
    "nextWarmAt": None,
    "lastError": None,
    "failures": 0,
}


def expected_panel(state: dict[str, Any]) -> dict[str, Any]:
    """The panel of docs/contract.md, "The panel (`spec`)", built from ``state`` independently."""

    def pct(value: int | None) -> str:
        return DASH if value is None else f"{value}%"

    fields: list[dict[str, Any]] = [
        {
            "kind": "toggle",
            "label": "Enabled",
            "value": state["enabled"],
            "action": {"actionId": "cache-warming/toggle"},
        },
        {
            "kind": "number",
            "label": "Refresh Interval",
            "value": math.floor(state["intervalMs"] / 1000 + 0.5),
            "min": 1,
            "step": 1,
            "unit": "s",
            "action": {"actionId": "cache-warming/set-interval"},
        },
        {"kind": "stat", "label": "Last Cache %", "value": pct(state["lastPct"])},
        {"kind": "stat", "label": "Cache retention", "value": pct(state["lastExpectedPct"])},
        {
            "kind": "custom",
            "rendererId": "cache-warming-timer",
            "payload": {"nextWarmAt": state["nextWarmAt"], "lastWarmAt": state["lastWarmAt"]},
        },
        {"kind": "stat", "label": "Status", "value": state["status"]},
    ]
    if state["lastError"] is not None:
        fields.append({"kind": "stat", "label": "Last error", "value": state["lastError"]})
    return {"id": "cache-warming", "region": "side", "title": "Cache Warming", "fields": fields}


def settings_reply(enabled: bool, interval_ms: int) -> dict[str, Any]:
    return {"ok": True, "settings": {"enabled": enabled, "intervalMs": interval_ms}}


async def one_update(surfaces: Listener, cid: str = CID, *, last: bool = True) -> dict[str, Any]:
    """The surface update an applied command causes.

    With ``last``, no second one may follow. In a loop of commands whose updates differ,
    a duplicate shows as the wrong update for the next command, so only the loop's last
    command needs the quiet wait.
    """
    body = await surfaces.next_body(WAIT_S)
    assert body["type"] == "surface.changed"
    assert body["conversationId"] == cid
    assert isinstance(body["at"], int)
    assert body["spec"] == expected_panel(body["state"])
    if last:
        await surfaces.nothing(QUIET_S)
    return body


async def one_surface(surfaces: Listener, cid: str = CID, *, last: bool = True) -> dict[str, Any]:
    """The state in the surface update an applied command causes."""
    return (await one_update(surfaces, cid, last=last))["state"]  # type: ignore[no-any-return]


async def get_state(probe: Probe, cid: str = CID) -> dict[str, Any]:
    reply = await probe.command({"type": "get_state", "conversationId": cid}, timeout=WAIT_S)
    assert reply["ok"] is True, reply
    assert reply["spec"] == expected_panel(reply["state"])
    return reply["state"]  # type: ignore[no-any-return]


def assert_error(reply: dict[str, Any], code: str) -> None:
    assert set(reply) == {"ok", "error", "code"}, reply
    assert reply["ok"] is False
    assert reply["code"] == code, reply
    assert isinstance(reply["error"], str) and reply["error"], reply


async def first_dead_letter(probe: Probe) -> aio_pika.abc.AbstractIncomingMessage:
    return await probe.dead_letter(WAIT_S)


# -- set_enabled, set_interval ------------------------------------------------------


async def test_set_enabled_true_then_false_replies_settings_and_one_surface_each(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()

    reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    assert reply == settings_reply(True, 240000)
    update = await one_update(surfaces)
    state = update["state"]
    assert state["enabled"] is True and state["status"] == "armed"
    # Enabling a conversation that never settled a turn arms it, one interval ahead.
    assert state["nextWarmAt"] - update["at"] == 240000

    reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": False})
    assert reply == settings_reply(False, 240000)
    state = await one_surface(surfaces)
    assert state == DEFAULT_STATE


async def test_repeated_enable_keeps_the_schedule(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    first = await one_surface(surfaces)
    await asyncio.sleep(0.05)
    reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    assert reply == settings_reply(True, 240000)
    second = await one_surface(surfaces)
    assert second["status"] == "armed"
    assert second["nextWarmAt"] == first["nextWarmAt"]


async def test_surface_update_properties(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    message = await surfaces.next(WAIT_S)
    assert message.routing_key == "surface.changed"
    assert message.content_type == "application/json"
    assert message.headers["conversation-id"] == CID
    assert message.delivery_mode != aio_pika.DeliveryMode.PERSISTENT


# Sent value -> clamped interval (docs/contract.md: "0, -5, 500 -> 1000; above 86400000 ->
# 86400000"; docs/semantics.md: "min(86400000, max(1000, round(x)))", rounding half up).
CLAMPS: list[tuple[Any, int]] = [
    (0, 1000),
    (-5, 1000),
    (500, 1000),
    (1000, 1000),
    (999.5, 1000),
    (1500.5, 1501),
    (2500.4, 2500),
    (3000.0, 3000),
    (86400000, 86400000),
    (86400001, 86400000),
    (86400000.4, 86400000),
    (1e12, 86400000),
    (10**30, 86400000),
    (-0.5, 1000),
]


async def test_set_interval_clamps_every_number(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    for i, (sent, clamped) in enumerate(CLAMPS):
        cid = f"clamp-{i}"
        reply = await probe.command(
            {"type": "set_interval", "conversationId": cid, "intervalMs": sent}
        )
        assert reply == settings_reply(False, clamped), f"intervalMs {sent!r}"
        state = await one_surface(surfaces, cid, last=False)
        assert state["intervalMs"] == clamped, f"intervalMs {sent!r}"
        assert (await get_state(probe, cid))["intervalMs"] == clamped
    await surfaces.nothing(QUIET_S)


async def test_set_interval_beyond_the_double_range_is_clamped(
    probe: Probe, start_worker: Any
) -> None:
    # docs/contract.md: clamped, never refused, including numbers beyond a double's range.
    await start_worker()
    for raw, clamped in ((b"1e400", 86_400_000), (b"-1e400", 1000)):
        body = b'{"type": "set_interval", "conversationId": "conv-1", "intervalMs": ' + raw + b"}"
        reply = await probe.command(body, timeout=3)
        assert reply == settings_reply(False, clamped), raw
    assert await probe.dead_count() == 0


async def test_set_interval_rearms_an_armed_conversation(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    armed = await one_surface(surfaces)
    reply = await probe.command({"type": "set_interval", "conversationId": CID, "intervalMs": 5000})
    assert reply == settings_reply(True, 5000)
    update = await one_update(surfaces)
    assert update["state"]["status"] == "armed"
    # A full new interval from now, not from the old arm.
    assert update["state"]["nextWarmAt"] - update["at"] == 5000
    assert update["state"]["nextWarmAt"] < armed["nextWarmAt"]


# -- get_state ----------------------------------------------------------------------


async def test_get_state_of_an_unseen_conversation_answers_defaults_and_creates_nothing(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    reply = await probe.command({"type": "get_state", "conversationId": "never-seen"})
    assert reply == {"ok": True, "state": DEFAULT_STATE, "spec": expected_panel(DEFAULT_STATE)}
    await surfaces.nothing(QUIET_S)

    # No record was created: the first change starts from the defaults.
    reply = await probe.command(
        {"type": "set_interval", "conversationId": "never-seen", "intervalMs": 7000}
    )
    assert reply == settings_reply(False, 7000)
    state = await one_surface(surfaces, "never-seen")
    assert state == {**DEFAULT_STATE, "intervalMs": 7000}


async def enable_with_a_minute(probe: Probe, surfaces: Listener) -> None:
    """Enable CID with a 60 s interval; consume the enable's surface (the caller reads the next)."""
    await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    await probe.command({"type": "set_interval", "conversationId": CID, "intervalMs": 60000})
    await surfaces.next_body(WAIT_S)


async def test_get_state_reports_the_current_state_and_publishes_no_surface(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await enable_with_a_minute(probe, surfaces)
    last = await one_surface(surfaces)
    for _ in range(3):
        assert await get_state(probe) == last
    await surfaces.nothing(QUIET_S)


# -- surface.action -----------------------------------------------------------------


def action(action_id: str, payload: Any = msgspec.UNSET, cid: str = CID) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "surface.action", "conversationId": cid, "actionId": action_id}
    if payload is not msgspec.UNSET:
        body["payload"] = payload
    return body


TOGGLE = "cache-warming/toggle"
SET_INTERVAL = "cache-warming/set-interval"


async def test_toggle_without_payload_flips(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    for expected in (True, False, True):
        reply = await probe.command(action(TOGGLE))
        assert reply == settings_reply(expected, 240000)
        state = await one_surface(surfaces, last=False)
        assert state["enabled"] is expected
    await surfaces.nothing(QUIET_S)
    assert (await get_state(probe))["enabled"] is True


async def test_toggle_with_a_null_or_bare_boolean_payload(probe: Probe, start_worker: Any) -> None:
    """docs/decisions.md 4: a null payload flips like none; a bare boolean sets."""
    await start_worker()
    surfaces = await probe.surfaces()
    for payload, expected in ((None, True), (None, False), (True, True), (True, True)):
        reply = await probe.command(action(TOGGLE, payload))
        assert reply == settings_reply(expected, 240000), f"payload {payload!r}"
        assert (await one_surface(surfaces))["enabled"] is expected


async def test_toggle_with_a_value_sets_it(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    for value in (True, False, False, True, True):
        reply = await probe.command(action(TOGGLE, {"value": value}))
        assert reply == settings_reply(value, 240000)
        assert (await one_surface(surfaces))["enabled"] is value


# Payload -> interval (docs/semantics.md: "a JSON number > 0 gives the clamp of round(s * 1000)").
SECONDS: list[tuple[Any, int]] = [
    (5, 5000),
    ({"value": 7}, 7000),
    (2.5, 2500),
    ({"value": 1.0005}, 1001),
    (0.0001, 1000),
    (100000, 86400000),
    ({"value": 86400}, 86400000),
    (1e300, 86400000),
    ({"value": 1e308}, 86400000),
]


async def test_set_interval_action_takes_seconds(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    await one_surface(surfaces)
    for payload, interval in SECONDS:
        reply = await probe.command(action(SET_INTERVAL, payload))
        assert reply == settings_reply(True, interval), f"payload {payload!r}"
        state = await one_surface(surfaces, last=False)
        assert state["intervalMs"] == interval, f"payload {payload!r}"
        # An interval beyond the idle budget (45 min) cannot be armed.
        assert state["status"] == ("armed" if interval <= 2700000 else "budget_exhausted")
    await surfaces.nothing(QUIET_S)


# -- rejections ---------------------------------------------------------------------

LONG_ID = "a" * 201
MULTIBYTE_LONG_ID = "\u00e9" * 100 + "a"  # 101 characters, 201 bytes of UTF-8

INVALID_FIELD: list[tuple[str, dict[str, Any]]] = [
    ("interval missing", {"type": "set_interval", "conversationId": CID}),
    ("interval null", {"type": "set_interval", "conversationId": CID, "intervalMs": None}),
    ("interval string", {"type": "set_interval", "conversationId": CID, "intervalMs": "5000"}),
    ("interval bool", {"type": "set_interval", "conversationId": CID, "intervalMs": True}),
    ("interval object", {"type": "set_interval", "conversationId": CID, "intervalMs": {}}),
    ("enabled missing", {"type": "set_enabled", "conversationId": CID}),
    ("enabled null", {"type": "set_enabled", "conversationId": CID, "enabled": None}),
    ("enabled string", {"type": "set_enabled", "conversationId": CID, "enabled": "true"}),
    ("enabled number", {"type": "set_enabled", "conversationId": CID, "enabled": 1}),
    ("id missing", {"type": "set_enabled", "enabled": True}),
    ("id null", {"type": "set_enabled", "conversationId": None, "enabled": True}),
    ("id number", {"type": "set_enabled", "conversationId": 5, "enabled": True}),
    ("id empty", {"type": "set_enabled", "conversationId": "", "enabled": True}),
    ("id 201 bytes", {"type": "set_enabled", "conversationId": LONG_ID, "enabled": True}),
    (
        "id 201 bytes multibyte",
        {"type": "set_enabled", "conversationId": MULTIBYTE_LONG_ID, "enabled": True},
    ),
    ("id control char", {"type": "set_enabled", "conversationId": "a\x01b", "enabled": True}),
    ("id tab", {"type": "set_enabled", "conversationId": "a\tb", "enabled": True}),
    ("id DEL", {"type": "set_enabled", "conversationId": "a\x7f", "enabled": True}),
    ("id C1 control", {"type": "set_enabled", "conversationId": "a\x85b", "enabled": True}),
    ("get_state id empty", {"type": "get_state", "conversationId": ""}),
    ("get_state id missing", {"type": "get_state"}),
    ("action id missing", {"type": "surface.action", "conversationId": CID}),
    ("action id null", {"type": "surface.action", "conversationId": CID, "actionId": None}),
    ("type missing", {"conversationId": CID, "enabled": True}),
    ("type null", {"type": None, "conversationId": CID, "enabled": True}),
]

INVALID_PAYLOAD: list[tuple[str, dict[str, Any]]] = [
    ("seconds numeric string", action(SET_INTERVAL, "5")),
    ("seconds true", action(SET_INTERVAL, True)),
    ("seconds null", action(SET_INTERVAL, None)),
    ("seconds empty object", action(SET_INTERVAL, {})),
    ("seconds missing", action(SET_INTERVAL)),
    ("seconds zero", action(SET_INTERVAL, 0)),
    ("seconds negative", action(SET_INTERVAL, -3)),
    ("seconds value string", action(SET_INTERVAL, {"value": "5"})),
    ("seconds value false", action(SET_INTERVAL, {"value": False})),
    ("seconds array", action(SET_INTERVAL, [5])),
    ("toggle value yes", action(TOGGLE, {"value": "yes"})),
    ("toggle value number", action(TOGGLE, {"value": 1})),
]

OTHER_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown action", action("cache-warming/explode", {"value": True}), "unknown_action"),
    ("unknown action no payload", action("toggle"), "unknown_action"),
    ("unknown type", {"type": "reset", "conversationId": CID}, "unknown_type"),
    ("event type as command", {"type": "turn.started", "conversationId": CID}, "unknown_type"),
    (
        "unknown type set_enabled-like",
        {"type": "setEnabled", "conversationId": CID},
        "unknown_type",
    ),
]

ALL_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    *((name, body, "invalid_field") for name, body in INVALID_FIELD),
    *((name, body, "invalid_payload") for name, body in INVALID_PAYLOAD),
    *OTHER_REJECTIONS,
]


async def test_every_rejection_has_its_code_changes_nothing_and_publishes_nothing(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await enable_with_a_minute(probe, surfaces)
    before = await one_surface(surfaces)

    for name, body, code in ALL_REJECTIONS:
        reply = await probe.command(body, timeout=WAIT_S)
        assert reply.get("code") == code, f"{name}: {reply}"
        assert_error(reply, code)

    await surfaces.nothing(QUIET_S)
    assert await get_state(probe) == before
    for cid in (LONG_ID[:200], MULTIBYTE_LONG_ID[:100], "ab", "a"):
        assert await get_state(probe, cid) == DEFAULT_STATE
    assert await probe.dead_count() == 0


# Python's re `$` matches before a final newline: a pattern alone lets it pass.
async def test_conversation_id_with_a_trailing_newline_is_invalid(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    reply = await probe.command(
        {"type": "set_enabled", "conversationId": "conv-1\n", "enabled": True}
    )
    await surfaces.nothing(QUIET_S)
    assert_error(reply, "invalid_field")


async def test_toggle_with_a_null_value_is_invalid_payload(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    reply = await probe.command(action(TOGGLE, {"value": None}))
    assert_error(reply, "invalid_payload")
    await surfaces.nothing(QUIET_S)
    assert (await get_state(probe))["enabled"] is False


async def test_decoded_but_wrong_commands_are_answered_not_dead_lettered(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    for _, body, code in ALL_REJECTIONS[:: max(1, len(ALL_REJECTIONS) // 8)]:
        assert_error(await probe.command(body), code)
    for _, body, _ in ALL_REJECTIONS[:5]:
        await probe.send_command(body)  # no reply_to: logged and counted only
    # A marker that must be dead-lettered: commands are applied in order, so were any
    # earlier one dead-lettered, it would come out of the dead-letter queue first.
    marker = b"not json, marker " + uuid.uuid4().hex.encode()
    assert_error(await probe.command(marker), "invalid_json")
    dead = await first_dead_letter(probe)
    assert dead.body == marker
    await asyncio.sleep(0.3)
    assert await probe.dead_count() == 0


async def test_a_store_error_is_answered_and_changes_nothing(
    probe: Probe, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = await start_worker()
    surfaces = await probe.surfaces()
    await probe.command({"type": "set_interval", "conversationId": CID, "intervalMs": 8000})
    before = await one_surface(surfaces)

    async def failing(*_: object) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(app.worker.store, "commit", failing)
    for body in (
        {"type": "set_enabled", "conversationId": CID, "enabled": True},
        {"type": "set_interval", "conversationId": CID, "intervalMs": 2000},
        action(TOGGLE),
        action(SET_INTERVAL, 3),
    ):
        assert_error(await probe.command(body), "store_error")
    await surfaces.nothing(QUIET_S)
    assert await get_state(probe) == before
    assert await probe.dead_count() == 0

    monkeypatch.undo()
    reply = await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    assert reply == settings_reply(True, 8000)
    assert (await one_surface(surfaces))["status"] == "armed"


# -- without reply_to ---------------------------------------------------------------


async def test_a_command_without_reply_to_is_applied_silently(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    await probe.send_command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    state = await one_surface(surfaces)
    assert state["enabled"] is True and state["status"] == "armed"
    await probe.send_command({"type": "set_interval", "conversationId": CID, "intervalMs": 9000})
    assert (await one_surface(surfaces))["intervalMs"] == 9000
    await probe.send_command(action(SET_INTERVAL, 3))
    assert (await one_surface(surfaces))["intervalMs"] == 3000
    await probe.send_command(action(TOGGLE))
    assert (await one_surface(surfaces))["enabled"] is False
    # A rejected one without reply_to: nobody is told, nothing changes.
    await probe.send_command({"type": "set_interval", "conversationId": CID, "intervalMs": "1"})
    await probe.send_command(action(SET_INTERVAL, "5"))
    await surfaces.nothing(QUIET_S)
    state = await get_state(probe)
    assert state["enabled"] is False and state["intervalMs"] == 3000


async def test_reply_properties(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    queue = await probe.channel.declare_queue(exclusive=True, auto_delete=True)
    replies = Listener(queue)
    await replies.start()
    correlation_id = uuid.uuid4().hex
    await probe.send_command(
        {"type": "get_state", "conversationId": CID},
        reply_to=queue.name,
        correlation_id=correlation_id,
    )
    message = await replies.next(WAIT_S)
    assert message.correlation_id == correlation_id
    assert message.content_type == "application/json"
    assert message.delivery_mode != aio_pika.DeliveryMode.PERSISTENT
    assert message.exchange == ""
    assert msgspec.json.decode(message.body)["ok"] is True
    await replies.nothing(QUIET_S)


# -- the encoding rules -------------------------------------------------------------

BIG = msgspec.json.encode(
    {"type": "set_enabled", "conversationId": CID, "enabled": True, "pad": "x" * 65536}
)
ENCODING: list[tuple[str, bytes, str | None, str]] = [
    (
        "text/plain",
        b'{"type": "set_enabled", "conversationId": "conv-1", "enabled": true}',
        "text/plain",
        "invalid_content_type",
    ),
    (
        "application/jsonx",
        b'{"type": "set_enabled", "conversationId": "conv-1", "enabled": true}',
        "application/jsonx",
        "invalid_content_type",
    ),
    ("over 64 KiB", BIG, "application/json", "too_large"),
    ("not JSON", b'{"type": "set_enabled", ', "application/json", "invalid_json"),
    ("not UTF-8", b'{"type": "get_state", "conversationId": "\xff"}', None, "invalid_json"),
    (
        "JSON array",
        b'[{"type": "set_enabled", "conversationId": "conv-1", "enabled": true}]',
        "application/json",
        "invalid_json",
    ),
    ("JSON string", b'"set_enabled"', "application/json", "invalid_json"),
    ("JSON null", b"null", "application/json", "invalid_json"),
]


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [case[1:] for case in ENCODING],
    ids=[case[0] for case in ENCODING],
)
async def test_a_command_failing_the_encoding_rules_is_answered_and_dead_lettered(
    probe: Probe, start_worker: Any, body: bytes, content_type: str | None, code: str
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    queue = await probe.channel.declare_queue(exclusive=True, auto_delete=True)
    replies = Listener(queue)
    await replies.start()
    correlation_id = uuid.uuid4().hex
    await probe.send_command(
        body, reply_to=queue.name, correlation_id=correlation_id, content_type=content_type
    )
    message = await replies.next(WAIT_S)
    assert message.correlation_id == correlation_id
    assert_error(msgspec.json.decode(message.body), code)

    dead = await first_dead_letter(probe)
    assert dead.body == body
    headers = dead.headers
    assert headers["x-warmer-reason"] == code
    assert isinstance(headers["x-warmer-error"], str) and headers["x-warmer-error"]
    assert "\n" not in headers["x-warmer-error"]
    assert headers["x-warmer-original-exchange"] == probe.names.commands
    assert headers["x-warmer-original-routing-key"] == COMMAND_ROUTING_KEY
    assert dead.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert dead.content_type == content_type
    assert dead.reply_to == queue.name
    assert dead.correlation_id == correlation_id
    await surfaces.nothing(QUIET_S)
    assert await probe.dead_count() == 0
    assert await get_state(probe) == DEFAULT_STATE


async def test_a_command_failing_the_encoding_rules_without_reply_to_is_dead_lettered(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    body = b'{"type": "set_enabled", "conversationId": "conv-1", "enabled": true}'
    await probe.send_command(body, content_type="text/plain")
    dead = await first_dead_letter(probe)
    assert dead.body == body
    assert dead.headers["x-warmer-reason"] == "invalid_content_type"
    await surfaces.nothing(QUIET_S)
    assert (await get_state(probe))["enabled"] is False


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", "Application/JSON"],
)
async def test_json_content_types_are_accepted(
    probe: Probe, start_worker: Any, content_type: str | None
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    reply = await probe.command(
        {"type": "set_enabled", "conversationId": CID, "enabled": True}, content_type=content_type
    )
    assert reply == settings_reply(True, 240000)
    assert (await one_surface(surfaces))["enabled"] is True


async def test_a_body_of_exactly_64_kib_with_unknown_fields_is_accepted(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    head = {"type": "set_interval", "conversationId": CID, "intervalMs": 4000, "pad": ""}
    size = len(msgspec.json.encode(head))
    body = msgspec.json.encode({**head, "pad": "x" * (64 * 1024 - size)})
    assert len(body) == 64 * 1024
    assert await probe.command(body) == settings_reply(False, 4000)
    assert (await one_surface(surfaces))["intervalMs"] == 4000


async def test_a_conversation_id_of_200_bytes_is_accepted(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    surfaces = await probe.surfaces()
    for cid in ("a" * 200, "\u00e9" * 100, "\U0001f600" * 50):
        assert len(cid.encode()) == 200
        reply = await probe.command({"type": "set_enabled", "conversationId": cid, "enabled": True})
        assert reply == settings_reply(True, 240000)
        assert (await one_surface(surfaces, cid, last=False))["enabled"] is True
    await surfaces.nothing(QUIET_S)


# -- conversation.closed persists OFF -----------------------------------------------


async def test_close_persists_off_and_keeps_the_interval_across_a_restart(
    probe: Probe, start_worker: Any
) -> None:
    app = await start_worker()
    surfaces = await probe.surfaces()
    await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    await probe.command({"type": "set_interval", "conversationId": CID, "intervalMs": 5000})
    await surfaces.next_body(WAIT_S)
    await one_surface(surfaces)
    await probe.event({"type": "conversation.closed", "conversationId": CID})
    closed = await one_surface(surfaces)
    assert closed["enabled"] is False and closed["status"] == "disabled"
    assert closed["intervalMs"] == 5000
    await app.stop()

    await start_worker()
    state = await get_state(probe)
    assert state["enabled"] is False
    assert state["intervalMs"] == 5000
    assert state["status"] == "disabled"
    # Re-enabling restores the persisted interval.
    assert await probe.command(
        {"type": "set_enabled", "conversationId": CID, "enabled": True}
    ) == settings_reply(True, 5000)


async def test_close_after_a_restart_keeps_the_stored_interval(
    probe: Probe, start_worker: Any
) -> None:
    app = await start_worker()
    await probe.command({"type": "set_interval", "conversationId": CID, "intervalMs": 7000})
    await probe.command({"type": "set_enabled", "conversationId": CID, "enabled": True})
    await app.stop()

    app = await start_worker()
    surfaces = await probe.surfaces()
    state = await get_state(probe)
    assert state["enabled"] is True and state["intervalMs"] == 7000
    await probe.event({"type": "conversation.closed", "conversationId": CID})
    closed = await one_surface(surfaces)
    assert closed["enabled"] is False and closed["intervalMs"] == 7000
    await app.stop()

    await start_worker()
    state = await get_state(probe)
    assert state["enabled"] is False and state["intervalMs"] == 7000
