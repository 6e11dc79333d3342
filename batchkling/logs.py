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
import re
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


#: A JWT: three base64url parts, the first two JSON objects (``eyJ`` is ``{"``).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+")
#: Whatever follows ``Bearer`` in an echoed Authorization header.
_BEARER = re.compile(r"(?i)(\bbearer\s+)(?!\[REDACTED\])[^\s\"',;]{8,}")
#: A secret's pieces this long are redacted wherever they appear: an echo cut at some length
#: (a snippet of an error page) must not leak the first part of a key.
MIN_PIECE = 8


class Redactor:
    """Replaces every registered secret — and any piece of one at least :data:`MIN_PIECE`
    characters long — every JWT, every ``Bearer`` credential, and every value under a
    secret-looking key."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._pieces: frozenset[str] = frozenset()
        self._anchors: tuple[str, ...] = ()
        self._finder: re.Pattern[str] | None = None
        # Log events repeat most of their values (run and job ids, event names, levels).
        self._seen: dict[str, str] = {}

    def register(self, secret: str | None) -> None:
        """Never log this value. Short values are ignored: they would mangle ordinary text."""
        if secret and len(secret) >= 6 and secret not in self._secrets:
            self._secrets.add(secret)
            self._seen.clear()
            pieces = {s[i:i + MIN_PIECE] for s in self._secrets
                      for i in range(len(s) - MIN_PIECE + 1)}
            self._pieces = frozenset(pieces)
            # Any piece of MIN_PIECE characters holds one of its secret's aligned quarters
            # (s[4k:4k+4]): plain substring tests on those rule out ordinary text cheaply.
            quarter = MIN_PIECE // 2
            self._anchors = tuple({s[i:i + quarter] for s in self._secrets
                                   for i in range(0, len(s) - quarter + 1, quarter)})
            self._finder = re.compile("|".join(map(re.escape, sorted(pieces)))) if pieces \
                else None

    def scrub_text(self, text: str) -> str:
        """``text`` without secrets, their pieces, JWTs or bearer credentials."""
        done = self._seen.get(text)
        if done is not None:
            return done
        original = text
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if self._finder is not None:
            for anchor in self._anchors:
                if anchor in text:
                    if self._finder.search(text):
                        text = self._cut_pieces(text)
                    break
        if "eyJ" in text:
            text = _JWT.sub(REDACTED, text)
        if "earer" in text or "EARER" in text:
            text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
        if len(original) <= 256:
            if len(self._seen) >= 4096:
                self._seen.clear()
            self._seen[original] = text
        return text

    def _cut_pieces(self, text: str) -> str:
        """Replace every run of text made of overlapping secret pieces."""
        assert self._finder is not None
        pieces, width = self._pieces, MIN_PIECE
        out: list[str] = []
        done = 0
        for match in self._finder.finditer(text):
            start, end = match.span()
            if start < done:
                continue
            # Widen while the window of MIN_PIECE characters at either edge is still a piece.
            while start > done and text[start - 1:start - 1 + width] in pieces:
                start -= 1
            while end < len(text) and text[end + 1 - width:end + 1] in pieces:
                end += 1
            out.append(text[done:start])
            out.append(REDACTED)
            done = end
        out.append(text[done:])
        return "".join(out)

    def scrub(self, value: Any) -> Any:
        """``value`` with secrets replaced, recursively through dicts, lists and tuples."""
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, dict):
            return {k: REDACTED if _secret_key(k) and v else self.scrub(v)
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, BaseException):
            return self.scrub_text(f"{type(value).__name__}: {value}")
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
    """Where rendered events go: the run logs open in this process and, optionally, the
    console.

    A ``worker`` drives several runs at once: each run's events go to its own ``run.log`` (by
    the event's ``run_id``), and events that name no run (the worker's own, a shared
    component's) to every run log open.
    """

    def __init__(self) -> None:
        self.files: dict[str, TextIO] = {}
        # Off until configure_logging says otherwise: a library prints nothing unasked.
        self.console_on = False
        self.console_json = True
        self.console_level = _LEVELS["info"]
        self.lock = threading.Lock()
        #: Why a run's log stopped being written (a full disk), by run id, if it did.
        self.file_errors: dict[str, OSError] = {}

    def write(self, line: str, event: MutableMapping[str, Any]) -> None:
        # A log line must never be what fails a job: with the disk full, a log call inside the
        # engine would otherwise raise between a create and the commit of its outcome.
        with self.lock:
            if self.files:
                run_id = event.get("run_id")
                if run_id is None:
                    targets = list(self.files.items())
                elif run_id in self.files:
                    targets = [(run_id, self.files[run_id])]
                else:
                    targets = []
                for name, fh in targets:
                    try:
                        fh.write(line + "\n")
                        fh.flush()
                    except OSError as exc:
                        del self.files[name]
                        self.file_errors[name] = exc
            level = _LEVELS.get(str(event.get("level", "info")), 20)
            if self.console_on and level >= self.console_level:
                # Looked up at each write: a live display that redirects stderr gets the line
                # above its frame instead of through it.
                console = sys.stderr
                try:
                    console.write((line if self.console_json else _pretty(event)) + "\n")
                    console.flush()
                except (OSError, ValueError):  # a closed or broken stderr (a pipe gone)
                    self.console_on = False


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
def run_log(path: Path, run_id: str) -> Iterator[None]:
    """Append ``run_id``'s events (and those naming no run) to ``path`` as JSON lines while
    the block runs.

    If the file cannot be written (the disk is full), the run goes on without it;
    :func:`run_log_error` says why afterwards.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _sinks.lock:
        _sinks.file_errors.pop(run_id, None)
    fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed below, errors swallowed
    with _sinks.lock:
        previous = _sinks.files.get(run_id)
        _sinks.files[run_id] = fh
    try:
        yield
    finally:
        with _sinks.lock:
            if _sinks.files.get(run_id) is fh:
                if previous is None:
                    del _sinks.files[run_id]
                else:
                    _sinks.files[run_id] = previous
            try:
                fh.close()
            except OSError as exc:
                _sinks.file_errors.setdefault(run_id, exc)


def run_log_error(run_id: str) -> OSError | None:
    """Why ``run_id``'s log stopped being written, if it did (``None``: it was written)."""
    return _sinks.file_errors.get(run_id)


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
