"""Killing the CLI at any moment loses nothing and pays for nothing twice, on each store
backend (``store_url``: SQLite, PostgreSQL).

The CLI runs in a subprocess against the simulator as a real loopback server; the test
SIGKILLs it (at random moments, or at labelled crash points) and resumes, then checks the
invariants: at most one provider task per idempotency key, every job in a documented state,
every `succeeded` row backed by a complete MP4, no `.part` files, a healthy database, and a
CSV that agrees with it.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_process, finish_process, wait_until_running
from invariants import db_query, store_problems

from batchkling.outputs.results import read_results
from batchkling.simulator import SimulatorServer
from batchkling.testing import write_manifest

SPEED = 300.0


def _cli(*args: str, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    return cli_process(*args, speed=SPEED, crash_at=crash_at)


def _where(workdir: Path, store: str) -> tuple[str, ...]:
    """The options that point the CLI at the test's workdir and store."""
    return ("--workdir", str(workdir), "--store", store)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 90) -> tuple[int, str]:
    code, _out, err = finish_process(proc, timeout)
    return code, err


LIMITS = {"max_in_flight": 6, "submit_rate": 40, "task_timeout": "2h"}


def _manifest(tmp_path: Path, sim: SimulatorServer, n: int, **sections: Any) -> Path:
    jobs = [{"id": f"clip-{i:03d}", "prompt": f"shot {i}"} for i in range(n)]
    sections.setdefault("limits", LIMITS)
    return write_manifest(tmp_path, jobs, name="killme", base_url=sim.base_url, **sections)


def _check_invariants(workdir: Path, store: str, sim: SimulatorServer, n: int
                      ) -> list[dict[str, str]]:
    stats = sim.stats()
    assert stats["duplicate_keys"] == [], "a key made two paid tasks"
    assert stats["creates_without_key"] == 0
    assert store_problems(store) == []
    db_states = dict(db_query(store, "SELECT job_id, state FROM jobs WHERE run_id='killme'"))
    tasks = dict(db_query(
        store, "SELECT job_id, COUNT(DISTINCT task_id) FROM attempts WHERE run_id='killme'"
        " AND task_id IS NOT NULL GROUP BY job_id"))
    rows = read_results(workdir / "killme" / "results.csv")
    assert len(rows) == n == len(db_states)
    for row in rows:
        assert row["status"] in ("succeeded", "unknown"), row
        if row["status"] == "succeeded":
            assert db_states[row["job_id"]] == "downloaded"
            assert tasks[row["job_id"]] == 1
            data = Path(row["video_path"]).read_bytes()
            assert data[4:8] == b"ftyp"
        else:
            assert db_states[row["job_id"]] == "unknown"
    assert not list(workdir.rglob("*.part"))
    # Tasks the provider made = jobs that succeeded + (at most) the honest unknowns.
    succeeded = sum(r["status"] == "succeeded" for r in rows)
    assert succeeded <= stats["creates"] <= n
    return rows


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_then_resume(tmp_path: Path, workdir: Path,
                                               simulator: Any, store_url: str) -> None:
    """SIGKILLed a dozen times mid-run and resumed each time: every job ends downloaded or
    honestly `unknown`, and no idempotency key ever made two tasks."""
    # A gateway that ignores Idempotency-Key: only batchkling's own discipline prevents
    # duplicates here.
    sim = simulator(speed=SPEED, honor_idempotency_key=False)
    n = 60
    manifest = _manifest(tmp_path, sim, n)
    rng = random.Random(20261125)
    kills = 0
    for _ in range(12):
        proc = _cli("run", str(manifest), *_where(workdir, store_url))
        wait_until_running(proc, store_url, "killme")
        time.sleep(rng.uniform(0.05, 1.0))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(timeout=30)
    code, err = _finish(_cli("resume", "killme", *_where(workdir, store_url)))
    assert code in (0, 3), err
    assert kills >= 6
    rows = _check_invariants(workdir, store_url, sim, n)
    unknown = [r["job_id"] for r in rows if r["status"] == "unknown"]
    assert (code == 0) == (not unknown)
    # Resolving the unknowns with a provider that honours the key pays for nothing twice.
    sim.update_config(honor_idempotency_key=True)
    code, err = _finish(_cli("retry", "killme", "--unknown", *_where(workdir, store_url)))
    assert code == 0, err
    rows = _check_invariants(workdir, store_url, sim, n)
    assert {r["status"] for r in rows} == {"succeeded"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", ["after_intent", "after_create"])
def test_crash_at_the_worst_moment(tmp_path: Path, workdir: Path, simulator: Any,
                                   point: str, store_url: str) -> None:
    """Killed between the intent commit and the create, or between the create and the
    task-id commit: the job is reported `unknown` (ImaRouter has no lookup), never resubmitted
    blindly; the rest of the run completes."""
    sim = simulator(speed=SPEED, honor_idempotency_key=False)
    # One task at a time, so the first two jobs are finished before the third create crashes,
    # however loaded the machine: exactly one job is caught in the window. (Creates merely
    # 200 ms apart left four jobs in it at a load average of 12.)
    manifest = _manifest(tmp_path, sim, 6, limits={**LIMITS, "max_in_flight": 1})
    code, _err = _finish(_cli("run", str(manifest), *_where(workdir, store_url),
                              crash_at=f"{point}:3"))
    assert code == -9  # SIGKILL
    code, err = _finish(_cli("resume", "killme", *_where(workdir, store_url)))
    assert code == 3, err
    rows = _check_invariants(workdir, store_url, sim, 6)
    assert [r["status"] for r in rows].count("unknown") == 1
    expected_tasks = 6 if point == "after_create" else 5
    assert sim.stats()["creates"] == expected_tasks


@pytest.mark.timeout(120)
def test_second_runner_refuses(tmp_path: Path, workdir: Path, simulator: Any,
                               store_url: str) -> None:
    """While one process runs a run id, a second `run` of it exits 3 with a clear message,
    and the first, continued, finishes the run alone."""
    sim = simulator(speed=20.0)  # slow renders: the first runner is busy for seconds
    manifest = _manifest(tmp_path, sim, 4)
    first = _cli("run", str(manifest), *_where(workdir, store_url))
    try:
        deadline = time.monotonic() + 20
        while sim.stats()["creates"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Paused (well within its staleness), the first runner cannot finish before the second
        # asks, however loaded the machine is; its lease is as live as a busy runner's.
        first.send_signal(signal.SIGSTOP)
        code, err = _finish(_cli("run", str(manifest), *_where(workdir, store_url)))
        assert code == 3, err
        assert "is being run by process" in err
        assert "Traceback" not in err
    finally:
        first.send_signal(signal.SIGCONT)
    code, err = _finish(first)
    assert code == 0, err
    assert sim.stats()["duplicate_keys"] == []
    assert sim.stats()["creates"] == 4
