"""Kling's native API: ``/v1/videos/text2video`` and ``/v1/videos/image2video`` (API.md §2).

Every create carries the attempt's idempotency key as ``external_task_id``. Kling refuses a
second task with the same external id and answers a query by it, so a create whose answer was
lost is settled exactly: :meth:`KlingProvider.lookup` finds the task, or proves there is none.

Auth is an HS256 JWT signed from the access and secret keys (cached, re-signed before it
expires, and once more on code 1004), or a single API key sent as the bearer as it is.
Answers are ``{code, message, request_id, data}`` envelopes; ``code`` 0 is success and the
other codes are mapped onto :mod:`batchkling.errors` in :func:`classify`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx
import jwt
from jwt.warnings import InsecureKeyLengthWarning

from batchkling.clock import Clock, SystemClock
from batchkling.errors import (
    AccountBlocked,
    AmbiguousCreate,
    ConfigError,
    ProviderError,
    RateLimited,
    SlotsExhausted,
    TaskFailed,
    TransientError,
)
from batchkling.logs import redactor
from batchkling.models import JobSpec
from batchkling.providers.base import (
    Phase,
    TaskStatus,
    check_task_id,
    describe_status,
    dig,
    json_request,
    money,
    parse_json,
    raise_unexpected,
    retry_after,
    send,
    timestamp,
)
from batchkling.providers.http import HttpClient
from batchkling.providers.imarouter import image_payload

#: The most tasks one list request may ask for (API.md §2: pageSize 1..500).
LIST_MAX = 500
#: JWT lifetime and how long before its end a fresh one is signed (API.md §2: exp = now + 1800).
TOKEN_LIFETIME = 1800.0
TOKEN_RENEW_BEFORE = 300.0
#: ``nbf`` a little in the past, so a provider clock slightly behind ours still accepts the token.
TOKEN_NBF_SKEW = 5.0

_ACCOUNT = frozenset({1000, 1001, 1002, 1003, 1100, 1101, 1102, 1304})
_EXPIRED = 1004
_RATE = 1302
_SLOTS = 1303
_REFUSED = frozenset({1103, 1200, 1201, 1203, 1300, 1301})
_SERVER = frozenset({5000, 5001})

_STATUS = {"submitted": Phase.QUEUED, "processing": Phase.RUNNING,
           "succeed": Phase.SUCCEEDED, "failed": Phase.FAILED}

# A failure reason that says the content or the request was refused: a new attempt would be
# refused the same way. Anything else (internal errors, timeouts) may succeed on a new attempt.
_POLICY = re.compile(
    r"polic|risk|moderat|sensitive|safety|nsfw|prohibit|violat|inappropriate|illegal|"
    r"invalid|parameter|not support|unsupported",
    re.IGNORECASE,
)
_DUPLICATE = re.compile(r"external.?task.?id.*(duplicat|already exist|exists)|"
                        r"duplicat.*external.?task.?id", re.IGNORECASE)
_NOT_FOUND = re.compile(r"not.?found|does not exist|no such task|not exist", re.IGNORECASE)


class KlingProvider:
    """Adapter for Kling's native video API, with exact crash recovery by ``external_task_id``."""

    name = "kling"
    can_lookup = True
    may_lag = False  # Kling's own API answers with the task's state now
    #: ``list_recent`` reports many tasks in one request.
    can_list = True

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
        timeout: float = 60.0,
        max_connections: int = 64,
        callback_url: str | None = None,
    ) -> None:
        if api_key is None and not (access_key and secret_key):
            raise ConfigError("Kling needs either an API key, or both an access and a secret key")
        self._api_key = api_key or None
        #: Where Kling POSTs status changes (the run's callback receiver), if anywhere.
        self.callback_url = callback_url
        self._access_key = access_key
        self._secret_key = secret_key
        self._clock = clock or SystemClock()
        self._token: str | None = None
        self._token_exp = 0.0
        self._client = HttpClient(base_url=base_url, timeout=timeout, transport=transport,
                                  max_connections=max_connections)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    # ---- auth ----------------------------------------------------------------------------

    def bearer(self, *, fresh: bool = False) -> str:
        """The bearer to send: the API key, or a JWT valid for at least five more minutes.

        ``fresh`` signs a new JWT whatever the cache holds (after Kling answered 1004).
        """
        if self._api_key is not None:
            return self._api_key
        assert self._access_key is not None and self._secret_key is not None
        now = self._clock.wall()
        if fresh or self._token is None or now >= self._token_exp - TOKEN_RENEW_BEFORE:
            exp = int(now + TOKEN_LIFETIME)
            claims = {"iss": self._access_key, "exp": exp, "nbf": int(now - TOKEN_NBF_SKEW)}
            with warnings.catch_warnings():
                # The key is the account's, not ours to lengthen: Kling's own secrets are long,
                # but the simulator's documented default is 14 bytes and PyJWT warns on each sign.
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                self._token = jwt.encode(claims, self._secret_key, algorithm="HS256",
                                         headers={"typ": "JWT"})
            # Made here, not read from the environment: the redactor learns it now, before a
            # provider can echo it into a message, a log or the database.
            redactor.register(self._token)
            self._token_exp = float(exp)
        return self._token

    def _scrub(self, text: str) -> str:
        """``text`` without any credential in it (providers echo odd things back)."""
        for secret in (self._api_key, self._access_key, self._secret_key, self._token):
            if secret and len(secret) >= 6:
                text = text.replace(secret, "[REDACTED]")
        return redactor.scrub_text(text)

    async def _call(self, method: str, path: str, *, creating: bool,
                    json: Mapping[str, Any] | None = None) -> tuple[httpx.Response, Any]:
        """Send a request with auth; on 1004 (token expired) re-sign and send it once more.

        Repeating a create here is safe: a 1004 answer means the request was refused at the
        door, before any task was made.
        """
        fresh = False
        while True:
            auth = {"Authorization": f"Bearer {self.bearer(fresh=fresh)}"}
            request = (json_request(self._client, method, path, json, headers=auth)
                       if json is not None else
                       self._client.build_request(method, path, headers=auth))
            response = await send(self._client, request, creating=creating)
            payload = parse_json(response)
            if _code(payload) == _EXPIRED and self._api_key is None and not fresh:
                fresh = True
                continue
            return response, payload

    # ---- requests ------------------------------------------------------------------------

    def build_request(self, spec: JobSpec, key: str) -> tuple[str, dict[str, Any]]:
        """The endpoint kind and JSON body for a create; raises OSError for unreadable images."""
        kind = kind_of(spec)
        body: dict[str, Any] = {
            "model_name": spec.model,
            "prompt": spec.prompt,
            "duration": str(spec.duration),  # Kling wants the string "5" or "10"
        }
        if kind == "text2video":
            # image2video takes no aspect ratio: the video keeps the first frame's.
            body["aspect_ratio"] = spec.size
        if spec.mode and not spec.model.endswith("-master"):
            body["mode"] = spec.mode
        if spec.negative_prompt:
            body["negative_prompt"] = spec.negative_prompt
        if spec.cfg_scale is not None and not spec.model.startswith("kling-v2"):
            body["cfg_scale"] = spec.cfg_scale
        if spec.image:
            body["image"] = image_payload(spec.image, data_uri=False, sha256=spec.image_sha256)
        if spec.image_tail:
            body["image_tail"] = image_payload(spec.image_tail, data_uri=False,
                                               sha256=spec.image_tail_sha256)
        if spec.camera_control:
            body["camera_control"] = dict(spec.camera_control)
        if spec.sound is not None:
            body["sound"] = spec.sound
        body.update(spec.metadata)
        if self.callback_url:
            body["callback_url"] = self.callback_url
        # Last, so no metadata can replace it: the key is what makes crash recovery exact.
        body["external_task_id"] = key
        return kind, body

    async def create(self, spec: JobSpec, key: str) -> str:
        """Create a task with ``external_task_id = key``; return Kling's task id."""
        try:
            kind, body = self.build_request(spec, key)
        except OSError as exc:
            raise TaskFailed(f"cannot read image: {exc.strerror}: {exc.filename}",
                             retryable=False) from exc
        response, payload = await self._call("POST", f"/v1/videos/{kind}", json=body,
                                             creating=True)
        data = self._data(response, payload, creating=True)
        return check_task_id(data.get("task_id"))

    async def status(self, task_id: str, spec: JobSpec) -> TaskStatus:
        """Query a task by Kling's task id."""
        response, payload = await self._call(
            "GET", f"/v1/videos/{kind_of(spec)}/{quote(task_id, safe='')}", creating=False)
        return parse_task(task_id, self._data(response, payload, creating=False))

    def parse_callback(self, payload: Any) -> TaskStatus | None:
        """The task a callback POST describes (the task object, or its envelope); None when
        it names no usable task id."""
        data = payload.get("data") if isinstance(payload, Mapping) else None
        data = data if isinstance(data, Mapping) else payload
        if not isinstance(data, Mapping):
            return None
        try:
            task_id = check_task_id(data.get("task_id"))
        except AmbiguousCreate:
            return None
        return parse_task(task_id, data)

    def list_kind(self, spec: JobSpec) -> str:
        """The list a job's task appears in (``text2video`` or ``image2video``)."""
        return kind_of(spec)

    async def list_recent(self, kind: str, size: int) -> dict[str, TaskStatus]:
        """The ``size`` newest tasks of ``kind`` (text2video or image2video) on the account, by
        task id: one request reports many tasks (API.md §2, ``pageSize`` up to 500)."""
        size = max(1, min(size, LIST_MAX))
        response, payload = await self._call(
            "GET", f"/v1/videos/{kind}?pageNum=1&pageSize={size}", creating=False)
        data = self._data_any(response, payload)
        found: dict[str, TaskStatus] = {}
        if not isinstance(data, list):
            raise_unexpected(response, creating=False)
        for item in data:
            if not isinstance(item, Mapping):
                continue
            try:
                task_id = check_task_id(item.get("task_id"))
            except AmbiguousCreate:
                continue
            found[task_id] = parse_task(task_id, item)
        return found

    async def lookup(self, key: str, spec: JobSpec) -> TaskStatus | None:
        """The task created with ``external_task_id = key``, or None when Kling has none."""
        response, payload = await self._call(
            "GET", f"/v1/videos/{kind_of(spec)}/{quote(key, safe='')}", creating=False)
        if is_not_found(response, payload):
            return None
        data = self._data(response, payload, creating=False)
        external = dig(data, "task_info", "external_task_id")
        if external is not None and external != key:
            raise TransientError(f"Kling answered the query for external_task_id {key!r} with "
                                 f"the task of {str(external)[:80]!r}")
        try:
            task_id = check_task_id(data.get("task_id"))
        except AmbiguousCreate as exc:
            raise TransientError(exc.message) from exc
        return parse_task(task_id, data)

    def _data_any(self, response: httpx.Response, payload: Any) -> Any:
        """The ``data`` of a successful envelope whatever its type; raises otherwise."""
        if response.status_code < 400 and _code(payload) == 0:
            return payload.get("data")
        return self._data(response, payload, creating=False)

    def _data(self, response: httpx.Response, payload: Any, *, creating: bool
              ) -> Mapping[str, Any]:
        """The ``data`` of a successful envelope; raises the mapped error otherwise."""
        code = _code(payload)
        if response.status_code < 400 and code == 0:
            data = payload.get("data")
            if isinstance(data, Mapping):
                return data
        if code is None or code == 0:
            # No envelope, or success with nothing in it: judge by the HTTP status alone.
            if response.status_code < 400:
                raise_unexpected(response, creating=creating)
            raise classify(response, None, None, creating=creating)
        message = payload.get("message")
        message = self._scrub(str(message)[:2000]) if isinstance(message, str | int) and \
            message else None
        raise classify(response, code, message, creating=creating)


