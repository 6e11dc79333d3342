"""The interface every provider adapter implements, and the HTTP plumbing they share.

The engine knows no provider by name: it calls ``create``, ``status`` and ``lookup`` and reacts
to the exception classes of :mod:`batchkling.errors`. Adapters translate their provider's
shapes and error codes into those.

Everything a provider answers is untrusted: the readers here bound it (JSON nested deeper than
:data:`MAX_JSON_DEPTH` is unreadable), parse it defensively (a number must be finite, a
timestamp a plausible date, a ``Retry-After`` a delay or a date) and never raise anything but a
:class:`~batchkling.errors.ProviderError` for it, so any answer, however wrong, ends as a
reason on its job.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn, Protocol

import httpx

from batchkling.errors import AmbiguousCreate, ProviderError, TaskFailed, TransientError
from batchkling.logs import redactor
from batchkling.models import JobSpec
from batchkling.providers.http import HttpClient

#: Task ids are put into URL paths: anything else is refused rather than escaped into a request.
_SAFE_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
#: JSON nested deeper than this is not a provider's answer; it is read as unreadable.
MAX_JSON_DEPTH = 64
#: Timestamps outside 2000..2200 are not believed, in seconds, milliseconds, µs or ns.
_EPOCH_RANGE = (946_684_800.0, 7_258_118_400.0)


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
    started_at: float | None = None  # unix seconds the render began, when reported


class Provider(Protocol):
    """A video-task API. Implementations raise only :class:`~batchkling.errors.ProviderError`s."""

    name: str
    #: True when ``lookup`` can find a task by the idempotency key (exact crash recovery).
    can_lookup: bool
    #: True when the provider may answer from a gateway's last look upstream rather than the
    #: task's state now (ImaRouter's, API.md); the engine then seeks that gateway's loop.
    may_lag: bool

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
    """Return a task id safe to put in a URL path, or raise :class:`AmbiguousCreate`.

    An id that carries a credential (a gateway that answers with the bearer it was sent) is
    refused too: it would be stored, logged and put in URLs.
    """
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        task_id = str(task_id)
    if not isinstance(task_id, str) or not _SAFE_TASK_ID.fullmatch(task_id):
        shown = redactor.scrub_text(repr(task_id)[:80]) if isinstance(task_id, str) else (
            f"of type {type(task_id).__name__}")
        raise AmbiguousCreate(f"the provider answered with an unusable task id {shown}")
    if redactor.scrub_text(task_id) != task_id:
        raise AmbiguousCreate("the provider answered with an unusable task id: it contains a "
                              "credential (part of the API key or a bearer token)")
    return task_id


def json_request(client: HttpClient, method: str, path: str, body: Mapping[str, Any], *,
                 headers: Mapping[str, str] | None = None) -> httpx.Request:
    """A request carrying ``body`` as JSON; a body JSON cannot carry (NaN, infinity, an
    object of no JSON type) fails the job before anything is sent."""
    try:
        return client.build_request(method, path, json=body, headers=headers)
    except (ValueError, TypeError, RecursionError) as exc:
        raise TaskFailed(f"the request cannot be sent as JSON: {exc}", retryable=False,
                         code="bad_request") from exc


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
    """The body as JSON, or None when it is not JSON (an HTML error page, say) or is nested
    deeper than any answer a provider gives."""
    try:
        data = response.json()
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return None if too_deep(data) else data


def too_deep(data: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether lists and mappings in ``data`` nest more than ``limit`` levels (no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children: Any = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from ``Retry-After`` (delta or HTTP date), capped at an hour; None when
    it says nothing readable."""
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            value = email.utils.parsedate_to_datetime(raw).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if math.isnan(value):
        return None
    return min(max(value, 0.0), 3600.0)


def poll_hint(response: httpx.Response) -> float | None:
    """The ``openai-poll-after-ms`` hint in seconds (at most an hour), if the provider gave one."""
    value = number(response.headers.get("openai-poll-after-ms"))
    return None if value is None else min(max(value / 1000.0, 0.0), 3600.0)


def body_snippet(response: httpx.Response, limit: int = 200) -> str:
    """A short, single-line excerpt of a response body for error messages.

    Credentials are scrubbed before the cut: a key cut in two would no longer be recognised.
    """
    try:
        text = response.text if response.content else ""
    except (UnicodeDecodeError, LookupError):
        text = response.content.decode("utf-8", "replace")
    text = redactor.scrub_text(" ".join(text[: 64 * limit].split()))
    return text[:limit] + ("…" if len(text) > limit else "")


def timestamp(value: Any) -> float | None:
    """Unix seconds from seconds, milliseconds, microseconds or nanoseconds, or an ISO string;
    None when unreadable or not a date between 2000 and 2200."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        low, high = _EPOCH_RANGE
        for scale in (1.0, 1e3, 1e6, 1e9):
            seconds = float(value) / scale
            if low <= seconds <= high:
                return seconds
        return None
    if isinstance(value, str):
        try:
            return timestamp(float(value))
        except (ValueError, OverflowError):
            pass
        try:
            from datetime import datetime

            return timestamp(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except (ValueError, OverflowError, OSError):
            return None
    return None


def number(value: Any) -> float | None:
    """A finite float from a number or a numeric string like ``"42%"``; None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        value = value.strip().rstrip("%")
    if not isinstance(value, int | float | str):
        return None
    try:
        result = float(value)
    except (ValueError, OverflowError):
        return None
    return result if math.isfinite(result) else None


def percent(value: Any) -> float | None:
    """Progress as a number from 0 to 100 (``42``, ``"42%"``); None when unreadable."""
    result = number(value)
    return None if result is None else min(max(result, 0.0), 100.0)


def money(value: Any) -> float | None:
    """A reported cost: a finite, non-negative number; anything else is unknown (None).

    ``"NaN"`` or ``-100`` must not reach the budget: a NaN makes every comparison false and a
    negative cost gives money back, and either would switch the cap off.
    """
    result = number(value)
    return result if result is not None and result >= 0 else None


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
        return _str(payload.get("code")), _str(err)
    return _str(payload.get("code")), _str(payload.get("message") or payload.get("msg"))


def _str(value: Any) -> str | None:
    """Text of an error field: scalars as they are, anything else refused (a nested object
    could be anything, deep enough to break ``str``), cut to a sane length."""
    if value is None or isinstance(value, Mapping | list):
        return None
    return str(value)[:2000]


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
