"""Hostile: the worker's commit path against a store that fails in every order.

The real worker on the in-memory bus and store (``tests/unit/test_pipeline.py``'s rig).
The promise under attack: nothing acknowledged is lost, and a command's reply always
matches what the store holds, whatever mix of unknown outcomes (landed or not), known
failures and lost data comes before, during and after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.unit.test_pipeline import RETRY_MS, Rig, outcome, rig
from warmer.contract import ErrorReply, SettingsReply, StateReply
from warmer.core import Policy, Warmer
from warmer.core.records import decode_record
from warmer.inputs import Received
from warmer.store import (
    MemoryShared,
    MemoryStore,
    SqliteStore,
    StoreError,
    StoreFenced,
    StoreLost,
)
from warmer.store import base as store_base
from warmer.store.base import WRITER_REFRESH_MS, WRITERS_KEPT

__all__ = ["rig"]  # the fixture, shared

CIDS = ("c0", "c1", "c2")


def set_interval(cid: str, interval_ms: int) -> dict[str, Any]:
    return {"type": "set_interval", "conversationId": cid, "intervalMs": interval_ms}


def interval_held(store: MemoryStore, cid: str) -> int | None:
    raw = store.records.get(cid)
    return None if raw is None else decode_record(raw).settings.interval_ms


# -- any order of failures --------------------------------------------------------------

Fault = tuple[int, bool, int, bool]
"""Before a batch: commits whose outcome is unknown, whether those land, known failures
to come, whether the store loses everything first."""

faults = st.tuples(st.integers(0, 2), st.booleans(), st.integers(0, 2), st.booleans())
batches = st.lists(
    st.tuples(faults, st.lists(st.sampled_from(CIDS), min_size=1, max_size=3)),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(batches)
def test_each_reply_matches_what_the_store_holds_through_any_failures(
    plan: list[tuple[Fault, list[str]]],
) -> None:
    asyncio.run(_replies_match_the_store(plan))


async def _replies_match_the_store(plan: list[tuple[Fault, list[str]]]) -> None:
    rig = Rig()
    unretrieved: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, c: unretrieved.append(c))
    answered: dict[str, int] = {}  # cid -> the interval of its last command answered ok
    sent = 0
    for (unknown, lands, failing, lose), cids in plan:
        rig.store.unknown_next, rig.store.unknown_lands = unknown, lands
        rig.store.fail_next = failing
        if lose:
            rig.store.lose()
        items = []
        for cid in cids:
            sent += 1
            body = set_interval(cid, 60_000 + sent)
            items.append(rig.command(body, reply_to="r", correlation_id=str(sent)))
        await rig.batch(*items)
        replies = {key: reply for _, key, reply in rig.outbound.replies}
        base = sent - len(cids)
        for n, (cid, item) in enumerate(zip(cids, items, strict=True), base + 1):
            reply = replies.get(str(n))
            assert outcome(item) == "ack", (n, outcome(item))
            match reply:
                case SettingsReply():
                    assert reply.settings.interval_ms == 60_000 + n
                    answered[cid] = 60_000 + n
                case ErrorReply():
                    assert reply.code == "store_error", reply
                    assert len(reply.error) <= 500
                case _:
                    pytest.fail(f"command {n} answered {reply!r}")
        # The store answers again, and the periodic check comes round (a loss hidden
        # behind a known failure is found by it, not by the batch).
        rig.store.unknown_next = rig.store.fail_next = 0
        await rig.worker.check_before_close()
        for cid in CIDS:  # live: memory and store agree with the replies
            assert interval_held(rig.store, cid) == answered.get(cid), (cid, plan)
            conv = rig.core.get(cid)
            held = None if conv is None else conv.interval_ms
            assert held == answered.get(cid), (cid, plan)
    # After a restart: a core loaded from the store says what the replies said.
    loaded = Warmer(
        Policy(),
        records={c: decode_record(r) for c, r in rig.store.records.items() if c in CIDS},
        adopt=True,
    )
    for cid in CIDS:
        conv = loaded.get(cid)
        assert (None if conv is None else conv.interval_ms) == answered.get(cid)
    await rig.worker.settled()
    assert unretrieved == []


# -- two workers on one store -----------------------------------------------------------


def beside(first: Rig, shared: MemoryShared) -> Rig:
    """A second worker on the same store (a rolling update's overlap), started now: it
    takes shard 0 of the store the first works on, and loads what the store holds."""
    second = Rig()
    second.store = second.worker.store = shared.shard(0, "second")
    records = {c: decode_record(r) for c, r in first.store.records.items() if c in CIDS}
    second.core = second.worker.core = Warmer(Policy(), records=records, adopt=True)
    return second


async def test_a_second_worker_s_restore_does_not_undo_what_the_first_acknowledged(
    rig: Rig,
) -> None:
    # Once the second worker took the shard, the first is fenced: it acknowledges nothing
    # more, so no restore of the second's (what it loaded) can undo an answer of the first.
    shared = MemoryShared()
    rig.store = rig.worker.store = shared.shard(0, "first")
    await rig.store.open()
    await rig.batch(rig.command(set_interval("c0", 30_000)))
    other = beside(rig, shared)  # a new worker starts, reads c0 = 30000
    await other.store.open()
    item = rig.command(set_interval("c0", 44_444), reply_to="r", correlation_id="k")
    await rig.batch(item)
    # Fenced: never answered ok (today a store_error; or given back unanswered).
    answers = [reply for _, key, reply in rig.outbound.replies if key == "k"]
    assert not any(isinstance(reply, SettingsReply) for reply in answers), answers
    assert interval_held(rig.store, "c0") == 30_000  # what the replies said
    with pytest.raises(StoreFenced):
        await rig.store.check()
    rig.store.lose()  # Redis restarted empty: both workers notice, in either order
    await rig.worker.check_before_close()
    await other.worker.check_before_close()
    assert interval_held(rig.store, "c0") == 30_000


# -- the writers an SQLite file keeps ---------------------------------------------------


class WallClock:
    """The wall clock the stores' sequences read (``warmer.store.base``), moved by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ms = time.time_ns() // 1_000_000
        monkeypatch.setattr(store_base, "time", SimpleNamespace(time_ns=self.time_ns))

    def time_ns(self) -> int:
        return self.ms * 1_000_000

    def advance(self, ms: int) -> None:
        self.ms += ms


async def test_an_idle_sqlite_writer_s_entry_survives_many_killed_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As with Redis: killed workers leave their entries, each start keeps the 256 most
    # recent, and a live worker idle since its last commit ranks below them all. Its
    # check every 5 s must keep it among them: ten killed workers every 5 s, for 5 min.
    wall = WallClock(monkeypatch)
    path = tmp_path / "warmer.db"
    live = SqliteStore(path)
    await live.open()
    await live.commit({"mine": b"x"}, 1)
    try:
        for round_ in range(60):
            wall.advance(5_000)
            with contextlib.closing(sqlite3.connect(path)) as raw, raw:
                raw.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [(f"writer:killed-{round_}-{n}", wall.ms + n) for n in range(9)],
                )
            other = SqliteStore(path)
            await other.open()  # forgets the least recent entries beyond 256
            conn, other._conn = other._conn, None  # killed: its entry stays
            assert conn is not None
            await conn.close()
            await live.check()
        with contextlib.closing(sqlite3.connect(path)) as raw:
            (kept,) = raw.execute("SELECT count(*) FROM meta WHERE key LIKE 'writer:%'").fetchone()
        assert kept <= WRITERS_KEPT + 1
    finally:
        await live.close()


