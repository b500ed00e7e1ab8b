"""Recovery at start: 100,000 and 1,000,000 persisted conversations, SQLite, Redis and
PostgreSQL.

For each store (SQLite, Redis, PostgreSQL: a schema of its own, dropped afterwards) and
size, one process writes N records straight into the store in one commit; a fresh process
then times what ``App.start`` does before it connects: load, decode every record, build
the core, ``begin`` + ``recover``, commit what recovery touched, arm the scheduler.
Separate processes keep the figures apart: the RSS growth is the recovering process's
own, measured from just after its imports.

The records are a realistic mix: 60% enabled and armed (due within their interval), 10%
warming (a warm out, its timeout still running), 10% paused after three failures, 20%
disabled; UUID-like ids, a ``cwd`` of about 30 characters, a model name, a last turn's
figures. Some sizes only: ``python -m bench.recovery 1000000``; after a still store:
``BENCH_RECOVERY_PAUSE_MS=7200000 python -m bench.recovery 1000000``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import redis.asyncio

from warmer.app import RECOVERY_CHUNK
from warmer.clock import SystemClock
from warmer.core import Policy, Record, Settings, Status, Warmer, parse_settings
from warmer.core.records import RecordError, decode_record, encode_record
from warmer.core.rules import token_start
from warmer.core.state import Conversation
from warmer.observe.log import configure_logging
from warmer.scheduler import Scheduler
from warmer.store import open_store

ESTIMATE_S: Final = 75.0
SIZES: Final = (100_000, 1_000_000)
STORES: Final = ("sqlite", "redis", "postgres")
TARGET_S: Final = 5.0
WRITE_TIMEOUT_MS: Final = 600_000
REDIS_URL: Final = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL: Final = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
_INTERVALS: Final = (240_000, 300_000, 600_000)
_MODELS: Final = ("claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5")


def _conversation_id(i: int) -> str:
    tail = (i * 0x9E3779B97F4A7C15) % (1 << 48)
    return f"{i:08x}-7f3a-4c2e-9b1d-{tail:012x}"


def _record(i: int, now: int) -> Record:
    """Conversation ``i``'s record as the worker would have left it at ``now``."""
    kind = i % 10  # 0-5 armed, 6 warming, 7 paused, 8-9 disabled
    interval = _INTERVALS[i % 3]
    enabled = kind < 8
    token = now * 1000 - i
    base = Conversation(
        enabled=enabled,
        interval_ms=interval,
        idle_since=now - 60_000 - i % 600_000,
        token=token,
        answered_token=token - 1,
        last_pct=97,
        last_expected_pct=98,
        last_warm_at=now - 90_000,
        last_read_at=now - 90_000,
        cwd=f"/home/dev{i % 100:02d}/projects/service-{i % 997:03d}",
        model_name=_MODELS[i % 3],
        last_seq=2 * (i % 50) + 2,
        idle_warms=i % 4,
        published_at=now - 90_000,
        timeout_ms=60_000,
        last_input_at=now - 90_000,
    )
    if kind < 6:
        base.phase = Status.ARMED
        # Armed at most one interval ago, as a running worker leaves it (one due further
        # ahead was armed on a time line ahead of this run's: recovery moves it earlier).
        base.next_warm_at = now + 1_000 + (i * 7919) % (interval - 1_000)
    elif kind == 6:
        base.phase = Status.WARMING
        base.published_at = now - 5_000
    elif kind == 7:
        base.phase = Status.PAUSED
        base.failures = 3
        base.last_error = "no completion within 60 s"
    return Record(settings=Settings(enabled=enabled, interval_ms=interval), state=base)


def store_url(store: str, n: int, directory: str) -> str:
    """Where the case of ``store`` and ``n`` keeps its records."""
    if store == "sqlite":
        return f"sqlite:///{directory}/recovery-{n}.db"
    if store == "postgres":
        return f"{POSTGRES_URL}?schema=bench_recovery_{os.getpid()}_{n}"
    return f"{REDIS_URL}?prefix=bench-recovery-{os.getpid()}-{n}"


async def write(url: str, n: int) -> float:
    """Write ``n`` records into the store at ``url`` in one commit; the seconds it took.

    With ``BENCH_RECOVERY_PAUSE_MS`` the records are left that long before the recovery
    (a store that was still: a restart after downtime, which also moves every last input
    on by the pause, decision 83)."""
    now = SystemClock().now_ms() - int(os.environ.get("BENCH_RECOVERY_PAUSE_MS", "0"))
    changes: dict[str, bytes | None] = {
        _conversation_id(i): encode_record(_record(i, now)) for i in range(n)
    }
    store = open_store(url, timeout_ms=WRITE_TIMEOUT_MS)  # one commit of every record
    await store.open()
    started = time.perf_counter()
    await store.commit(changes, now * 1000)
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed


def _decoded(records: dict[str, bytes]) -> Iterator[tuple[str, Record]]:
    """``App._decoded``: each record decoded as its bytes are dropped."""
    for cid in list(records):
        try:
            yield cid, decode_record(records.pop(cid))
        except RecordError as exc:
            raise SystemExit(f"unreadable record {cid!r}: {exc}") from exc


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ignore(key: str, token: int) -> None:
    """The scheduler's callback: nothing falls due while the benchmark runs."""


