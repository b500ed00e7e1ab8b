"""Hostile bodies over the real broker: what the decoder's slow path reads reaches a reply,
never the dead letters (tests/unit/test_hostile_decode.py has the cases one by one)."""

from __future__ import annotations

from typing import Any

from tests.integration.probe import Probe
from tests.integration.test_commands import settings_reply

_HUGE = b"1" + b"0" * 4400  # beyond a double, and beyond Python's 4300-digit int-from-text


async def test_hostile_commands_are_answered_not_dead_lettered(
    probe: Probe, start_worker: Any
) -> None:
    await start_worker()
    cases: list[tuple[bytes, dict[str, Any]]] = [
        (
            b'{"type":"set_interval","conversationId":"h","intervalMs":' + _HUGE + b"}",
            settings_reply(False, 86_400_000),
        ),
        (
            b'{"type":"set_interval","conversationId":"h","intervalMs":-' + _HUGE + b"}",
            settings_reply(False, 1000),
        ),
        (
            b'{"type":"set_enabled","conversationId":5,"enabled":"x","conversationId":"h","enabled":true}',
            settings_reply(True, 1000),
        ),
        (
            b'{"type":"set_policy","conversationId":"h","policy":"x - at `$.enabled`"}',
            {
                "ok": False,
                "code": "invalid_field",
                "error": "set_policy: policy: Invalid enum value 'x - at `$.enabled`'",
            },
        ),
    ]
    for body, expected in cases:
        assert await probe.command(body, timeout=3) == expected, body[:80]
    assert await probe.dead_count() == 0
