"""Pass-through: lifecycle events per second, the worker against a bare aio-pika consumer
and an idiomatic FastStream subscriber.

One stream of 20,000 events (``turn.started``, ``turn.settled`` with ``cwd`` and model,
``warm.completed`` with usage, in sweeps over 1,000 conversations) is published into a
full queue while its consumer is stopped, then timed from the moment the broker shows the
consumer until the last output is routed. Both contenders publish one message per event
to an exchange with one counting queue bound (never consumed: its depth is the count):

- worker: ``python -m warmer run`` with a SQLite store in a temporary directory; the
  conversations are opted in first (``set_enabled``, then a 30-minute interval: no warm
  falls due during the run, and every event is applied, so one ``surface.changed`` each);
- bare: ``python -m bench.bare_consumer`` on a quorum queue with the worker's inbound
  arguments, prefetch 256: ``json.loads``, one persistent publish with its confirm
  awaited, ``ack``, per message;
- faststream: ``python -m bench.faststream_consumer``, the same queue and prefetch, a
  ``RabbitBroker`` with one ``@broker.subscriber``: the body decoded by FastStream, one
  persistent ``broker.publish`` with its confirm awaited, acknowledged by FastStream
  (skipped, and said so, when FastStream is not installed: it comes with the ``dev`` extra).

Rounds alternate worker, bare, faststream, worker, bare, faststream...; each has
namespaces of its own, deleted afterwards. After each round the contender is stopped and
its input queue must be empty.
``python -m bench.passthrough [rounds] [events]``; ``BENCH_PT_CONTENDERS=worker,bare``
races only those, ``BENCH_WARMER_LOOP=uvloop`` runs the worker on uvloop; with
``BENCH_PY_SPY=/tmp/worker`` each timed worker is sampled by py-spy (``pip install
py-spy``) into ``/tmp/worker-<tag>.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, NamedTuple

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from warmer.bus.topology import (
    COMMAND_ROUTING_KEY,
    SURFACE_ROUTING_KEY,
    Names,
    declare,
    delete,
    inbound_queue_arguments,
)
from warmer.contract import (
    LifecycleEvent,
    SetEnabled,
    SetInterval,
    TurnSettled,
    TurnStarted,
    Usage,
    WarmCompleted,
    encode,
)

AMQP_URL: Final = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
EVENTS: Final = 12_000
"""Per round: enough for a steady rate (FastStream takes ~17 s for them), few enough that
`make bench` stays under 15 minutes."""
CONVERSATIONS: Final = 1_000
ROUNDS: Final = 3
TARGET_RATIO: Final = 1.5
ESTIMATE_S: Final = 130.0
"""Three rounds of three contenders here; FastStream's rounds take about half of it."""
INTERVAL_MS: Final = 1_800_000  # inside the 45-minute idle budget, far beyond the run
_POLL_S: Final = 0.005
_DEADLINE_S: Final = 180.0
_USAGE: Final = Usage(
    input_tokens=48_000, cache_read_tokens=47_200, cache_write_tokens=800, output_tokens=1
)
_JSON: Final = "application/json"
_KINDS: Final = ("turn.started", "turn.settled", "warm.completed")  # the routing keys

Stream = list[tuple[str, bytes]]
"""Routing key and body of each message, in publish order."""


def _ids(conversations: int) -> list[str]:
    return [f"conv-{i:06d}-7f3a9c2e" for i in range(conversations)]


def lifecycle_stream(events: int, conversations: int) -> Stream:
    """Sweeps over the conversations: started, settled, completed, started, ..."""
    ids, now = _ids(conversations), time.time_ns() // 1_000_000
    stream: Stream = []
    for k in range(events):
        sweep, cid = divmod(k, conversations)
        at = now + k
        kind = sweep % 3
        if kind == 0:
            event: LifecycleEvent = TurnStarted(conversation_id=ids[cid], seq=sweep + 1, at=at)
        elif kind == 1:
            event = TurnSettled(
                conversation_id=ids[cid],
                cwd=f"/home/dev/projects/service-{cid % 97:03d}",
                model_name="claude-sonnet-4-5",
                last_request_at=at - 1_500,
                seq=sweep + 1,
                at=at,
            )
        else:
            event = WarmCompleted(conversation_id=ids[cid], usage=_USAGE, at=at)
        stream.append((_KINDS[kind], encode(event)))
    return stream


def opt_in_stream(conversations: int) -> Stream:
    """Every conversation enabled, then given the long interval: one surface each."""
    enable = [SetEnabled(conversation_id=cid, enabled=True) for cid in _ids(conversations)]
    interval = [
        SetInterval(conversation_id=cid, interval_ms=INTERVAL_MS) for cid in _ids(conversations)
    ]
    return [(COMMAND_ROUTING_KEY, encode(c)) for c in [*enable, *interval]]


async def publish(exchange: AbstractExchange, stream: Stream) -> None:
    """Publish persistently with confirms, 500 in flight at a time."""
    for start in range(0, len(stream), 500):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        body, content_type=_JSON, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                    ),
                    key,
                )
                for key, body in stream[start : start + 500]
            )
        )