async def test_an_sqlite_check_writes_the_entry_only_once_it_is_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Raised at every check, a store that comes back without its last second would read
    # as one that lost commits when it lost only a check's write.
    wall = WallClock(monkeypatch)
    store = SqliteStore(tmp_path / "warmer.db")
    await store.open()
    try:
        await store.commit({"c": b"x"}, 1)
        entry = store._seen
        wall.ms = entry + WRITER_REFRESH_MS - 1
        await store.check()
        assert store._seen == entry
        wall.advance(1)
        await store.check()
        assert store._seen > entry
    finally:
        await store.close()


# -- what an outage says ----------------------------------------------------------------


async def test_an_outage_is_one_error_line_not_one_a_command(rig: Rig) -> None:
    await rig.batch(rig.command(set_interval("c0", 30_000)))
    rig.store.failing = True
    with capture_logs() as logs:
        for n in range(50):  # a command a second through the outage, each its own batch
            item = rig.command(set_interval("c0", 40_000 + n), reply_to="r", correlation_id=str(n))
            await rig.batch(item)
        rig.store.failing = False
        await rig.batch(rig.command(set_interval("c0", 50_000)))
    errors = [log["event"] for log in logs if log["log_level"] == "error"]
    assert errors == ["store_failed_commands_refused"]
    said = [log["event"] for log in logs]
    assert said.count("not_ready") == 1 and said.count("ready_again") == 1
    refused = [r for _, _, r in rig.outbound.replies if isinstance(r, ErrorReply)]
    assert len(refused) == 50 and all(r.code == "store_error" for r in refused)
    assert interval_held(rig.store, "c0") == 50_000


