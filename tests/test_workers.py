"""Cooperating workers on one store: claims, shared slots, takeover, and fencing.

The CLI runs in subprocesses against the simulator on loopback (Kling's native shape, whose
lookup by ``external_task_id`` settles every create a killed worker left unanswered). The
tests SIGKILL, SIGSTOP and SIGCONT workers and check what DESIGN.md §10 promises: one provider
task per job, never more tasks in flight than the account's slots, a worker that wakes up after
being presumed dead changes nothing and exits 5, and every job ends downloaded.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until_running

from batchkling.simulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, SimulatorServer
from batchkling.testing import write_manifest

KLING_ENV = {"KLING_ACCESS_KEY": DEFAULT_ACCESS_KEY, "KLING_SECRET_KEY": DEFAULT_SECRET_KEY}
SPEED = 300.0
RUN = "crew"


def _cli(*args: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **KLING_ENV}
    env.pop("BATCHKLING_CRASH_AT", None)
    return subprocess.Popen(
        [sys.executable, "-m", "batchkling", *args, "--workdir", str(workdir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


def _manifest(tmp_path: Path, sim: SimulatorServer, n: int, **limits: Any) -> Path:
    jobs = [{"id": f"clip-{i:03d}", "prompt": f"shot {i}"} for i in range(n)]
    settings = {"max_in_flight": 10, "submit_rate": 40, "task_timeout": "2h", **limits}
    return write_manifest(tmp_path, jobs, name=RUN, provider="kling", base_url=sim.base_url,
                          limits=settings)


def _db(workdir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(workdir / "batchkling.db", timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _check_every_job_paid_once(workdir: Path, sim: SimulatorServer, n: int) -> None:
    """Every job downloaded from exactly one task; no key created twice; a healthy store."""
    stats = sim.stats()
    assert stats["duplicate_keys"] == [], "a key made two paid tasks"
    assert stats["creates"] == n
    assert _db(workdir, "PRAGMA integrity_check") == [("ok",)]
    states = dict(_db(workdir, "SELECT job_id, state FROM jobs WHERE run_id = ?", RUN))
    assert len(states) == n
    assert set(states.values()) == {"downloaded"}, states
    tasks = _db(workdir, "SELECT job_id, COUNT(DISTINCT task_id) FROM attempts WHERE run_id = ?"
                " AND task_id IS NOT NULL GROUP BY job_id", RUN)
    assert all(count == 1 for _job, count in tasks) and len(tasks) == n
    # No attempt without its job, no job claimed by nobody that is still in flight.
    assert _db(workdir, "SELECT COUNT(*) FROM attempts a LEFT JOIN jobs j USING (run_id, job_id)"
               " WHERE j.job_id IS NULL") == [(0,)]
    for path in (workdir / RUN / "videos").glob("*.mp4"):
        assert path.read_bytes()[4:8] == b"ftyp"
    assert not list(workdir.rglob("*.part"))


def _one_driving(workdir: Path, crew: list[subprocess.Popen[bytes]]) -> int | None:
    """The index of a worker process that is registered and drives a job now (None once
    every job is downloaded: the run is over)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if _db(workdir, "SELECT COUNT(*) FROM jobs WHERE state != 'downloaded'") == [(0,)]:
                return None
            pids = {pid for (pid,) in _db(
                workdir, "SELECT DISTINCT w.pid FROM jobs j JOIN workers w USING (worker_id)"
                " WHERE w.state = 'alive'")}
        except sqlite3.Error:
            pids = set()
        driving = [i for i, proc in enumerate(crew) if proc.pid in pids and proc.poll() is None]
        if driving:
            return driving[0]
        time.sleep(0.01)
    return None


@pytest.mark.timeout(120)
def test_a_paused_runner_is_fenced_after_takeover(tmp_path: Path, workdir: Path,
                                                   simulator: Any) -> None:
    """A runner SIGSTOPped past --stale-after loses its run to a second runner; continued,
    it changes nothing, says why and exits 5, while the second finishes every job once."""
    sim = simulator(speed=40.0)  # renders of a couple of seconds: A is mid-run when paused
    n = 12
    manifest = _manifest(tmp_path, sim, n, max_in_flight=3, submit_rate=4)
    first = _cli("run", str(manifest), "--stale-after", "1s", "--speed", "40", workdir=workdir)
    wait_until_running(first, workdir / "batchkling.db", RUN)
    while sim.stats()["creates"] < 2 and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    try:
        created_while_paused = sim.stats()["creates"]
        time.sleep(1.5)  # silent past --stale-after
        second = _cli("resume", RUN, "--stale-after", "1s", "--speed", "40", workdir=workdir)
        wait_until_running(second, workdir / "batchkling.db", RUN)
    finally:
        first.send_signal(signal.SIGCONT)
    code, err = _finish(first)
    assert code == 5, err
    assert "presumed dead" in err and "Traceback" not in err
    code, err = _finish(second)
    assert code == 0, err
    assert created_while_paused < n
    _check_every_job_paid_once(workdir, sim, n)
    fenced = _db(workdir, "SELECT state FROM workers WHERE stop_reason LIKE '%taken over%'")
    assert fenced == [("dead",)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_four_workers_killed_and_paused_share_ten_slots(tmp_path: Path, workdir: Path,
                                                        simulator: Any) -> None:
    """4 workers on one store and one 10-slot account, 300 jobs; workers SIGKILLed and
    restarted at random, one SIGSTOPped past --stale-after and continued: every job is
    downloaded from one task, the account never holds more than 10, no create is refused for
    slots, and the woken worker exits 5."""
    sim = simulator(speed=SPEED, slot_limit=10)
    n = 300
    # Creates paced over about ten seconds, so the kills land while the run is under way.
    manifest = _manifest(tmp_path, sim, n, max_in_flight=10, submit_rate=30)
    code, err = _finish(_cli("submit", str(manifest), workdir=workdir))
    assert code == 0, err

    def worker() -> subprocess.Popen[bytes]:
        return _cli("worker", "--exit-when-idle", "--stale-after", "1s", "--speed", str(SPEED),
                    workdir=workdir)

    rng = random.Random(20261202)
    crew = [worker() for _ in range(4)]
    kills, paused_code = 0, None
    # A kill each time another tenth of the creates has gone out, at a random moment after it,
    # so the number of kills does not depend on how loaded the machine is; the second one is
    # a pause past --stale-after instead.
    for tenth in range(1, 10):
        while sim.stats()["creates"] < n * tenth / 10:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        victim = _one_driving(workdir, crew)
        if victim is None:
            break  # the run finished first
        if tenth == 2:
            # One worker sleeps through its staleness while it drives jobs: the others take
            # its jobs over, and it must change nothing once it wakes.
            crew[victim].send_signal(signal.SIGSTOP)
            time.sleep(2.0)
            crew[victim].send_signal(signal.SIGCONT)
            paused_code, _err = _finish(crew[victim], timeout=30)
        else:
            crew[victim].kill()
            crew[victim].wait()
        crew[victim] = worker()
        kills += 1
    for proc in crew:
        code, err = _finish(proc, timeout=120)
        assert code in (0, 5), err
    assert kills >= 5
    assert paused_code == 5
    stats = sim.stats()
    assert stats["peak_slots"] <= 10
    assert stats["rejected"].get("slots", 0) == 0, stats["rejected"]
    # Any job still unfinished (its last worker killed right at the end) is finished by one
    # more worker, like a restarted pod would.
    code, err = _finish(worker())
    assert code == 0, err
    _check_every_job_paid_once(workdir, sim, n)
