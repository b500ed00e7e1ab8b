"""An in-memory store for tests, with switches that make calls fail like a broken disk."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from warmer.store.base import (
    Loaded,
    RawSettings,
    StoreError,
    StoreLost,
    StoreOutcomeUnknown,
    check_commit,
    new_writer,
    next_sequence,
)


class MemoryStore:
    """A Store kept in dicts; nothing survives the process.

    Set ``failing`` to make every call (but ``close``) raise StoreError until it is
    cleared, or ``fail_next`` to make only the next that many calls raise. A failed call
    changes nothing. ``unknown_next`` makes the next that many commits raise
    StoreOutcomeUnknown, written or not as ``unknown_lands`` says; ``lose`` empties the
    store like a Redis restarted without persistence.
    """

    def __init__(
        self,
        settings: Mapping[str, RawSettings] | None = None,
        token: int = 0,
        *,
        records: Mapping[str, bytes] | None = None,
    ) -> None:
        """Start with ``records``, legacy ``settings`` (malformed ones welcome) and ``token``."""
        self.records: dict[str, bytes] = dict(records or {})
        """Conversation id -> record, as committed."""
        self.settings: dict[str, RawSettings] = copy.deepcopy(dict(settings or {}))
        """Settings left by a schema-1 store; a commit touching an id removes its entry."""
        self.token = token
        """The highest token committed."""
        self.writers: dict[str, int] = {}
        """Writer id -> the sequence of its last write."""
        self.writer = new_writer()
        """This store's own writer id."""
        self.failing = False
        self.fail_next = 0
        self.unknown_next = 0
        self.unknown_lands = True
        self.is_open = False
        self._seen = 0
        self._sent = 0

    def lose(self) -> None:
        """Forget everything, as a store restarted without its data would."""
        self.records.clear()
        self.settings.clear()
        self.token = 0
        self.writers.clear()

    def _check(self, operation: str) -> None:
        if self.failing:
            raise StoreError(f"memory store failing: {operation}")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StoreError(f"memory store failing: {operation}")

    def _check_entry(self) -> None:
        if self._seen == 0:  # never opened nor written: the first write registers
            return
        entry = self.writers.get(self.writer)
        if entry is None or entry < self._seen:
            raise StoreLost(f"memory store lost writer {self.writer}'s data")

    def _sequence(self) -> int:
        """Raise this writer's entry; the new sequence."""
        self._sent = self.writers[self.writer] = next_sequence(self._sent)
        return self._sent

    def _register(self) -> None:
        self._seen = self._sequence()

    async def open(self) -> None:
        """Mark the store open and record this writer."""
        self._check("open")
        self.is_open = True
        self._register()

    async def close(self) -> None:
        """Mark the store closed, forget this writer; never fails."""
        self.is_open = False
        self.writers.pop(self.writer, None)

    async def load(self) -> Loaded:
        """A copy of everything stored; legacy settings only for ids with no record."""
        self._check("load")
        settings = {
            conversation_id: value
            for conversation_id, value in self.settings.items()
            if conversation_id not in self.records
        }
        return Loaded(
            records=dict(self.records), settings=copy.deepcopy(settings), token=self.token
        )

    async def commit(self, changes: Mapping[str, bytes | None], token: int) -> None:
        """Put or delete each record and keep the larger token, all or nothing."""
        check_commit(changes, token)
        self._check("commit")
        unknown = self.unknown_next > 0
        if unknown:
            self.unknown_next -= 1
        if not unknown or self.unknown_lands:
            self._check_entry()
            self._write(changes, token)
            sequence = self._sequence()
            if unknown:  # landed, but the answer never came back
                raise StoreOutcomeUnknown("memory store: no answer (outcome unknown)")
            self._seen = sequence
            return
        raise StoreOutcomeUnknown("memory store: no answer (outcome unknown)")

    async def check(self) -> None:
        """StoreLost when this writer's entry is gone or behind."""
        self._check("check")
        self._check_entry()

    async def restore(self, records: Mapping[str, bytes], token: int) -> None:
        """Write every record again and record this writer afresh."""
        check_commit(records, token)
        self._check("restore")
        self._write(records, token)
        self._register()

    def _write(self, changes: Mapping[str, bytes | None], token: int) -> None:
        for conversation_id, record in changes.items():
            self.settings.pop(conversation_id, None)
            if record is None:
                self.records.pop(conversation_id, None)
            else:
                self.records[conversation_id] = record
        self.token = max(self.token, token)
