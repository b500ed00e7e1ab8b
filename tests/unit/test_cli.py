"""The `warmer` command: help, config errors, and handing the config to the app."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import structlog

from warmer.cli import main
from warmer.config import SETTINGS, Config


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No WARMER_* from the outer environment; logging set up by a test is undone."""
    for name in list(os.environ):
        if name.startswith("WARMER_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    level = root.level
    yield
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture
def app_calls(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Replace `warmer.app` with a fake whose `run` records its config and returns 7."""
    calls: list[Config] = []

    async def run(config: Config) -> int:
        calls.append(config)
        return 7

    monkeypatch.setitem(sys.modules, "warmer.app", types.SimpleNamespace(run=run))
    return calls


def test_run_help_documents_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0

    out = capsys.readouterr().out
    assert "usage: warmer run" in out
    for setting in SETTINGS:
        assert setting.name in out
        assert f"default: {setting.default}" in out


def test_top_level_help_lists_the_run_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0

    out = capsys.readouterr().out
    assert "usage: warmer" in out
    assert "run the worker" in out


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0

    assert capsys.readouterr().out.strip() == f"warmer {version('warmer')}"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2

    err = capsys.readouterr().err
    assert "usage: warmer" in err
    assert "run" in err


def test_an_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fly"]) == 2

    assert "invalid choice: 'fly'" in capsys.readouterr().err


def test_a_bad_setting_exits_2_with_one_line_and_no_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], app_calls: list[Config]
) -> None:
    monkeypatch.setenv("WARMER_AMQP_URL", "http://app:s3cr3t@rabbit:5672/")

    assert main(["run"]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("warmer: WARMER_AMQP_URL='http://app:***@rabbit:5672/'")
    assert "s3cr3t" not in captured.err
    assert app_calls == []


def test_a_bad_number_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], app_calls: list[Config]
) -> None:
    monkeypatch.setenv("WARMER_PREFETCH", "abc")

    assert main(["run"]) == 2

    assert capsys.readouterr().err == (
        "warmer: WARMER_PREFETCH='abc' is not valid: expected an integer from 1 to 65535\n"
    )
    assert app_calls == []


def test_run_hands_the_config_to_the_app_and_returns_its_code(
    monkeypatch: pytest.MonkeyPatch, app_calls: list[Config]
) -> None:
    monkeypatch.setenv("WARMER_NAMESPACE", "team-a")
    monkeypatch.setenv("WARMER_PREFETCH", "32")
    monkeypatch.setenv("WARMER_LOG_LEVEL", "error")

    assert main(["run"]) == 7

    assert len(app_calls) == 1
    assert app_calls[0].namespace == "team-a"
    assert app_calls[0].prefetch == 32
    assert app_calls[0].log_level == "error"


def test_run_logs_json_lines_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], app_calls: list[Config]
) -> None:
    monkeypatch.setenv("WARMER_AMQP_URL", "amqps://app:s3cr3t@rabbit:5671/")
    monkeypatch.setenv("WARMER_LOG_FORMAT", "json")
    monkeypatch.setenv("WARMER_PREFECH", "8")

    assert main(["run"]) == 7

    err = capsys.readouterr().err
    assert "s3cr3t" not in err
    events = [json.loads(line) for line in err.splitlines()]
    by_name = {e["event"]: e for e in events}
    loaded = by_name["config_loaded"]
    assert loaded["amqp_url"] == "amqps://app:***@rabbit:5671/"
    assert loaded["level"] == "info"
    assert loaded["timestamp"].endswith("Z")
    assert loaded["logger"] == "warmer.cli"
    assert by_name["config_unknown_setting"]["name"] == "WARMER_PREFECH"
    assert by_name["config_unknown_setting"]["level"] == "warning"


def test_the_log_level_filters_events(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], app_calls: list[Config]
) -> None:
    monkeypatch.setenv("WARMER_LOG_FORMAT", "json")
    monkeypatch.setenv("WARMER_LOG_LEVEL", "warning")

    assert main(["run"]) == 7

    assert "config_loaded" not in capsys.readouterr().err


def test_an_interrupt_ends_the_run_cleanly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def run(config: Config) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "warmer.app", types.SimpleNamespace(run=run))
    monkeypatch.setenv("WARMER_LOG_FORMAT", "json")

    assert main(["run"]) == 0

    events = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()]
    assert events[-1] == "worker_interrupted"


# -- a store that cannot be read stops start-up: one line, exit 69, nothing reset -------


def _startup_failure(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    failures = [e for e in events if e["event"] == "startup_failed"]
    assert len(failures) == 1, events
    failure: dict[str, object] = failures[0]
    return failure


def test_a_corrupted_store_file_stops_start_up_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "warmer.db"
    garbage = b"this is not a database, " * 200
    path.write_bytes(garbage)
    monkeypatch.setenv("WARMER_STORE", f"sqlite:///{path}")
    monkeypatch.setenv("WARMER_LOG_FORMAT", "json")
    monkeypatch.setenv("WARMER_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")  # never reached

    assert main(["run"]) == 69
    failure = _startup_failure(capsys)
    assert str(path) in str(failure["error"])
    assert "\n" not in str(failure["error"])
    assert path.read_bytes() == garbage  # no silent reset


def test_the_event_loop_is_asyncios_unless_uvloop_is_asked_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import importlib

    import uvloop

    from warmer.cli import _Exit, _loop_factory
    from warmer.config import Config

    assert _loop_factory(Config()) is None
    factory = _loop_factory(Config(loop="uvloop"))
    assert factory is uvloop.new_event_loop
    loop = factory()
    try:
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()

    real = importlib.import_module

    def without_uvloop(name: str, package: str | None = None) -> object:
        if name == "uvloop":
            raise ImportError(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", without_uvloop)
    with pytest.raises(_Exit) as exited:
        _loop_factory(Config(loop="uvloop"))
    assert exited.value.code == 2
    assert "needs the uvloop package" in capsys.readouterr().err
