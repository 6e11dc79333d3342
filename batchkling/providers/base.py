"""The interface every provider adapter implements, and the HTTP plumbing they share.

The engine knows no provider by name: it calls ``create``, ``status`` and ``lookup`` and reacts
to the exception classes of :mod:`batchkling.errors`. Adapters translate their provider's
shapes and error codes into those.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn, Protocol

import httpx

from batchkling.errors import AmbiguousCreate, ProviderError, TransientError
from batchkling.models import JobSpec
from batchkling.providers.http import HttpClient

#: Task ids are put into URL paths: anything else is refused rather than escaped into a request.
_SAFE_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class Phase(StrEnum):
    """Where a provider task stands, normalised across providers and their synonyms."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """One observation of a provider task."""

    task_id: str
    phase: Phase
    progress: float | None = None  # 0..100
    video_url: str | None = None
    cost_usd: float | None = None
    cost_units: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool = False  # for FAILED: may a new attempt succeed?
    created_at: float | None = None  # unix seconds
    completed_at: float | None = None
    poll_after: float | None = None  # provider's hint, seconds


class Provider(Protocol):
    """A video-task API. Implementations raise only :class:`~batchkling.errors.ProviderError`s."""

    name: str
    #: True when ``lookup`` can find a task by the idempotency key (exact crash recovery).
    can_lookup: bool

    async def create(self, spec: JobSpec, key: str) -> str:
        """Create a task for ``spec``; return its task id. ``key`` is unique per attempt."""
        ...

    async def status(self, task_id: str, spec: JobSpec) -> TaskStatus:
        """Observe a task."""
        ...

    async def lookup(self, key: str, spec: JobSpec) -> TaskStatus | None:
        """The task created with ``key``, None if there is none; only when ``can_lookup``."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def check_task_id(task_id: object) -> str:
    """Return a task id safe to put in a URL path, or raise :class:`AmbiguousCreate`."""
    if isinstance(task_id, int):
        task_id = str(task_id)
    if not isinstance(task_id, str) or not _SAFE_TASK_ID.match(task_id):
        shown = repr(task_id)[:80]
        raise AmbiguousCreate(f"the provider answered with an unusable task id {shown}")
    return task_id


async def send(client: HttpClient, request: httpx.Request, *, creating: bool) -> httpx.Response:
    """Send a request, translating transport failures.

    A failure before any byte left (connect refused, DNS, pool full) is safe to repeat. After
    that, a create may have reached the provider: it is ambiguous and must not be blind-retried.
    """
    try:
        return await client.send(request)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise TransientError(f"cannot reach {request.url.host}: {_describe(exc)}") from exc
    except httpx.HTTPError as exc:
        what = f"no complete answer from {request.url.host}: {_describe(exc)}"
        if creating:
            raise AmbiguousCreate(what) from exc
        raise TransientError(what) from exc


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parse_json(response: httpx.Response) -> Any:
    """The body as JSON, or None when it is not JSON (an HTML error page, say)."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from ``Retry-After`` (delta or HTTP date), capped at an hour."""
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(raw) if raw else None
        if parsed is None:
            return None
        value = parsed.timestamp() - time.time()
    return min(max(value, 0.0), 3600.0)


def poll_hint(response: httpx.Response) -> float | None:
    """The ``openai-poll-after-ms`` hint in seconds, if the provider gave one."""
    raw = response.headers.get("openai-poll-after-ms")
    try:
        return max(float(raw) / 1000.0, 0.0) if raw is not None else None
    except ValueError:
        return None


def body_snippet(response: httpx.Response, limit: int = 200) -> str:
    """A short, single-line excerpt of a response body for error messages."""
    text = response.text if response.content else ""
    text = " ".join(text.split())
    return text[:limit] + ("…" if len(text) > limit else "")


def timestamp(value: Any) -> float | None:
    """Unix seconds from seconds, milliseconds, or an ISO string; None when unreadable."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value) / 1000.0 if value > 1e11 else float(value)
    if isinstance(value, str):
        try:
            return timestamp(float(value))
        except ValueError:
            pass
        try:
            from datetime import datetime

            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def number(value: Any) -> float | None:
    """A float from a number or a numeric string like ``"42%"``; None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().rstrip("%"))
        except ValueError:
            return None
    return None


def dig(data: Mapping[str, Any], *path: str | int) -> Any:
    """``data[path[0]][path[1]]…``, or None where any step is missing."""
    current: Any = data
    for step in path:
        if isinstance(step, int):
            if not isinstance(current, list) or len(current) <= step:
                return None
            current = current[step]
        elif isinstance(current, Mapping):
            current = current.get(step)
        else:
            return None
    return current


def error_text(payload: Any) -> tuple[str | None, str | None]:
    """``(code, message)`` from the error bodies providers send, whatever their shape."""
    if not isinstance(payload, Mapping):
        return None, None
    err = payload.get("error")
    if isinstance(err, Mapping):
        code = err.get("code") or err.get("type")
        return _str(code), _str(err.get("message"))
    if isinstance(err, str):
        return _str(payload.get("code")), err
    return _str(payload.get("code")), _str(payload.get("message") or payload.get("msg"))


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def describe_status(response: httpx.Response, message: str | None) -> str:
    """A human message for an error response: the provider's words, else the status."""
    if message:
        return message
    snippet = body_snippet(response)
    return f"HTTP {response.status_code}" + (f": {snippet}" if snippet else "")


def raise_unexpected(response: httpx.Response, *, creating: bool) -> NoReturn:
    """A response batchkling cannot read: ambiguous for creates, transient for reads."""
    what = f"unreadable answer from the provider (HTTP {response.status_code}): " + body_snippet(
        response
    )
    if creating:
        raise AmbiguousCreate(what, status=response.status_code)
    raise TransientError(what, status=response.status_code)


__all__ = [
    "Phase",
    "Provider",
    "ProviderError",
    "TaskStatus",
]
