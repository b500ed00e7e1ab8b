"""aio-pika's and aiormq's lines about a connection being re-established: debug at most."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import aiormq
import pytest
import structlog

from warmer.observe.log import configure_logging

CLIENTS = ("aio_pika", "aiormq")


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    levels = {name: logging.getLogger(name).level for name in ("", *CLIENTS)}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    structlog.reset_defaults()


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def lost() -> aiormq.exceptions.AMQPConnectionError:
    return aiormq.exceptions.AMQPConnectionError("Server connection reset")


def test_a_lost_connection_is_not_written_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    logging.getLogger("aiormq.connection").error(
        "Unexpected connection close from remote", exc_info=lost()
    )
    logging.getLogger("aio_pika.tools").error("Callback error: ConnectionChannelError")
    logging.getLogger("aio_pika.robust_connection").warning(
        'Connection attempt to "amqp://x" failed: refused. Reconnecting after 1 seconds.'
    )
    logging.getLogger("aio_pika.robust_connection").info("Connection to x closed.")
    logging.getLogger("aiormq.connection").warning("Connection %r was blocked by: %r", 1, "x")
    assert lines(capsys) == []


def test_at_debug_the_lost_connection_lines_are_debug_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "debug")
    logging.getLogger("aiormq.connection").error(
        "Unexpected connection close from remote", exc_info=lost()
    )
    logging.getLogger("aio_pika.tools").error("Callback error: ConnectionChannelError")
    logged = lines(capsys)
    assert [(e["logger"], e["level"]) for e in logged] == [
        ("aiormq.connection", "debug"),
        ("aio_pika.tools", "debug"),
    ]
    assert all("exception" not in e for e in logged)


def test_other_client_errors_stay_errors(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    logging.getLogger("aio_pika.queue").error("Consumer callback failed", exc_info=ValueError("x"))
    (event,) = lines(capsys)
    assert event["level"] == "error"
    assert "ValueError" in str(event["exception"])


def test_at_warning_level_the_demoted_lines_are_not_written(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "warning")
    logging.getLogger("aiormq.connection").warning("Connection attempt failed", exc_info=lost())
    logging.getLogger("warmer.app").warning("broker_connection_lost")
    assert [e["logger"] for e in lines(capsys)] == ["warmer.app"]
