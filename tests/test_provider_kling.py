"""The Kling native adapter: request mapping, JWT auth, error codes, task parsing, lookup."""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from sim_helpers import Sim

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
from batchkling.models import JobSpec
from batchkling.providers.base import Phase
from batchkling.providers.kling import KlingProvider, kind_of, parse_task

pytestmark = pytest.mark.timeout(30)

ACCESS, SECRET = "sim-access-key", "sim-secret-key"
API_KEY = "kling-api-key-0123456789"
ASSETS = Path(__file__).parent.parent / "sample_manifests" / "assets"
FIRST, LAST = ASSETS / "handbag_first.jpg", ASSETS / "handbag_last.jpg"
TEXT = JobSpec(job_id="t", model="kling-v2-6", prompt="a red fox in snow", duration=5,
               size="9:16", mode="pro", negative_prompt="blur")
IMAGE = JobSpec(job_id="i", model="kling-v2-6", prompt="the bag turns", duration=10,
                size="16:9", mode="std", image=str(FIRST), image_tail=str(LAST))


class ManualClock:
    """Wall time that moves only when told to (the provider signs tokens with it)."""

    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self.now = wall

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()


class SimWall(ManualClock):
    """The in-process simulator's wall time, plus an optional skew of our own."""

    def __init__(self, sim: Sim) -> None:
        super().__init__()
        self.sim, self.skew = sim, 0.0

    def wall(self) -> float:
        return self.sim.state.wall_now() + self.skew


def _creds(api_key: str | None) -> dict[str, str | None]:
    if api_key is not None:
        return {"api_key": api_key, "access_key": None, "secret_key": None}
    return {"api_key": None, "access_key": ACCESS, "secret_key": SECRET}


def _mock(handler: Callable[[httpx.Request], httpx.Response], *, clock: ManualClock | None = None,
          api_key: str | None = None) -> KlingProvider:
    creds = _creds(api_key)
    return KlingProvider("https://kling.example.test", api_key=creds["api_key"],
                         access_key=creds["access_key"], secret_key=creds["secret_key"],
                         transport=httpx.MockTransport(handler), clock=clock or ManualClock())


def _on_sim(sim: Sim, *, api_key: str | None = None) -> KlingProvider:
    creds = _creds(api_key)
    return KlingProvider("http://testserver", api_key=creds["api_key"],
                         access_key=creds["access_key"], secret_key=creds["secret_key"],
                         transport=httpx.ASGITransport(app=sim.app), clock=SimWall(sim))


def _envelope(code: int = 0, data: Any = None, message: str = "SUCCEED") -> dict[str, Any]:
    return {"code": code, "message": message, "request_id": "r-1", "data": data}


def _answer(status: int, body: Any = None, headers: dict[str, str] | None = None,
            text: str | None = None) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def _claims(request: httpx.Request) -> dict[str, Any]:
    token = request.headers["authorization"].removeprefix("Bearer ")
    with warnings.catch_warnings():  # the simulator's documented secret is short
        warnings.simplefilter("ignore")
        claims: dict[str, Any] = jwt.decode(token, SECRET, algorithms=["HS256"],
                                            options={"verify_exp": False, "verify_nbf": False})
    return claims


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _capture() -> tuple[list[httpx.Request], Callable[[httpx.Request], httpx.Response]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=_envelope(data={"task_id": "812345",
                                                        "task_status": "submitted"}))

    return seen, handler


