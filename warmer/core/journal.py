"""The open batch's journal: each conversation as it was before the batch first changed it.

The shell applies a batch of inputs, commits what ``touched`` lists, then ``end``s it; or,
when the commit cannot be made before the worker stops or loses its connection,
``rollback``s it, so the redelivered inputs are applied again. Timers are not the core's:
the shell arms a batch's timers only once it is committed, and puts back the inputs nobody
will redeliver (timer fires, returned warms). The token counter never goes back: tokens
only grow, so a rolled back batch skips the tokens it took.
"""

from __future__ import annotations

from msgspec.structs import replace

from warmer.core.state import DEFAULT_SETTINGS, Conversation, Record, Settings, settings_of

Snapshot = tuple[Conversation | None, Settings | None]


class Journal:
    """Snapshots of the conversations (and their settings) an open batch touched."""

    def __init__(
        self, conversations: dict[str, Conversation], settings: dict[str, Settings]
    ) -> None:
        """Journal changes to ``conversations`` and ``settings`` (the core's own dicts)."""
        self._conversations = conversations
        self._settings = settings
        self._batch: dict[str, Snapshot] | None = None

    def begin(self) -> None:
        """Open a batch."""
        if self._batch is not None:
            raise RuntimeError("a batch is already open")
        self._batch = {}

    def touch(self, cid: str) -> None:
        """Called before an input changes ``cid``: in a batch, snapshot it the first time."""
        batch = self._batch
        if batch is not None and cid not in batch:
            conv = self._conversations.get(cid)
            batch[cid] = (None if conv is None else replace(conv), self._settings.get(cid))

    def snapshotted(self) -> list[str]:
        """The conversations the open batch snapshotted (touched), changed or not."""
        return list(self._open())

    def touched(self) -> dict[str, Record | None]:
        """The record of each conversation the batch changed or created; None: removed.

        A conversation an input only looked at (a stale or dropped input, a fire that
        failed its check) is not listed: its record did not change.
        """
        changes: dict[str, Record | None] = {}
        for cid, (conv_before, settings_before) in self._open().items():
            conv = self._conversations.get(cid)
            settings = self._settings.get(cid)
            if conv == conv_before and settings == settings_before:
                continue
            if conv is None and settings is None:
                changes[cid] = None
            else:
                if settings is None:
                    settings = DEFAULT_SETTINGS if conv is None else settings_of(conv)
                changes[cid] = Record(
                    settings=settings, state=None if conv is None else replace(conv)
                )
        return changes

    def end(self) -> None:
        """Close the batch: its changes were committed."""
        self._open()
        self._batch = None

    def rollback(self) -> None:
        """Put every touched conversation back as it was at ``begin``; the batch stays open.

        Conversations the batch created are removed and removed ones come back.
        """
        for cid, (conv, settings) in self._open().items():
            if conv is None:
                self._conversations.pop(cid, None)
            else:
                self._conversations[cid] = replace(conv)  # the snapshot stays the snapshot
            if settings is None:
                self._settings.pop(cid, None)
            else:
                self._settings[cid] = settings

    def _open(self) -> dict[str, Snapshot]:
        if self._batch is None:
            raise RuntimeError("no batch is open")
        return self._batch


__all__ = ["Journal", "Snapshot"]
