"""The contact sheet: one card per job, groups, relative video paths, escaping, summary."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import batchkling
from batchkling.models import JobSpec, JobState
from batchkling.outputs.report import render_report, write_report
from batchkling.store.sqlite import SqliteStore

ASSETS = Path(batchkling.__file__).parent / "simulator" / "assets"
HOSTILE = "<script>alert(1)</script>"
#: 2025-11-25 12:00 UTC: fixed so the page is the same on every run.
T0 = 1_764_072_000.0
PRODUCTS = {
    "watch": ("Meridian Steel Watch", "dark marble"),
    "sneaker": ("Aero Run Sneaker", "concrete skatepark"),
    "perfume": ("Nocturne Eau de Parfum", "velvet drapes"),
    "headphones": ("Pulse ANC Headphones", "neon studio"),
}
SIZES = ("16:9", "9:16", "1:1")
MODES = ("std", "pro")
#: Jobs that do not end downloaded: job id -> (state, fields).
OUTCOMES: dict[str, tuple[JobState, dict[str, Any]]] = {
    "sneaker-9x16-pro": (JobState.FAILED, {
        "error_code": "CONTENT_POLICY",
        "error_message": "The prompt was rejected by the safety filter (logo likeness)."}),
    "perfume-16x9-pro": (JobState.FAILED, {
        "error_code": "CONTENT_POLICY",
        "error_message": "The prompt was rejected by the safety filter (logo likeness)."}),
    "perfume-1x1-std": (JobState.FAILED, {
        "error_code": "RENDER_ERROR", "error_message": "Internal render error; try again."}),
    "headphones-9x16-std": (JobState.TIMED_OUT, {
        "error_code": "TIMEOUT", "error_message": "No result after 1 h of polling."}),
    "headphones-1x1-pro": (JobState.UNKNOWN, {
        "error_code": "AMBIGUOUS_CREATE",
        "error_message": "Connection reset while creating the task."}),
    "headphones-16x9-pro": (JobState.RUNNING, {"progress": 0.4}),
    "headphones-16x9-std": (JobState.SUBMITTED, {}),
}


def matrix_specs(*, hostile: bool = True) -> list[JobSpec]:
    """24 jobs: 4 products × 3 sizes × 2 modes, with a hostile prompt in one of them."""
    specs = []
    for product, (name, backdrop) in PRODUCTS.items():
        for size in SIZES:
            for mode in MODES:
                job_id = f"{product}-{size.replace(':', 'x')}-{mode}"
                prompt = (f"{name} on a {backdrop}, premium commercial, slow orbit, "
                          "soft key light")
                if hostile and job_id == "watch-1x1-pro":
                    prompt = f"{HOSTILE} {name} <b>bold</b> & more"
                specs.append(JobSpec(
                    job_id=job_id, model="kling-v2-6", prompt=prompt, duration=5, size=size,
                    mode=mode, negative_prompt="blurry, warped logo",
                    variables={"product": product, "name": name, "style": "premium",
                               "size": size, "mode": mode},
                    group="{product}-{size:slug}-{mode}"))
    return specs


async def build_matrix_run(
    workdir: Path, run_id: str = "spring-ads", *, hostile: bool = True, missing: bool = True
) -> Path:
    """A 24-job matrix run in ``workdir`` with real clips; returns the run folder.

    Most jobs are downloaded; the rest are failed, timed out, unknown or still going. With
    ``missing``, one downloaded job's video file has been deleted.
    """
    run_dir = workdir / run_id
    videos = run_dir / "videos"
    videos.mkdir(parents=True)
    specs = matrix_specs(hostile=hostile)
    async with SqliteStore(workdir / "batchkling.db") as store:
        await store.save_run(run_id, manifest_path="ads/spring.yaml", manifest_text=None,
                             config_json="{}", provider="imarouter", base_url="http://127.0.0.1",
                             simulated=True, now=T0)
        await store.sync_jobs(run_id, added=list(enumerate(specs)), changed=[], reordered=[],
                              removed=[], now=T0)
        for i, spec in enumerate(specs):
            submitted = T0 + 5 + i * 3
            await store.transition(run_id, spec.job_id, JobState.SUBMITTED, now=submitted,
                                   event="job.submitted", new_attempt=(1, f"k{i}"),
                                   task_id=f"task-{i:03d}", submitted_at=submitted)
            state, fields = OUTCOMES.get(spec.job_id, (JobState.DOWNLOADED, {}))
            render = 60.0 + (i * 17) % 80
            done = submitted + render
            if state is JobState.DOWNLOADED:
                clip = videos / f"{spec.job_id}.mp4"
                slug = spec.size.replace(":", "x")
                if not (missing and spec.job_id == "sneaker-16x9-std"):
                    shutil.copyfile(ASSETS / f"sample_{slug}.mp4", clip)
                fields = {"video_path": str(clip), "render_seconds": render,
                          "completed_at": done,
                          "cost_usd": 0.25 if spec.mode == "std" else 0.35}
            elif state in (JobState.FAILED, JobState.TIMED_OUT):
                fields = {**fields, "completed_at": done, "attempt": 2 if i % 2 else 1}
            await store.transition(run_id, spec.job_id, state, now=done, event="e", **fields)
        await store.set_run_state(run_id, "finished", None, T0 + 400)
    return run_dir


async def make_report(workdir: Path, **kwargs: Any) -> tuple[Path, str]:
    run_dir = await build_matrix_run(workdir, **kwargs)
    async with SqliteStore(workdir / "batchkling.db") as store:
        dest = await write_report(store, "spring-ads", run_dir / "report.html")
    return dest, dest.read_text(encoding="utf-8")


class _Page(HTMLParser):
    """Collects the attributes that load anything, the scripts and their JSON blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self.blocks: list[tuple[str | None, str]] = []  # (id or class, text)
        self.state: dict[str, str | None] = {}
        self._block: tuple[str | None, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for name in ("src", "href", "poster", "action"):
            if a.get(name):
                self.links.append(str(a[name]))
        if a.get("id") == "runstate":
            self.state = a
        if tag == "script":
            self.scripts.append(a)
            if a.get("type") == "application/json":
                self._block = (a.get("id") or a.get("class"), [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._block is not None:
            self.blocks.append((self._block[0], "".join(self._block[1])))
            self._block = None

    def handle_data(self, data: str) -> None:
        if self._block is not None:
            self._block[1].append(data)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(json.loads(next(t for name, t in self.blocks if name == "report-meta")))

    @property
    def jobs(self) -> list[dict[str, Any]]:
        return [job for name, t in self.blocks if name == "jobs" for job in json.loads(t)]


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


class TestContactSheet:
    async def test_one_card_per_job_in_manifest_order(self, workdir: Path) -> None:
        """Every job has exactly one card's data, in manifest order, with its status."""
        _, page = await make_report(workdir)
        jobs = parse(page).jobs
        assert [j["id"] for j in jobs] == [s.job_id for s in matrix_specs()]
        status = {j["id"]: j["status"] for j in jobs}
        assert status["watch-16x9-std"] == "succeeded"
        assert status["sneaker-9x16-pro"] == "failed"
        assert status["headphones-9x16-std"] == "timed_out"
        assert status["headphones-1x1-pro"] == "unknown"
        assert status["headphones-16x9-pro"] == "pending"

    async def test_videos_are_relative_and_missing_ones_are_placeholders(
        self, workdir: Path
    ) -> None:
        """Stored absolute paths become videos/<id>.mp4; a deleted file gets a placeholder."""
        _, page = await make_report(workdir)
        jobs = parse(page).jobs
        videos = [j["video"] for j in jobs if "video" in j]
        assert len(videos) == 16  # 17 downloaded, one file deleted
        assert "videos/watch-16x9-std.mp4" in videos
        assert all(re.fullmatch(r"videos/[a-z0-9x-]+\.mp4", v) for v in videos)
        notes = {j["id"]: j["note"] for j in jobs if "note" in j}
        assert notes["sneaker-16x9-std"] == "video file missing"
        assert len(notes) == 24 - 16
        assert notes["headphones-16x9-pro"] == "rendering · 40%"

    async def test_a_moved_run_folder_still_finds_its_videos(self, workdir: Path) -> None:
        """Paths recorded before the folder moved are found again inside the run folder."""
        await build_matrix_run(workdir)
        moved = workdir.parent / "moved"
        shutil.move(workdir, moved)
        async with SqliteStore(moved / "batchkling.db") as store:
            dest = await write_report(store, "spring-ads", moved / "spring-ads" / "report.html")
        assert "videos/watch-16x9-std.mp4" in [j.get("video") for j in parse(
            dest.read_text()).jobs]

    async def test_untrusted_text_is_escaped(self, workdir: Path) -> None:
        """A prompt with markup is data: escaped in the JSON blocks, never markup in the page."""
        _, page = await make_report(workdir)
        assert HOSTILE not in page
        assert "<b>bold</b>" not in page
        parsed = parse(page)
        assert all("<" not in text for _name, text in parsed.blocks)
        assert any(j["prompt"].startswith(HOSTILE) for j in parsed.jobs)
        # Only the page's own script runs; the rest are data blocks.
        assert [s.get("type") for s in parsed.scripts].count(None) == 1
        assert parsed.scripts[-1].get("type") is None

    def test_error_messages_and_variables_are_escaped(self) -> None:
        """Provider error text and variable values are untrusted too, in the summary as well."""
        page = render_report(_run(), [_row(
            state=JobState.FAILED, error_code="<i>X</i>",
            error_message='"><img src=x onerror=alert(1)>',
            variables={"product": "<svg onload=alert(1)>"})], generated_at=T0)
        assert "<img" not in page and "<svg" not in page and "<i>X" not in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page  # the problems summary
        assert parse(page).jobs[0]["error"] == '"><img src=x onerror=alert(1)>'

    async def test_no_external_references(self, workdir: Path) -> None:
        """The page loads nothing from the network: inline CSS/JS, relative videos only."""
        _, page = await make_report(workdir)
        assert "http://" not in page and "https://" not in page
        assert "<link rel=\"stylesheet\"" not in page and "@import" not in page
        parsed = parse(page)
        for link in parsed.links:
            assert link.startswith("data:"), link
        for job in parsed.jobs:
            for key in ("video", "thumb", "thumb_tail"):
                assert key not in job or job[key].startswith(("videos/", "thumbs/")), job
        assert "Content-Security-Policy" in page

    async def test_groups_by_the_first_varying_variable(self, workdir: Path) -> None:
        """Cards start grouped by product; name (one-to-one with product) is folded in."""
        _, page = await make_report(workdir)
        meta = parse(page).meta
        assert meta["group"] == "var:product"
        dims = {d["key"]: d for d in meta["dims"]}
        assert list(dims) == ["var:product", "var:size", "var:mode", "status"]
        assert dims["var:product"]["aliases"] == ["name"]
        assert "Every job: <i>style</i> premium" in page

    async def test_summary_counts_cost_and_reasons(self, workdir: Path) -> None:
        """The header counts each status, totals cost, and groups problems by reason."""
        _, page = await make_report(workdir)
        chips = dict(re.findall(r'value="(\w+)" checked>[^<]* <b>(\d+)</b>', page))
        assert chips == {"succeeded": "17", "failed": "3", "timed_out": "1", "unknown": "1",
                         "pending": "2"}
        assert "<span>Cost</span><b>$5.05</b>" in page  # 9 std × 0.25 + 8 pro × 0.35
        reasons = re.findall(r'<b>(\d+) ×</b> <span class="badge st-(\w+)">\w+</span> '
                             r"<code>(\w+)</code>", page)
        assert reasons[0] == ("2", "failed", "CONTENT_POLICY")
        assert ("1", "timed_out", "TIMEOUT") in reasons
        assert ("1", "unknown", "AMBIGUOUS_CREATE") in reasons

    async def test_card_data_has_parameters_timings_and_attempts(self, workdir: Path) -> None:
        """A card's data carries model, duration, size, mode, kind, cost, render, attempts."""
        _, page = await make_report(workdir)
        job = next(j for j in parse(page).jobs if j["id"] == "watch-16x9-pro")
        assert (job["model"], job["duration"], job["size"], job["mode"], job["kind"]) == (
            "kling-v2-6", 5, "16:9", "pro", "text")
        assert (job["cost"], job["render"], job["attempts"]) == (0.35, 77.0, 1)
        assert job["submitted"] == T0 + 8

    async def test_rewrite_is_atomic_and_leaves_no_temp_files(self, workdir: Path) -> None:
        """Writing again replaces the page with the new state and leaves no temporary files."""
        dest, first = await make_report(workdir)
        before = {j["id"]: j["status"] for j in parse(first).jobs}
        assert before["headphones-16x9-std"] == "pending"
        async with SqliteStore(workdir / "batchkling.db") as store:
            await store.transition("spring-ads", "headphones-16x9-std", JobState.FAILED,
                                   now=T0 + 600, event="e", error_code="GONE")
            again = await write_report(store, "spring-ads", dest)
        assert again == dest
        after = {j["id"]: j["status"] for j in parse(dest.read_text()).jobs}
        assert after["headphones-16x9-std"] == "failed"
        assert sorted(p.name for p in dest.parent.iterdir()) == ["report.html", "videos"]

    async def test_report_while_another_connection_writes(self, workdir: Path) -> None:
        """Rendering is read-only: it works while a live runner holds the run, and says so."""
        run_dir = await build_matrix_run(workdir)
        async with SqliteStore(workdir / "batchkling.db") as runner, \
                SqliteStore(workdir / "batchkling.db") as reader:
            await runner.register_worker("runner", runs=["spring-ads"], now=T0 + 500)
            await runner.acquire_lease("spring-ads", "runner", now=T0 + 500, stale_after=60)
            await runner.transition("spring-ads", "headphones-16x9-std", JobState.RUNNING,
                                    now=T0 + 501, event="e", progress=0.1)
            dest = await write_report(reader, "spring-ads", run_dir / "report.html",
                                      now=T0 + 502)
            await runner.transition("spring-ads", "headphones-16x9-std", JobState.RUNNING,
                                    now=T0 + 502, event="e", progress=0.2)
        page = dest.read_text()
        assert parse(page).state["data-state"] == "running"
        assert "This run is still going" in page
        assert "rendering · 10%" in [j.get("note") for j in parse(page).jobs]

    def test_an_empty_run_renders(self) -> None:
        """A run with no jobs yet still gives a valid page."""
        page = render_report(_run(), [], generated_at=T0)
        parsed = parse(page)
        assert parsed.jobs == []
        assert parsed.meta["total"] == 0
        assert "<span>Jobs</span><b>0</b>" in page


class TestRunState:
    async def test_a_dead_runner_is_interrupted_not_running(self, workdir: Path) -> None:
        """A lease whose heartbeat stopped (a killed process) shows as interrupted, with the
        resume step, never as "still going"."""
        run_dir = await build_matrix_run(workdir)
        async with SqliteStore(workdir / "batchkling.db") as store:
            await store.acquire_lease("spring-ads", "gone", now=T0 + 500, stale_after=60)
            dest = await write_report(store, "spring-ads", run_dir / "report.html",
                                      now=T0 + 500 + 3600)
        page = dest.read_text()
        assert parse(page).state["data-state"] == "interrupted"
        assert "still going" not in page
        assert "<code>batchkling resume spring-ads</code>" in page

    async def test_header_names_the_next_steps(self, workdir: Path) -> None:
        """Unknown and failed jobs get their commands, with the real run id, in the header and
        on their cards."""
        _, page = await make_report(workdir)
        assert "<code>batchkling retry spring-ads --unknown</code>" in page
        assert "<code>batchkling retry spring-ads</code>" in page
        jobs = {j["id"]: j for j in parse(page).jobs}
        assert jobs["headphones-1x1-pro"]["next"].startswith(
            "`batchkling retry spring-ads --unknown`")
        assert "RUN" not in page.replace("RUNNING", "")


class TestFiles:
    async def test_report_and_csv_follow_the_umask(self, tmp_path: Path, workdir: Path,
                                                   simulator: Any, api_key: str) -> None:
        """results.csv and report.html get the mode of any new file (0644 under umask 022),
        like the videos: teammates on a shared server can open them; the page written at the
        end of the run says "finished"."""
        import os

        from batchkling.manifest.document import load_manifest
        from batchkling.run.orchestrator import Orchestrator
        from batchkling.testing import write_manifest

        sim = simulator()
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], base_url=sim.base_url)
        old = os.umask(0o022)
        try:
            async with Orchestrator(load_manifest(path), workdir=workdir,
                                    time_scale=400) as orch:
                await orch.run()
        finally:
            os.umask(old)
        run_dir = workdir / "test-run"
        for name in ("results.csv", "report.html", "videos/a.mp4"):
            assert (run_dir / name).stat().st_mode & 0o777 == 0o644, name
        # The page written at the end of the run says it finished (it said "running").
        assert parse((run_dir / "report.html").read_text()).state["data-state"] == "finished"

    async def test_source_images_become_shared_thumbnails(self, tmp_path: Path) -> None:
        """First and last frames appear as small JPEGs in thumbs/, one per image content."""
        from PIL import Image

        images = []
        for name, colour in (("first.png", "red"), ("last.png", "blue")):
            Image.new("RGB", (800, 600), colour).save(tmp_path / name)
            images.append(str(tmp_path / name))
        rows = [_row(job_id=f"j{i}", image=images[0], image_sha256="a" * 64,
                     image_tail=images[1], image_tail_sha256="b" * 64) for i in range(3)]
        run_dir = tmp_path / "run"
        page = render_report(_run(), rows, generated_at=T0, run_dir=run_dir)
        jobs = parse(page).jobs
        assert {j["thumb"] for j in jobs} == {"thumbs/" + "a" * 24 + ".jpg"}
        assert {j["thumb_tail"] for j in jobs} == {"thumbs/" + "b" * 24 + ".jpg"}
        with Image.open(run_dir / jobs[0]["thumb"]) as thumb:
            assert max(thumb.size) <= 240 and thumb.format == "JPEG"
        assert sorted(p.name for p in (run_dir / "thumbs").iterdir()) == [
            "a" * 24 + ".jpg", "b" * 24 + ".jpg"]


@pytest.mark.parametrize(("state", "video", "expected"), [
    (JobState.PENDING, None, "waiting to start"),
    (JobState.SUCCEEDED, None, "rendered, downloading"),
    (JobState.FAILED, None, "no video: failed"),
    (JobState.DOWNLOADED, "/nowhere/j.mp4", "video file missing"),
])
def test_placeholder_says_why_there_is_no_video(state: JobState, video: str | None,
                                                expected: str) -> None:
    """Jobs without a playable video get a placeholder naming the reason."""
    page = render_report(_run(), [_row(state=state, video_path=video)], generated_at=T0)
    assert parse(page).jobs[0]["note"] == expected


def test_placeholder_when_downloads_are_off() -> None:
    """A render kept remotely (output.download off) says so."""
    page = render_report(_run(), [_row(state=JobState.SUCCEEDED)], generated_at=T0,
                         download=False)
    assert parse(page).jobs[0]["note"] == "rendered, not downloaded"


def _run() -> Any:
    from batchkling.store import RunRow

    return RunRow(run_id="r", manifest_path=None, config_json="{}", provider="imarouter",
                  base_url="http://x", simulated=False, nonce="n", state="finished",
                  stop_reason=None, created_at=T0, updated_at=T0, lease_owner=None,
                  lease_pid=None, lease_host=None, lease_heartbeat=None)


def _row(*, job_id: str = "j", state: JobState = JobState.DOWNLOADED,
         variables: dict[str, str] | None = None, image: str | None = None,
         image_sha256: str | None = None, image_tail: str | None = None,
         image_tail_sha256: str | None = None, **fields: Any) -> Any:
    """A stored job as the report reads it."""
    from batchkling.store import JobRow

    spec = JobSpec(job_id=job_id, model="kling-v2-6", prompt="p", duration=5, size="16:9",
                   mode="std", variables=variables or {}, image=image, image_sha256=image_sha256,
                   image_tail=image_tail, image_tail_sha256=image_tail_sha256)
    values: dict[str, Any] = dict.fromkeys(JobRow.__dataclass_fields__)
    values.update(run_id="r", job_id=job_id, seq=0, spec_json=spec.to_json(),
                  fingerprint=spec.fingerprint, state=state, attempt=1, attempt_base=0,
                  reserved_usd=0.0, updated_at=T0, **fields)
    return JobRow(**values)
