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
    """Collects the cards, the attributes that load anything, and the JSON blob."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, str | None]] = []
        self.videos: list[str | None] = []
        self.links: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self.data = ""
        self._in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "article":
            self.cards.append(a)
        if tag == "video":
            self.videos.append(a.get("src"))
            assert "controls" in a and "muted" in a and a.get("preload") == "metadata"
        for name in ("src", "href", "poster", "action"):
            if a.get(name):
                self.links.append(str(a[name]))
        if tag == "script":
            self.scripts.append(a)
            self._in_data = a.get("type") == "application/json"

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_data = False

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data += data


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


class TestContactSheet:
    async def test_one_card_per_job_in_manifest_order(self, workdir: Path) -> None:
        """Every job has exactly one card, in manifest order, with its status."""
        _, page = await make_report(workdir)
        cards = parse(page).cards
        assert [c["data-job"] for c in cards] == [s.job_id for s in matrix_specs()]
        status = {c["data-job"]: c["data-status"] for c in cards}
        assert status["watch-16x9-std"] == "succeeded"
        assert status["sneaker-9x16-pro"] == "failed"
        assert status["headphones-9x16-std"] == "timed_out"
        assert status["headphones-1x1-pro"] == "unknown"
        assert status["headphones-16x9-pro"] == "pending"

    async def test_videos_are_relative_and_missing_ones_are_placeholders(
        self, workdir: Path
    ) -> None:
        """Stored absolute paths become videos/<id>.mp4; a deleted file shows a placeholder."""
        _, page = await make_report(workdir)
        videos = parse(page).videos
        assert len(videos) == 16  # 17 downloaded, one file deleted
        assert "videos/watch-16x9-std.mp4" in videos
        assert all(v is not None and re.fullmatch(r"videos/[a-z0-9x-]+\.mp4", v) for v in videos)
        assert "videos/sneaker-16x9-std.mp4" not in videos
        assert "video file missing" in page
        assert page.count('class="placeholder"') == 24 - 16

    async def test_a_moved_run_folder_still_finds_its_videos(self, workdir: Path) -> None:
        """Paths recorded before the folder moved are found again inside the run folder."""
        await build_matrix_run(workdir)
        moved = workdir.parent / "moved"
        shutil.move(workdir, moved)
        async with SqliteStore(moved / "batchkling.db") as store:
            dest = await write_report(store, "spring-ads", moved / "spring-ads" / "report.html")
        assert "videos/watch-16x9-std.mp4" in parse(dest.read_text()).videos

    async def test_untrusted_text_is_escaped(self, workdir: Path) -> None:
        """A prompt with markup renders as text, in the cards and inside the JSON blob."""
        _, page = await make_report(workdir)
        assert HOSTILE not in page
        assert "<b>bold</b>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        parsed = parse(page)
        assert "</" not in parsed.data and "<" not in parsed.data
        jobs = json.loads(parsed.data)["jobs"]
        assert any(HOSTILE.lower() in j["text"] for j in jobs)
        # Only the page's own two scripts: data and code.
        assert [s.get("type") for s in parsed.scripts] == ["application/json", None]

    def test_error_messages_and_variables_are_escaped(self) -> None:
        """Provider error text and variable values are untrusted too."""
        page = render_report(_run(), [_record(
            status="failed", state="failed", error_code="<i>X</i>",
            error_message='"><img src=x onerror=alert(1)>',
            variables={"product": "<svg onload=alert(1)>"})], generated_at=T0)
        assert "<img" not in page and "<svg" not in page and "<i>X" not in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page

    async def test_no_external_references(self, workdir: Path) -> None:
        """The page loads nothing from the network: inline CSS/JS, relative videos only."""
        _, page = await make_report(workdir)
        assert "http://" not in page and "https://" not in page
        assert "<link rel=\"stylesheet\"" not in page and "@import" not in page
        for link in parse(page).links:
            assert link.startswith(("videos/", "data:")), link
        assert "Content-Security-Policy" in page

    async def test_groups_by_the_first_varying_variable(self, workdir: Path) -> None:
        """Cards start grouped by product; name (one-to-one with product) is folded in."""
        _, page = await make_report(workdir)
        headings = re.findall(r"<h2>(.*?) <small>", page)
        assert headings == [f"product: {p}" for p in PRODUCTS]
        data = json.loads(parse(page).data)
        assert data["group"] == "var:product"
        dims = {d["key"]: d for d in data["dims"]}
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

    async def test_card_shows_parameters_timings_and_attempts(self, workdir: Path) -> None:
        """A card carries model, duration, size, mode, kind, cost, render time, attempts."""
        _, page = await make_report(workdir)
        card = re.search(r'<article [^>]*data-job="watch-16x9-pro".*?</article>', page)
        assert card is not None
        text = card.group(0)
        assert "kling-v2-6 · 5 s · 16:9 · pro · text → video" in text
        assert "<dd title=\"\">$0.35</dd>" in text
        assert "<dt>Render</dt><dd title=\"\">77 s</dd>" in text
        assert "<dt>Attempts</dt><dd title=\"\">1</dd>" in text
        assert "2025-11-25 12:00:08 UTC" in text

    async def test_rewrite_is_atomic_and_leaves_no_temp_files(self, workdir: Path) -> None:
        """Writing again replaces the page with the new state and leaves no temporary files."""
        dest, first = await make_report(workdir)
        assert 'data-job="headphones-16x9-std" data-status="pending"' in first
        async with SqliteStore(workdir / "batchkling.db") as store:
            await store.transition("spring-ads", "headphones-16x9-std", JobState.FAILED,
                                   now=T0 + 600, event="e", error_code="GONE")
            again = await write_report(store, "spring-ads", dest)
        assert again == dest
        assert 'data-job="headphones-16x9-std" data-status="failed"' in dest.read_text()
        assert sorted(p.name for p in dest.parent.iterdir()) == ["report.html", "videos"]

    async def test_report_while_another_connection_writes(self, workdir: Path) -> None:
        """Rendering is read-only: it works while a runner holds the run, and says so."""
        run_dir = await build_matrix_run(workdir)
        async with SqliteStore(workdir / "batchkling.db") as runner, \
                SqliteStore(workdir / "batchkling.db") as reader:
            await runner.acquire_lease("spring-ads", "runner", now=T0 + 500, stale_after=60)
            await runner.transition("spring-ads", "headphones-16x9-std", JobState.RUNNING,
                                    now=T0 + 501, event="e", progress=0.1)
            dest = await write_report(reader, "spring-ads", run_dir / "report.html")
            await runner.transition("spring-ads", "headphones-16x9-std", JobState.RUNNING,
                                    now=T0 + 502, event="e", progress=0.2)
        page = dest.read_text()
        assert "This run is still going" in page
        assert "rendering · 10%" in page

    def test_an_empty_run_renders(self) -> None:
        """A run with no jobs yet still gives a valid page."""
        page = render_report(_run(), [], generated_at=T0)
        parsed = parse(page)
        assert parsed.cards == []
        assert json.loads(parsed.data)["jobs"] == []
        assert "<span>Jobs</span><b>0</b>" in page


@pytest.mark.parametrize(("status", "state", "note", "expected"), [
    ("pending", "pending", None, "waiting to start"),
    ("pending", "succeeded", None, "rendered, downloading"),
    ("succeeded", "succeeded", None, "rendered, not downloaded"),
    ("failed", "failed", None, "no video: failed"),
    ("succeeded", "downloaded", "video file missing", "video file missing"),
])
def test_placeholder_says_why_there_is_no_video(
    status: str, state: str, note: str | None, expected: str
) -> None:
    """Jobs without a playable video get a placeholder naming the reason."""
    page = render_report(_run(), [_record(status=status, state=state, video_note=note)],
                         generated_at=T0)
    assert f'<div class="placeholder"><span>{expected}</span></div>' in page


def _run() -> Any:
    from batchkling.store import RunRow

    return RunRow(run_id="r", manifest_path=None, config_json="{}", provider="imarouter",
                  base_url="http://x", simulated=False, nonce="n", state="finished",
                  stop_reason=None, created_at=T0, updated_at=T0, lease_owner=None,
                  lease_pid=None, lease_host=None, lease_heartbeat=None)


def _record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "job_id": "j", "seq": 0, "state": "downloaded", "status": "succeeded",
        "model": "kling-v2-6", "prompt": "p", "negative_prompt": None, "duration": 5,
        "size": "16:9", "mode": "std", "kind": "text", "image": None, "image_tail": None,
        "variables": {}, "group": None, "attempts": 1, "task_id": None, "progress": None,
        "cost_usd": None, "error_code": None, "error_message": None, "submitted_at": None,
        "completed_at": None, "render_seconds": None, "video": None, "video_note": None,
    }
    record.update(overrides)
    return record