class TestRequest:
    async def test_text2video_body(self) -> None:
        """A prompt-only job goes to text2video with Kling's field names and a string duration."""
        seen, handler = _capture()
        provider = _mock(handler)
        spec = JobSpec(job_id="t", model="kling-v2-6", prompt="p", duration=10, size="9:16",
                       mode="pro", negative_prompt="blur", sound="on",
                       camera_control={"type": "simple", "config": {"zoom": 5}},
                       metadata={"callback_url": "https://cb.example/x"})
        assert await provider.create(spec, "bk-key-1") == "812345"
        await provider.aclose()
        request = seen[0]
        assert request.method == "POST" and request.url.path == "/v1/videos/text2video"
        assert json.loads(request.content) == {
            "model_name": "kling-v2-6", "prompt": "p", "duration": "10", "aspect_ratio": "9:16",
            "mode": "pro", "negative_prompt": "blur",
            "camera_control": {"type": "simple", "config": {"zoom": 5}}, "sound": "on",
            "callback_url": "https://cb.example/x", "external_task_id": "bk-key-1",
        }

    async def test_image2video_body_has_raw_base64(self) -> None:
        """Local frames travel as raw base64 (no ``data:`` prefix) to image2video."""
        seen, handler = _capture()
        provider = _mock(handler)
        await provider.create(IMAGE, "bk-key-2")
        await provider.aclose()
        body = json.loads(seen[0].content)
        assert seen[0].url.path == "/v1/videos/image2video"
        assert body["image"] == _b64(FIRST) and body["image_tail"] == _b64(LAST)
        assert not body["image"].startswith("data:")
        assert body["duration"] == "10" and body["external_task_id"] == "bk-key-2"
        assert "aspect_ratio" not in body  # image2video keeps the frame's own aspect ratio

    async def test_image_urls_pass_as_they_are(self) -> None:
        """An https image is sent as the URL, unchanged."""
        seen, handler = _capture()
        provider = _mock(handler)
        spec = JobSpec(job_id="u", model="kling-v1-6", prompt="p", duration=5, size="1:1",
                       image="https://cdn.example/a.jpg")
        await provider.create(spec, "k")
        await provider.aclose()
        assert json.loads(seen[0].content)["image"] == "https://cdn.example/a.jpg"

    @pytest.mark.parametrize(("model", "has_mode", "has_cfg"), [
        ("kling-v1-6", True, True),
        ("kling-v2-6", True, False),
        ("kling-v2-master", False, False),
        ("kling-v2-1-master", False, False),
    ])
    async def test_mode_and_cfg_scale_only_where_the_model_takes_them(
            self, model: str, has_mode: bool, has_cfg: bool) -> None:
        """``mode`` is left out for *-master models, ``cfg_scale`` for kling-v2* models."""
        seen, handler = _capture()
        provider = _mock(handler)
        spec = JobSpec(job_id="m", model=model, prompt="p", duration=5, size="16:9", mode="pro",
                       cfg_scale=0.4)
        await provider.create(spec, "k")
        await provider.aclose()
        body = json.loads(seen[0].content)
        assert ("mode" in body) is has_mode
        assert ("cfg_scale" in body) is has_cfg

    async def test_metadata_cannot_replace_the_external_task_id(self) -> None:
        """The attempt's key is the external_task_id even if metadata names another."""
        seen, handler = _capture()
        provider = _mock(handler)
        spec = JobSpec(job_id="x", model="kling-v2-6", prompt="p", duration=5, size="16:9",
                       metadata={"external_task_id": "mine", "callback_url": "https://c.x/"})
        await provider.create(spec, "bk-real")
        await provider.aclose()
        body = json.loads(seen[0].content)
        assert body["external_task_id"] == "bk-real" and body["callback_url"] == "https://c.x/"

    async def test_unreadable_image_fails_the_job(self, tmp_path: Path) -> None:
        """A missing image file is a final job failure, and nothing is sent."""
        seen, handler = _capture()
        provider = _mock(handler)
        spec = JobSpec(job_id="x", model="kling-v2-6", prompt="p", duration=5, size="16:9",
                       image=str(tmp_path / "gone.jpg"))
        with pytest.raises(TaskFailed) as info:
            await provider.create(spec, "k")
        await provider.aclose()
        assert info.value.retryable is False and seen == []

    def test_kind_follows_the_images(self) -> None:
        """image2video whenever the spec carries a frame, text2video otherwise."""
        assert kind_of(TEXT) == "text2video"
        assert kind_of(IMAGE) == "image2video"

    @pytest.mark.parametrize("spec", [TEXT, IMAGE], ids=["text2video", "image2video"])
    async def test_the_simulator_accepts_and_finishes_both_kinds(self, spec: JobSpec) -> None:
        """Against the Kling-shaped simulator a task is created, polled and ends with a video."""
        async with Sim(queue_s=1, render_median_s=10) as sim:
            provider = _on_sim(sim)
            task_id = await provider.create(spec, f"bk-{spec.job_id}")
            first = await provider.status(task_id, spec)
            assert first.phase is Phase.QUEUED and first.task_id == task_id
            sim.advance(600)
            done = await provider.status(task_id, spec)
            await provider.aclose()
        assert done.phase is Phase.SUCCEEDED and done.video_url
        assert done.cost_units is not None and done.cost_units > 0 and done.cost_usd is None
        assert done.created_at is not None and done.completed_at is not None
        assert 1e9 < done.created_at <= done.completed_at < 1e10  # seconds, not ms


