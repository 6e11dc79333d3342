"""Hostile input: manifests that try to escape, run code or smuggle formulas, a provider whose
answers point at internal addresses or make no sense, and symlinks planted in the run folder.

Scenario numbers are docs/reliability.md's: 13 hostile manifests, 14 hostile provider answers,
15 formula injection, and the symlinked output folder. Each run ends on the shared invariants.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from conftest import SPEED, TEST_KEY
from invariants import check_invariants

from batchkling.cli import cli
from batchkling.manifest.document import load_manifest
from batchkling.models import RunSummary
from batchkling.run.orchestrator import Orchestrator
from batchkling.testing import VirtualClock, write_manifest

pytestmark = pytest.mark.timeout(60)
ENV = {"BATCHKLING_TEST_KEY": TEST_KEY}
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# ---- 13: hostile manifests ---------------------------------------------------------------


def _header(base_url: str, name: str = "hostile") -> str:
    return (f"version: 1\nname: {name}\nprovider:\n  name: imarouter\n  base_url: {base_url}\n"
            "  api_key_env: BATCHKLING_TEST_KEY\n")


MANIFESTS: dict[str, Callable[[str, Path], bytes]] = {
    "python-apply-tag": lambda url, tmp: (
        _header(url).replace("name: hostile", "name: !!python/object/apply:os.system "
                             f"['touch {tmp}/pwned']") + "jobs: [{id: a, prompt: hi}]\n"
    ).encode(),
    "python-new-tag": lambda url, tmp: (
        _header(url) + "jobs:\n  - id: a\n    prompt: !!python/object/new:subprocess.Popen "
        f"[[touch, {tmp}/pwned]]\n"
    ).encode(),
    "python-name-tag": lambda url, tmp: (
        _header(url) + "jobs:\n  - id: a\n    prompt: !!python/name:os.system\n").encode(),
    "10k-prompt": lambda url, tmp: (
        _header(url) + f"jobs:\n  - id: a\n    prompt: {'x' * 10_000}\n").encode(),
    "dotdot-id": lambda url, tmp: (
        _header(url) + "jobs:\n  - id: ../../x\n    prompt: hi\n").encode(),
    "absolute-id": lambda url, tmp: (
        _header(url) + f"jobs:\n  - id: {tmp}/owned\n    prompt: hi\n").encode(),
    "backslash-id": lambda url, tmp: (
        _header(url) + "jobs:\n  - id: '..\\..\\x'\n    prompt: hi\n").encode(),
    "nul-in-id": lambda url, tmp: (
        _header(url) + 'jobs:\n  - id: "a\\0b"\n    prompt: hi\n').encode(),
    "duplicate-ids": lambda url, tmp: (
        _header(url) + "jobs:\n  - {id: a, prompt: one}\n  - {id: a, prompt: two}\n").encode(),
    "invalid-utf8": lambda url, tmp: (
        _header(url).encode() + b"jobs:\n  - id: a\n    prompt: caf\xe9 \xff\xfe\n"),
    "formula-id-from-csv": lambda url, tmp: (
        _header(url) + "matrices:\n  - id: '{name}'\n    prompt: 'ad for {name}'\n"
        "    vars_from: hostile.csv\n").encode(),
    "newline-id": lambda url, tmp: (
        _header(url) + 'jobs:\n  - id: "hero\\n"\n    prompt: hi\n').encode(),
    "case-twin-ids": lambda url, tmp: (
        _header(url) + "jobs:\n  - {id: Hero, prompt: one}\n  - {id: hero, prompt: two}\n"
    ).encode(),
    "alias-bomb": lambda url, tmp: (
        _header(url) + "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))
        + "jobs: [{id: a, prompt: hi}]\n").encode(),
}


class TestHostileManifests:
    """#13: refused before anything is sent."""

    @pytest.mark.parametrize("case", sorted(MANIFESTS))
    def test_refused_with_zero_creates(self, tmp_path: Path, workdir: Path, simulator: Any,
                                       case: str) -> None:
        """`batchkling run` on a hostile manifest exits 2 with one-line problems and no
        traceback; the provider receives no create, no code runs, and nothing is written."""
        sim = simulator()
        (tmp_path / "hostile.csv").write_text('name\n"=cmd|\' /C calc\'!A0"\n@SUM(A1)\n')
        path = tmp_path / "m.yaml"
        path.write_bytes(MANIFESTS[case](sim.base_url, tmp_path))
        result = CliRunner(env=ENV).invoke(cli, ["run", str(path), "--workdir", str(workdir)])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert "nothing was submitted" in result.stderr
        assert sim.stats()["create_requests"] == 0
        assert not (tmp_path / "pwned").exists()
        assert list(workdir.iterdir()) == []
        assert not (tmp_path / "owned").exists() and not (tmp_path.parent / "x").exists()


