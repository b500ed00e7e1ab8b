"""Structured logging: every line is an event with a snake_case name and key-values.

`configure_logging` is called once by the CLI; modules take a logger with
`get_logger(__name__)` at import time (the logger is lazy, so configuration made later
still applies). Records from the standard `logging` module (aio-pika, aiormq) go
through the same renderer, so a json deployment emits nothing but JSON lines.

The clients' own lines are quieted below debug: their loggers pass errors only, and those
about a connection going away are demoted to debug. The worker reports a lost connection
itself, once per outage (``broker_connection_lost``, ``broker_reconnected``), where the
clients would write a line or three per attempt, every second.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final, TextIO, cast

import aiormq
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor

__all__ = ["configure_logging", "get_logger"]

_LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_FORMATS: Final = ("json", "console")
_HEADLINE: Final = ("timestamp", "level", "event", "logger")
_CONNECTION_ERRORS: Final = (
    ConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
)


def configure_logging(format: str, level: str) -> None:
    """Send every log event to stderr as `format` (json or console), from `level` up.

    json: one object per line with `event`, `level`, `timestamp` (ISO 8601, UTC) and the
    event's key-values; console: aligned, coloured lines for people. Raises `ValueError`
    on an unknown format or level. Calling it again replaces the previous setup.
    """
    if format not in _FORMATS:
        raise ValueError(f"unknown log format {format!r}: expected one of {_FORMATS}")
    threshold = _LEVELS.get(level.lower())
    if threshold is None:
        raise ValueError(f"unknown log level {level!r}: expected one of {tuple(_LEVELS)}")

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: list[Processor]
    if format == "json":
        renderer = [
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            _headline_first,
            structlog.processors.JSONRenderer(),
        ]
    else:
        # ConsoleRenderer formats exceptions itself (format_exc_info would pre-empt it).
        renderer = [structlog.dev.ConsoleRenderer(colors=_stderr_is_terminal())]

    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=_stderr_logger,
        # Uncached, so each event resolves sys.stderr afresh (tests swap it) and a
        # later configure_logging applies to loggers already in use.
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(shared, renderer, threshold)


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger whose events carry `logger=name`; use `get_logger(__name__)`."""
    return cast(FilteringBoundLogger, structlog.get_logger(name))


class _NamedWriteLogger(structlog.WriteLogger):
    """A `WriteLogger` that knows the name it was asked for, like a stdlib logger."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


def _stderr_logger(*args: Any) -> _NamedWriteLogger:
    name = args[0] if args and isinstance(args[0], str) else None
    return _NamedWriteLogger(sys.stderr, name)


def _add_logger_name(logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Add `logger`: the stdlib record's name, or the name given to `get_logger`."""
    record = event_dict.get("_record")
    name = record.name if record is not None else getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    return event_dict


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _headline_first(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Reorder keys so each JSON line starts with its time, level, event and logger."""
    head = {k: event_dict[k] for k in _HEADLINE if k in event_dict}
    return {**head, **event_dict}


class _StderrHandler(logging.Handler):
    """Writes formatted records to the current `sys.stderr`, one per line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream: TextIO = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


_CLIENTS: Final = ("aio_pika", "aiormq")


class _ReconnectionNoise(logging.Filter):
    """aio-pika's and aiormq's lines about a connection being re-established: debug.

    A lost connection heals itself; the worker says so once (``broker_connection_lost``, a
    warning, then ``broker_reconnected``). The clients would add error-level lines with
    tracebacks on every attempt, which page operators for nothing. Errors that are not
    about the connection stay errors.
    """

    _WORDS: Final = ("connection", "Connection", "transport", "reconnect", "closed", "Closed")

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self._threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or record.name.split(".")[0] not in _CLIENTS:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        about_connection = isinstance(exc, _CONNECTION_ERRORS) or any(
            word in record.getMessage() for word in self._WORDS
        )
        if not about_connection:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return self._threshold <= logging.DEBUG


def _route_stdlib_logging(shared: list[Processor], renderer: list[Processor], level: int) -> None:
    """Render records of the `logging` module like structlog events, on the root logger."""
    handler = _StderrHandler()
    handler.addFilter(_ReconnectionNoise(level))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Their warnings and infos are per attempt (a reconnect line every second, a
    # blocked connection the worker reports itself): only errors, unless debugging.
    for client in _CLIENTS:
        logging.getLogger(client).setLevel(
            logging.DEBUG if level <= logging.DEBUG else logging.ERROR
        )
