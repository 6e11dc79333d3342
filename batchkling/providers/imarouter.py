"""ImaRouter's unified ``/v1/videos`` task API (and gateways of the same shape).

Requests follow API.md §1. Responses are read tolerantly: a task id in ``task_id`` or ``id``,
bodies optionally wrapped as ``{code, data}``, status synonyms, progress as ``42`` or ``"42%"``,
timestamps in seconds or milliseconds, and the result URL wherever gateways put it.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from batchkling.errors import (
    AccountBlocked,
    AmbiguousCreate,
    RateLimited,
    SlotsExhausted,
    TaskFailed,
    TransientError,
)
from batchkling.models import JobSpec
from batchkling.providers.base import (
    Phase,
    TaskStatus,
    check_task_id,
    describe_status,
    dig,
    error_text,
    json_request,
    money,
    parse_json,
    percent,
    poll_hint,
    raise_unexpected,
    retry_after,
    send,
    timestamp,
)
from batchkling.providers.http import HttpClient

_DONE = frozenset({"completed", "complete", "succeeded", "succeed", "success", "done", "finished"})
_FAILED = frozenset({"failed", "failure", "error", "cancelled", "canceled", "expired", "rejected"})
_QUEUED = frozenset({"queued", "pending", "submitted", "not_start", "waiting"})

# Words in a failure reason that mean a new attempt would fail the same way.
_PERMANENT = re.compile(
    r"polic|moderat|sensitive|safety|nsfw|prohibit|violat|inappropriate|risk|"
    r"invalid|parameter|not support|unsupported|1200|1201|1203|1300|1301",
    re.IGNORECASE,
)
_CREDIT = re.compile(r"quota|credit|balance|arrear|insufficient|billing|1100|1101|1102|payment",
                     re.IGNORECASE)
_CONCURRENCY = re.compile(r"concurren|parallel|1303|slot", re.IGNORECASE)


class InputChanged(TaskFailed):
    """A local image no longer has the content the job was planned (and fingerprinted) with."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False, code="input_changed")


def image_payload(source: str, *, data_uri: bool, sha256: str | None = None) -> str:
    """An image as the provider takes it: URLs as they are, local files base64-encoded.

    ``sha256`` pins a local file to the content the job was planned with: the bytes read are
    hashed, and different bytes raise :class:`InputChanged` instead of being sent under the
    job's fingerprint and idempotency key (a file swapped between submit and resume).
    """
    if source.startswith(("http://", "https://")):
        return source
    data = Path(source).read_bytes()
    if sha256 is not None:
        found = hashlib.sha256(data).hexdigest()
        if found != sha256:
            raise InputChanged(
                f"image {source} changed since the job was planned (sha256 {found[:12]}…, "
                f"planned {sha256[:12]}…): nothing was sent. Restore the file, or run the "
                "manifest again so the job is planned with the new image (a new task)")
    raw = base64.b64encode(data).decode("ascii")
    if not data_uri:
        return raw
    mime = mimetypes.guess_type(source)[0] or "image/jpeg"
    return f"data:{mime};base64,{raw}"


