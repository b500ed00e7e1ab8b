"""A whole opt-in cycle over the real broker."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.probe import Probe

pytestmark = pytest.mark.broker


async def test_opt_in_cycle(probe: Probe, start_worker: Any) -> None:
    await start_worker()
    warms = await probe.warms()
    surfaces = await probe.surfaces()
    reply = await probe.command({"type": "set_enabled", "conversationId": "c-1", "enabled": True})
    assert reply == {"ok": True, "settings": {"enabled": True, "intervalMs": 240000}}
    reply = await probe.command(
        {"type": "set_interval", "conversationId": "c-1", "intervalMs": 1000}
    )
    assert reply["settings"]["intervalMs"] == 1000
    await probe.event(
        {"type": "turn.settled", "conversationId": "c-1", "cwd": "/repo", "modelName": "m"}
    )
    message = await warms.next(5)
    body = __import__("msgspec").json.decode(message.body)
    assert body["type"] == "warm.requested"
    assert body["cwd"] == "/repo" and body["modelName"] == "m"
    assert message.message_id == f"c-1:{body['token']}"
    assert message.headers["conversation-id"] == "c-1"
    assert message.expiration is not None
    await probe.event(
        {
            "type": "warm.completed",
            "conversationId": "c-1",
            "token": body["token"],
            "usage": {"inputTokens": 1000, "cacheReadTokens": 800, "cacheWriteTokens": 200},
        }
    )
    update = await surfaces.until(lambda b: b["state"]["lastPct"] == 80)
    assert update["state"]["status"] == "armed"
    second = await warms.next_body(5)
    assert second["token"] > body["token"]