class TestTaskParsing:
    @pytest.mark.parametrize(("raw", "phase"), [
        ("submitted", Phase.QUEUED), ("processing", Phase.RUNNING),
        ("failed", Phase.FAILED), ("something-new", Phase.RUNNING),
    ])
    def test_statuses(self, raw: str, phase: Phase) -> None:
        """Kling's statuses map onto phases; an unknown one means still running."""
        assert parse_task("8", {"task_status": raw}).phase is phase

    def test_succeed_reads_the_first_video_units_and_ms_timestamps(self) -> None:
        """``succeed`` gives the first video's URL, units as cost_units and seconds timestamps."""
        status = parse_task("8", {
            "task_id": "8", "task_status": "succeed", "created_at": 1_722_000_000_000,
            "updated_at": 1_722_000_090_500, "final_unit_deduction": "2.5",
            "task_result": {"videos": [{"id": "v", "url": "https://cdn/v.mp4",
                                        "duration": "5.042"}]}})
        assert status.phase is Phase.SUCCEEDED and status.video_url == "https://cdn/v.mp4"
        assert status.cost_units == 2.5 and status.cost_usd is None
        assert status.created_at == 1_722_000_000.0 and status.completed_at == 1_722_000_090.5

    def test_succeed_without_a_video_keeps_polling(self) -> None:
        """A task reported done with no URL yet is treated as still running."""
        status = parse_task("8", {"task_status": "succeed", "task_result": {}})
        assert status.phase is Phase.RUNNING

    @pytest.mark.parametrize(("reason", "retryable"), [
        ("Failure to pass the risk control system", False),
        ("The content violates the platform policy", False),
        ("Internal error, please try again later", True),
        ("", True),
    ])
    def test_failure_reason_decides_retry(self, reason: str, retryable: bool) -> None:
        """Content-policy reasons are final; internal ones may succeed on a new attempt."""
        status = parse_task("8", {"task_status": "failed", "task_status_msg": reason,
                                  "final_unit_deduction": "0"})
        assert status.phase is Phase.FAILED and status.retryable is retryable
        assert status.error_message and status.cost_units == 0.0

    @pytest.mark.parametrize(("tag", "retryable"), [("content_policy", False),
                                                    ("internal", True)])
    async def test_simulated_failures(self, tag: str, retryable: bool) -> None:
        """The simulator's two failure kinds come out final and retryable respectively."""
        spec = JobSpec(job_id="f", model="kling-v2-6", prompt=f"x [sim:fail={tag}]",
                       duration=5, size="16:9")
        async with Sim() as sim:
            provider = _on_sim(sim)
            task_id = await provider.create(spec, "bk-f")
            sim.advance(3600)
            status = await provider.status(task_id, spec)
            await provider.aclose()
        assert status.phase is Phase.FAILED and status.retryable is retryable
        assert status.error_message


#: (code, HTTP status, error on create, error on status/lookup)
CODES: list[tuple[int, int, type[ProviderError], type[ProviderError]]] = [
    *[(c, 401, AccountBlocked, AccountBlocked) for c in (1000, 1001, 1002, 1003)],
    *[(c, 429, AccountBlocked, AccountBlocked) for c in (1100, 1101, 1102, 1304)],
    (1103, 403, TaskFailed, TaskFailed),
    (1200, 400, TaskFailed, TaskFailed),
    (1201, 400, TaskFailed, TaskFailed),
    (1203, 404, TaskFailed, TransientError),
    (1300, 400, TaskFailed, TaskFailed),
    (1301, 400, TaskFailed, TaskFailed),
    (1302, 429, RateLimited, RateLimited),
    (1303, 429, SlotsExhausted, SlotsExhausted),
    (5000, 500, AmbiguousCreate, TransientError),
    (5001, 503, AmbiguousCreate, TransientError),
]


