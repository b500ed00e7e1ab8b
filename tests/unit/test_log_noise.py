"""aio-pika's and aiormq's lines about a connection being re-established: info at most."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import aiormq
import pytest
import structlog

from warmer.observe.log import configure_logging


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    level = root.level
    yield
    root.setLevel(level)
    structlog.reset_defaults()


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def lost() -> aiormq.exceptions.AMQPConnectionError:
    return aiormq.exceptions.AMQPConnectionError("Server connection reset")


def test_a_lost_connection_is_info_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    logging.getLogger("aiormq.connection").error(
        "Unexpected connection close from remote", exc_info=lost()
    )
    logging.getLogger("aio_pika.tools").error("Callback error: ConnectionChannelError")
    logged = lines(capsys)
    assert [(e["logger"], e["level"]) for e in logged] == [
        ("aiormq.connection", "info"),
        ("aio_pika.tools", "info"),
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
