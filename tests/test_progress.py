"""The terminal progress display and the progress snapshot it draws from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import SPEED
from rich.console import Console

from batchkling.manifest.document import load_manifest
from batchkling.progress import render
from batchkling.run.orchestrator import Orchestrator, Progress
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
                           stop_reason=None, eta_seconds=50))
    assert "spring" in frame and "5/11 downloaded" in frame
    assert "pending 3" in frame and "running 2" in frame and "failed 1" in frame
    assert "slots 2/4" in frame  # submitted + running: the tasks that exist
    assert "cost $1.50 + $0.75 reserved for tasks not yet priced" in frame
    assert "ETA 0m50s" in frame


def test_frame_says_why_creates_stopped() -> None:
    """A stop reason is shown under the counts."""
    frame = _text(Progress(run_id="r", counts={"pending": 1}, in_flight=0, slot_limit=1,
                           spent_usd=0, committed_usd=0,
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
    assert snapshot.eta_seconds is None  # nothing left: the last frame says "ETA —"


async def test_redraws_take_totals_from_the_engine(tmp_path: Path, workdir: Path,
                                                   simulator: Any, api_key: str) -> None:
    """A redraw reads recent ends from the engine, not from a query over every ended job, and
    money from the store's running totals; they agree with the store's queries, across a
    second invocation of the run too."""
    sim = simulator()
    jobs = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}]
    for extra in ([], [{"id": "c", "prompt": "z"}]):
        path = write_manifest(tmp_path, jobs + extra, base_url=sim.base_url)
        async with Orchestrator(load_manifest(path), workdir=workdir, time_scale=SPEED) as orch:
            await orch.run()
            store = orch.store
            money, ends = await store.money("test-run"), await store.recent_ends("test-run")

            async def refused(*_args: Any, **_kwargs: Any) -> Any:
                raise AssertionError("a redraw read the whole run")

            store.recent_ends = refused  # type: ignore[method-assign]
            snapshot = await orch.progress()
        assert (snapshot.spent_usd, snapshot.committed_usd) == pytest.approx(money)
        assert snapshot.spent_usd > 0
        assert orch._engine is not None and list(orch._engine.recent_ends) == ends
        assert len(ends) == 2 + len(extra)


async def test_status_and_report_while_a_run_is_going(tmp_path: Path, workdir: Path,
                                                      simulator: Any, api_key: str) -> None:
    """`status` and `report` read a live run from another connection without disturbing it."""
    import anyio

    from batchkling.outputs.report import write_report
    from batchkling.outputs.views import run_status
    from batchkling.store.sqlite import SqliteStore

    sim = simulator(speed=40.0)  # renders of a few seconds: the run is visibly in flight
    jobs = [{"id": f"j{i}", "prompt": f"shot {i}"} for i in range(6)]
    path = write_manifest(tmp_path, jobs, base_url=sim.base_url,
                          limits={"max_in_flight": 3, "submit_rate": 50})
    seen: dict[str, Any] = {}

    async def look() -> None:
        while sim.stats()["creates"] < 3:
            await anyio.sleep(0.02)
        seen["status"] = await run_status(workdir, "test-run")
        async with SqliteStore(workdir / "batchkling.db") as other:
            seen["report"] = await write_report(other, "test-run", tmp_path / "live.html")
        while True:  # once jobs end at a pace, the ETA has something to go by
            later = await run_status(workdir, "test-run")
            if later["counts"].get("downloaded", 0) >= 2 or later["state"] != "running":
                break
            await anyio.sleep(0.02)
        seen["later"], seen["live"] = later, await orch.progress()

    async with (Orchestrator(load_manifest(path), workdir=workdir, time_scale=40.0) as orch,
                anyio.create_task_group() as tg):
        tg.start_soon(look)
        summary = await orch.run()
    assert summary.exit_code == 0 and summary.counts == {"succeeded": 6}
    assert seen["status"]["state"] == "running" and seen["status"]["in_flight"] >= 1
    assert seen["status"]["eta_seconds"] is None  # nothing has ended yet: no pace to go by
    if seen["later"]["state"] == "running":
        assert seen["later"]["eta_seconds"] is not None and seen["later"]["eta_seconds"] >= 0
        # The live display goes by the same pace as `status`: the two ETAs agree.
        assert seen["live"].eta_seconds is not None
        assert abs(seen["live"].eta_seconds - seen["later"]["eta_seconds"]) <= 2
    assert "still going" in seen["report"].read_text()


def test_eta_goes_by_the_pace_of_recent_ends() -> None:
    """Jobs left × the recent time per job, less the time since the last one ended."""
    from batchkling.outputs.views import eta_seconds

    assert eta_seconds(5, [100.0, 90.0, 80.0], now=104.0) == 46.0  # 10 s a job, 4 s in
    assert eta_seconds(5, [100.0], now=104.0) is None
    assert eta_seconds(5, [100.0, 100.0], now=104.0) is None  # no pace from one moment
    assert eta_seconds(0, [], now=104.0) == 0.0
    assert eta_seconds(1, [100.0, 90.0], now=500.0) == 0.0  # overdue is "now", not negative


def test_status_shows_eta_and_when_runs_started(capsys: Any) -> None:
    from batchkling.outputs.views import print_status

    run = {"run_id": "spring", "state": "running", "provider": "imarouter", "simulated": False,
           "counts": {"pending": 2, "downloaded": 3}, "in_flight": 1, "cost_usd": 1.0,
           "committed_usd": 1.5, "eta_seconds": 125, "stop_reason": None, "problems": {},
           "jobs": 5, "manifest": "m.yaml", "created_at": 1_780_000_000.0}
    print_status(run, single=True)
    assert "ETA 2m05s" in capsys.readouterr().out
    print_status([run], single=False)
    table = capsys.readouterr().out
    assert "started" in table and "spring" in table and "m.yaml" in table
