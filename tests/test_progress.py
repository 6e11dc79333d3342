"""The terminal progress display and the progress snapshot it draws from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import SPEED
from rich.console import Console

from batchkling.manifest import load_manifest
from batchkling.orchestrator import Orchestrator, Progress
from batchkling.progress import render
from batchkling.testing import write_manifest


def _text(progress: Progress) -> str:
    console = Console(width=120, record=True)
    console.print(render(progress))
    return console.export_text()


def test_frame_shows_counts_slots_money_and_eta() -> None:
    """One frame names every non-empty state, the slots, the money and an ETA."""
    frame = _text(Progress(run_id="spring", counts={"pending": 3, "running": 2, "downloaded": 5,
                                                     "failed": 1},
                           in_flight=2, slot_limit=4, spent_usd=1.5, committed_usd=2.25,
                           elapsed=60, stop_reason=None))
    assert "spring" in frame and "5/11 downloaded" in frame
    assert "pending 3" in frame and "running 2" in frame and "failed 1" in frame
    assert "slots 2/4" in frame and "$1.50" in frame and "$2.25" in frame
    assert "ETA 0m50s" in frame  # 6 ended in 60 s: 10 s each, 5 left


def test_frame_says_why_creates_stopped() -> None:
    """A stop reason is shown under the counts."""
    frame = _text(Progress(run_id="r", counts={"pending": 1}, in_flight=0, slot_limit=1,
                           spent_usd=0, committed_usd=0, elapsed=0,
                           stop_reason="budget reached"))
    assert "creates stopped: budget reached" in frame and "ETA —" in frame


async def test_snapshot_after_a_run(tmp_path: Path, workdir: Path, simulator: Any,
                                    api_key: str) -> None:
    """progress() reports the store's counts and money for the run."""
    sim = simulator()
    path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}],
                          base_url=sim.base_url)
    async with Orchestrator(load_manifest(path), workdir=workdir, time_scale=SPEED) as orch:
        await orch.run()
        snapshot = await orch.progress()
    assert snapshot.counts == {"downloaded": 2}
    assert snapshot.spent_usd > 0 and snapshot.in_flight == 0


async def test_status_and_report_while_a_run_is_going(tmp_path: Path, workdir: Path,
                                                      simulator: Any, api_key: str) -> None:
    """`status` and `report` read a live run from another connection without disturbing it."""
    import anyio

    from batchkling.report import write_report
    from batchkling.store import Store
    from batchkling.views import run_status

    sim = simulator(speed=40.0)  # renders of a few seconds: the run is visibly in flight
    jobs = [{"id": f"j{i}", "prompt": f"shot {i}"} for i in range(6)]
    path = write_manifest(tmp_path, jobs, base_url=sim.base_url,
                          limits={"max_in_flight": 3, "submit_rate": 50})
    seen: dict[str, Any] = {}

    async def look() -> None:
        while sim.stats()["creates"] < 3:
            await anyio.sleep(0.02)
        seen["status"] = await run_status(workdir, "test-run")
        async with Store(workdir / "batchkling.db") as other:
            seen["report"] = await write_report(other, "test-run", tmp_path / "live.html")

    async with (Orchestrator(load_manifest(path), workdir=workdir, time_scale=40.0) as orch,
                anyio.create_task_group() as tg):
        tg.start_soon(look)
        summary = await orch.run()
    assert summary.exit_code == 0 and summary.counts == {"succeeded": 6}
    assert seen["status"]["state"] == "running" and seen["status"]["in_flight"] >= 1
    assert "still going" in seen["report"].read_text()
