"""An in-memory store for tests, with a switch that makes calls fail like a broken disk."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from warmer.store.base import RawSettings, StoreError


class MemoryStore:
    """A Store kept in a dict; nothing survives the process.

    Set ``failing`` to make every call (but ``close``) raise StoreError until it is
    cleared, or ``fail_next`` to make only the next that many calls raise. A failed call
    changes nothing.
    """

    def __init__(
        self,
        settings: Mapping[str, RawSettings] | None = None,
        token: int = 0,
    ) -> None:
        """Start with ``settings`` (raw values, malformed ones welcome) and ``token`` stored."""
        self.settings: dict[str, RawSettings] = copy.deepcopy(dict(settings or {}))
        self.token = token
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

    async def load_settings(self) -> dict[str, RawSettings]:
        """A copy of every stored settings value, as stored."""
        self._check("load_settings")
        return copy.deepcopy(self.settings)

    async def put_settings(self, conversation_id: str, enabled: bool, interval_ms: int) -> None:
        """Replace a conversation's settings."""
        self._check("put_settings")
        self.settings[conversation_id] = {"enabled": enabled, "intervalMs": interval_ms}

    async def load_token(self) -> int:
        """The highest token stored, 0 when none was."""
        self._check("load_token")
        return self.token

    async def put_token(self, token: int) -> None:
        """Keep the larger of the stored token and ``token``."""
        self._check("put_token")
        self.token = max(self.token, token)