def kind_of(spec: JobSpec) -> str:
    """``image2video`` when the job carries an image, ``text2video`` otherwise."""
    return "image2video" if spec.image or spec.image_tail else "text2video"


def _code(payload: Any) -> int | None:
    if not isinstance(payload, Mapping):
        return None
    code = payload.get("code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.strip().isascii() and code.strip().isdigit() \
            and len(code.strip()) <= 9:
        return int(code)
    return None


def is_not_found(response: httpx.Response, payload: Any) -> bool:
    """Whether Kling says no task has that id (a 404 envelope, or a "not found" message).

    Auth, rate and server codes are never "not found", even on a 404: None from a lookup lets
    the engine create the task again, so only a clear answer may produce it.
    """
    code = _code(payload)
    if code is None or code in _ACCOUNT or code in (_EXPIRED, _RATE, _SLOTS) or code in _SERVER:
        # No envelope: a proxy or a wrong path answered, not Kling about this task.
        return False
    if response.status_code == 404:
        return True
    message = payload.get("message") if isinstance(payload, Mapping) else None
    return code in _REFUSED and isinstance(message, str) and bool(_NOT_FOUND.search(message))


def classify(response: httpx.Response, code: int | None, message: str | None, *,
             creating: bool) -> ProviderError:
    """The batchkling error for a Kling error answer (API.md §2's table)."""
    status = response.status_code
    text = describe_status(response, message)
    if code is not None:
        text = f"{text} (Kling code {code})"
    scode = str(code) if code is not None else None
    if code in _ACCOUNT or code == _EXPIRED:
        if code == _EXPIRED:
            # Only reached when a freshly signed token was refused too (or for an API key):
            # most likely our clock disagrees with Kling's.
            text += "; check the system clock and that the keys are current"
        return AccountBlocked(text, code=scode, status=status)
    if code == _SLOTS:
        return SlotsExhausted(text, code=scode, status=status)
    if code == _RATE:
        return RateLimited(text, retry_after=retry_after(response), code=scode, status=status)
    if code in _REFUSED:
        if creating and message and _DUPLICATE.search(message):
            # Kling refuses a second task with an external_task_id it has seen: the task for
            # this attempt already exists (an earlier create of it got no answer to us). Failing
            # the job would abandon a paid render; AmbiguousCreate makes the engine look it up
            # by the key and adopt it.
            return AmbiguousCreate(text, code=scode, status=status)
        if not creating and status == 404:
            # A task queried right after its create may not be visible yet; the deadline
            # bounds how long that is believed.
            return TransientError(text, code=scode, status=status)
        return TaskFailed(text, retryable=False, code=scode, status=status)
    if code in _SERVER or status >= 500:
        if creating:
            return AmbiguousCreate(text, code=scode, status=status)
        return TransientError(text, code=scode, status=status)
    if status == 429:
        return RateLimited(text, retry_after=retry_after(response), code=scode, status=status)
    if status in (401, 403):
        return AccountBlocked(text, code=scode, status=status)
    if not creating:
        return TransientError(text, code=scode, status=status)
    if 400 <= status < 500:
        return TaskFailed(text, retryable=False, code=scode, status=status)
    # An unknown non-zero code on a 2xx create: whether a task exists is not known.
    return AmbiguousCreate(text, code=scode, status=status)


def parse_task(task_id: str, data: Mapping[str, Any]) -> TaskStatus:
    """Normalise Kling's task ``data`` (statuses, ms timestamps, units, failure reason)."""
    status = data.get("task_status")
    raw = status.strip().lower() if isinstance(status, str) else ""
    phase = _STATUS.get(raw, Phase.RUNNING)  # an unknown status means still running
    created = timestamp(data.get("created_at"))
    updated = timestamp(data.get("updated_at"))
    units = money(data.get("final_unit_deduction"))
    if phase is Phase.SUCCEEDED:
        url = dig(data, "task_result", "videos", 0, "url")
        if not isinstance(url, str) or not url:
            # Reported done without a video yet: poll again rather than fail a paid render.
            return TaskStatus(task_id, Phase.RUNNING, progress=100.0, created_at=created)
        return TaskStatus(task_id, Phase.SUCCEEDED, progress=100.0, video_url=url,
                          cost_units=units, created_at=created, completed_at=updated)
    if phase is Phase.FAILED:
        reason = data.get("task_status_msg")
        reason = reason.strip()[:2000] if isinstance(reason, str) and reason.strip() else (
            "the task failed without a reason")
        permanent = bool(_POLICY.search(reason))
        return TaskStatus(task_id, Phase.FAILED, cost_units=units,
                          error_code="content_policy" if permanent else "task_failed",
                          error_message=reason, retryable=not permanent, created_at=created,
                          completed_at=updated)
    # `updated_at` is the latest status change: for a task processing, when its render began.
    started = updated if phase is Phase.RUNNING else None
    return TaskStatus(task_id, phase, created_at=created, started_at=started)


__all__ = ["KlingProvider", "classify", "kind_of", "parse_task"]