async def _depth(channel: AbstractChannel, queue: str) -> tuple[int, int]:
    """Ready messages and consumers of ``queue``, as the broker answers a passive declare."""
    declared = await channel.declare_queue(queue, passive=True)
    result = declared.declaration_result
    return result.message_count or 0, result.consumer_count or 0


async def _until(
    check: Callable[[], Awaitable[bool]], process: subprocess.Popen[bytes], what: str
) -> float:
    """Poll ``check`` until true; the perf_counter time it first was. Fails if ``process`` ends."""
    deadline = time.perf_counter() + _DEADLINE_S
    while not await check():
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the contender exited with {process.returncode}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{what}: not within {_DEADLINE_S} s")
        await asyncio.sleep(_POLL_S)
    return time.perf_counter()


class Run(NamedTuple):
    """One contender's timed run."""

    events_per_s: float
    cpu_us_per_event: float
    """The contender process's CPU time (user + system) per event: steadier than the rate
    on a shared machine, and what an optimisation of the worker moves."""


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _timed(
    channel: AbstractChannel,
    process: subprocess.Popen[bytes],
    inbound: str,
    counter: str,
    events: int,
) -> Run:
    """From the consumer's appearance on ``inbound`` until ``counter`` holds every output."""
    started = await _until(lambda: _consumed(channel, inbound), process, "consumer start")
    cpu = _cpu_s(process.pid)
    finished = await _until(lambda: _routed(channel, counter, events), process, "all through")
    cpu = _cpu_s(process.pid) - cpu
    return Run(events / (finished - started), cpu / events * 1e6)