# ---- 14 and 15: a hostile provider -------------------------------------------------------

API_HOST = "api.example.test"
CDN = "93.184.215.14"  # a public address literal: no DNS needed, and the downloader allows it
MP4 = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 4000
HTML = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
_CASE = re.compile(r"\[case:([a-z0-9-]+)\]")

RESULT_URLS = {
    "file-url": "file:///etc/passwd",
    "metadata-ip": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "localhost": "http://localhost:8080/admin.mp4",
    "ipv6-loopback": "http://[::1]/x.mp4",
    "private-ip": "http://10.0.0.7/x.mp4",
    "mapped-loopback": "http://[::ffff:127.0.0.1]/x.mp4",
    "redirect-loopback": f"https://{CDN}/redirect/v.mp4",
    "huge": f"https://{CDN}/huge/v.mp4",
    "html-video": f"https://{CDN}/html/v.mp4",
    "ok": f"https://{CDN}/ok/v.mp4",
}


class HostileGateway:
    """A fake ImaRouter and CDN: each job's ``[case:…]`` tag picks how it misbehaves."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.tasks: dict[str, str] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == API_HOST:
            return self.api(request)
        if request.url.host == CDN:
            return self.cdn(request)
        return httpx.Response(599, text="the test gateway serves no other host")

    def api(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/v1/videos":
            body = json.loads(request.content)
            match = _CASE.search(body["prompt"])
            case = match.group(1) if match else "ok"
            if case == "bad-json":
                return httpx.Response(200, content=b'{"id": "t-1", "status": ',
                                      headers={"content-type": "application/json"})
            if case == "html-502":
                return httpx.Response(502, content=HTML, headers={"content-type": "text/html"})
            if case == "html-200":
                return httpx.Response(200, content=HTML, headers={"content-type": "text/html"})
            if case == "path-id":
                return httpx.Response(200, json={"id": "../../admin/delete?all=1#",
                                                 "status": "queued"})
            if case == "echo-key":
                return httpx.Response(400, json={"error": {
                    "message": f"malformed request from {request.headers['authorization']}"}})
            task_id = f"task-{len(self.tasks):03d}"
            self.tasks[task_id] = case
            return httpx.Response(200, json={"id": task_id, "status": "queued"})
        task_id = path.rsplit("/", 1)[-1]
        case = self.tasks.get(task_id)
        if request.method != "GET" or case is None:
            return httpx.Response(404, json={"error": {"message": "no such task"}})
        if case == "poll-bad-json":
            return httpx.Response(200, content=b"{{{", headers={"content-type": "application/json"})
        if case == "poll-html":
            return httpx.Response(503, content=HTML, headers={"content-type": "text/html"})
        if case == "fail-formula":
            return httpx.Response(200, json={
                "id": task_id, "status": "failed",
                "error": {"code": "+cmd", "message": '=HYPERLINK("http://evil.example","x")'}})
        return httpx.Response(200, json={"id": task_id, "status": "completed",
                                         "amount_usd": 0.35,
                                         "results": [{"url": RESULT_URLS[case]}]})

    def cdn(self, request: httpx.Request) -> httpx.Response:
        kind = request.url.path.split("/")[1]
        if kind == "redirect":
            return httpx.Response(302, headers={"location": "http://127.0.0.1:8080/internal"})
        if kind == "huge":
            return httpx.Response(200, content=MP4,
                                  headers={"content-length": str(10 * 1024**3),
                                           "content-type": "video/mp4"})
        if kind == "html":
            return httpx.Response(200, content=HTML, headers={"content-type": "text/html"})
        return httpx.Response(200, content=MP4, headers={"content-type": "video/mp4"})


async def _run_against(gateway: HostileGateway, path: Path, workdir: Path) -> RunSummary:
    clock = VirtualClock()
    async with clock.running(), Orchestrator(
            load_manifest(path), workdir=workdir, env=ENV, clock=clock, seed=5,
            transport=httpx.MockTransport(gateway)) as orch:
        return await orch.run()


def _hostile_manifest(folder: Path, jobs: list[dict[str, Any]], **sections: Any) -> Path:
    return write_manifest(folder, jobs, name="hostile", base_url=f"https://{API_HOST}",
                          limits={"max_in_flight": 8, "submit_rate": 50, "task_timeout": "15m"},
                          **sections)


class TestHostileProvider:
    """#14: answers pointing at internal addresses, or not answers at all."""

    async def test_answers_are_refused_with_reasons(self, tmp_path: Path,
                                                    workdir: Path) -> None:
        """Result URLs on file://, link-local, loopback, private and mapped addresses, a
        redirect to loopback, a 10 GB body, an HTML page for a video, malformed JSON, HTML
        error pages and a task id with path characters: each job ends with a recorded reason,
        no request reaches an internal address, and no create is repeated."""
        cases = [*RESULT_URLS, "bad-json", "html-502", "html-200", "path-id", "echo-key",
                 "poll-bad-json", "poll-html"]
        jobs = [{"id": case, "prompt": f"scene [case:{case}]"} for case in cases]
        gateway = HostileGateway()
        summary = await _run_against(gateway, _hostile_manifest(tmp_path, jobs), workdir)
        assert summary.exit_code == 3  # jobs left unknown / timed out / not downloaded
        checked = check_invariants(workdir, "hostile", jobs=len(cases))
        rows = checked.rows
        status = {job: row["status"] for job, row in rows.items()}
        unsafe = ["file-url", "metadata-ip", "localhost", "ipv6-loopback", "private-ip",
                  "mapped-loopback", "redirect-loopback"]
        for job in unsafe:
            assert (status[job], rows[job]["error_code"]) == ("failed", "unsafe_url"), job
            assert rows[job]["error_message"].startswith(("refused result URL",
                                                         "more than")), rows[job]
        assert status["ok"] == "succeeded"
        assert status["huge"] == "pending" and "over the" in rows["huge"]["error_message"]
        assert status["html-video"] == "pending"
        assert "not a video" in rows["html-video"]["error_message"]
        for job in ("bad-json", "html-502", "html-200", "path-id"):
            assert status[job] == "unknown", (job, rows[job])
        assert "unusable task id" in rows["path-id"]["error_message"]
        assert "unreadable answer" in rows["bad-json"]["error_message"]
        assert status["echo-key"] == "failed"
        assert TEST_KEY not in rows["echo-key"]["error_message"]
        assert "[REDACTED]" in rows["echo-key"]["error_message"]
        for job in ("poll-bad-json", "poll-html"):
            assert status[job] == "timed_out", (job, rows[job])

        hosts = {r.url.host for r in gateway.requests}
        assert hosts == {API_HOST, CDN}, hosts
        assert {r.url.scheme for r in gateway.requests} == {"https"}
        assert not [r for r in gateway.requests if "admin" in str(r.url)]
        creates = [r for r in gateway.requests if r.method == "POST"]
        assert len(creates) == len(cases)  # nothing ambiguous was sent twice
        assert not [p for p in workdir.rglob("*") if p.is_file() and TEST_KEY.encode()
                    in p.read_bytes()]
        videos = sorted(p.name for p in (workdir / "hostile" / "videos").iterdir())
        assert videos == ["ok.mp4"]
        print(f"#14: {len(cases)} hostile answers, {len(gateway.requests)} requests, "
              f"hosts {sorted(hosts)}")