async def recover(url: str) -> dict[str, float]:
    """Time each step of ``App._recovered_core`` and the arming in ``App.start``."""
    rss_before = _rss_bytes()
    phases: dict[str, float] = {}
    mark = started = time.perf_counter()
    cpu_mark = cpu_started = time.process_time()

    def lap(name: str) -> None:
        """The phase's wall time, and its CPU time (this process's own: on a shared
        machine the wall time also counts the others' jobs)."""
        nonlocal mark, cpu_mark
        now, cpu = time.perf_counter(), time.process_time()
        phases[f"{name}_s"] = now - mark
        phases[f"{name}_cpu_s"] = cpu - cpu_mark
        mark, cpu_mark = now, cpu

    clock = SystemClock()
    store = open_store(url)
    await store.open()
    loaded = await store.load()
    lap("load")
    core = Warmer(
        Policy(),
        records=_decoded(loaded.records),  # as App.start does: each record's bytes dropped
        adopt=True,
        settings={cid: parse_settings(raw) for cid, raw in loaded.settings.items()},
        token_start=loaded.token,
    )
    now = clock.now_ms()
    core.tokens_from(token_start(loaded.token, now))
    lap("decode_core")
    core.begin()
    recovery = core.recover(now)
    lap("recover")
    changes = {
        cid: None if record is None else encode_record(record)
        for cid, record in core.touched().items()
    }
    items = list(changes.items())  # as App._commit_recovery does, a chunk at a time
    for first in range(0, max(len(items), 1), RECOVERY_CHUNK):
        await store.commit(dict(items[first : first + RECOVERY_CHUNK]), core.last_token)
    core.end()
    lap("commit")
    scheduler = Scheduler(clock, _ignore)
    scheduler.arm_many((arm.conversation_id, arm.due_at, arm.token) for arm in recovery.arms)
    scheduler.start()
    lap("arm")
    phases["total_s"] = time.perf_counter() - started
    phases["total_cpu_s"] = time.process_time() - cpu_started
    phases["rss_growth_mb"] = (_rss_bytes() - rss_before) / 2**20
    phases["armed"] = float(len(scheduler))
    phases["touched"] = float(len(changes))
    # What the running worker keeps: the loaded bytes and decoded records are garbage once
    # App.start returns (freed memory the allocator keeps still counts in RSS).
    del loaded, changes, recovery
    gc.collect()
    phases["rss_kept_mb"] = (_rss_bytes() - rss_before) / 2**20
    phases["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    await scheduler.stop()
    await store.close()
    return phases


async def _drop_redis_keys(url: str) -> None:
    prefix = url.partition("?prefix=")[2]
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.unlink(f"{prefix}:conversations", f"{prefix}:token")
    finally:
        await client.aclose()


def _drop_postgres_schema(url: str) -> None:
    import asyncpg  # only with the postgres case

    async def drop() -> None:
        schema = url.partition("?schema=")[2]
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def _child(*args: str) -> str:
    argv = [sys.executable, "-m", "bench.recovery", *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def case(store: str, n: int, directory: str) -> dict[str, float]:
    """Write ``n`` records into ``store``, time their recovery in a fresh process, clean up."""
    url = store_url(store, n, directory)
    try:
        figures = {"write_s": float(_child("write", url, str(n)))}
        figures.update(json.loads(_child("recover", url)))
    finally:
        if store == "redis":
            asyncio.run(_drop_redis_keys(url))
        elif store == "postgres":
            _drop_postgres_schema(url)
        else:
            Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    return figures


def run(sizes: tuple[int, ...] = SIZES, stores: tuple[str, ...] = STORES) -> dict[str, float]:
    """Every store at every size (about a minute, most of it writing and recovering
    1,000,000)."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as directory:
        for n in sizes:
            for store in stores:
                for name, value in case(store, n, directory).items():
                    figures[f"{store}_{n}.{name}"] = value
    figures["target_total_s_at_1m"] = TARGET_S
    return figures


def _main(argv: list[str]) -> None:
    """``write URL N`` and ``recover URL`` are the child processes; ``[N ...] [STORE ...]``
    runs some sizes and stores only (``1000000 sqlite``)."""
    configure_logging("json", "warning")  # the store's info lines would fill stdout
    if argv and argv[0] == "write":
        print(asyncio.run(write(argv[1], int(argv[2]))))
    elif argv and argv[0] == "recover":
        print(json.dumps(asyncio.run(recover(argv[1]))))
    else:
        parser = argparse.ArgumentParser(
            prog="python -m bench.recovery",
            description="Start-up with N stored conversations, per store.",
        )
        parser.add_argument(
            "cases", nargs="*", help=f"sizes and stores ({', '.join(STORES)}); all by default"
        )
        cases = parser.parse_args(argv).cases
        sizes = tuple(int(arg) for arg in cases if arg.isdigit()) or SIZES
        stores = tuple(arg for arg in cases if not arg.isdigit()) or STORES
        for name, value in run(sizes, stores).items():
            print(f"{name:<36} {value:>12,.3f}")


if __name__ == "__main__":
    _main(sys.argv[1:])