class TestErrorCodes:
    @pytest.mark.parametrize(("code", "http", "on_create", "on_poll"), CODES,
                             ids=[str(c[0]) for c in CODES])
    async def test_every_code_is_classified(self, code: int, http: int,
                                            on_create: type[ProviderError],
                                            on_poll: type[ProviderError]) -> None:
        """Each code of API.md's table maps to the documented error, on create and on poll."""
        body = _envelope(code, message=f"kling says {code}")
        provider = _mock(_answer(http, body, headers={"Retry-After": "7"}))
        with pytest.raises(ProviderError) as created:
            await provider.create(TEXT, "k")
        with pytest.raises(ProviderError) as polled:
            await provider.status("812345", TEXT)
        await provider.aclose()
        assert type(created.value) is on_create and type(polled.value) is on_poll
        assert created.value.code == str(code) and created.value.status == http
        assert f"kling says {code}" in created.value.message
        assert f"code {code}" in created.value.message
        if isinstance(created.value, TaskFailed):
            assert created.value.retryable is False
        if isinstance(created.value, RateLimited):
            assert created.value.retry_after == 7.0

    async def test_code_with_200_is_still_an_error(self) -> None:
        """A non-zero code is an error even when the HTTP status says 200."""
        provider = _mock(_answer(200, _envelope(1303, message="parallel limit")))
        with pytest.raises(SlotsExhausted):
            await provider.create(TEXT, "k")
        await provider.aclose()

    async def test_duplicate_external_task_id_means_reconcile(self) -> None:
        """A create refused because its external_task_id exists is ambiguous, not a failure."""
        async with Sim() as sim:
            provider = _on_sim(sim)
            await provider.create(TEXT, "bk-same")
            with pytest.raises(AmbiguousCreate) as info:
                await provider.create(TEXT, "bk-same")
            assert (await provider.lookup("bk-same", TEXT)) is not None
            await provider.aclose()
            assert (await sim.stats())["creates"] == 1
        assert info.value.code == "1201"

    async def test_content_policy_on_create_is_final(self) -> None:
        """The simulator's 1301 for a forbidden prompt fails the job for good."""
        spec = JobSpec(job_id="x", model="kling-v2-6", prompt="a forbidden scene", duration=5,
                       size="16:9")
        async with Sim() as sim:
            provider = _on_sim(sim)
            with pytest.raises(TaskFailed) as info:
                await provider.create(spec, "k")
            await provider.aclose()
        assert info.value.code == "1301" and info.value.retryable is False

    @pytest.mark.parametrize(("exc", "on_create"), [
        (httpx.ConnectError("refused"), TransientError),
        (httpx.ReadTimeout("slow"), AmbiguousCreate),
        (httpx.RemoteProtocolError("dropped"), AmbiguousCreate),
    ])
    async def test_transport_failures(self, exc: Exception,
                                      on_create: type[ProviderError]) -> None:
        """Nothing sent is safe to repeat; a create that may have arrived is ambiguous."""
        def handler(request: httpx.Request) -> httpx.Response:
            raise exc

        provider = _mock(handler)
        with pytest.raises(ProviderError) as created:
            await provider.create(TEXT, "k")
        with pytest.raises(TransientError):
            await provider.status("812345", TEXT)
        await provider.aclose()
        assert type(created.value) is on_create

    @pytest.mark.parametrize(("status", "text", "on_create"), [
        (502, "<html>bad gateway</html>", AmbiguousCreate),
        (200, "not json", AmbiguousCreate),
        (403, "<html>forbidden</html>", AccountBlocked),
        (429, "slow down", RateLimited),
    ])
    async def test_answers_without_an_envelope(self, status: int, text: str,
                                               on_create: type[ProviderError]) -> None:
        """Proxies' bare answers are judged by their HTTP status."""
        provider = _mock(_answer(status, text=text))
        with pytest.raises(ProviderError) as info:
            await provider.create(TEXT, "k")
        await provider.aclose()
        assert type(info.value) is on_create

    async def test_unusable_task_id_is_ambiguous(self) -> None:
        """A success without a usable task id cannot be tracked: reconcile it."""
        provider = _mock(_answer(200, _envelope(data={"task_id": "../../etc"})))
        with pytest.raises(AmbiguousCreate):
            await provider.create(TEXT, "k")
        await provider.aclose()

    async def test_keys_never_appear_in_errors(self) -> None:
        """A provider echoing credentials back has them redacted from the error message."""
        def handler(request: httpx.Request) -> httpx.Response:
            auth = request.headers["authorization"]
            return httpx.Response(401, json=_envelope(
                1002, message=f"bad {auth} for {ACCESS} / {SECRET} / {API_KEY}"))

        for api_key, secrets in ((None, (ACCESS, SECRET)), (API_KEY, (API_KEY,))):
            provider = _mock(handler, api_key=api_key)
            with pytest.raises(AccountBlocked) as info:
                await provider.create(TEXT, "k")
            await provider.aclose()
            text = str(info.value)
            for secret in (*secrets, provider.bearer()):
                assert secret not in text
            assert "[REDACTED]" in text and "code 1002" in text


