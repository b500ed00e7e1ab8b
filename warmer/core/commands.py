"""Commands that change settings, planned: validated and turned into a ``SettingsChange``.

Planning reads nothing but the persisted settings (and, for a toggle without a value, the
conversation's enabled state in memory) and changes nothing; ``Warmer.commit`` applies
the change once the shell persists it, and ``Warmer.store_failed`` refuses it when it
cannot.
"""

from __future__ import annotations

from typing import Final, Literal, assert_never

from msgspec import UNSET, Struct
from msgspec.structs import replace

from warmer.contract import (
    ErrorCode,
    ErrorReply,
    SetEnabled,
    SetInterval,
    SetPolicy,
    SurfaceAction,
    quoted,
)
from warmer.core.effects import Outcome, SendReply
from warmer.core.panel import SET_INTERVAL_ACTION, TOGGLE_ACTION
from warmer.core.rules import clamp_interval, seconds_to_interval
from warmer.core.state import Settings

_TOGGLE_PAYLOAD: Final = 'payload: the toggle takes {"value": true|false}'


class SettingsChange(Struct, frozen=True):
    """A planned settings command: ``commit`` applies it (or ``store_failed`` refuses it)."""

    conversation_id: str
    settings: Settings
    field: Literal["enabled", "interval", "policy"]
    base: Settings  # the persisted settings the change was planned on


def plan_settings(
    command: SetEnabled | SetInterval | SetPolicy | SurfaceAction,
    persisted: Settings,
    enabled: bool,
) -> Outcome | SettingsChange:
    """The change a command asks of ``persisted``, or the reply refusing it.

    ``enabled``: whether the conversation is enabled now (in memory), which a toggle
    without a value flips.
    """
    cid = command.conversation_id
    match command:
        case SetEnabled():
            return SettingsChange(
                cid, replace(persisted, enabled=command.enabled), "enabled", persisted
            )
        case SetInterval():
            settings = replace(persisted, interval_ms=clamp_interval(command.interval_ms))
            return SettingsChange(cid, settings, "interval", persisted)
        case SetPolicy():
            return SettingsChange(
                cid, replace(persisted, policy=command.policy), "policy", persisted
            )
        case SurfaceAction():
            return _plan_action(command, persisted, enabled)
        case _:
            assert_never(command)


def _plan_action(
    action: SurfaceAction, persisted: Settings, enabled_now: bool
) -> Outcome | SettingsChange:
    cid = action.conversation_id
    payload = action.payload
    if action.action_id == TOGGLE_ACTION:
        if isinstance(payload, dict):
            payload = payload.get("value", UNSET)
            if not isinstance(payload, bool):
                return reject(_TOGGLE_PAYLOAD, "invalid_payload")
        if payload is UNSET or payload is None:
            enabled = not enabled_now
        elif isinstance(payload, bool):
            enabled = payload
        else:
            return reject(_TOGGLE_PAYLOAD, "invalid_payload")
        return SettingsChange(cid, replace(persisted, enabled=enabled), "enabled", persisted)
    if action.action_id == SET_INTERVAL_ACTION:
        if isinstance(payload, dict):
            payload = payload.get("value")
        interval = seconds_to_interval(payload)
        if interval is None:
            return reject(
                "payload: set-interval takes a positive number of seconds", "invalid_payload"
            )
        settings = replace(persisted, interval_ms=interval)
        return SettingsChange(cid, settings, "interval", persisted)
    return reject(f"actionId: unknown action {quoted(action.action_id)}", "unknown_action")


def reject(error: str, code: ErrorCode) -> Outcome:
    """A command that cannot be applied: an error reply, nothing else."""
    return Outcome([SendReply(ErrorReply(error=error, code=code))], "rejected")
