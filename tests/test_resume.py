"""Resume start-up: what it reads and checks, and that a large finished run costs it little
(virtual time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from conftest import TEST_KEY
from invariants import db_query

from batchkling.testing import VirtualSim

pytestmark = pytest.mark.timeout(120)


async def test_missing_videos_are_fetched_again_in_few_thread_trips(
        tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resume looks for the files of 60 downloaded jobs a page at a time in a worker thread
    (not one thread hand-off per file), downloads the two that were deleted again, and
    creates no task."""
    vs = VirtualSim({"BATCHKLING_TEST_KEY": TEST_KEY})
    n = 60
    summary = await vs.run(vs.manifest(tmp_path, n, limits={"max_in_flight": 20}), workdir)
    assert summary.exit_code == 0
    for job_id in ("job-003", "job-041"):
        (workdir / "test-run" / "videos" / f"{job_id}.mp4").unlink()
    creates = vs.stats()["creates"]
    trips: list[Any] = []
    real = anyio.to_thread.run_sync

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    summary = await vs.resume("test-run", workdir)
    assert summary.exit_code == 0
    assert vs.stats()["creates"] == creates
    missing = [j for (j,) in db_query(workdir, "SELECT job_id FROM events WHERE "
                                               "event = 'job.video_missing' ORDER BY job_id")]
    assert missing == ["job-003", "job-041"]
    assert (workdir / "test-run" / "videos" / "job-041.mp4").stat().st_size > 1000
    assert len(trips) < 20, len(trips)
