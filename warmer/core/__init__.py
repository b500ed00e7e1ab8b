"""The pure core: the state machine and its rules. No asyncio, no I/O, no clock."""

from warmer.core.effects import (
    Arm,
    Cancel,
    Effect,
    PersistSettings,
    PublishSurface,
    PublishWarm,
    SendReply,
    WarmFailed,
)
from warmer.core.machine import Outcome, Policy, SettingsChange, Warmer
from warmer.core.panel import DEFAULT_PANEL, build_panel
from warmer.core.state import Conversation, Phase, Settings, parse_settings

__all__ = [
    "DEFAULT_PANEL",
    "Arm",
    "Cancel",
    "Conversation",
    "Effect",
    "Outcome",
    "PersistSettings",
    "Phase",
    "Policy",
    "PublishSurface",
    "PublishWarm",
    "SendReply",
    "Settings",
    "SettingsChange",
    "WarmFailed",
    "Warmer",
    "build_panel",
    "parse_settings",
]