class TestAuth:
    async def test_jwt_claims(self) -> None:
        """The bearer is an HS256 JWT: iss = access key, exp = now+1800, nbf = now-5."""
        seen, handler = _capture()
        clock = ManualClock(1_700_000_000.0)
        provider = _mock(handler, clock=clock)
        await provider.create(TEXT, "k")
        await provider.aclose()
        token = seen[0].headers["authorization"].removeprefix("Bearer ")
        assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
        assert _claims(seen[0]) == {"iss": ACCESS, "exp": 1_700_001_800,
                                    "nbf": 1_699_999_995}

    async def test_signing_is_quiet(self) -> None:
        """The simulator's short default secret raises no PyJWT warning when signing."""
        provider = _mock(_capture()[1])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            provider.bearer()
        await provider.aclose()

    async def test_token_is_cached_then_renewed_before_it_expires(self) -> None:
        """One token serves requests until five minutes before exp; then a new one is signed."""
        seen, handler = _capture()
        clock = ManualClock()
        provider = _mock(handler, clock=clock)
        await provider.status("8", TEXT)
        clock.now += 1400  # 400 s left: still good
        await provider.status("8", TEXT)
        clock.now += 150  # 250 s left: renewed
        await provider.status("8", TEXT)
        clock.now += 7200  # long past the first token's lifetime
        await provider.status("8", TEXT)
        await provider.aclose()
        tokens = [r.headers["authorization"] for r in seen]
        assert tokens[0] == tokens[1] != tokens[2] != tokens[3]
        assert _claims(seen[3])["exp"] == int(clock.now + 1800)

    async def test_1004_resigns_and_retries_once(self) -> None:
        """On 1004 a fresh token is signed and the same request sent once more."""
        seen: list[httpx.Request] = []
        clock = ManualClock()

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            if len(seen) == 1:
                clock.now += 60  # the server's clock is ahead of ours
                return httpx.Response(401, json=_envelope(1004, message="token expired"))
            return httpx.Response(200, json=_envelope(data={"task_id": "8123"}))

        provider = _mock(handler, clock=clock)
        assert await provider.create(TEXT, "bk-k") == "8123"
        await provider.aclose()
        assert len(seen) == 2
        assert seen[0].headers["authorization"] != seen[1].headers["authorization"]
        assert json.loads(seen[0].content) == json.loads(seen[1].content)

    async def test_1004_twice_stops_with_a_clock_hint(self) -> None:
        """A freshly signed token refused as expired too is not retried again."""
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(401, json=_envelope(1004, message="token expired"))

        provider = _mock(handler)
        with pytest.raises(AccountBlocked) as info:
            await provider.status("8", TEXT)
        await provider.aclose()
        assert len(seen) == 2 and "clock" in info.value.message

    async def test_clock_skew_against_the_simulator(self) -> None:
        """When the simulator says 1004 for a token we still trust, a new one gets through."""
        async with Sim() as sim:
            provider = _on_sim(sim)
            clock = provider._clock
            assert isinstance(clock, SimWall)
            task_id = await provider.create(TEXT, "bk-skew")
            before = sim.state.counters.rejected.get("auth", 0)
            clock.skew = -1000.0  # our clock falls 1000 s behind the simulator's...
            sim.advance(2000)  # ...so the cached token (800 s left to us) has expired there
            status = await provider.status(task_id, TEXT)
            await provider.aclose()
            assert status.task_id == task_id
            assert sim.state.counters.rejected["auth"] == before + 1

    async def test_a_run_longer_than_the_token_lifetime(self) -> None:
        """Hours of polling on one provider keep working as tokens expire and are replaced."""
        async with Sim(render_median_s=2 * 3600.0, render_sigma=0.0) as sim:
            provider = _on_sim(sim)
            task_id = await provider.create(TEXT, "bk-long")
            phases = []
            for _ in range(10):
                sim.advance(1000)
                phases.append((await provider.status(task_id, TEXT)).phase)
            await provider.aclose()
            assert phases[0] is Phase.RUNNING and phases[-1] is Phase.SUCCEEDED
            assert sim.state.counters.rejected.get("auth", 0) == 0

    async def test_api_key_is_the_bearer(self) -> None:
        """A single-key account sends the key as the bearer, and 1004 is not retried."""
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(401, json=_envelope(1004, message="expired"))

        provider = _mock(handler, api_key=API_KEY)
        assert provider.bearer() == API_KEY
        with pytest.raises(AccountBlocked):
            await provider.create(TEXT, "k")
        await provider.aclose()
        assert [r.headers["authorization"] for r in seen] == [f"Bearer {API_KEY}"]

    async def test_api_key_against_the_simulator(self) -> None:
        """The simulator takes a configured API key as the bearer."""
        async with Sim(api_key=API_KEY) as sim:
            provider = _on_sim(sim, api_key=API_KEY)
            task_id = await provider.create(TEXT, "bk-api")
            assert (await provider.status(task_id, TEXT)).task_id == task_id
            await provider.aclose()

    def test_credentials_are_required(self) -> None:
        """Neither an API key nor both JWT keys: a configuration error."""
        with pytest.raises(ConfigError):
            KlingProvider("https://x", access_key=ACCESS)


