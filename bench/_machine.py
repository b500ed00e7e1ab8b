"""What a benchmark ran on: the machine, the versions, the load; for ``python -m bench
--markdown``. Not a benchmark (``python -m bench`` skips names starting with ``_``)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
from datetime import UTC, datetime
from typing import Final

import aiormq
import redis.asyncio

from bench._harness import AMQP_URL, REDIS_URL

PACKAGES: Final = ("aio-pika", "aiormq", "pamqp", "msgspec", "redis", "hiredis", "aiosqlite")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``unknown``."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def memory_gb() -> float:
    """Total memory (``/proc/meminfo``), GB."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


async def _services() -> tuple[str, str]:
    rabbit = redis_version = "unknown"
    try:
        connection = await aiormq.connect(AMQP_URL)
        properties = connection.server_properties or {}
        rabbit = str(properties.get("version", "unknown"))
        await connection.close()
    except Exception as exc:  # a description, not a benchmark: say why
        rabbit = f"unknown ({exc})"
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        redis_version = str((await client.info("server")).get("redis_version", "unknown"))
    except Exception as exc:
        redis_version = f"unknown ({exc})"
    finally:
        await client.aclose()
    return rabbit, redis_version


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def describe() -> str:
    """One Markdown paragraph: date, cores, CPU, memory, Python, packages, services, load."""
    rabbit, redis_version = asyncio.run(_services())
    packages = ", ".join(f"{name} {_version(name)}" for name in PACKAGES)
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores ({cpu_model()}), "
        f"{memory_gb():.1f} GB; {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}; {packages}; RabbitMQ {rabbit}, Redis {redis_version} "
        f"on the same machine; load average {load()} (1 / 5 / 15 min)."
    )
