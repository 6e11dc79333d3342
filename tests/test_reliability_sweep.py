"""The adversarial sweep of issue #14, in process: provider answers no reader expected, a
manifest edited under a rendering task, an image swapped before resume, hostile YAML.

Each class is one item of the issue (docs/reliability.md, "The adversarial sweep", numbers them
S2–S16) and fails on the code before its fix. Gateways that answer absurdly are
``httpx.MockTransport`` apps on virtual time; faults that need a real socket (a provider that
trickles) use the loopback server of ``tests/hostile_http.py``. Every run ends on the shared
invariants (tests/invariants.py).
"""

from __future__ import annotations

import errno
import json
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TEST_KEY
from hostile_http import HostileServer, Reply, Request
from invariants import check_invariants, db_query

import batchkling.logs
import batchkling.providers.http
import batchkling.run.download
from batchkling.errors import ManifestError
from batchkling.manifest.document import load_manifest
from batchkling.models import RunSummary
from batchkling.run.orchestrator import Orchestrator
from batchkling.testing import VirtualClock, VirtualSim, write_manifest

pytestmark = pytest.mark.timeout(60)
ENV = {"BATCHKLING_TEST_KEY": TEST_KEY}
API = "api.example.test"
CDN = "93.184.215.14"  # a public address literal: the downloader allows it, no DNS needed
MP4 = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 4000
_CASE = re.compile(r"\[case:([a-z0-9-]+)\]")

Answer = Callable[[httpx.Request, str], httpx.Response]


def _task(task_id: str, **fields: Any) -> httpx.Response:
    return httpx.Response(200, json={"id": task_id, "status": "completed",
                                     "results": [{"url": f"https://{CDN}/v/{task_id}.mp4"}],
                                     **fields})


class Gateway:
    """A fake ImaRouter and CDN. A job's ``[case:…]`` tag picks its create answer from
    ``creates`` and its poll answers from ``polls``; anything not named behaves."""

    def __init__(self, creates: dict[str, Answer] | None = None,
                 polls: dict[str, Answer] | None = None) -> None:
        self.creates, self.polls = creates or {}, polls or {}
        self.requests: list[httpx.Request] = []
        self.case_of: dict[str, str] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == CDN:
            return httpx.Response(200, content=MP4, headers={"content-type": "video/mp4"})
        if request.method == "POST":
            body = json.loads(request.content)
            match = _CASE.search(body["prompt"])
            case = match.group(1) if match else "ok"
            answer = self.creates.get(case)
            if answer is not None:
                return answer(request, case)
            task_id = f"task-{len(self.case_of):03d}"
            self.case_of[task_id] = case
            return httpx.Response(200, json={"id": task_id, "status": "queued"})
        task_id = request.url.path.rsplit("/", 1)[-1]
        case = self.case_of.get(task_id, "ok")
        answer = self.polls.get(case)
        return answer(request, task_id) if answer is not None else _task(task_id)

    def create_requests(self, case: str | None = None) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST" and (
            case is None or f"[case:{case}]" in json.loads(r.content)["prompt"])]


def _manifest(folder: Path, cases: list[str], **sections: Any) -> Path:
    limits = {"max_in_flight": 8, "submit_rate": 50, "task_timeout": "15m",
              **sections.pop("limits", {})}
    jobs = [{"id": case, "prompt": f"scene [case:{case}]"} for case in cases]
    return write_manifest(folder, jobs, name="sweep", base_url=f"https://{API}",
                          limits=limits, **sections)


async def _run(gateway: Gateway, path: Path, workdir: Path, **kwargs: Any) -> RunSummary:
    clock = VirtualClock()
    async with clock.running(), Orchestrator(
            load_manifest(path), workdir=workdir, env=ENV, clock=clock, seed=5,
            transport=httpx.MockTransport(gateway), **kwargs) as orch:
        return await orch.run()


def _no_internal_errors(workdir: Path) -> None:
    """No job ended in a bug report, and none is left in `submitting`."""
    assert db_query(workdir, "SELECT job_id, data FROM events WHERE event = "
                    "'job.internal_error'") == []
    assert db_query(workdir, "SELECT job_id FROM jobs WHERE state = 'submitting'") == []