class TestFormulaInjection:
    """#15: text a spreadsheet would run, from the manifest, a CSV of variables, or the
    provider, is escaped in results.csv."""

    async def test_csv_has_no_live_formula(self, tmp_path: Path, workdir: Path) -> None:
        """Prompts, matrix variables and provider error messages starting with = + - @ or a
        tab reach results.csv with a leading quote: no cell of the file starts a formula."""
        (tmp_path / "cells.csv").write_text(
            'no,cell\n1,"=SUM(A1:A9)"\n2,"+1+1"\n3,"-2+3"\n4,"@cmd"\n5,"\tindent"\n',
            encoding="utf-8")
        jobs = [{"id": "eq", "prompt": '=HYPERLINK("http://evil.example","x") [case:ok]'},
                {"id": "plus", "prompt": "+1+cmd [case:ok]"},
                {"id": "minus", "prompt": "-1-cmd [case:ok]"},
                {"id": "at", "prompt": "@SUM(1) [case:ok]"},
                {"id": "tab", "prompt": "\t=1 [case:ok]"},
                {"id": "provider-says", "prompt": "fine [case:fail-formula]"}]
        matrices = [{"id": "var-{no}", "prompt": "{cell} [case:ok]", "vars_from": "cells.csv"}]
        path = _hostile_manifest(tmp_path, jobs, matrices=matrices)
        summary = await _run_against(HostileGateway(), path, workdir)
        assert summary.exit_code == 1  # provider-says failed, the rest succeeded
        csv_path = workdir / "hostile" / "results.csv"
        checked = check_invariants(workdir, "hostile", jobs=len(jobs) + 5)
        with open(csv_path, newline="", encoding="utf-8") as fh:
            cells = [cell for row in csv.reader(fh) for cell in row]
        live = [c for c in cells if c.startswith(FORMULA_START)]
        assert live == []
        rows = checked.rows
        assert rows["eq"]["prompt"].startswith("'=HYPERLINK")
        assert rows["tab"]["prompt"].startswith("'\t")
        failed = rows["provider-says"]
        assert failed["error_message"].startswith("'=HYPERLINK")
        assert failed["error_code"] == "'+cmd"
        assert rows["var-1"]["var.cell"] == "'=SUM(A1:A9)"
        assert rows["var-4"]["prompt"].startswith("'@cmd")


