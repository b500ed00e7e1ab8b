"""An in-memory store for tests, with switches that make calls fail like a broken disk.

``MemoryStore`` is a Store on its own (shard 0, no fence), as the worker's unit tests use
it; ``MemoryShared`` is a Shared store whose views are MemoryStores over the same data, so
that several in-process "replicas" can share it and fence each other.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

from warmer.core.gaps import MODEL_KEY
from warmer.store.base import (
    PRESENCE_INFO_CHARS,
    Loaded,
    Owner,
    RawSettings,
    Replica,
    StoreError,
    StoreLost,
    StoreOutcomeUnknown,
    check_commit,
    judge_epoch,
    new_epoch,
    new_writer,
    next_sequence,
    wall_ms,
)


@dataclass
class _Data:
    """What one memory back end holds: every shard's records and the shared entries."""

    shards: dict[int, dict[str, bytes]] = field(default_factory=dict)
    settings: dict[str, RawSettings] = field(default_factory=dict)
    token: int = 0
    writers: dict[str, int] = field(default_factory=dict)
    owners: dict[int, Owner] = field(default_factory=dict)
    replicas: dict[str, tuple[Replica, int]] = field(default_factory=dict)
    """Replica id -> its presence and the wall ms it expires at."""
    layout: int | None = None

    def records(self, shard: int) -> dict[str, bytes]:
        return self.shards.setdefault(shard, {})

    def lose(self) -> None:
        """Forget everything, as a Redis restarted without persistence would."""
        self.shards.clear()
        self.settings.clear()
        self.token = 0
        self.writers.clear()
        self.owners.clear()
        self.replicas.clear()
        self.layout = None


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
        data: _Data | None = None,
        shard: int = 0,
        replica: str | None = None,
    ) -> None:
        """Start with ``records``, legacy ``settings`` (malformed ones welcome) and ``token``;
        a view of ``MemoryShared`` gets its ``data``, ``shard`` and ``replica`` instead."""
        self._data = data if data is not None else _Data()
        self.shard = shard
        self.epoch = 0
        self._replica = replica
        """Who takes the shard at ``open``: None for a store on its own (never fenced)."""
        if records:
            self._data.records(shard).update(records)
        if settings:
            self._data.settings.update(copy.deepcopy(dict(settings)))
        self._data.token = max(self._data.token, token)
        self.writer = new_writer()
        """This store's own writer id."""
        self.failing = False
        self.fail_next = 0
        self.unknown_next = 0
        self.unknown_lands = True
        self.is_open = False
        self._seen = 0
        self._sent = 0

    @property
    def records(self) -> dict[str, bytes]:
        """Conversation id -> record, as committed (this shard's)."""
        return self._data.records(self.shard)

    @records.setter
    def records(self, value: dict[str, bytes]) -> None:
        self._data.shards[self.shard] = value

    @property
    def settings(self) -> dict[str, RawSettings]:
        """Settings left by a schema-1 store; a commit touching an id removes its entry."""
        return self._data.settings

    @property
    def token(self) -> int:
        """The highest token committed (one for the whole store)."""
        return self._data.token

    @token.setter
    def token(self, value: int) -> None:
        self._data.token = value

    @property
    def writers(self) -> dict[str, int]:
        """Writer id -> the sequence of its last write."""
        return self._data.writers

    @writers.setter
    def writers(self, value: dict[str, int]) -> None:
        self._data.writers = value

    def lose(self) -> None:
        """Forget everything, as a store restarted without its data would."""
        self._data.lose()

    def _check(self, operation: str) -> None:
        if self.failing:
            raise StoreError(f"memory store failing: {operation}")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StoreError(f"memory store failing: {operation}")

    def _fence(self, *, restoring: bool = False) -> None:
        if self._replica is None or self.epoch == 0:
            return
        held = self._data.owners.get(self.shard)
        judge_epoch(
            None if held is None else held.epoch,
            self.epoch,
            restoring=restoring,
            where=f"memory store shard {self.shard}",
        )

    def _check_entry(self) -> None:
        self._fence()
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

    def _own(self, released: bool = False) -> None:
        assert self._replica is not None
        self._data.owners[self.shard] = Owner(
            shard=self.shard,
            epoch=self.epoch,
            replica=self._replica,
            since_ms=wall_ms(),
            released=released,
        )

    async def open(self) -> None:
        """Mark the store open, take the shard (a view) and record this writer."""
        self._check("open")
        self.is_open = True
        if self._replica is not None:
            held = self._data.owners.get(self.shard)
            self.epoch = new_epoch(None if held is None else held.epoch)
            self._own()
        self._register()

    async def close(self) -> None:
        """Mark the store closed, release the shard, forget this writer; never fails."""
        self.is_open = False
        held = self._data.owners.get(self.shard)
        if self._replica is not None and held is not None and held.epoch == self.epoch:
            self._own(released=True)
        self.writers.pop(self.writer, None)

    async def load(self) -> Loaded:
        """A copy of everything stored; legacy settings only for ids with no record."""
        self._check("load")
        legacy = self.settings if self.shard == 0 else {}
        settings = {
            conversation_id: value
            for conversation_id, value in legacy.items()
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
        """StoreFenced once another view took the shard; StoreLost when this writer's entry
        is gone or behind."""
        self._check("check")
        self._check_entry()

    async def restore(self, records: Mapping[str, bytes], token: int) -> None:
        """Write every record again, the shard's epoch if it is missing, and this writer."""
        check_commit(records, token)
        self._check("restore")
        self._fence(restoring=True)
        if self._replica is not None and self.epoch:
            self._own()
        self._write(records, token)
        self._register()

    def _write(self, changes: Mapping[str, bytes | None], token: int) -> None:
        for conversation_id, record in changes.items():
            if self.shard == 0:
                self.settings.pop(conversation_id, None)
            if record is None:
                self.records.pop(conversation_id, None)
            else:
                self.records[conversation_id] = record
        self.token = max(self.token, token)


class MemoryShared:
    """A Shared store in dicts, for tests: views over the same data fence each other.

    ``lose`` empties it like a Redis restarted without persistence; ``views`` lists every
    view handed out, so that a test can flip a view's failure switches.
    """

    shareable = True

    def __init__(self) -> None:
        """An empty store, never laid out."""
        self.url = "memory://"
        self._data = _Data()
        self.views: list[MemoryStore] = []
        self.is_open = False

    def lose(self) -> None:
        """Forget everything (records, token, epochs, presence, layout)."""
        self._data.lose()

    async def open(self) -> None:
        """Mark the store open."""
        self.is_open = True

    async def close(self) -> None:
        """Mark the store closed."""
        self.is_open = False

    def shard(self, shard: int, replica: str) -> MemoryStore:
        """A view of ``shard`` that ``replica`` takes when it opens it."""
        view = MemoryStore(data=self._data, shard=shard, replica=replica)
        self.views.append(view)
        return view

    async def layout(self) -> int | None:
        """The layout set, or 1 when records or a token exist without one."""
        if self._data.layout is not None:
            return self._data.layout
        if self._data.token or any(self._data.shards.values()) or self._data.settings:
            return 1
        return None

    async def set_layout(self, shards: int) -> None:
        """Record the layout."""
        self._data.layout = shards

    async def beat(self, replica: str, info: str, ttl_ms: int) -> list[Replica]:
        """Record ``replica`` alive for ``ttl_ms``; every live one, by id."""
        now = wall_ms()
        seen = Replica(id=replica, info=info[:PRESENCE_INFO_CHARS], seen_ms=now)
        replicas = self._data.replicas
        replicas[replica] = (seen, now + ttl_ms)
        for gone in [key for key, (_, expires) in replicas.items() if expires < now]:
            del replicas[gone]
        return [replicas[key][0] for key in sorted(replicas)]

    async def leave(self, replica: str) -> None:
        """Remove ``replica``'s presence."""
        self._data.replicas.pop(replica, None)

    async def replicas(self) -> list[Replica]:
        """Every live replica, by id."""
        now = wall_ms()
        live = self._data.replicas
        return [live[key][0] for key in sorted(live) if live[key][1] >= now]

    async def owners(self) -> list[Owner]:
        """Every shard ever taken, by shard."""
        return [self._data.owners[shard] for shard in sorted(self._data.owners)]

    async def ids(self, shard: int) -> list[str]:
        """The conversation ids of ``shard``."""
        return list(self._data.shards.get(shard, {}))

    async def assign(self, moves: Mapping[str, int]) -> None:
        """Move each record to the shard given (``MODEL_KEY`` stays)."""
        shards = self._data.shards
        for conversation_id, target in moves.items():
            if conversation_id == MODEL_KEY:
                continue
            for shard, records in list(shards.items()):
                if shard != target and conversation_id in records:
                    self._data.records(target)[conversation_id] = records.pop(conversation_id)
                    break