def _py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """Sample ``pid`` until it exits: py-spy's raw (collapsed) stacks, idle and threads kept."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [py_spy, "record", "--pid", str(pid), "--output", str(output), "--format", "raw"]
    argv += ["--rate", "200", "--idle", "--threads"]  # blocking: whole stacks, ~10% slower
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the worker starts consuming
    return spy


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, a graceful exit expected; the log's tail in the error otherwise."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = -9
    if code != 0:
        raise RuntimeError(f"contender exited with {code}: {log.read_text()[-2000:]}")


async def _settled_and_stopped(
    channel: AbstractChannel, process: subprocess.Popen[bytes], log: Path, inbound: str
) -> None:
    """Stop the contender (the last acks may still be on their way) and check it took all."""
    await asyncio.sleep(0.3)
    _stop(process, log)
    left, _ = await _depth(channel, inbound)
    if left:
        raise RuntimeError(f"{left} events left unacknowledged in {inbound}")


async def worker_round(
    channel: AbstractChannel, stream: Stream, conversations: int, tag: str, directory: Path
) -> Run:
    """One timed run of ``python -m warmer run``."""
    names = Names.of(f"bench-pt-worker-{tag}")
    topology = await declare(channel, names)
    counter = await channel.declare_queue(f"{names.surface}.count", exclusive=True)
    await counter.bind(topology.exchanges[names.surface], SURFACE_ROUTING_KEY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMER_")}
    env |= {
        "WARMER_AMQP_URL": AMQP_URL,
        "WARMER_NAMESPACE": f"bench-pt-worker-{tag}",
        "WARMER_STORE": f"sqlite:///{directory / f'{tag}.db'}",
        "WARMER_LOG_LEVEL": "warning",
        "WARMER_LOG_FORMAT": "json",
        "WARMER_LOOP": os.environ.get("BENCH_WARMER_LOOP", "asyncio"),
    }
    argv = [sys.executable, "-m", "warmer", "run"]
    log = directory / f"{tag}.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        process = _start(argv, env, log)
        await _until(lambda: _consumed(channel, names.commands), process, "worker start (opt-in)")
        opt_in = opt_in_stream(conversations)
        await publish(topology.exchanges[names.commands], opt_in)
        await _until(lambda: _routed(channel, counter.name, len(opt_in)), process, "opt-in")
        _stop(process, log)
        await counter.purge()
        await publish(topology.exchanges[names.lifecycle], stream)
        process = _start(argv, env, log)
        profile = os.environ.get("BENCH_PY_SPY")
        spy = _py_spy(process.pid, Path(f"{profile}-{tag}.txt")) if profile else None
        run = await _timed(channel, process, names.lifecycle, counter.name, len(stream))
        await _settled_and_stopped(channel, process, log, names.lifecycle)
        if spy is not None:
            spy.wait(30)  # it writes the profile once the worker has exited
        routed, _ = await _depth(channel, counter.name)
        if routed != len(stream):
            raise RuntimeError(f"{routed} surface.changed for {len(stream)} events")
        return run
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        await counter.delete(if_unused=False, if_empty=False)
        await delete(channel, names)


async def bare_round(
    channel: AbstractChannel, stream: Stream, tag: str, directory: Path, who: str = "bare"
) -> Run:
    """One timed run of ``bench.bare_consumer`` (or, ``who="faststream"``, of
    ``bench.faststream_consumer``), each in its own process."""
    prefix = f"bench-pt-{who}-{tag}"
    inbound = await channel.declare_exchange(f"{prefix}.in", "topic", durable=True)
    out = await channel.declare_exchange(f"{prefix}.out", "topic", durable=True)
    dlx = await channel.declare_exchange(f"{prefix}.dlx", "fanout", durable=True)
    queue = await channel.declare_queue(
        f"{prefix}.lifecycle", durable=True, arguments=inbound_queue_arguments(dlx.name)
    )
    await queue.bind(inbound, "#")
    counter = await channel.declare_queue(f"{prefix}.count", exclusive=True)
    await counter.bind(out, "#")
    log = directory / f"{tag}.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        await publish(inbound, stream)
        if who == "faststream":
            argv = [sys.executable, "-m", "bench.faststream_consumer", AMQP_URL]
            argv += [queue.name, out.name, dlx.name]
        else:
            argv = [sys.executable, "-m", "bench.bare_consumer", AMQP_URL, queue.name, out.name]
        process = _start(argv, dict(os.environ), log)
        run = await _timed(channel, process, queue.name, counter.name, len(stream))
        await _settled_and_stopped(channel, process, log, queue.name)
        return run
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        for gone in (queue, counter):
            await gone.delete(if_unused=False, if_empty=False)
        for exchange in (inbound, out, dlx):
            await exchange.delete()


async def _consumed(channel: AbstractChannel, queue: str) -> bool:
    return (await _depth(channel, queue))[1] > 0


async def _routed(channel: AbstractChannel, queue: str, count: int) -> bool:
    return (await _depth(channel, queue))[0] >= count


def _faststream_installed() -> bool:
    return importlib.util.find_spec("faststream") is not None


async def race(rounds: int, events: int, conversations: int) -> dict[str, float]:
    """Worker, bare consumer and FastStream in turn, ``rounds`` each; every run's figures
    and the medians."""
    stream = lifecycle_stream(events, conversations)
    figures: dict[str, float] = {}
    contenders = ["worker", "bare"]
    if _faststream_installed():
        contenders.append("faststream")
    else:
        print("faststream is not installed (the dev extra): not raced", file=sys.stderr)
    only = os.environ.get("BENCH_PT_CONTENDERS")  # e.g. "worker,bare": a quicker look
    if only:
        contenders = [who for who in contenders if who in only.split(",")]
    runs: dict[str, list[Run]] = {who: [] for who in contenders}
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        with tempfile.TemporaryDirectory(prefix="bench-passthrough-") as name:
            directory = Path(name)
            for r in range(1, rounds + 1):
                tag = f"{os.getpid()}-{r}"
                if "worker" in runs:
                    runs["worker"].append(
                        await worker_round(channel, stream, conversations, tag, directory)
                    )
                if "bare" in runs:
                    runs["bare"].append(await bare_round(channel, stream, tag, directory))
                if "faststream" in runs:
                    runs["faststream"].append(
                        await bare_round(channel, stream, tag, directory, "faststream")
                    )
                for who in contenders:
                    figures[f"{who}_{r}_events_per_s"] = runs[who][-1].events_per_s
                    figures[f"{who}_{r}_cpu_us_per_event"] = runs[who][-1].cpu_us_per_event
    finally:
        await connection.close()
    for who in contenders:
        figures[f"{who}_median_events_per_s"] = statistics.median(
            run.events_per_s for run in runs[who]
        )
        figures[f"{who}_median_cpu_us_per_event"] = statistics.median(
            run.cpu_us_per_event for run in runs[who]
        )
    for who in [c for c in contenders if c != "worker" and "worker" in contenders]:
        figures[f"ratio_worker_over_{who}"] = (
            figures["worker_median_events_per_s"] / figures[f"{who}_median_events_per_s"]
        )
        figures[f"cpu_ratio_{who}_over_worker"] = (
            figures[f"{who}_median_cpu_us_per_event"] / figures["worker_median_cpu_us_per_event"]
        )
    figures["target_ratio"] = TARGET_RATIO
    return figures


def run(
    rounds: int = ROUNDS, events: int = EVENTS, conversations: int = CONVERSATIONS
) -> dict[str, float]:
    """The race on the local broker (``BENCH_AMQP_URL`` to use another)."""
    return asyncio.run(race(rounds, events, conversations))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.passthrough",
        description="Lifecycle events per second: the worker against a bare aio-pika "
        "consumer and a FastStream subscriber, alternating rounds, each in its own process.",
    )
    parser.add_argument("rounds", nargs="?", type=int, default=ROUNDS)
    parser.add_argument("events", nargs="?", type=int, default=EVENTS)
    parser.add_argument("conversations", nargs="?", type=int, default=CONVERSATIONS)
    given = parser.parse_args()
    for metric, value in run(given.rounds, given.events, given.conversations).items():
        print(f"{metric:<32} {value:>12,.2f}")