# ---- symlinks in the run folder -----------------------------------------------------------


async def _sim_run(path: Path, workdir: Path) -> RunSummary:
    async with Orchestrator(load_manifest(path), workdir=workdir, env=ENV, time_scale=SPEED,
                            seed=3) as orch:
        return await orch.run()


class TestSymlinks:
    """The run folder, or files in it, are symlinks to elsewhere."""

    async def test_symlinked_run_folder_is_followed(self, tmp_path: Path, workdir: Path,
                                                    simulator: Any) -> None:
        """A run folder that is a symlink (jobs/<run> -> a bigger disk) is the user's choice:
        videos, CSV and log land in its target, under names from job ids only."""
        sim = simulator()
        elsewhere = tmp_path / "big-disk" / "run"
        elsewhere.mkdir(parents=True)
        (workdir / "test-run").symlink_to(elsewhere, target_is_directory=True)
        jobs = [{"id": f"job-{i}", "prompt": f"scene {i}"} for i in range(3)]
        summary = await _sim_run(write_manifest(tmp_path, jobs, base_url=sim.base_url), workdir)
        assert summary.exit_code == 0
        check_invariants(workdir, "test-run", sim.stats(), jobs=3)
        assert sorted(p.name for p in (elsewhere / "videos").iterdir()) == [
            "job-0.mp4", "job-1.mp4", "job-2.mp4"]
        assert (elsewhere / "results.csv").is_file() and (elsewhere / "run.log").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big-disk", "jobs", "manifest.yaml"]

    async def test_planted_final_path_symlink_is_replaced(self, tmp_path: Path, workdir: Path,
                                                          simulator: Any) -> None:
        """A symlink planted at a video's final path is replaced by the video; the file it
        pointed to is untouched."""
        sim = simulator()
        victim = tmp_path / "victim.txt"
        victim.write_text("precious")
        videos = workdir / "test-run" / "videos"
        videos.mkdir(parents=True)
        (videos / "job-0.mp4").symlink_to(victim)
        summary = await _sim_run(write_manifest(tmp_path, [{"id": "job-0", "prompt": "x"}],
                                                base_url=sim.base_url), workdir)
        assert summary.exit_code == 0
        assert victim.read_text() == "precious"
        assert not (videos / "job-0.mp4").is_symlink()
        check_invariants(workdir, "test-run", sim.stats(), jobs=1)

    async def test_planted_part_symlink_is_not_followed(self, tmp_path: Path, workdir: Path,
                                                        simulator: Any) -> None:
        """A symlink planted at a video's .part path is not written through: the file it
        points to is untouched, and the video still lands at its final path."""
        sim = simulator()
        victim = tmp_path / "victim.txt"
        victim.write_text("precious")
        videos = workdir / "test-run" / "videos"
        videos.mkdir(parents=True)
        (videos / "job-0.mp4.part").symlink_to(victim)
        summary = await _sim_run(write_manifest(tmp_path, [{"id": "job-0", "prompt": "x"}],
                                                base_url=sim.base_url), workdir)
        assert victim.read_bytes() == b"precious"
        assert summary.exit_code == 0
        assert not (videos / "job-0.mp4").is_symlink()
        check_invariants(workdir, "test-run", sim.stats(), jobs=1)

