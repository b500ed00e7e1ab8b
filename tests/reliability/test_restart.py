"""A real `warmer run` killed (SIGKILL) or stopped (SIGTERM), then a new one on the same store.

docs/semantics.md, addition 3: the schedule survives a crash. Every test runs against both
stores: SQLite in the test's directory and Redis under a key prefix of its own (deleted
afterwards; skipped with the reason when no Redis answers, failed when
``WARMER_REQUIRE_BROKER=1``). The test plays the orchestrator (it receives the warm
requests and answers some of them) and a dashboard (it reads the surface updates).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.integration.probe import Listener, Probe
from tests.reliability.conftest import WorkerProcess, completed, queue_depths
from warmer.bus.topology import COMMAND_ROUTING_KEY

pytestmark = pytest.mark.broker

CID = "c-restart"
START_S = 20.0  # a worker process is up (``worker_started``) within this
LATE_MS = 800  # how late a timer may fire on a busy machine and still count as on time
DOWN_S = 1.5  # how long a killed worker stays down before the next one starts


def now_ms() -> int:
    return int(time.time() * 1000)


# -- the stores and the worker processes ---------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store every worker process of the test shares: SQLite, or Redis (own prefix)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'restart.db'}"
    # tests/conftest.py: skips (or fails in CI) without Redis, deletes the keys afterwards.
    return str(request.getfixturevalue("redis_store_url"))


class Workers:
    """The successive worker processes of one test: one namespace, one store."""

    def __init__(self, spawn: Callable[..., WorkerProcess], env: dict[str, str]) -> None:
        self._spawn = spawn
        self.env = env
        self.current: WorkerProcess | None = None
        self.spawned_at_ms = 0
        """When the current process was started (epoch ms)."""

    async def start(self) -> WorkerProcess:
        """A new worker process, once it consumes (``worker_started``)."""
        self.spawned_at_ms = now_ms()
        worker = self._spawn(**self.env)
        self.current = worker
        await worker.wait_event("worker_started", START_S)
        return worker

    async def kill(self) -> None:
        """SIGKILL the current process: nothing graceful, not even a flush."""
        worker = self._current()
        await asyncio.to_thread(worker.kill)
        code = worker.process.returncode
        assert code == -signal.SIGKILL, f"exit code {code}; log:\n{worker.log()}"

    async def stop(self) -> None:
        """SIGTERM the current process and wait for its graceful exit (code 0)."""
        worker = self._current()
        worker.sigterm()
        code = await worker.wait_exit(15)
        assert code == 0, f"exit code {code} (None: still running); log:\n{worker.log()}"

    async def restart(self) -> dict[str, Any]:
        """Start the next process; its ``state_recovered`` log line."""
        worker = await self.start()
        assert len(worker.named("state_recovered")) == 1, worker.log()
        [recovered] = worker.named("state_recovered")
        return recovered

    def _current(self) -> WorkerProcess:
        assert self.current is not None, "no worker started"
        return self.current


@pytest.fixture
def workers(
    amqp_url: str,
    namespace: str,
    probe: Probe,
    store_url: str,
    spawn_worker: Callable[..., WorkerProcess],
) -> Callable[..., Workers]:
    """``workers(WARMER_X=...)``: worker processes on this test's namespace and store.

    The order of the arguments is the order of teardown, reversed: the processes are
    killed first, then the store's keys and the namespace's topology are deleted.
    """

    def make(**more: str) -> Workers:
        env = {
            "WARMER_AMQP_URL": amqp_url,
            "WARMER_NAMESPACE": namespace,
            "WARMER_STORE": store_url,
            "WARMER_LOG_FORMAT": "json",
            **more,
        }
        return Workers(spawn_worker, env)

    return make


# -- the test's side of the bus ------------------------------------------------------


class Gathered:
    """Every message a listener receives, taken in the background, in arrival order."""

    def __init__(self, listener: Listener) -> None:
        self.messages: list[AbstractIncomingMessage] = []
        self.bodies: list[dict[str, Any]] = []
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._take(listener))

    async def _take(self, listener: Listener) -> None:
        # Stopped by a flag, not by cancelling: Python 3.11's wait_for swallows a
        # cancellation that comes as the message does, and messages may still be flowing.
        while not self._closed:
            try:
                message = await listener.next(0.1)
            except AssertionError:  # nothing within 0.1 s
                continue
            self.messages.append(message)
            self.bodies.append(msgspec.json.decode(message.body))

    async def close(self) -> None:
        self._closed = True
        await asyncio.wait([self._task], timeout=5)

    def of(self, cid: str) -> list[dict[str, Any]]:
        """The bodies about conversation ``cid``, in arrival order."""
        return [b for b in self.bodies if b.get("conversationId") == cid]

    async def quiet(self, for_s: float = 0.5, timeout: float = 10.0) -> None:
        """Wait until nothing arrived for ``for_s`` seconds."""
        deadline = time.monotonic() + timeout
        seen = -1
        while seen != len(self.messages):
            assert time.monotonic() < deadline, f"still receiving after {timeout} s"
            seen = len(self.messages)
            await asyncio.sleep(for_s)


class Requester:
    """Commands whose replies come to one queue of the test's own, by correlation id."""

    def __init__(self, probe: Probe, queue: str, replies: Gathered) -> None:
        self.probe = probe
        self.queue = queue
        self.replies = replies

    def answers(self, correlation_id: str) -> list[dict[str, Any]]:
        """Every reply to ``correlation_id`` so far (replies are at least once)."""
        return [
            body
            for message, body in zip(self.replies.messages, self.replies.bodies, strict=True)
            if message.correlation_id == correlation_id
        ]

    async def send(self, body: dict[str, Any], correlation_id: str | None = None) -> str:
        correlation_id = correlation_id or uuid.uuid4().hex
        await self.probe.send_command(body, reply_to=self.queue, correlation_id=correlation_id)
        return correlation_id

    async def wait(self, correlation_ids: Iterable[str], timeout: float = 15.0) -> None:
        """Wait until each of ``correlation_ids`` has an answer."""
        wanted = set(correlation_ids)
        deadline = time.monotonic() + timeout
        while missing := wanted - {m.correlation_id for m in self.replies.messages}:
            assert time.monotonic() < deadline, f"{len(missing)} commands unanswered"
            await asyncio.sleep(0.05)

    async def ask_all(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send every command at once; their first answers, in the same order."""
        ids = await asyncio.gather(*(self.send(body) for body in bodies))
        await self.wait(ids)
        return [self.answers(i)[0] for i in ids]

    async def states(self, cids: list[str]) -> dict[str, dict[str, Any]]:
        """``get_state`` of every conversation in ``cids``: its ``state``."""
        replies = await self.ask_all([{"type": "get_state", "conversationId": c} for c in cids])
        for reply in replies:
            assert reply["ok"] is True, reply
        return {cid: reply["state"] for cid, reply in zip(cids, replies, strict=True)}


@pytest.fixture
async def gather() -> AsyncIterator[Callable[[Listener], Gathered]]:
    """``gather(listener)``: a ``Gathered`` stopped at the end of the test."""
    made: list[Gathered] = []

    def make(listener: Listener) -> Gathered:
        gathered = Gathered(listener)
        made.append(gathered)
        return gathered

    yield make
    for gathered in made:
        await gathered.close()


@pytest.fixture
async def requester(probe: Probe, gather: Callable[[Listener], Gathered]) -> Requester:
    queue = await probe.channel.declare_queue(exclusive=True, auto_delete=True)
    listener = Listener(queue)
    await listener.start()
    return Requester(probe, queue.name, gather(listener))


async def drained(probe: Probe, timeout: float = 20.0) -> None:
    """Wait until both inbound queues stay empty (consumed and acknowledged) for 0.3 s."""
    deadline = time.monotonic() + timeout
    empty_since: float | None = None
    while True:
        lifecycle, commands, _ = await queue_depths(probe)
        if (lifecycle, commands) == (0, 0):
            empty_since = empty_since or time.monotonic()
            if time.monotonic() - empty_since >= 0.3:
                return
        else:
            empty_since = None
        assert time.monotonic() < deadline, f"queues not drained: {(lifecycle, commands)}"
        await asyncio.sleep(0.1)


async def left_after_kill(probe: Probe) -> tuple[int, int]:
    """Queue depths once the killed worker's consumers are gone (unacked ones returned)."""
    deadline = time.monotonic() + 10
    while True:
        lifecycle, commands, consumers = await queue_depths(probe)
        if consumers == 0:
            return lifecycle, commands
        assert time.monotonic() < deadline, "the killed worker's consumers are still there"
        await asyncio.sleep(0.05)


# -- bodies and small steps ----------------------------------------------------------


def settled(cid: str = CID, **fields: Any) -> dict[str, Any]:
    return {"type": "turn.settled", "conversationId": cid, **fields}


def failed(token: int, error: str, cid: str = CID) -> dict[str, Any]:
    return {"type": "warm.completed", "conversationId": cid, "token": token, "error": error}


async def enable(probe: Probe, surfaces: Listener, interval_ms: int, cid: str = CID) -> None:
    """Set the interval, then enable (which arms); skip their surface updates."""
    reply = await probe.command(
        {"type": "set_interval", "conversationId": cid, "intervalMs": interval_ms}
    )
    assert reply == {"ok": True, "settings": {"enabled": False, "intervalMs": interval_ms}}
    reply = await probe.command({"type": "set_enabled", "conversationId": cid, "enabled": True})
    assert reply == {"ok": True, "settings": {"enabled": True, "intervalMs": interval_ms}}
    update = await surfaces.until(lambda b: b["conversationId"] == cid and b["state"]["enabled"])
    assert update["state"]["status"] == "armed", update


async def settle_and_warm_at_once(
    probe: Probe, surfaces: Listener, warms: Listener, interval_ms: int, **context: Any
) -> dict[str, Any]:
    """Settle with ``lastRequestAt`` one interval ago, so the first warm is due now.

    (Rule 6: the arm is due at max(now, lastRequestAt + interval).) The warm request.
    """
    await probe.event(settled(lastRequestAt=now_ms() - interval_ms, **context))
    warm = await warms.next_body(5)
    assert warm["conversationId"] == CID, warm
    update = await surfaces.until(lambda b: b["state"]["status"] == "warming", 5)
    assert update["state"]["nextWarmAt"] is None, update
    return warm


async def state(probe: Probe, cid: str = CID) -> dict[str, Any]:
    reply = await probe.command({"type": "get_state", "conversationId": cid})
    assert reply["ok"] is True, reply
    return reply["state"]  # type: ignore[no-any-return]


# -- 1 to 5, 7: one conversation, killed at one point of its cycle ---------------------


async def test_an_armed_warm_goes_out_at_its_own_due_time_after_a_crash(
    probe: Probe, workers: Callable[..., Workers]
) -> None:
    interval = 4000
    run = workers()
    await run.start()
    surfaces = await probe.surfaces()
    warms = await probe.warms()
    await enable(probe, surfaces, interval)
    # With a seq: the kill may come before the settle is acknowledged, and its redelivery
    # must then be dropped as stale, not arm the warm again a full interval later.
    await probe.event(settled(cwd="/srv/a", modelName="m", seq=1))
    armed = await surfaces.next_body(5)
    assert armed["state"]["status"] == "armed", armed
    due = armed["state"]["nextWarmAt"]
    assert due == armed["at"] + interval

    await run.kill()
    await asyncio.sleep(DOWN_S)
    recovered = await run.restart()
    assert (recovered["loaded"], recovered["rearmed"]) == (1, 1), recovered
    assert (recovered["awaited"], recovered["warmed_now"], recovered["expired"]) == (0, 0, 0)
    before = await state(probe)
    assert before["status"] == "armed", before
    assert (before["nextWarmAt"], before["intervalMs"]) == (due, interval), before

    # At the due time the settle set, not a full interval after the restart.
    warm = await warms.next_body(interval / 1000 + 5)
    assert warm["conversationId"] == CID
    assert (warm["cwd"], warm["modelName"]) == ("/srv/a", "m"), warm
    assert due <= warm["requestedAt"] <= due + LATE_MS, (due, warm)
    assert warm["requestedAt"] < run.spawned_at_ms + interval, (run.spawned_at_ms, warm)
    after = await state(probe)
    assert after["status"] == "warming" and after["intervalMs"] == interval, after
    await warms.nothing(within=0.3)


async def test_a_warm_out_when_the_worker_died_is_awaited_and_its_completion_applied(
    probe: Probe, workers: Callable[..., Workers]
) -> None:
    interval, timeout = 10_000, 5000
    run = workers(WARMER_WARM_TIMEOUT_MS=str(timeout))
    await run.start()
    surfaces = await probe.surfaces()
    warms = await probe.warms()
    await enable(probe, surfaces, interval)
    warm = await settle_and_warm_at_once(probe, surfaces, warms, interval, cwd="/srv/a")
    token = warm["token"]

    await run.kill()  # the orchestrator is still warming
    recovered = await run.restart()
    assert (recovered["loaded"], recovered["awaited"]) == (1, 1), recovered
    assert (recovered["rearmed"], recovered["warmed_now"], recovered["expired"]) == (0, 0, 0)
    assert recovered["token"] >= token, recovered
    waiting = await state(probe)
    assert waiting["status"] == "warming" and waiting["failures"] == 0, waiting

    await probe.event(completed(token, 800, CID))
    update = await surfaces.until(lambda b: b["state"]["lastPct"] == 80, 5)
    current = update["state"]
    assert current["status"] == "armed", current
    assert (current["failures"], current["lastError"]) == (0, None), current
    assert current["lastWarmAt"] == update["at"]
    assert current["nextWarmAt"] == update["at"] + interval, current

    # The old request's timeout passes: no failure, no retry, no second request for it.
    timed_out_at = warm["requestedAt"] + timeout
    await warms.nothing(within=max(timed_out_at - now_ms(), 0) / 1000 + 0.5)
    after = await state(probe)
    assert after == current, after


async def test_after_a_completion_the_next_warm_is_one_interval_later_with_a_new_token(
    probe: Probe, workers: Callable[..., Workers]
) -> None:
    interval = 4000
    run = workers()
    await run.start()
    surfaces = await probe.surfaces()
    warms = await probe.warms()
    await enable(probe, surfaces, interval)
    first = await settle_and_warm_at_once(probe, surfaces, warms, interval, modelName="m")
    await probe.event(completed(first["token"], 700, CID))
    update = await surfaces.until(lambda b: b["state"]["lastPct"] == 70, 5)
    assert update["state"]["status"] == "armed", update
    due = update["state"]["nextWarmAt"]
    assert due == update["at"] + interval

    await run.kill()
    await asyncio.sleep(DOWN_S)
    recovered = await run.restart()
    assert (recovered["loaded"], recovered["rearmed"]) == (1, 1), recovered
    before = await state(probe)
    assert (before["status"], before["nextWarmAt"], before["lastPct"]) == ("armed", due, 70)

    second = await warms.next_body(interval / 1000 + 5)
    assert second["conversationId"] == CID and second["modelName"] == "m", second
    assert second["token"] > first["token"], (first, second)
    assert due <= second["requestedAt"] <= due + LATE_MS, (due, second)
    assert second["requestedAt"] < run.spawned_at_ms + interval, (run.spawned_at_ms, second)


async def test_a_paused_conversation_stays_paused_after_a_crash(
    probe: Probe, workers: Callable[..., Workers]
) -> None:
    interval = 1500
    run = workers(WARMER_MAX_FAILURES="1")
    await run.start()
    surfaces = await probe.surfaces()
    warms = await probe.warms()
    await enable(probe, surfaces, interval)
    warm = await settle_and_warm_at_once(probe, surfaces, warms, interval)
    await probe.event(failed(warm["token"], "provider overloaded"))
    update = await surfaces.until(lambda b: b["state"]["status"] != "warming", 5)
    paused = update["state"]
    assert paused["status"] == "paused", paused
    assert (paused["failures"], paused["lastError"]) == (1, "provider overloaded"), paused

    await run.kill()
    recovered = await run.restart()
    assert recovered["loaded"] == 1, recovered
    assert (recovered["rearmed"], recovered["awaited"], recovered["warmed_now"]) == (0, 0, 0)
    assert await state(probe) == paused
    await warms.nothing(within=2 * interval / 1000)
    assert await state(probe) == paused


async def test_an_exhausted_budget_stays_exhausted_after_a_crash(
    probe: Probe, workers: Callable[..., Workers]
) -> None:
    interval = 1500
    run = workers(WARMER_IDLE_MAX_WARMS="1")
    await run.start()
    surfaces = await probe.surfaces()
    warms = await probe.warms()
    await enable(probe, surfaces, interval)
    warm = await settle_and_warm_at_once(probe, surfaces, warms, interval)
    await probe.event(completed(warm["token"], 900, CID))
    update = await surfaces.until(lambda b: b["state"]["lastPct"] == 90, 5)
    exhausted = update["state"]
    assert exhausted["status"] == "budget_exhausted", exhausted
    assert exhausted["nextWarmAt"] is None, exhausted

    await run.kill()
    recovered = await run.restart()
    assert recovered["loaded"] == 1, recovered
    assert (recovered["rearmed"], recovered["awaited"], recovered["warmed_now"]) == (0, 0, 0)
    assert await state(probe) == exhausted
    await warms.nothing(within=2 * interval / 1000)
    assert await state(probe) == exhausted


async def test_a_warm_that_fell_due_after_the_cache_expired_waits_for_the_next_turn(
    probe: Probe, workers: Callable[..., Workers]
) -> None:
    interval, ttl = 2000, 1000
    run = workers(WARMER_CACHE_TTL_MS=str(ttl))
    await run.start()
    surfaces = await probe.surfaces()
    warms = await probe.warms()
    await enable(probe, surfaces, interval)
    # With seq: if the kill beats the settle's acknowledgement, its redelivery is stale
    # (the settle is committed), not a fresh settle that arms again after the restart.
    await probe.event(settled(cwd="/srv/a", seq=1))
    armed = await surfaces.next_body(5)
    assert armed["state"]["status"] == "armed", armed
    due = armed["state"]["nextWarmAt"]
    await run.kill()
    assert now_ms() < due, "killed before the warm fell due"

    # Down until the warm is overdue and the cache (read at the settle) is gone.
    await asyncio.sleep((max(due, armed["at"] + ttl) + 300 - now_ms()) / 1000)
    recovered = await run.restart()
    assert (recovered["loaded"], recovered["expired"]) == (1, 1), recovered
    assert (recovered["rearmed"], recovered["awaited"], recovered["warmed_now"]) == (0, 0, 0)
    expired = await state(probe)  # the late-fire guard: shown, not warmed
    assert (expired["status"], expired["nextWarmAt"], expired["enabled"]) == (
        "expired",
        None,
        True,
    ), expired
    await warms.nothing(within=1.0)

    # The next turn arms it again (its last request a moment ago: due soon).
    await probe.event(settled(cwd="/srv/b", seq=2, lastRequestAt=now_ms() - interval + 300))
    rearmed = await surfaces.until(lambda b: b["state"]["status"] == "armed", 5)
    assert rearmed["state"]["nextWarmAt"] >= rearmed["at"], rearmed
    warm = await warms.next_body(5)
    assert (warm["conversationId"], warm["cwd"]) == (CID, "/srv/b"), warm
    assert warm["token"] > recovered["token"], (recovered, warm)


# -- 6: killed in the middle of a stream ----------------------------------------------

EVENT_ONLY = 10  # conversations with events only: never enabled, no timers
EVENTS_EACH = 20
MIXED = 40  # conversations with events and commands, warming at short intervals
COMMANDS_EACH = 8
STREAM_SEED = 20240601
INTERVALS = (1000, 1500, 2500, 60_000, 90_000)
CHUNK = 50  # messages published together, then a short pause: the worker falls behind


class Item(msgspec.Struct, frozen=True):
    """One message of the stream: an event, or a command with its correlation id."""

    kind: str  # "event" or "command"
    body: dict[str, Any]
    correlation_id: str | None = None


def turns(cid: str, count: int) -> list[Item]:
    """``turn.started`` (odd seq) and ``turn.settled`` (even seq), seq 1..count."""
    return [
        Item(
            "event",
            {
                "type": "turn.started" if seq % 2 else "turn.settled",
                "conversationId": cid,
                "seq": seq,
                **({} if seq % 2 else {"cwd": f"/srv/{cid}/{seq}"}),
            },
        )
        for seq in range(1, count + 1)
    ]


def stream_plan(rng: random.Random) -> tuple[list[Item], dict[str, list[Item]]]:
    """The stream, in publish order, and each conversation's items in that order."""
    per_conversation: dict[str, list[Item]] = {}
    for i in range(EVENT_ONLY):
        cid = f"ev-{i:02}"
        per_conversation[cid] = turns(cid, EVENTS_EACH)
    for i in range(MIXED):
        cid = f"mx-{i:02}"
        events = turns(cid, 11 + i % 2)  # some end generating, some idle
        commands = []
        for k in range(COMMANDS_EACH):
            if k % 2 == 0:
                body = {"type": "set_enabled", "conversationId": cid, "enabled": rng.random() < 0.7}
            else:
                body = {"type": "set_interval", "conversationId": cid}
                body["intervalMs"] = rng.choice(INTERVALS)
            commands.append(Item("command", body, f"{cid}:{k}"))
        rng.shuffle(commands)  # still at least one of each kind
        mixed: list[Item] = []
        while events or commands:
            source = events if events and (not commands or rng.random() < 0.6) else commands
            mixed.append(source.pop(0))
        per_conversation[cid] = mixed
    queues = {cid: list(items) for cid, items in per_conversation.items()}
    stream: list[Item] = []
    while queues:
        cid = rng.choice(sorted(queues))
        stream.append(queues[cid].pop(0))
        if not queues[cid]:
            del queues[cid]
    return stream, per_conversation


class StreamPublisher:
    """Publishes the stream in order, with confirms, in chunks; ``published`` counts."""

    def __init__(self, probe: Probe, reply_to: str) -> None:
        self.probe = probe
        self.reply_to = reply_to
        self.published = 0

    async def run(self, stream: list[Item]) -> None:
        lifecycle = await self.probe.channel.get_exchange(self.probe.names.lifecycle)
        commands = await self.probe.channel.get_exchange(self.probe.names.commands)

        async def publish(item: Item) -> None:
            raw = msgspec.json.encode(item.body)
            if item.kind == "event":
                headers = {"conversation-id": item.body["conversationId"]}
                message = aio_pika.Message(raw, content_type="application/json", headers=headers)
                await lifecycle.publish(message, item.body["type"])
            else:
                message = aio_pika.Message(
                    raw,
                    content_type="application/json",
                    reply_to=self.reply_to,
                    correlation_id=item.correlation_id,
                )
                await commands.publish(message, COMMAND_ROUTING_KEY)

        for start in range(0, len(stream), CHUNK):
            chunk = stream[start : start + CHUNK]
            await asyncio.gather(*(publish(item) for item in chunk))
            self.published += len(chunk)
            await asyncio.sleep(0.005)


def possible_values(items: list[Item], index: int, field: str, default: object) -> set[object]:
    """What ``field`` of the persisted settings may read when command ``index`` is applied.

    The value the last command before it set (or the default), or, when a crash made
    the broker deliver commands again, a value a later command set (applied before the
    redelivered one).
    """
    key = "enabled" if field == "enabled" else "intervalMs"
    commands = [item for item in items if item.kind == "command" and key in item.body]
    before = [c for c in commands if items.index(c) < index]
    after = [c for c in commands if items.index(c) > index]
    values = {before[-1].body[key] if before else default}
    values.update(c.body[key] for c in after)
    return values


async def test_a_crash_in_mid_stream_loses_no_answered_command_and_applies_no_event_twice(
    probe: Probe,
    workers: Callable[..., Workers],
    requester: Requester,
    gather: Callable[[Listener], Gathered],
) -> None:
    stream, per_conversation = stream_plan(random.Random(STREAM_SEED))
    command_items = [item for item in stream if item.kind == "command"]
    events = EVENT_ONLY * EVENTS_EACH + sum(11 + i % 2 for i in range(MIXED))
    assert (len(stream) - len(command_items), len(command_items)) == (events, MIXED * COMMANDS_EACH)
    run = workers()
    await run.start()
    surfaces = gather(await probe.surfaces())
    warms = gather(await probe.warms())

    # The stream flows; the worker is killed when a good part of it was applied.
    publisher = StreamPublisher(probe, requester.queue)
    publishing = asyncio.get_running_loop().create_task(publisher.run(stream))
    deadline = time.monotonic() + 15
    while publisher.published < len(stream) * 0.4 or len(surfaces.bodies) < 100:
        assert time.monotonic() < deadline, (publisher.published, len(surfaces.bodies))
        assert not publishing.done(), "the stream ended before the kill: publish more slowly"
        await asyncio.sleep(0.01)
    await run.kill()
    killed_at = now_ms()
    applied_before = len(surfaces.bodies)
    answered_before = len(requester.replies.messages)
    await publishing
    lifecycle_left, commands_left = await left_after_kill(probe)
    assert lifecycle_left + commands_left > 0, "the kill came after the stream was applied"
    assert answered_before > 0 and applied_before > 0

    recovered = await run.restart()
    assert 0 < recovered["loaded"] <= EVENT_ONLY + MIXED, recovered
    await requester.wait([item.correlation_id or "" for item in command_items], 20)
    await drained(probe)
    await surfaces.quiet(0.3)

    # Every command answered, every answer ok, saying what the command set.
    for item in command_items:
        answers = requester.answers(item.correlation_id or "")
        assert answers, item
        for answer in answers:
            assert answer["ok"] is True, (item, answer)
            key = "enabled" if item.body["type"] == "set_enabled" else "intervalMs"
            assert answer["settings"][key] == item.body[key], (item, answer)
            # ... and the other setting as the commands before it left it: none of them
            # lost, even those answered by the killed worker.
            items = per_conversation[item.body["conversationId"]]
            other = "intervalMs" if key == "enabled" else "enabled"
            default = 240_000 if other == "intervalMs" else False
            allowed = possible_values(items, items.index(item), other, default)
            assert answer["settings"][other] in allowed, (item, answer, allowed)

    # The final state: the settings of the last commands, the activity of the last event.
    cids = sorted(per_conversation)
    deadline = time.monotonic() + 5
    while True:
        states = await requester.states(cids)
        wrong = {}
        for cid, got in states.items():
            items = per_conversation[cid]
            last_event = [i for i in items if i.kind == "event"][-1]
            enables = [i.body["enabled"] for i in items if i.body["type"] == "set_enabled"]
            intervals = [i.body["intervalMs"] for i in items if i.body["type"] == "set_interval"]
            want = {
                "enabled": enables[-1] if enables else False,
                "intervalMs": intervals[-1] if intervals else 240_000,
                "active": last_event.body["type"] == "turn.started",
            }
            have = {key: got[key] for key in want}
            if have != want:
                wrong[cid] = (have, want, got["status"])
        if not wrong or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert wrong == {}, wrong

    # Each event applied at most once: the event-only conversations publish one surface
    # per applied event and nothing else (a surface lost with the killed worker is fine).
    counts = Counter(b["conversationId"] for b in surfaces.bodies)
    for i in range(EVENT_ONLY):
        cid = f"ev-{i:02}"
        assert counts[cid] <= EVENTS_EACH, (
            cid,
            counts[cid],
            [s["state"] for s in surfaces.of(cid)],
        )

    # Warming goes on: every conversation left enabled, idle and on a short interval is
    # warmed by the new worker.
    warming = {
        cid
        for cid, got in states.items()
        if got["enabled"] and not got["active"] and got["intervalMs"] <= max(INTERVALS[:3])
    }
    assert warming, "the plan should leave some conversations warming"
    deadline = time.monotonic() + max(INTERVALS[:3]) / 1000 + 5
    while unwarmed := {
        cid for cid in warming if not any(w["requestedAt"] >= killed_at for w in warms.of(cid))
    }:
        assert time.monotonic() < deadline, f"never warmed after the restart: {sorted(unwarmed)}"
        await asyncio.sleep(0.1)

    # Tokens: per conversation strictly growing; one counter, so never one token twice;
    # the new worker's counter starts above every token the killed one issued.
    tokens = [w["token"] for w in warms.bodies]
    assert len(tokens) == len(set(tokens)), sorted(t for t, n in Counter(tokens).items() if n > 1)
    for cid in cids:
        mine = [w["token"] for w in warms.of(cid)]
        assert mine == sorted(set(mine)), (cid, mine)
    before_kill = [w["token"] for w in warms.bodies if w["requestedAt"] <= killed_at]
    assert recovered["token"] >= max(before_kill, default=0), (recovered, before_kill)


# -- 8: closes racing commands, then a graceful restart ---------------------------------

RACED = 100


async def test_closes_racing_commands_leave_a_state_that_survives_a_graceful_restart(
    probe: Probe,
    workers: Callable[..., Workers],
    requester: Requester,
    gather: Callable[[Listener], Gathered],
) -> None:
    run = workers()
    await run.start()
    cids = [f"cl-{i:03}" for i in range(RACED)]

    def v(base: int, i: int) -> int:
        return base + 1000 * i  # distinct per conversation, long: no timer falls due

    # Every conversation enabled and armed (a settled turn).
    replies = await requester.ask_all(
        [
            {"type": "set_interval", "conversationId": cid, "intervalMs": v(600_000, i)}
            for i, cid in enumerate(cids)
        ]
        + [{"type": "set_enabled", "conversationId": cid, "enabled": True} for cid in cids]
    )
    assert all(r["ok"] for r in replies), replies
    await asyncio.gather(*(probe.event(settled(cid)) for cid in cids))
    await drained(probe)
    start = await requester.states(cids)
    assert {s["status"] for s in start.values()} == {"armed"}, start

    # The race: every conversation closed while commands for it are in flight.
    #   kind 0: set_interval, set_interval          -> closed stays closed
    #   kind 1: set_interval, set_enabled true, set_interval -> enabled if after the close
    #   kind 2: set_enabled false, set_interval     -> disabled either way
    surfaces = gather(await probe.surfaces())
    plans: dict[str, list[dict[str, Any]]] = {}
    for i, cid in enumerate(cids):
        first = {"type": "set_interval", "conversationId": cid, "intervalMs": v(300_000, i)}
        last = {"type": "set_interval", "conversationId": cid, "intervalMs": v(400_000, i)}
        enable_true = {"type": "set_enabled", "conversationId": cid, "enabled": True}
        enable_false = {"type": "set_enabled", "conversationId": cid, "enabled": False}
        plans[cid] = [[first, last], [first, enable_true, last], [enable_false, last]][i % 3]
    sent: dict[str, list[str]] = {cid: [] for cid in cids}
    publishes: list[Awaitable[object]] = []
    for step in range(3):
        for cid in cids:
            if step == 1:  # the close goes out among the commands
                publishes.append(
                    probe.event({"type": "conversation.closed", "conversationId": cid})
                )
            if step < len(plans[cid]):
                correlation_id = f"{cid}:{step}"
                sent[cid].append(correlation_id)
                publishes.append(requester.send(plans[cid][step], correlation_id))
    await asyncio.gather(*publishes)
    await requester.wait([i for ids in sent.values() for i in ids], 20)
    await drained(probe)
    await surfaces.quiet(0.5)

    # What is decidable from the outside.
    before = await requester.states(cids)
    for i, cid in enumerate(cids):
        got = before[cid]
        answers = [requester.answers(c) for c in sent[cid]]
        assert all(len(a) == 1 and a[0]["ok"] for a in answers), (cid, answers)
        # The last set_interval answered shows, whatever the close did meanwhile.
        assert got["intervalMs"] == v(400_000, i), (cid, got)
        last_answer = answers[-1][0]["settings"]
        if i % 3 != 1 or last_answer["enabled"] is False:
            # Never re-enabled after the close: closed, and disabled, for good.
            assert (got["enabled"], got["status"]) == (False, "disabled"), (cid, got, answers)
        # The dashboard's last update is the state.
        last_update = surfaces.of(cid)[-1]["state"]
        assert last_update == got, (cid, last_update, got)

    # SIGTERM, and a new worker: the store holds exactly that.
    await run.stop()
    recovered = await run.restart()
    armed = sum(1 for s in before.values() if s["status"] == "armed")
    assert recovered["loaded"] == RACED, recovered
    assert recovered["rearmed"] == armed, (recovered, armed)
    assert (recovered["awaited"], recovered["warmed_now"], recovered["expired"]) == (0, 0, 0)
    after = await requester.states(cids)
    assert after == before
