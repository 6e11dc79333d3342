"""Logging: structlog events with stable names, JSON lines to run.log, secrets redacted.

Configured once by the CLI. A library user gets no console output unless they call
:func:`configure_logging` (or configure structlog their own way, which batchkling then
follows). Events carry ``run_id`` and ``job_id`` through contextvars. Every value passes
through a redaction processor that knows the secrets in use, so an API key cannot reach a log
even when an exception message quotes it.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_SECRET_KEYS = ("api_key", "apikey", "secret", "token", "authorization", "password")
REDACTED = "[REDACTED]"


class Redactor:
    """Replaces every registered secret, and every value under a secret-looking key."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def register(self, secret: str | None) -> None:
        """Never log this value. Short values are ignored: they would mangle ordinary text."""
        if secret and len(secret) >= 6:
            self._secrets.add(secret)

    def scrub(self, value: Any) -> Any:
        """``value`` with secrets replaced, recursively through dicts, lists and tuples."""
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: REDACTED if _secret_key(k) and v else self.scrub(v)
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, _logger: Any, _name: str,
                 event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        return {k: REDACTED if _secret_key(k) and v else self.scrub(v) for k, v in event.items()}


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and _secret_name(key)


@functools.lru_cache(maxsize=1024)
def _secret_name(key: str) -> bool:
    # Events reuse a few dozen key names: each is looked at once, not on every event.
    lowered = key.lower()
    return any(part in lowered for part in _SECRET_KEYS)


redactor = Redactor()


class _Sinks:
    """Where rendered events go: the current run's log file and, optionally, the console."""

    def __init__(self) -> None:
        self.file: TextIO | None = None
        # Off until configure_logging says otherwise: a library prints nothing unasked.
        self.console_on = False
        self.console_json = True
        self.console_level = _LEVELS["info"]
        self.lock = threading.Lock()

    def write(self, line: str, event: MutableMapping[str, Any]) -> None:
        with self.lock:
            if self.file is not None:
                self.file.write(line + "\n")
                self.file.flush()
            level = _LEVELS.get(str(event.get("level", "info")), 20)
            if self.console_on and level >= self.console_level:
                # Looked up at each write: a live display that redirects stderr gets the line
                # above its frame instead of through it.
                console = sys.stderr
                console.write((line if self.console_json else _pretty(event)) + "\n")
                console.flush()


_sinks = _Sinks()


class _SinkLogger:
    def __init__(self, *_args: Any) -> None:
        pass

    def _emit(self, line: str, event: MutableMapping[str, Any]) -> None:
        _sinks.write(line, event)

    msg = debug = info = warning = error = critical = exception = _emit


def _render(_logger: Any, _name: str,
            event: MutableMapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    line = json.dumps(event, default=str, ensure_ascii=False, separators=(",", ":"))
    return (line, event), {}


def _pretty(event: MutableMapping[str, Any]) -> str:
    skip = {"event", "level", "timestamp", "run_id"}
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    level = str(event.get("level", "info"))
    prefix = "" if level == "info" else f"{level.upper()}: "
    return f"{prefix}{event.get('event')} {details}".rstrip()


def configure_logging(*, console: str = "json", level: str = "info") -> None:
    """Set up structlog. ``console``: ``json`` (cron), ``pretty`` (a person), ``off``."""
    _sinks.console_on = console != "off"
    _sinks.console_json = console == "json"
    _sinks.console_level = _LEVELS.get(level, 20)
    structlog.configure(
        processors=_processors(), logger_factory=_SinkLogger, cache_logger_on_first_use=False
    )


def _processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redactor,
        _render,
    ]


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Append JSON lines to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = _sinks.file
    with open(path, "a", encoding="utf-8") as fh:
        _sinks.file = fh
        try:
            yield
        finally:
            _sinks.file = previous


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` values.

    Where nobody configured structlog (a program using batchkling as a library), batchkling's
    events still reach ``run.log`` but nothing reaches stdout or stderr (structlog's own
    default would print every event to stdout); :func:`configure_logging` turns the console on.
    A program that configured structlog itself gets the events its own way.
    """
    if structlog.is_configured():
        return structlog.get_logger("batchkling").bind(**bound)
    return structlog.wrap_logger(_SinkLogger(), processors=_processors()).bind(**bound)
