"""The command line: `warmer run` starts the worker with settings from the environment."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, cast

from warmer.config import Config, ConfigError, settings_help, unknown_settings
from warmer.observe.log import configure_logging, get_logger

__all__ = ["main"]

_EXIT_USAGE = 2

log = get_logger(__name__)

AppRun = Callable[[Config], Coroutine[Any, Any, int]]


def main(argv: list[str] | None = None) -> int:
    """Run the `warmer` command with `argv` (default: `sys.argv[1:]`); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already reported
        return exit_.code if isinstance(exit_.code, int) else _EXIT_USAGE
    command: Callable[[], int] | None = getattr(args, "command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return _EXIT_USAGE
    return command()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmer",
        description="A RabbitMQ sidecar that keeps LLM prompt caches warm.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the worker",
        description="Run the worker until interrupted. Settings come from the environment.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.set_defaults(command=_run)
    return parser


def _run() -> int:
    """`warmer run`: read the config, set up logging, run the app until it returns."""
    try:
        config = Config.from_env(os.environ, isatty=sys.stderr.isatty())
    except ConfigError as error:
        print(f"warmer: {error}", file=sys.stderr)
        return _EXIT_USAGE
    configure_logging(config.log_format, config.log_level)
    for name in unknown_settings(os.environ):
        log.warning("config_unknown_setting", name=name)
    log.info("config_loaded", **config.as_log_fields())
    try:
        return asyncio.run(_app_run()(config))
    except KeyboardInterrupt:
        log.info("worker_interrupted")
        return 0


def _app_run() -> AppRun:
    # Imported late: the app pulls in the broker client and the store, which neither
    # `--help` nor a config error needs.
    app = importlib.import_module("warmer.app")
    return cast(AppRun, app.run)
