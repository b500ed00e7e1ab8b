"""The pure core: the state machine and its rules. No asyncio, no I/O, no clock."""

from warmer.contract import Status
from warmer.core.commands import SettingsChange
from warmer.core.effects import (
    Accounted,
    Arm,
    Cancel,
    Effect,
    IntervalAdjusted,
    Outcome,
    PublishSurface,
    PublishWarm,
    SendReply,
    WarmFailed,
    WarmFailedCause,
    WarmSkipped,
)
from warmer.core.gaps import MODEL_KEY, GapModel, GapModelError
from warmer.core.machine import Warmer
from warmer.core.panel import DEFAULT_PANEL, build_panel
from warmer.core.policy import Policy
from warmer.core.records import RecordError, decode_record, encode_record
from warmer.core.recovery import Recovery
from warmer.core.state import Conversation, Hold, Record, Settings, parse_settings

__all__ = [
    "DEFAULT_PANEL",
    "MODEL_KEY",
    "Accounted",
    "Arm",
    "Cancel",
    "Conversation",
    "Effect",
    "GapModel",
    "GapModelError",
    "Hold",
    "IntervalAdjusted",
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
    "WarmSkipped",
    "Warmer",
    "build_panel",
    "decode_record",
    "encode_record",
    "parse_settings",
]