# -- commands arriving while a batch is retried -----------------------------------------

Wave = tuple[Fault, list[str], int]
"""Faults set, commands put (one conversation each), then that many turns of the loop."""

waves = st.lists(
    st.tuples(
        st.tuples(st.integers(0, 8), st.booleans(), st.integers(0, 3), st.booleans()),
        st.lists(st.sampled_from(CIDS), min_size=1, max_size=3),
        st.integers(0, 6),
    ),
    min_size=1,
    max_size=6,
)


async def turns(rig: Rig, count: int) -> None:
    """Let the running loop move ``count`` times, the clock by the first retry pause."""
    for _ in range(count):
        await rig.settle_down()
        rig.clock.advance(RETRY_MS[0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(waves)
def test_commands_arriving_while_a_batch_is_retried_match_the_store(plan: list[Wave]) -> None:
    asyncio.run(_arriving_match_the_store(plan))


async def _arriving_match_the_store(plan: list[Wave]) -> None:
    rig = Rig()
    unretrieved: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, c: unretrieved.append(c))
    running = rig.run()
    sent: list[tuple[str, int, Received]] = []
    for (unknown, lands, failing, lose), cids, moves in plan:
        rig.store.unknown_next, rig.store.unknown_lands = unknown, lands
        rig.store.fail_next = failing
        if lose:
            rig.store.lose()
        for cid in cids:
            n = len(sent) + 1
            item = rig.command(set_interval(cid, 60_000 + n), reply_to="r", correlation_id=str(n))
            sent.append((cid, 60_000 + n, item))
            rig.put(item)
        await turns(rig, moves)
    rig.store.unknown_next = rig.store.fail_next = 0
    await rig.drive(lambda: all(outcome(item) is not None for _, _, item in sent))
    await rig.drive(lambda: not rig.worker._committing.locked())
    await rig.worker.check_before_close()  # the periodic check, come round
    replies = {key: reply for _, key, reply in rig.outbound.replies}
    answered: dict[str, int] = {}
    for n, (cid, interval_ms, item) in enumerate(sent, 1):
        assert outcome(item) == "ack"
        match replies.get(str(n)):
            case SettingsReply(settings=view):
                assert view.interval_ms == interval_ms
                answered[cid] = interval_ms  # in the order sent: ok ones commit in order
            case ErrorReply(code=code, error=error):
                assert code == "store_error"
                event(
                    "refused while another batch was retried"
                    if "not written" in error
                    else "refused"
                )
            case other:
                pytest.fail(f"command {n} answered {other!r}")
    for cid in CIDS:
        assert interval_held(rig.store, cid) == answered.get(cid), (cid, plan)
        conv = rig.core.get(cid)
        assert (None if conv is None else conv.interval_ms) == answered.get(cid), (cid, plan)
    rig.worker.abandon()
    await rig.drive(running.done)
    await running
    await rig.worker.settled()
    assert unretrieved == []


@pytest.mark.xfail(
    strict=True,
    reason="an SQLite file copied over in place under the running worker (a backup put "
    "back) is not noticed: in WAL mode the connection's page cache is trusted while the "
    "log index is unchanged, so the check reads the newer pages; the next commits then "
    "mix both, and the file fails integrity_check",
)
async def test_an_sqlite_file_copied_over_by_an_older_one_is_noticed(tmp_path: Path) -> None:
    path, backup = tmp_path / "warmer.db", tmp_path / "backup.db"
    store = SqliteStore(path)
    await store.open()
    try:
        older = {f"a{n}": b"x" * 100 for n in range(50)}
        await store.commit(older, 1)
        await store.check()  # the log emptied into the file
        shutil.copyfile(path, backup)
        newer = {f"b{n}": b"y" * 100 for n in range(50)}
        await store.commit(newer, 2)
        await store.check()
        shutil.copyfile(backup, path)  # in place, as cp does
        noticed = False
        try:
            await store.check()
        except StoreLost:
            noticed = True
            await store.restore(older | newer, 2)
        await store.commit({"c": b"z"}, 3)
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert noticed


async def test_an_sqlite_disk_full_mid_commit_writes_nothing_and_recovers(tmp_path: Path) -> None:
    # A full volume, as SQLite sees it (max_page_count: SQLITE_FULL half way through the
    # records): a known failure, nothing of the commit written, the file intact.
    path = tmp_path / "warmer.db"
    store = SqliteStore(path)
    await store.open()
    try:
        await store.commit({"kept": b"k"}, 1)
        await store.check()
        conn = store._conn
        assert conn is not None
        (pages,) = await (await conn.execute("PRAGMA page_count")).fetchone()  # type: ignore[misc]
        await conn.execute(f"PRAGMA max_page_count = {pages + 4}")
        big = {f"big-{n}": bytes(3000) for n in range(40)}
        with pytest.raises(StoreError) as failed:
            await store.commit(big, 2)
        assert not failed.value.unknown and "full" in str(failed.value)
        assert len(str(failed.value)) <= 500
        assert (await store.load()).records == {"kept": b"k"}
        await store.check()  # the entry still answers: nothing lost, nothing half written
        await conn.execute("PRAGMA max_page_count = 1073741823")
        await store.commit(big, 2)
        assert (await store.load()).records == {"kept": b"k"} | big
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# -- a disable refused while an enable's outcome is unknown -----------------------------


async def test_a_disable_refused_while_an_enable_is_unknown_leaks_nothing(rig: Rig) -> None:
    rig.store.unknown_next, rig.store.unknown_lands = 10_000, False  # frozen, for now
    enable = rig.command(
        {"type": "set_enabled", "conversationId": "c", "enabled": True},
        reply_to="r",
        correlation_id="enable",
    )
    task = rig.start(enable)
    await rig.drive(lambda: rig.metric("warmer_store_errors_total") >= 2)
    disable = rig.command(
        {"type": "set_enabled", "conversationId": "c", "enabled": False},
        reply_to="r",
        correlation_id="disable",
    )
    look = rig.command(
        {"type": "get_state", "conversationId": "c"}, reply_to="r", correlation_id="look"
    )
    closing = rig.event({"type": "conversation.closed", "conversationId": "c"})
    for item in (disable, look, closing):
        rig.inputs.put(item)
    await rig.drive(lambda: outcome(disable) is not None and outcome(look) is not None)
    replies = {key: reply for _, key, reply in rig.outbound.replies}
    refused = replies["disable"]
    assert isinstance(refused, ErrorReply) and refused.code == "store_error"
    state = replies["look"]
    assert isinstance(state, StateReply)
    assert state.state.enabled is True  # memory: the enable being written, not the disable
    assert outcome(closing) is None and outcome(enable) is None  # both wait
    rig.store.unknown_next = 0
    await rig.drive(task.done)
    await task
    assert isinstance(replies_of(rig)["enable"], SettingsReply)
    record = rig.store.records.get("c")
    assert record is not None and decode_record(record).settings.enabled is True
    assert rig.core.get("c") is not None and rig.core.get("c").enabled is True  # type: ignore[union-attr]
    left = rig.inputs._items.popleft()  # the close, not refused: in its own batch
    assert left is closing
    await rig.batch(left)
    assert outcome(closing) == "ack"


def replies_of(rig: Rig) -> dict[str | None, object]:
    return {key: reply for _, key, reply in rig.outbound.replies}
