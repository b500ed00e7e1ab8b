"""`warmer demo`, shortened: warms happen, completions land, the view draws, and
everything the demo made is gone afterwards (its namespace, its store, its tasks).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import aio_pika
import aiormq
import pytest
from rich.console import Console

from warmer.bus.topology import Names
from warmer.config import Config
from warmer.demo import play

pytestmark = pytest.mark.broker

DURATION_S = 12.0


async def test_a_short_demo_warms_measures_draws_and_cleans_up(amqp_url: str) -> None:
    before = asyncio.all_tasks()
    output = io.StringIO()
    console = Console(record=True, file=output, width=160, height=40)
    config = Config(amqp_url=amqp_url, log_format="console", log_level="warning")

    summary = await play(config, duration_s=DURATION_S, console=console, seed=7, fast=True)

    assert summary.exit_code == 0
    assert summary.warms > 0
    assert summary.completions > 0
    assert summary.turns > 0
    assert summary.measured > 0  # some conversation's lastPct became non-null
    assert summary.surface_updates > 0
    drawn = console.export_text()
    assert "billing-api-refactor" in drawn
    assert "warms in flight" in drawn
    assert "demo over" in drawn

    assert not await asyncio.to_thread(Path(summary.store_dir).exists)
    await asyncio.sleep(0)
    left = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert not [task for task in left if not task.done()], left

    names = Names.of(summary.namespace)
    assert summary.namespace.startswith("warmer-demo-")
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for queue, _ in names.queues():
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue, passive=True)
        for exchange, _ in names.exchanges():
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_exchange(exchange, passive=True)