class TestOneTaskForSeveralCreates:
    """S2: a gateway answers three creates with one task id (a bug, a replayed answer)."""

    async def test_only_the_first_job_owns_the_task(self, tmp_path: Path,
                                                    workdir: Path) -> None:
        """The first job to record the task keeps it; the others end `unknown` with a reason
        naming the owner — never `succeeded` with someone else's video."""
        gateway = Gateway(creates={"same": lambda _r, _c: httpx.Response(
            200, json={"id": "task-shared", "status": "queued"})})
        gateway.case_of["task-shared"] = "same"
        cases = ["same", "same-2", "same-3"]
        gateway.creates.update({c: gateway.creates["same"] for c in cases[1:]})
        summary = await _run(gateway, _manifest(tmp_path, cases), workdir)
        assert summary.exit_code == 3
        checked = check_invariants(workdir, "sweep", jobs=3)
        assert sorted(checked.statuses.elements()) == ["succeeded", "unknown", "unknown"]
        owner = next(job for job, row in checked.rows.items() if row["status"] == "succeeded")
        for job, row in checked.rows.items():
            if job != owner:
                assert row["error_code"] == "duplicate_task"
                assert f"already belongs to job '{owner}'" in row["error_message"]
                assert row["video_path"] == "" and row["task_id"] == ""
        assert len(gateway.create_requests()) == 3  # none was sent again
        _no_internal_errors(workdir)


class TestRemovedWhileRendering:
    """S3: a job removed from the manifest while its task renders, then put back."""

    async def test_the_paid_task_is_kept_and_fetched(self, tmp_path: Path,
                                                     workdir: Path) -> None:
        """A run interrupted while three tasks render; re-run without one job (its task is
        still tracked and downloaded, not skipped); re-run with it again: every video is
        fetched from its one task."""
        vs = VirtualSim(ENV)
        full = vs.manifest(tmp_path, 3, limits={"max_in_flight": 3})

        async def interrupt(orch: Orchestrator) -> None:
            while vs.stats()["creates"] < 3:
                await vs.clock.sleep(0.5)
            await vs.clock.sleep(1)
            orch.interrupt()

        assert (await vs.run(full, workdir, during=interrupt)).exit_code == 130
        assert set(db_query(workdir, "SELECT state FROM jobs")) <= {("submitted",),
                                                                   ("running",)}
        edited = tmp_path / "edited"
        edited.mkdir()
        fewer = vs.manifest(edited, 2, limits={"max_in_flight": 3})
        await vs.run(fewer, workdir)
        assert db_query(workdir, "SELECT state FROM jobs WHERE job_id = 'job-002'") == [
            ("downloaded",)]
        summary = await vs.run(full, workdir)
        assert summary.exit_code == 0, summary
        stats = vs.stats()
        assert stats["creates"] == 3
        assert check_invariants(workdir, "test-run", stats, jobs=3).statuses == {"succeeded": 3}

    async def test_a_skipped_job_put_back_returns_to_its_state(self, tmp_path: Path,
                                                               workdir: Path) -> None:
        """A job skipped while it had no task comes back as it was: a failed one stays
        failed (not paid for again), a pending one is created."""
        gateway = Gateway(polls={"doomed": lambda _r, t: httpx.Response(200, json={
            "id": t, "status": "failed", "error": {"message": "content policy violation"}})})
        both = _manifest(tmp_path, ["doomed", "ok"])
        assert (await _run(gateway, both, workdir)).exit_code == 1
        (tmp_path / "edited").mkdir()
        only_ok = _manifest(tmp_path / "edited", ["ok"])
        assert (await _run(gateway, only_ok, workdir)).exit_code == 0
        assert db_query(workdir, "SELECT state FROM jobs WHERE job_id = 'doomed'") == [
            ("skipped",)]
        assert (await _run(gateway, both, workdir)).exit_code == 1
        assert db_query(workdir, "SELECT state FROM jobs WHERE job_id = 'doomed'") == [
            ("failed",)]
        assert len(gateway.create_requests()) == 2


def _trickling(body: bytes) -> Reply:
    return Reply(200, body, {"Content-Type": "application/json"}, trickle=0.3)