class TestLookup:
    @pytest.mark.parametrize("spec", [TEXT, IMAGE], ids=["text2video", "image2video"])
    async def test_found_by_external_task_id(self, spec: JobSpec) -> None:
        """The task made with a key is found by it, with Kling's own task id and creation time."""
        async with Sim() as sim:
            provider = _on_sim(sim)
            task_id = await provider.create(spec, "bk-lost-answer")
            found = await provider.lookup("bk-lost-answer", spec)
            await provider.aclose()
        assert found is not None
        assert found.task_id == task_id != "bk-lost-answer"
        assert found.phase is Phase.QUEUED and found.created_at is not None

    async def test_not_found_is_none(self) -> None:
        """A key no task carries gives None (the simulator answers 1201 with HTTP 404)."""
        async with Sim() as sim:
            provider = _on_sim(sim)
            assert await provider.lookup("bk-never-sent", TEXT) is None
            await provider.aclose()

    async def test_not_found_message_on_200(self) -> None:
        """A "task not found" message under a 1201/1203 code is also None, whatever the status."""
        provider = _mock(_answer(400, _envelope(1201, message="Task does not exist")))
        assert await provider.lookup("bk-x", TEXT) is None
        await provider.aclose()

    @pytest.mark.parametrize(("http", "body", "error"), [
        (401, _envelope(1002, message="token invalid"), AccountBlocked),
        (404, _envelope(1100, message="account abnormal"), AccountBlocked),
        (500, _envelope(5000, message="internal"), TransientError),
        (404, None, TransientError),  # a bare 404 is a wrong path, not an answer about the task
        (200, _envelope(data={"task_id": "8", "task_status": "submitted",
                              "task_info": {"external_task_id": "someone-else"}}),
         TransientError),
    ])
    async def test_other_answers_raise(self, http: int, body: Any,
                                       error: type[ProviderError]) -> None:
        """Anything but a clear "found" or "not found" raises, so the engine never guesses."""
        provider = _mock(_answer(http, body) if body is not None
                         else _answer(http, text="<html>404</html>"))
        with pytest.raises(error):
            await provider.lookup("bk-x", TEXT)
        await provider.aclose()

    async def test_lookup_uses_the_kind_of_the_spec(self) -> None:
        """The query goes to the endpoint of the job's kind, with the key in the path."""
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200, json=_envelope(data={
                "task_id": "8777", "task_status": "processing", "created_at": 1_722_000_000_000,
                "task_info": {"external_task_id": "bk-k"}}))

        provider = _mock(handler)
        found = await provider.lookup("bk-k", IMAGE)
        await provider.aclose()
        assert seen[0].method == "GET"
        assert seen[0].url.path == "/v1/videos/image2video/bk-k"
        assert found is not None and found.task_id == "8777" and found.phase is Phase.RUNNING
        assert found.created_at == 1_722_000_000.0
