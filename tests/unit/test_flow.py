"""connection.blocked and connection.unblocked reach the listeners, as aiormq handles them."""

from __future__ import annotations

import aiormq.connection
from pamqp import commands as spec

from warmer.bus import flow


async def test_listeners_hear_blocked_with_the_reason_and_unblocked() -> None:
    flow.install()
    flow.install()  # idempotent: wrapped once, heard once
    heard: list[tuple[object, str | None]] = []
    unsubscribe = flow.subscribe(lambda connection, reason: heard.append((connection, reason)))
    connection = aiormq.connection.Connection("amqp://guest:guest@127.0.0.1:1/")
    try:
        await connection._Connection__handle_connection_blocked(  # type: ignore[attr-defined]
            spec.Connection.Blocked(reason="low on memory")
        )
        await connection._Connection__handle_connection_blocked(  # type: ignore[attr-defined]
            spec.Connection.Blocked(reason="")
        )
        await connection._Connection__handle_connection_unblocked(  # type: ignore[attr-defined]
            spec.Connection.Unblocked()
        )
    finally:
        unsubscribe()
    assert heard == [
        (connection, "low on memory"),
        (connection, "no reason given"),
        (connection, None),
    ]
    # aiormq's own handling still runs: unblocked, the connection is ready to write again.
    assert connection._Connection__connection_unblocked.is_set()  # type: ignore[attr-defined]


async def test_a_failing_listener_does_not_reach_aiormq() -> None:
    flow.install()
    heard: list[str | None] = []

    def broken(_connection: object, _reason: str | None) -> None:
        raise RuntimeError("a bug")

    unsubscribe_broken = flow.subscribe(broken)
    unsubscribe = flow.subscribe(lambda _c, reason: heard.append(reason))
    try:
        connection = aiormq.connection.Connection("amqp://guest:guest@127.0.0.1:1/")
        await connection._Connection__handle_connection_blocked(  # type: ignore[attr-defined]
            spec.Connection.Blocked(reason="disk")
        )
    finally:
        unsubscribe_broken()
        unsubscribe()
    assert heard == ["disk"]