class TestTrickle:
    """S5: a provider that sends its create answer, its poll answer or its video a byte at a
    time never holds the run: every request has a total deadline."""

    @pytest.mark.timeout(45)
    async def test_trickling_answers_end_with_reasons(self, tmp_path: Path, workdir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """With a 1 s request deadline and a 0.5 s download grace: the trickled create is
        `unknown` (ambiguous, never resent), the trickled poll times out naming the deadline,
        the trickled video keeps its render with the reason; the run ends in seconds."""
        monkeypatch.setattr(batchkling.providers.http, "REQUEST_DEADLINE", 1.0, raising=False)
        monkeypatch.setattr(batchkling.run.download, "STALL_GRACE", 0.5, raising=False)
        tasks: dict[str, str] = {}

        def app(request: Request) -> Reply:
            if request.method == "POST":
                case = _CASE.search(request.json()["prompt"]).group(1)  # type: ignore[union-attr]
                if case == "slow-create":
                    return _trickling(b'{"id": "t-slow", "status": "queued"}' + b" " * 200)
                tasks[f"t-{case}"] = case
                return Reply.json({"id": f"t-{case}", "status": "queued"})
            if request.path.startswith("/v1/videos/"):
                task_id = request.path.rsplit("/", 1)[-1]
                answer = json.dumps({"id": task_id, "status": "completed", "results": [
                    {"url": f"{server.url}/files/{task_id}.mp4"}]}).encode()
                if tasks.get(task_id) == "slow-poll":
                    return _trickling(answer + b" " * 200)
                return Reply(200, answer, {"Content-Type": "application/json"})
            if "slow-video" in request.path:
                return Reply(200, MP4, {"Content-Type": "video/mp4"}, trickle=0.3)
            return Reply(200, MP4, {"Content-Type": "video/mp4"})

        with HostileServer(app) as server:
            cases = ["slow-create", "slow-poll", "slow-video", "fine"]
            jobs = [{"id": c, "prompt": f"scene [case:{c}]"} for c in cases]
            path = write_manifest(tmp_path, jobs, name="sweep", base_url=server.url,
                                  limits={"max_in_flight": 4, "task_timeout": "5s"})
            started = time.monotonic()
            async with Orchestrator(load_manifest(path), workdir=workdir, env=ENV,
                                    min_poll_interval=0.2, seed=1) as orch:
                summary = await orch.run()
            took = time.monotonic() - started
        assert summary.exit_code == 3
        checked = check_invariants(workdir, "sweep", jobs=4)
        rows = checked.rows
        assert rows["fine"]["status"] == "succeeded"
        assert rows["slow-create"]["status"] == "unknown"
        assert "no complete answer within" in rows["slow-create"]["error_message"]
        assert len(server.of("POST")) == 4  # the trickled create was not sent again
        assert rows["slow-poll"]["status"] == "timed_out"
        assert "no complete answer within" in rows["slow-poll"]["error_message"]
        assert rows["slow-video"]["status"] == "pending"  # succeeded, not downloaded
        assert "slower than" in rows["slow-video"]["error_message"]
        assert took < 20, took
        print(f"S5: three trickling answers ended with reasons in {took:.1f} s")


def _deep(depth: int) -> bytes:
    return b'{"id": "t-deep", "status": "queued", "x": ' + b"[" * depth + b"]" * depth + b"}"


def _json(body: bytes, status: int = 200, **headers: str) -> Answer:
    return lambda _r, _c: httpx.Response(status, content=body, headers={
        "content-type": "application/json", **headers})


class TestUnreadableAnswers:
    """S6: answers nested thousands deep, a Retry-After nobody can read, NaN where a number
    goes: each a reason on its job; no traceback, nothing stuck in `submitting`."""

    async def test_every_job_ends_with_a_reason(self, tmp_path: Path, workdir: Path) -> None:
        """A create answer nested 100,000 deep is ambiguous (`unknown`, not resent), a deep poll
        answer times out with the reason, a 429 whose Retry-After is gibberish is backed off and
        created later, NaN progress is ignored; the run finishes."""
        refused: set[str] = set()

        def limited(request: httpx.Request, case: str) -> httpx.Response:
            if case not in refused:
                refused.add(case)
                return httpx.Response(429, json={"error": {"message": "slow down"}},
                                      headers={"retry-after": "soon-ish, maybe; \x00"})
            return httpx.Response(200, json={"id": "t-patient", "status": "queued"})

        gateway = Gateway(
            creates={"deep-create": _json(_deep(100_000)), "bad-retry-after": limited},
            polls={"deep-poll": _json(_deep(100_000)),
                   "nan-progress": lambda _r, t: httpx.Response(
                       200, content=b'{"id": "%s", "status": "in_progress", "progress": NaN}'
                       % t.encode(), headers={"content-type": "application/json"})})
        gateway.case_of["t-patient"] = "ok"
        cases = ["deep-create", "deep-poll", "bad-retry-after", "nan-progress", "ok"]
        path = _manifest(tmp_path, cases, limits={"task_timeout": "5m"})
        summary = await _run(gateway, path, workdir)
        assert summary.exit_code == 3
        rows = check_invariants(workdir, "sweep", jobs=len(cases)).rows
        assert rows["deep-create"]["status"] == "unknown"
        assert "unreadable answer" in rows["deep-create"]["error_message"]
        assert len(gateway.create_requests("deep-create")) == 1
        assert rows["deep-poll"]["status"] == "timed_out"
        assert "unreadable answer" in rows["deep-poll"]["error_message"]
        assert rows["bad-retry-after"]["status"] == "succeeded"
        assert rows["nan-progress"]["status"] == "timed_out"
        assert rows["ok"]["status"] == "succeeded"
        _no_internal_errors(workdir)


class TestAbsurdValues:
    """S7: result URLs that do not parse, timestamps in microseconds and nanoseconds."""

    async def test_results_are_written_and_every_job_has_a_reason(
            self, tmp_path: Path, workdir: Path) -> None:
        """A result URL that does not parse fails its job (unsafe_url) with the reason;
        microsecond and nanosecond timestamps are read as dates, and one that is no date at
        all is not believed; results.csv is written."""
        now = time.time()

        def stamped(scale: float) -> Answer:
            return lambda _r, t: _task(t, created_at=int((now - 60) * scale),
                                       completed_at=int(now * scale))

        gateway = Gateway(polls={
            "bad-url": lambda _r, t: httpx.Response(200, json={
                "id": t, "status": "completed", "results": [{"url": "http://[::1/x.mp4"}]}),
            "bad-port": lambda _r, t: httpx.Response(200, json={
                "id": t, "status": "completed", "results": [{"url": f"https://{CDN}:99999x/v"}]}),
            "micro-ts": stamped(1e6), "nano-ts": stamped(1e9), "year-3000": stamped(1e3 * 100),
        })
        cases = ["bad-url", "bad-port", "micro-ts", "nano-ts", "year-3000"]
        summary = await _run(gateway, _manifest(tmp_path, cases), workdir)
        assert summary.exit_code == 1, summary
        rows = check_invariants(workdir, "sweep", jobs=len(cases)).rows
        for case in ("bad-url", "bad-port"):
            assert (rows[case]["status"], rows[case]["error_code"]) == ("failed", "unsafe_url")
            assert "does not parse" in rows[case]["error_message"]
        year = time.strftime("%Y", time.gmtime(now))
        for case in ("micro-ts", "nano-ts"):
            assert rows[case]["status"] == "succeeded"
            assert rows[case]["completed_at"].startswith(year), rows[case]
        # A "timestamp" that is no plausible date is not believed: our own clock stands in.
        assert rows["year-3000"]["status"] == "succeeded"
        assert "2000" < rows["year-3000"]["completed_at"] < "2200"
        _no_internal_errors(workdir)


class TestHugeAnswers:
    """S8: a poll answer of tens of megabytes (or a gzip bomb) is refused unread."""

    async def test_oversized_answers_are_reasons(self, tmp_path: Path, workdir: Path) -> None:
        """A 32 MB poll answer and a 32 KB deflate body that inflates to 32 MB: the client
        stops reading past 8 MB, and the job times out with the size as the reason; a 32 MB
        create answer makes its job `unknown`."""
        pulled = {"bytes": 0}
        pad = 32 * 1024 * 1024

        async def huge_body(prefix: bytes) -> Any:
            yield prefix
            chunk = b" " * 65536
            for _ in range(pad // len(chunk)):
                pulled["bytes"] += len(chunk)
                yield chunk
            yield b'"}'

        def huge(prefix: bytes) -> Answer:
            return lambda _r, _c: httpx.Response(
                200, headers={"content-type": "application/json"},
                stream=_Stream(huge_body(prefix)))

        bomb = zlib.compress(b'{"id": "t", "status": "queued", "pad": "' + b" " * pad + b'"}')
        gateway = Gateway(
            creates={"huge-create": huge(b'{"id": "t-huge", "status": "queued", "pad": "')},
            polls={"huge-poll": huge(b'{"status": "queued", "pad": "'),
                   "gzip-bomb": lambda _r, _t: httpx.Response(
                       200, content=bomb, headers={"content-type": "application/json",
                                                   "content-encoding": "deflate"})})
        cases = ["huge-create", "huge-poll", "gzip-bomb", "ok"]
        summary = await _run(gateway, _manifest(tmp_path, cases, limits={"task_timeout": "1m"}),
                             workdir)
        assert summary.exit_code == 3
        rows = check_invariants(workdir, "sweep", jobs=len(cases)).rows
        assert rows["huge-create"]["status"] == "unknown"
        for case in ("huge-create", "huge-poll", "gzip-bomb"):
            assert "over 8 MB" in rows[case]["error_message"], rows[case]
        assert rows["huge-poll"]["status"] == rows["gzip-bomb"]["status"] == "timed_out"
        assert rows["ok"]["status"] == "succeeded"
        polls = len([r for r in gateway.requests if r.method == "GET"
                     and r.url.host == API and r.url.path.endswith(("001", "002"))])
        # Each huge answer was abandoned at the limit, not read to its end.
        assert pulled["bytes"] <= (polls + 1) * (8 * 1024 * 1024 + 65536), (pulled, polls)
        _no_internal_errors(workdir)


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: Any) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> Any:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()


class TestCostNotANumber:
    """S10: a reported cost of "NaN", -100 or infinity must not switch the budget off."""

    @pytest.mark.parametrize("cost", ["NaN", -100, "Infinity", "1e999"])
    async def test_budget_holds(self, tmp_path: Path, workdir: Path, cost: Any) -> None:
        """A $1 budget at $0.30 a job buys three creates, whatever the provider says the
        finished ones cost; the absurd cost is recorded as unknown."""
        gateway = Gateway(polls={"ok": lambda _r, t: _task(t, amount_usd=cost)})
        jobs = [f"ok-{i}" for i in range(10)]
        path = write_manifest(
            tmp_path, [{"id": j, "prompt": "scene"} for j in jobs], name="sweep",
            base_url=f"https://{API}", limits={"max_in_flight": 1, "submit_rate": 50},
            # margin 1: no price is ever learned here, so reservations are the table's alone
            budget={"max_usd": 1, "margin": 1}, pricing={"kling-v2-6": 0.06})
        summary = await _run(gateway, path, workdir)
        assert summary.exit_code == 3
        assert "budget reached" in (summary.stop_reason or "")
        assert len(gateway.create_requests()) == 3
        rows = check_invariants(workdir, "sweep", jobs=10).rows
        done = [r for r in rows.values() if r["status"] == "succeeded"]
        assert len(done) == 3 and all(r["cost_usd"] == "" for r in done)
        assert summary.committed_usd == pytest.approx(0.9)


class TestSwappedImage:
    """S16: an image file swapped for another between submit and resume."""

    async def test_changed_input_is_refused(self, tmp_path: Path, workdir: Path) -> None:
        """A job planned with one image, whose file (a symlink) points at another when the
        run resumes, fails with `input_changed` and the reason; its bytes are never sent."""
        from PIL import Image

        for name, colour in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
            Image.new("RGB", (400, 400), colour).save(tmp_path / name)
        (tmp_path / "frame.png").symlink_to(tmp_path / "a.png")
        vs = VirtualSim(ENV, api_key="sk-the-right-key-00000000")
        path = write_manifest(tmp_path, [{"id": "shot", "image": "frame.png", "prompt": "go"}],
                              base_url=vs.base_url, limits={"max_in_flight": 1})
        refused = await vs.run(path, workdir)  # wrong key: creates stop, the job stays pending
        assert refused.exit_code == 4
        (tmp_path / "frame.png").unlink()
        (tmp_path / "frame.png").symlink_to(tmp_path / "b.png")
        summary = await vs.resume("test-run", workdir,
                                  env={"BATCHKLING_TEST_KEY": "sk-the-right-key-00000000"})
        assert summary.exit_code == 1
        stats = vs.stats()
        assert stats["creates"] == 0
        rows = check_invariants(workdir, "test-run", stats, jobs=1).rows
        assert (rows["shot"]["status"], rows["shot"]["error_code"]) == ("failed",
                                                                       "input_changed")
        assert "changed since the job was planned" in rows["shot"]["error_message"]


class _FullDisk:
    """A text file that takes ``room`` writes, then fails as a full disk does."""

    def __init__(self, real: Any, room: int) -> None:
        self.real, self.room = real, room

    def write(self, text: str) -> int:
        self.room -= 1
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(self.real.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class TestRunLogDiskFull:
    """S9: the disk fills while the run log is being written (ENOSPC injected)."""

    async def test_the_run_goes_on_and_stops_creating(self, tmp_path: Path, workdir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """A log line that cannot be written fails no job and leaves none in `submitting`:
        creates stop with the reason (the disk holding run.log is full), the tasks in flight
        finish, and a resume once there is room completes the run, paying for nothing twice."""
        real_open = open

        def full_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            return _FullDisk(real_open(path, mode, *args, **kwargs), room=4)

        monkeypatch.setattr(batchkling.logs, "open", full_open, raising=False)
        vs = VirtualSim(ENV)
        n = 6
        summary = await vs.run(vs.manifest(tmp_path, n, limits={"max_in_flight": 2,
                                                                "submit_rate": 0.1}), workdir)
        assert summary.exit_code == 3, summary
        assert "run.log is full" in (summary.stop_reason or ""), summary.stop_reason
        stats = vs.stats()
        assert stats["creates"] < n
        checked = check_invariants(workdir, "test-run", stats, jobs=n)
        assert checked.statuses["succeeded"] == stats["creates"]
        _no_internal_errors(workdir)
        monkeypatch.undo()
        summary = await vs.resume("test-run", workdir)
        assert summary.exit_code == 0, summary
        stats = vs.stats()
        assert stats["creates"] == n
        assert check_invariants(workdir, "test-run", stats, jobs=n).statuses == {"succeeded": n}


def _bomb(levels: int) -> str:
    lines = ["version: 1", "name: bomb", "x0: &x0 {k0: v, k1: v}"]
    lines += [f"x{i}: &x{i} {{<<: [*x{i - 1}, *x{i - 1}], k{i + 1}: v}}"
              for i in range(1, levels)]
    return "\n".join([*lines, "jobs: [{id: a, prompt: hi}]"]) + "\n"


class TestHostileYaml:
    """S12, S13: merge keys nested for an exponential expansion; metadata hundreds deep."""

    @pytest.mark.timeout(30)
    def test_merge_key_bomb_is_read_at_once(self, tmp_path: Path) -> None:
        """A 1.3 KB manifest whose `<<` merges double at each of 40 levels (2^40 pairs
        unrolled) is read in well under a second and refused for its unknown keys."""
        path = tmp_path / "bomb.yaml"
        path.write_text(_bomb(40))
        assert path.stat().st_size < 1500
        started = time.monotonic()
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert time.monotonic() - started < 5
        assert "unknown key 'x0'" in str(info.value)

    @pytest.mark.parametrize("depth", [40, 400])
    def test_deep_metadata_is_a_problem(self, tmp_path: Path, depth: int) -> None:
        """`metadata` nested 40 or 400 levels is one located problem, not a RecursionError."""
        nested = "{a: " * depth + "1" + "}" * depth
        path = tmp_path / "deep.yaml"
        path.write_text(f"version: 1\nname: deep\njobs:\n  - id: a\n    prompt: hi\n"
                        f"    metadata: {nested}\n")
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert len(info.value.problems) == 1
        assert re.search(r"nested more than \d+ levels", str(info.value)), info.value

    @pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
    def test_metadata_numbers_must_be_finite(self, tmp_path: Path, value: str) -> None:
        """NaN or infinity in `metadata` is a problem at load (JSON cannot carry it to the
        provider), not a create that dies while being encoded."""
        path = tmp_path / "m.yaml"
        path.write_text("version: 1\nname: n\njobs:\n  - id: a\n    prompt: hi\n"
                        f"    metadata: {{weight: {value}}}\n")
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert "finite" in str(info.value)


async def test_request_deadline_ends_a_trickled_create(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP layer alone: a create answer trickled a byte every 0.3 s ends at the total
    deadline as an ambiguous create (the idle timeout of 60 s would never fire)."""
    from batchkling.errors import AmbiguousCreate
    from batchkling.models import JobSpec
    from batchkling.providers.imarouter import ImaRouterProvider

    monkeypatch.setattr(batchkling.providers.http, "REQUEST_DEADLINE", 0.8, raising=False)
    with HostileServer(lambda _r: _trickling(b'{"id": "t-1", "status": "queued"}')) as server:
        provider = ImaRouterProvider(server.url, TEST_KEY)
        started = time.monotonic()
        try:
            with pytest.raises(AmbiguousCreate, match="no complete answer within"):
                await provider.create(JobSpec(job_id="a", model="kling-v2-6", prompt="p",
                                              duration=5, size="16:9"), "k-1")
        finally:
            await provider.aclose()
        assert time.monotonic() - started < 5
