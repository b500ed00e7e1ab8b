"""The pure core: the state machine and its rules. No asyncio, no I/O, no clock."""

from warmer.contract import Status
from warmer.core.effects import (
    Arm,
    Cancel,
    Effect,
    PublishSurface,
    PublishWarm,
    SendReply,
    WarmFailed,
    WarmFailedCause,
)
from warmer.core.machine import Outcome, SettingsChange, Warmer
from warmer.core.panel import DEFAULT_PANEL, build_panel
from warmer.core.policy import Policy
from warmer.core.records import RecordError, decode_record, encode_record
from warmer.core.recovery import Recovery
from warmer.core.state import Conversation, Record, Settings, parse_settings

__all__ = [
    "DEFAULT_PANEL",
    "Arm",
    "Cancel",
    "Conversation",
    "Effect",
    "Outcome",
    "Policy",
    "PublishSurface",
    "PublishWarm",
    "Record",
    "RecordError",
    "Recovery",
    "SendReply",
    "Settings",
    "SettingsChange",
    "Status",
    "WarmFailed",
    "WarmFailedCause",
    "Warmer",
    "build_panel",
    "decode_record",
    "encode_record",
    "parse_settings",
]