class ImaRouterProvider:
    """Adapter for ``POST /v1/videos`` and ``GET /v1/videos/{task_id}``."""

    name = "imarouter"
    # ImaRouter offers no lookup by idempotency key: an interrupted create becomes `unknown`.
    can_lookup = False
    # Its gateway polls Kling itself, about every 15 s, and answers from its last look.
    may_lag = True

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 60.0,
        max_connections: int = 64,
        callback_url: str | None = None,
    ) -> None:
        #: Passed through to Kling as ``metadata.callback_url`` (API.md §1), if set.
        self.callback_url = callback_url
        self._client = HttpClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                  timeout=timeout, transport=transport,
                                  max_connections=max_connections)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    def build_request(self, spec: JobSpec, key: str) -> dict[str, Any]:
        """The JSON body for a create."""
        metadata: dict[str, Any] = {}
        if spec.mode:
            metadata["mode"] = spec.mode
        if spec.image_tail:
            metadata["image_tail"] = image_payload(spec.image_tail, data_uri=True,
                                                   sha256=spec.image_tail_sha256)
        for name in ("negative_prompt", "cfg_scale", "sound"):
            value = getattr(spec, name)
            if value is not None:
                metadata[name] = value
        if spec.camera_control:
            metadata["camera_control"] = dict(spec.camera_control)
        metadata.update(spec.metadata)
        if self.callback_url:
            metadata["callback_url"] = self.callback_url
        # Kling rejects a second task with the same external id, so even a gateway that ignores
        # Idempotency-Key cannot bill a resubmitted create twice.
        metadata["external_task_id"] = key
        body: dict[str, Any] = {
            "model": spec.model,
            "prompt": spec.prompt,
            "duration": spec.duration,
            "size": spec.size,
            "metadata": metadata,
        }
        if spec.image:
            body["image"] = image_payload(spec.image, data_uri=True, sha256=spec.image_sha256)
        return body

    async def create(self, spec: JobSpec, key: str) -> str:
        """Create a task; the idempotency key travels as ``Idempotency-Key`` and external id."""
        try:
            body = self.build_request(spec, key)
        except OSError as exc:
            raise TaskFailed(f"cannot read image: {exc.strerror}: {exc.filename}",
                             retryable=False) from exc
        request = json_request(self._client, "POST", "/v1/videos", body,
                               headers={"Idempotency-Key": key})
        task, _response = await self._exchange(request, creating=True)
        return check_task_id(task.get("task_id") or task.get("id"))

    async def status(self, task_id: str, spec: JobSpec) -> TaskStatus:
        """Poll a task."""
        request = self._client.build_request("GET", f"/v1/videos/{quote(task_id, safe='')}")
        task, response = await self._exchange(request, creating=False)
        return parse_task(task_id, task, poll_after=poll_hint(response))

    async def _exchange(self, request: httpx.Request, *,
                        creating: bool) -> tuple[Mapping[str, Any], httpx.Response]:
        """Send, classify errors, and return the task object the answer carries."""
        response = await send(self._client, request, creating=creating)
        payload = parse_json(response)
        if response.status_code >= 400:
            self._raise_for(response, payload, creating=creating)
        task = _unwrap(payload)
        if task is None:
            raise_unexpected(response, creating=creating)
        return task, response

    def parse_callback(self, payload: Any) -> TaskStatus | None:
        """The task a callback POST describes (a video object, bare or wrapped); None when it
        names no usable task id."""
        task = _unwrap(payload)
        if task is None:
            return None
        try:
            task_id = check_task_id(task.get("task_id") or task.get("id"))
        except AmbiguousCreate:
            return None
        return parse_task(task_id, task, poll_after=None)

    async def lookup(self, key: str, spec: JobSpec) -> TaskStatus | None:
        """Not offered by ImaRouter."""
        raise NotImplementedError("ImaRouter has no lookup by idempotency key")

    def _raise_for(self, response: httpx.Response, payload: Any, *, creating: bool) -> None:
        status = response.status_code
        code, message = error_text(payload)
        text = describe_status(response, message)
        words = f"{code or ''} {message or ''}"
        if status == 429 or (code and "rate" in code.lower()):
            if _CREDIT.search(words):
                raise AccountBlocked(text, code=code, status=status)
            if _CONCURRENCY.search(words):
                raise SlotsExhausted(text, code=code, status=status)
            raise RateLimited(text, retry_after=retry_after(response), code=code, status=status)
        if status == 402 or (_CREDIT.search(words) and status in (400, 403)):
            raise AccountBlocked(text, code=code, status=status)
        if status in (401, 403):
            raise AccountBlocked(text, code=code, status=status)
        if status == 404 and not creating:
            # Gateways answer 404 for a moment after create; the deadline bounds how long.
            raise TransientError(text, code=code or "task_not_found", status=status)
        if 400 <= status < 500:
            raise TaskFailed(text, retryable=False, code=code, status=status)
        if creating:
            raise AmbiguousCreate(text, code=code, status=status)
        raise TransientError(text, code=code, status=status)


def _unwrap(payload: Any) -> Mapping[str, Any] | None:
    """The task object, from a bare object or a ``{code, data: {...}}`` wrapper."""
    if not isinstance(payload, Mapping):
        return None
    data = payload.get("data")
    if isinstance(data, Mapping) and ("id" in data or "task_id" in data or "status" in data):
        return data
    if "id" in payload or "task_id" in payload or "status" in payload:
        return payload
    return None


def result_url(task: Mapping[str, Any]) -> str | None:
    """The first result URL in any of the places gateways put it."""
    for path in (("results", 0, "url"), ("metadata", "url"), ("video", "url"),
                 ("output", 0, "url"), ("url",), ("video_url",)):
        value = dig(task, *path)
        if isinstance(value, str) and value:
            return value
    return None


def parse_task(task_id: str, task: Mapping[str, Any], *, poll_after: float | None) -> TaskStatus:
    """Normalise a task object of the ``/v1/videos`` shape."""
    status = task.get("status")
    raw_status = status.strip().lower() if isinstance(status, str) else ""
    progress = percent(task.get("progress"))
    created = timestamp(task.get("created_at"))
    completed = timestamp(task.get("completed_at"))
    cost = money(task.get("amount_usd"))
    if raw_status in _DONE:
        url = result_url(task)
        if url is None:
            # Some gateways report completion a poll before the URL appears.
            return TaskStatus(task_id, Phase.RUNNING, progress=100.0, created_at=created,
                              poll_after=poll_after)
        return TaskStatus(task_id, Phase.SUCCEEDED, progress=100.0, video_url=url,
                          cost_usd=cost, created_at=created, completed_at=completed,
                          poll_after=poll_after)
    if raw_status in _FAILED:
        code, message = error_text(task)
        message = (message or _first_text(task, "fail_reason", "task_status_msg", "reason")
                   or f"the task ended {raw_status} without a reason")
        permanent = bool(_PERMANENT.search(f"{code or ''} {message}"))
        return TaskStatus(task_id, Phase.FAILED, progress=progress, cost_usd=cost,
                          error_code=code or raw_status, error_message=message,
                          retryable=not permanent, created_at=created, completed_at=completed,
                          poll_after=poll_after)
    phase = Phase.QUEUED if raw_status in _QUEUED else Phase.RUNNING
    # An unknown status means still running: a deadline, not a guess, ends the wait.
    return TaskStatus(task_id, phase, progress=progress, created_at=created, poll_after=poll_after)


def _first_text(task: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = task.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None
