"""A conversation's record as the store keeps it: MessagePack, arrays instead of maps.

The store never looks inside a record: the core encodes what ``Warmer.touched`` returns
and decodes what was loaded at start. Decoding checks what the types say (Meta
constraints on the fields) and the few facts that tie fields together, and raises
``RecordError``, and nothing else, on anything that is not a record the core could
have written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec

from warmer.contract import Status
from warmer.core.gaps import MODEL_KEY, GapModel
from warmer.core.state import Record

_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(Record)
_TIMED: Final = frozenset({Status.ARMED, Status.RETRYING})


class RecordError(ValueError):
    """Stored bytes that are not a valid record; the message is one line."""


def encode_record(record: Record) -> bytes:
    """The stored form of a record."""
    return _ENCODER.encode(record)


def encode_changes(
    touched: Mapping[str, Record | None], model: GapModel | None = None
) -> dict[str, bytes | None]:
    """What a batch commits: each touched record encoded, ``None`` for a removed one, and
    the gap model under ``MODEL_KEY`` when the batch changed it."""
    changes: dict[str, bytes | None] = {
        cid: None if record is None else encode_record(record) for cid, record in touched.items()
    }
    if model is not None:
        changes[MODEL_KEY] = model.encode()
    return changes


def decode_record(data: bytes | bytearray | memoryview) -> Record:
    """A record from its stored form; RecordError when it is malformed."""
    try:
        record = _DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RecordError(_one_line(f"malformed record: {exc}")) from None
    state = record.state
    if state is None:
        return record
    if (state.next_warm_at is None) == (state.phase in _TIMED):
        raise RecordError(f"malformed record: phase {state.phase.value} with this nextWarmAt")
    if state.phase.pending and (not state.enabled or state.active):
        raise RecordError(f"malformed record: phase {state.phase.value} while not enabled or idle")
    return record


def _one_line(text: str) -> str:
    return " ".join(text.split())
