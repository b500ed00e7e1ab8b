"""RedisStore against a real Redis: its keys, one round trip per commit, and every way it fails.

What every back end does is in tests/unit/test_store_contract.py. Each test has a key
prefix of its own (``redis_store_url``, tests/conftest.py), deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import redis.asyncio
from structlog.testing import capture_logs

from tests.redis_server import HoldingProxy, redis_server
from warmer.store import (
    Loaded,
    RedisShared,
    RedisStore,
    StoreError,
    StoreFenced,
    StoreLost,
    StoreOutcomeUnknown,
    open_store,
)
from warmer.store.base import WRITERS_KEPT

T = TypeVar("T")


def awaitable(reply: Awaitable[T] | T) -> Awaitable[T]:
    """A command's reply, as the asyncio client gives it: redis-py types both clients' at once."""
    assert inspect.isawaitable(reply)
    return reply


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the same database, to look at (and break) the keys."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_store_url: str) -> AsyncIterator[RedisStore]:
    opened = RedisStore(redis_store_url)
    await opened.open()
    yield opened
    await opened.close()


def assert_one_line(error: StoreError, *words: str) -> None:
    message = str(error)
    assert "\n" not in message
    for word in words:
        assert word in message, message


async def test_open_store_opens_a_redis_store(redis_store_url: str, redis_prefix: str) -> None:
    store = open_store(redis_store_url)
    assert isinstance(store, RedisStore)
    await store.open()
    try:
        await store.commit({"c-1": b"one"}, 1)
        assert await store.load() == Loaded(records={"c-1": b"one"}, settings={}, token=1)
    finally:
        await store.close()
    assert store.records_key == f"{redis_prefix}:conversations"


async def test_the_keys_are_one_hash_and_one_token(
    store: RedisStore, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    await store.commit({"c-1": b"\x00one", "c-2": b"two"}, 7)
    await store.commit({"c-2": None}, 3)
    assert await awaitable(raw.hgetall(f"{redis_prefix}:conversations")) == {b"c-1": b"\x00one"}
    assert await raw.get(f"{redis_prefix}:token") == b"7"
    keys = {key async for key in raw.scan_iter(match=f"{redis_prefix}*")}
    names = ("conversations", "token", "writers")
    assert keys == {f"{redis_prefix}:{name}".encode() for name in names}
    entry = await awaitable(raw.hget(f"{redis_prefix}:writers", store.writer))
    assert entry is not None and int(entry) > 0


async def test_the_prefix_defaults_to_warmer(redis_url: str) -> None:
    store = RedisStore(redis_url)
    assert (store.records_key, store.token_key) == ("warmer:conversations", "warmer:token")


async def test_prefixes_keep_stores_apart(redis_url: str, redis_prefix: str) -> None:
    first = RedisStore(f"{redis_url}?prefix={redis_prefix}:a")
    second = RedisStore(f"{redis_url}?prefix={redis_prefix}:b")
    await first.open()
    await second.open()
    try:
        await first.commit({"c-1": b"first"}, 5)
        assert await second.load() == Loaded(records={}, settings={}, token=0)
    finally:
        await first.close()
        await second.close()


async def test_a_commit_is_one_round_trip(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert store._client is not None
    sent: list[object] = []
    execute = cast(Callable[..., Awaitable[Any]], store._client.execute_command)

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(args[0])
        return await execute(*args, **options)

    monkeypatch.setattr(store._client, "execute_command", counting)
    await store.commit({f"c-{n}": bytes(120) for n in range(256)} | {"gone": None}, 9)
    assert sent == ["EVALSHA"]


async def test_the_script_is_loaded_again_after_a_flush(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    await raw.script_flush()
    await store.commit({"c-1": b"one"}, 1)
    assert (await store.load()).records == {"c-1": b"one"}


async def test_load_reads_the_hash_in_chunks(
    redis_store_url: str, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = {f"c-{n}": n.to_bytes(2, "big") for n in range(1000)}
    await store.commit(records, 1)
    small = RedisStore(redis_store_url, scan_count=50)
    await small.open()
    try:
        assert small._client is not None
        scans = 0
        hscan = small._client.hscan

        async def counting(*args: Any, **options: Any) -> Any:
            nonlocal scans
            scans += 1
            return await hscan(*args, **options)

        monkeypatch.setattr(small._client, "hscan", counting)
        assert (await small.load()).records == records
        assert scans >= 1000 // 50 // 2
    finally:
        await small.close()


async def test_close_lets_issued_commits_finish(redis_store_url: str) -> None:
    store = RedisStore(redis_store_url)
    await store.open()
    commits = [asyncio.create_task(store.commit({f"c-{n}": b"x"}, n)) for n in range(20)]
    await asyncio.sleep(0)
    await store.close()
    await asyncio.gather(*commits)
    again = RedisStore(redis_store_url)
    await again.open()
    try:
        assert len((await again.load()).records) == 20
    finally:
        await again.close()


async def test_calls_before_open_and_after_close_raise_store_error(redis_store_url: str) -> None:
    store = RedisStore(redis_store_url)
    with pytest.raises(StoreError, match="not open"):
        await store.load()
    await store.open()
    await store.open()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.commit({"c-1": b"one"}, 1)


# Keys that hold something else: StoreError, one line, naming the key; nothing written


async def test_a_records_key_of_another_type(
    store: RedisStore, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    await awaitable(raw.rpush(f"{redis_prefix}:conversations", b"a list"))
    with pytest.raises(StoreError) as at_load:
        await store.load()
    assert_one_line(at_load.value, f"{redis_prefix}:conversations", store.url)
    with pytest.raises(StoreError) as at_commit:
        await store.commit({"c-1": b"one"}, 5)
    assert_one_line(at_commit.value, f"{redis_prefix}:conversations holds a list, not a hash")
    assert await raw.get(f"{redis_prefix}:token") is None


@pytest.mark.parametrize("kind", ["list", "hash"])
async def test_a_token_key_of_another_type(
    store: RedisStore, raw: redis.asyncio.Redis, redis_prefix: str, kind: str
) -> None:
    token_key = f"{redis_prefix}:token"
    if kind == "list":
        await awaitable(raw.rpush(token_key, b"1"))
    else:
        await awaitable(raw.hset(token_key, "token", "1"))
    with pytest.raises(StoreError) as at_load:
        await store.load()
    assert_one_line(at_load.value, token_key)
    with pytest.raises(StoreError) as at_commit:
        await store.commit({"c-1": b"one"}, 5)
    assert_one_line(at_commit.value, f"{token_key} holds a {kind}, not a token")
    assert await raw.exists(f"{redis_prefix}:conversations") == 0


@pytest.mark.parametrize("value", [b"soon", b"-5", b"1.5", b"007", b"9223372036854775808", b""])
async def test_a_token_that_is_not_a_token(
    store: RedisStore, raw: redis.asyncio.Redis, redis_prefix: str, value: bytes
) -> None:
    await raw.set(f"{redis_prefix}:token", value)
    with pytest.raises(StoreError) as at_load:
        await store.load()
    assert_one_line(at_load.value, f"{redis_prefix}:token holds")
    with pytest.raises(StoreError) as at_commit:
        await store.commit({"c-1": b"one"}, 5)
    assert_one_line(at_commit.value, f"{redis_prefix}:token holds")
    assert await raw.exists(f"{redis_prefix}:conversations") == 0


async def test_a_conversation_id_that_is_not_utf8(
    store: RedisStore, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    await awaitable(raw.hset(f"{redis_prefix}:conversations", mapping={b"\xff\xfe": b"record"}))
    with pytest.raises(StoreError) as raised:
        await store.load()
    assert_one_line(raised.value, "not UTF-8")


# A Redis that is not there, does not answer, or refuses us: the URL shown, the password not


async def _unused_port() -> int:
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


async def test_open_fails_when_nothing_listens() -> None:
    port = await _unused_port()
    store = RedisStore(f"redis://warmer:s3cret-pass@127.0.0.1:{port}/0")
    started = time.monotonic()
    with pytest.raises(StoreError) as raised:
        await store.open()
    assert time.monotonic() - started < 5
    assert_one_line(raised.value, f"redis://warmer:***@127.0.0.1:{port}/0", "ConnectionError")
    assert "s3cret" not in str(raised.value)
    with pytest.raises(StoreError, match="not open"):
        await store.load()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_open_fails_when_redis_does_not_answer() -> None:
    async with silent_server() as port:
        store = RedisStore(f"redis://:s3cret-pass@127.0.0.1:{port}/0", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(StoreError) as raised:
            await store.open()
        assert time.monotonic() - started < 3
    assert_one_line(raised.value, f"redis://:***@127.0.0.1:{port}/0", "Timeout")
    assert "s3cret" not in str(raised.value)


async def test_a_wrong_password_is_a_store_error_without_it(redis_url: str) -> None:
    host = redis_url.split("://", 1)[1].rpartition("@")[2]
    store = RedisStore(f"redis://nobody-here:s3cret-pass@{host}")
    with pytest.raises(StoreError) as raised:
        await store.open()
    assert_one_line(raised.value, "redis://nobody-here:***@", "Error")
    assert "s3cret" not in str(raised.value)


# The writer's entry: lost data noticed, late copies ignored, outcomes known or not


async def test_a_late_copy_of_an_older_commit_changes_nothing(store: RedisStore) -> None:
    await store.commit({"c-1": b"one"}, 1)
    sent = store._sent
    await store.commit({"c-1": b"two", "c-2": b"two"}, 2)
    # The first commit again, as a copy held up in the network would arrive after the second.
    async with store._commits:
        await store._run({"c-1": b"one", "c-2": None}, 1, entry=str(sent), expected="")
    assert (await store.load()).records == {"c-1": b"two", "c-2": b"two"}
    await store.check()


async def test_a_store_gone_back_in_time_is_lost(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    await store.commit({"c-1": b"one"}, 1)
    before = await awaitable(raw.hget(store.writers_key, store.writer))
    await store.commit({"c-1": b"two"}, 2)
    # An older copy of the data (a snapshot restored): the entry is behind the last commit.
    assert before is not None
    await awaitable(raw.hset(store.writers_key, mapping={store.writer: before}))
    await awaitable(raw.hset(store.records_key, mapping={"c-1": b"one"}))
    with pytest.raises(StoreLost, match="lost writer"):
        await store.check()
    with pytest.raises(StoreLost):
        await store.commit({"c-2": b"new"}, 3)
    assert (await store.load()).records == {"c-1": b"one"}


async def test_close_forgets_the_writer_and_open_keeps_the_most_recent_writers(
    redis_store_url: str, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    writers_key = f"{redis_prefix}:writers"
    await awaitable(raw.hset(writers_key, mapping={f"old-{n}": str(n) for n in range(300)}))
    store = RedisStore(redis_store_url)
    await store.open()
    entries = await awaitable(raw.hgetall(writers_key))
    assert len(entries) == WRITERS_KEPT
    assert store.writer.encode() in entries
    assert b"old-299" in entries and b"old-44" not in entries
    await store.close()
    assert store.writer.encode() not in await awaitable(raw.hgetall(writers_key))


async def test_open_warns_when_the_server_keeps_nothing(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as server:
        store = RedisStore(server.url)
        with capture_logs() as logs:
            await store.open()
        await store.close()
    warned = [log for log in logs if log["event"] == "store_not_persistent"]
    assert warned and warned[0]["loses"] == "everything", logs


async def test_open_says_nothing_is_wrong_with_an_append_only_file(tmp_path: Path) -> None:
    async with redis_server(tmp_path, appendonly=True) as server:
        store = RedisStore(server.url)
        with capture_logs() as logs:
            await store.open()
        await store.close()
    assert "store_not_persistent" not in [log["event"] for log in logs]
    assert "store_persistence" in [log["event"] for log in logs]


async def test_a_refused_connection_is_known_not_to_have_written(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as server:
        store = RedisStore(server.url, timeout=0.5, connect_timeout=0.5)
        await store.open()
        await store.commit({"c-1": b"one"}, 1)
        await server.stop()
        for _ in range(2):
            # redis-py finds the pooled connection closed before it sends on it.
            with pytest.raises(StoreError) as raised:
                await store.commit({"c-1": b"two"}, 2)
            assert not raised.value.unknown, raised.value
            assert not isinstance(raised.value, StoreOutcomeUnknown)
        await store.close()


async def test_a_frozen_redis_leaves_the_outcome_unknown_and_a_restart_lost_data(
    tmp_path: Path,
) -> None:
    async with redis_server(tmp_path) as server:
        store = RedisStore(server.url, timeout=0.3, connect_timeout=0.3)
        await store.open()
        await store.commit({"c-1": b"one"}, 1)
        server.freeze()
        started = time.monotonic()
        with pytest.raises(StoreOutcomeUnknown):
            await store.commit({"c-1": b"two"}, 2)
        assert time.monotonic() - started < 1.5
        server.thaw()
        # The write landed once Redis went on: sending it again is safe, and says so.
        await store.commit({"c-1": b"two"}, 2)
        assert (await store.load()).records == {"c-1": b"two"}
        await server.restart()
        with pytest.raises(StoreLost):
            await store.check()
        with pytest.raises(StoreLost):
            await store.commit({"c-1": b"three"}, 3)
        await store.restore({"c-1": b"two"}, 2)
        await store.commit({"c-1": b"three"}, 3)
        assert (await store.load()).records == {"c-1": b"three"}
        await store.close()


async def test_a_commit_delivered_late_by_the_network_never_undoes_a_later_one(
    tmp_path: Path,
) -> None:
    async with redis_server(tmp_path) as server:
        proxy = HoldingProxy(server.port)
        await proxy.start()
        store = RedisStore(proxy.url, timeout=0.3, connect_timeout=0.3)
        try:
            await store.open()
            await store.commit({"c-1": b"one"}, 1)
            proxy.hold()
            with pytest.raises(StoreOutcomeUnknown):
                await store.commit({"c-1": b"two", "c-2": b"two"}, 2)
            # The worker sends the same changes again (on a new connection), then goes on.
            await store.commit({"c-1": b"two", "c-2": b"two"}, 2)
            await store.commit({"c-1": b"three", "c-2": None}, 3)
            await proxy.release()  # the first copy of "two" reaches Redis now
            assert (await store.load()).records == {"c-1": b"three"}
            await store.check()
        finally:
            await store.close()
            await proxy.close()


async def test_shards_and_their_owners_are_keys_beside_shard_0_s(
    redis_store_url: str, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    shared = RedisShared(redis_store_url)
    await shared.open()
    zero, three = shared.shard(0, "pod-a"), shared.shard(3, "pod b")
    try:
        await zero.open()
        await three.open()
        await zero.commit({"c-0": b"zero"}, 2)
        await three.commit({"c-3": b"three"}, 5)
        await shared.set_layout(4)
        await shared.beat("pod-a", "host a", 60_000)
        assert await awaitable(raw.hgetall(f"{redis_prefix}:conversations")) == {b"c-0": b"zero"}
        assert await awaitable(raw.hgetall(f"{redis_prefix}:conversations:3")) == {b"c-3": b"three"}
        assert await raw.get(f"{redis_prefix}:token") == b"5"
        assert await raw.get(f"{redis_prefix}:layout") == b"4"
        owner = cast(bytes | None, await awaitable(raw.hget(f"{redis_prefix}:owners", "3")))
        assert owner is not None
        epoch, since, released, replica = owner.split(b" ", 3)
        assert (int(epoch), released, replica) == (three.epoch, b"0", b"pod b")
        assert abs(int(since) - time.time() * 1000) < 60_000
        seen = cast(bytes | None, await awaitable(raw.hget(f"{redis_prefix}:replicas", "pod-a")))
        assert seen is not None and seen.endswith(b" host a")
        keys = {key async for key in raw.scan_iter(match=f"{redis_prefix}*")}
        names: tuple[str, ...] = ("conversations", "conversations:3", "token", "writers", "owners")
        names += ("layout", "replicas")
        assert keys == {f"{redis_prefix}:{name}".encode() for name in names}
    finally:
        await zero.close()
        await three.close()
        await shared.close()
    owner = cast(bytes | None, await awaitable(raw.hget(f"{redis_prefix}:owners", "3")))
    assert owner is not None and owner.split(b" ")[2] == b"1"  # released, epoch kept


async def test_a_fenced_commit_is_refused_inside_the_script_before_any_write(
    redis_store_url: str, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    shared = RedisShared(redis_store_url)
    await shared.open()
    first, second = shared.shard(1, "a"), shared.shard(1, "b")
    try:
        await first.open()
        await second.open()
        # Straight to the script: no check on this side of the wire decides it.
        with pytest.raises(StoreFenced) as fenced:
            async with first._commits:
                await first._run({"c": b"late"}, 99, entry=str(first._next()), expected="")
        assert_one_line(fenced.value, "WARMERFENCED", str(second.epoch))
        assert await awaitable(raw.hgetall(f"{redis_prefix}:conversations:1")) == {}
        assert await raw.get(f"{redis_prefix}:token") is None
    finally:
        await first.close()
        await second.close()
        await shared.close()
