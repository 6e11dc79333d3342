"""The ImaRouter adapter: request mapping, tolerant parsing, error classification."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchkling.errors import (
    AccountBlocked,
    AmbiguousCreate,
    RateLimited,
    SlotsExhausted,
    TaskFailed,
    TransientError,
)
from batchkling.models import JobSpec
from batchkling.providers.base import Phase
from batchkling.providers.imarouter import ImaRouterProvider, parse_task

KEY = "sk-unit-test-key-123456"
SPEC = JobSpec(job_id="j", model="kling-v2-6", prompt="a cat", duration=5, size="16:9",
               mode="pro", negative_prompt="blur")


def _provider(handler: Callable[[httpx.Request], httpx.Response]) -> ImaRouterProvider:
    return ImaRouterProvider("https://api.example.test", KEY,
                             transport=httpx.MockTransport(handler))


def _answer(status: int, body: Any = None, headers: dict[str, str] | None = None,
            text: str | None = None) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


class TestRequest:
    async def test_create_body_and_headers(self, tmp_path: Path) -> None:
        """Mode, image_tail, negative prompt and the key travel where the gateway expects."""
        first, last = tmp_path / "a.png", tmp_path / "b.jpg"
        first.write_bytes(b"\x89PNG-first")
        last.write_bytes(b"\xff\xd8-last")
        spec = JobSpec(job_id="j", model="kling-v2-6", prompt="p", duration=10, size="9:16",
                       mode="pro", image=str(first), image_tail=str(last),
                       metadata={"callback_url": "https://cb.example/x"})
        seen: dict[str, Any] = {}

        def handler(request: httpx.Request) -> httpx.Response:
            seen["body"] = json.loads(request.content)
            seen["headers"] = request.headers
            return httpx.Response(200, json={"id": "task_1", "status": "queued"})

        provider = _provider(handler)
        assert await provider.create(spec, "bk-key-1") == "task_1"
        await provider.aclose()
        body = seen["body"]
        assert body["model"] == "kling-v2-6" and body["duration"] == 10
        assert body["size"] == "9:16"
        assert body["image"] == "data:image/png;base64," + base64.b64encode(
            b"\x89PNG-first").decode()
        assert body["metadata"]["mode"] == "pro"
        assert body["metadata"]["image_tail"].startswith("data:image/jpeg;base64,")
        assert body["metadata"]["external_task_id"] == "bk-key-1"
        assert body["metadata"]["callback_url"] == "https://cb.example/x"
        assert seen["headers"]["idempotency-key"] == "bk-key-1"
        assert seen["headers"]["authorization"] == f"Bearer {KEY}"

    async def test_task_id_from_wrapped_body(self) -> None:
        """`{code, data: {task_id}}` bodies are unwrapped."""
        provider = _provider(_answer(200, {"code": 0, "data": {"task_id": "t-9"}}))
        assert await provider.create(SPEC, "k") == "t-9"

    async def test_task_id_with_path_characters_is_refused(self) -> None:
        """A task id that would escape the URL path is not used."""
        provider = _provider(_answer(200, {"id": "../../admin"}))
        with pytest.raises(AmbiguousCreate, match="unusable task id"):
            await provider.create(SPEC, "k")


class TestErrors:
    @pytest.mark.parametrize(
        ("status", "body", "headers", "expected"),
        [
            (401, {"code": "invalid_api_key", "message": "bad key"}, None, AccountBlocked),
            (402, {"code": "insufficient_quota", "message": "top up"}, None, AccountBlocked),
            (429, {"error": {"message": "Kling 1102: resource pack depleted"}}, None,
             AccountBlocked),
            (429, {"code": "concurrency_limit_exceeded", "message": "parallel task limit"},
             None, SlotsExhausted),
            (400, {"code": "invalid_request", "message": "duration must be 5 or 10"}, None,
             TaskFailed),
            (500, {"code": "upstream_error", "message": "boom"}, None, AmbiguousCreate),
            (503, None, None, AmbiguousCreate),
        ],
    )
    async def test_create_classification(self, status: int, body: Any,
                                         headers: dict[str, str] | None,
                                         expected: type[Exception]) -> None:
        """Each error answer to a create maps to what the engine must do about it."""
        with pytest.raises(expected):
            await _provider(_answer(status, body, headers)).create(SPEC, "k")

    async def test_rate_limit_carries_retry_after(self) -> None:
        """A 429 rate limit reports Retry-After in seconds."""
        provider = _provider(_answer(429, {"code": "rate_limit_exceeded"},
                                     {"Retry-After": "7"}))
        with pytest.raises(RateLimited) as info:
            await provider.create(SPEC, "k")
        assert info.value.retry_after == 7

    async def test_html_page_on_create_is_ambiguous(self) -> None:
        """A 200 that is not JSON may hide a created task: ambiguous, not a failure."""
        provider = _provider(_answer(200, text="<html>gateway</html>"))
        with pytest.raises(AmbiguousCreate, match="unreadable answer"):
            await provider.create(SPEC, "k")

    async def test_connect_error_is_safe_to_retry(self) -> None:
        """Nothing left the machine: a transient error, not an ambiguous create."""
        def handler(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("refused", request=request)

        with pytest.raises(TransientError):
            await _provider(handler).create(SPEC, "k")

    async def test_read_timeout_is_ambiguous(self) -> None:
        """The request was sent and no answer came: the task may exist."""
        def handler(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("slow", request=request)

        with pytest.raises(AmbiguousCreate):
            await _provider(handler).create(SPEC, "k")

    @pytest.mark.parametrize("status", [404, 500, 502])
    async def test_poll_errors_are_transient(self, status: int) -> None:
        """A failed poll never fails the job: 404 right after create, 5xx, all transient."""
        with pytest.raises(TransientError):
            await _provider(_answer(status, {"code": "x"})).status("t1", SPEC)

    async def test_malformed_poll_is_transient(self) -> None:
        """Malformed JSON on a poll is retried, not fatal."""
        with pytest.raises(TransientError):
            await _provider(_answer(200, text="{not json")).status("t1", SPEC)


class TestParsing:
    @pytest.mark.parametrize("status", ["succeeded", "succeed", "success", "completed"])
    def test_success_synonyms(self, status: str) -> None:
        """Every done synonym with a URL is success."""
        parsed = parse_task("t", {"status": status, "metadata": {"url": "https://v/x.mp4"}},
                            poll_after=None)
        assert parsed.phase is Phase.SUCCEEDED and parsed.video_url == "https://v/x.mp4"

    @pytest.mark.parametrize("status", ["queued", "pending", "submitted", "NOT_START"])
    def test_queued_synonyms(self, status: str) -> None:
        """Waiting synonyms are queued."""
        assert parse_task("t", {"status": status}, poll_after=None).phase is Phase.QUEUED

    def test_unknown_status_means_running(self) -> None:
        """An unknown status keeps the task alive; only the deadline ends the wait."""
        assert parse_task("t", {"status": "rendering"}, poll_after=None).phase is Phase.RUNNING

    def test_completed_without_url_is_still_running(self) -> None:
        """`completed` before the URL appears is polled again, not failed."""
        parsed = parse_task("t", {"status": "completed"}, poll_after=None)
        assert parsed.phase is Phase.RUNNING

    @pytest.mark.parametrize("where", [
        {"results": [{"url": "https://v/a.mp4"}]},
        {"video": {"url": "https://v/a.mp4"}},
        {"output": [{"url": "https://v/a.mp4"}]},
        {"url": "https://v/a.mp4"},
        {"video_url": "https://v/a.mp4"},
    ])
    def test_url_anywhere(self, where: dict[str, Any]) -> None:
        """The result URL is found in each place gateways put it."""
        parsed = parse_task("t", {"status": "completed", **where}, poll_after=None)
        assert parsed.video_url == "https://v/a.mp4"

    def test_progress_string_and_ms_timestamps(self) -> None:
        """"42%" and millisecond timestamps are read."""
        parsed = parse_task("t", {"status": "in_progress", "progress": "42%",
                                  "created_at": 1_700_000_000_000}, poll_after=None)
        assert parsed.progress == 42 and parsed.created_at == 1_700_000_000

    @pytest.mark.parametrize(("body", "retryable"), [
        ({"status": "failed", "error": {"code": "content_policy",
                                        "message": "Content policy violation"}}, False),
        ({"status": "failed", "fail_reason": "internal error, please retry"}, True),
        ({"status": "error", "task_status_msg": "The prompt is sensitive"}, False),
    ])
    def test_failure_reason_and_retryability(self, body: dict[str, Any],
                                             retryable: bool) -> None:
        """The reason is read from any field; policy failures are not retried."""
        parsed = parse_task("t", body, poll_after=None)
        assert parsed.phase is Phase.FAILED
        assert parsed.error_message and parsed.retryable is retryable
