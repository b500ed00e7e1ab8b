"""An in-memory store for tests, with switches that make calls fail like a broken disk."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from warmer.store.base import Loaded, RawSettings, StoreError, check_commit


class MemoryStore:
    """A Store kept in dicts; nothing survives the process.

    Set ``failing`` to make every call (but ``close``) raise StoreError until it is
    cleared, or ``fail_next`` to make only the next that many calls raise. A failed call
    changes nothing.
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
        self.failing = False
        self.fail_next = 0
        self.is_open = False

    def _check(self, operation: str) -> None:
        if self.failing:
            raise StoreError(f"memory store failing: {operation}")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StoreError(f"memory store failing: {operation}")

    async def open(self) -> None:
        """Mark the store open."""
        self._check("open")
        self.is_open = True

    async def close(self) -> None:
        """Mark the store closed; never fails."""
        self.is_open = False

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
        for conversation_id, record in changes.items():
            self.settings.pop(conversation_id, None)
            if record is None:
                self.records.pop(conversation_id, None)
            else:
                self.records[conversation_id] = record
        self.token = max(self.token, token)
