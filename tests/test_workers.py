"""Cooperating workers on one store: claims, shared slots, takeover, and fencing.

The CLI runs in subprocesses against the simulator on loopback (Kling's native shape, whose
lookup by ``external_task_id`` settles every create a killed worker left unanswered), on each
store backend (``store_url``: one SQLite file, or one PostgreSQL database the workers share).
The tests SIGKILL, SIGSTOP and SIGCONT workers and check what DESIGN.md §10 promises: one
provider task per job, never more tasks in flight than the account's slots, a worker that wakes
up after being presumed dead changes nothing and exits 5, and every job ends downloaded.
"""

from __future__ import annotations

import itertools
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

import anyio
import psycopg
import pytest
import yaml
from conftest import cli_process, finish_process, wait_until_running
from invariants import db_query, store_problems

from batchkling.simulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, SimulatorServer
from batchkling.simulator.state import account_label
from batchkling.store import is_postgres
from batchkling.testing import VirtualSim, write_manifest

KLING_ENV = {"KLING_ACCESS_KEY": DEFAULT_ACCESS_KEY, "KLING_SECRET_KEY": DEFAULT_SECRET_KEY}
SPEED = 300.0
RUN = "crew"


def _cli(*args: str, workdir: Path, store: str, log: Path | None = None
         ) -> subprocess.Popen[bytes]:
    return cli_process(*args, "--workdir", str(workdir),
                       env={**KLING_ENV, "BATCHKLING_STORE": store}, stderr=log)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str]:
    code, _out, err = finish_process(proc, timeout)
    return code, err


def _manifest(tmp_path: Path, sim: SimulatorServer, n: int, **limits: Any) -> Path:
    jobs = [{"id": f"clip-{i:03d}", "prompt": f"shot {i}"} for i in range(n)]
    settings = {"max_in_flight": 10, "submit_rate": 40, "task_timeout": "2h", **limits}
    return write_manifest(tmp_path, jobs, name=RUN, provider="kling", base_url=sim.base_url,
                          limits=settings)


def _check_every_job_paid_once(workdir: Path, store: str, sim: SimulatorServer, n: int) -> None:
    """Every job downloaded from exactly one task; no key created twice; a healthy store."""
    stats = sim.stats()
    assert stats["duplicate_keys"] == [], "a key made two paid tasks"
    assert stats["creates"] == n
    assert store_problems(store) == []
    states = dict(db_query(store, "SELECT job_id, state FROM jobs WHERE run_id = ?", RUN))
    assert len(states) == n
    assert set(states.values()) == {"downloaded"}, states
    tasks = db_query(store, "SELECT job_id, COUNT(DISTINCT task_id) FROM attempts WHERE run_id = ?"
                " AND task_id IS NOT NULL GROUP BY job_id", RUN)
    assert all(count == 1 for _job, count in tasks) and len(tasks) == n
    # No attempt without its job, no job claimed by nobody that is still in flight.
    assert db_query(store, "SELECT COUNT(*) FROM attempts a LEFT JOIN jobs j USING (run_id, job_id)"
               " WHERE j.job_id IS NULL") == [(0,)]
    for path in (workdir / RUN / "videos").glob("*.mp4"):
        assert path.read_bytes()[4:8] == b"ftyp"
    assert not list(workdir.rglob("*.part"))


def _one_driving(store: str, crew: list[subprocess.Popen[bytes]]) -> int | None:
    """The index of a worker process that is registered and drives a job now (None once
    every job is downloaded: the run is over)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if db_query(store, "SELECT COUNT(*) FROM jobs WHERE state != 'downloaded'") == [
                    (0,)]:
                return None
            pids = {pid for (pid,) in db_query(
                store, "SELECT DISTINCT w.pid FROM jobs j JOIN workers w USING (worker_id)"
                " WHERE w.state = 'alive'")}
        except (sqlite3.Error, psycopg.Error):
            pids = set()
        driving = [i for i, proc in enumerate(crew) if proc.pid in pids and proc.poll() is None]
        if driving:
            return driving[0]
        time.sleep(0.01)
    return None


@pytest.mark.timeout(120)
def test_a_paused_runner_is_fenced_after_takeover(tmp_path: Path, workdir: Path,
                                                   simulator: Any, store_url: str) -> None:
    """A runner SIGSTOPped past --stale-after loses its run to a second runner; continued,
    it changes nothing, says why and exits 5, while the second finishes every job once."""
    sim = simulator(speed=40.0)  # renders of a couple of seconds: A is mid-run when paused
    n = 12
    manifest = _manifest(tmp_path, sim, n, max_in_flight=3, submit_rate=4)
    first = _cli("run", str(manifest), "--stale-after", "1s", "--speed", "40", workdir=workdir,
                 store=store_url)
    wait_until_running(first, store_url, RUN)
    while sim.stats()["creates"] < 2 and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    try:
        created_while_paused = sim.stats()["creates"]
        time.sleep(1.5)  # silent past --stale-after
        second = _cli("resume", RUN, "--stale-after", "1s", "--speed", "40", workdir=workdir,
                      store=store_url)
        wait_until_running(second, store_url, RUN)
    finally:
        first.send_signal(signal.SIGCONT)
    code, err = _finish(first)
    assert code == 5, err
    assert "presumed dead" in err and "Traceback" not in err
    code, err = _finish(second)
    assert code == 0, err
    assert created_while_paused < n
    _check_every_job_paid_once(workdir, store_url, sim, n)
    fenced = db_query(store_url, "SELECT state FROM workers WHERE stop_reason LIKE ?",
                      "%taken over%")
    assert fenced == [("dead",)]


def _wait_for_creates(sim: SimulatorServer, creates: float, crew: list[subprocess.Popen[bytes]],
                      store: str, stall: float = 90.0) -> None:
    """Wait until the simulator has seen ``creates`` creates. If none comes for ``stall``
    seconds, fail saying what the store and the workers say, rather than hang to the timeout."""
    seen, since = sim.stats()["creates"], time.monotonic()
    while seen < creates:
        time.sleep(0.01)
        now = sim.stats()["creates"]
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            states = db_query(store, "SELECT state, COUNT(*) FROM jobs GROUP BY state")
            runs = db_query(store, "SELECT state, stop_reason FROM runs")
            workers = db_query(store, "SELECT pid, state, stop_reason FROM workers")
            exits = [proc.poll() for proc in crew]
            pytest.fail(f"no create for {stall:.0f}s at {seen} of {creates:.0f}: jobs {states},"
                        f" run {runs}, workers {workers}, crew exit codes {exits}")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_four_workers_killed_and_paused_share_ten_slots(tmp_path: Path, workdir: Path,
                                                        simulator: Any, store_url: str) -> None:
    """4 workers on one store and one 10-slot account, 300 jobs; workers SIGKILLed and
    restarted at random, one SIGSTOPped past --stale-after and continued: every job is
    downloaded from one task, the account never holds more than 10, no create is refused for
    slots, and the woken worker exits 5."""
    sim = simulator(speed=SPEED, slot_limit=10)
    n = 300
    # Creates paced over about ten seconds, so the kills land while the run is under way.
    manifest = _manifest(tmp_path, sim, n, max_in_flight=10, submit_rate=30)
    code, err = _finish(_cli("submit", str(manifest), workdir=workdir, store=store_url))
    assert code == 0, err

    logs = iter(tmp_path / f"worker-{i}.log" for i in itertools.count())

    def worker() -> subprocess.Popen[bytes]:
        # Its log to a file: a worker that lives through the whole run logs more than a pipe
        # holds, and would block on it (the run stalled at a tenth of its creates).
        return _cli("worker", "--exit-when-idle", "--stale-after", "1s", "--speed", str(SPEED),
                    workdir=workdir, store=store_url, log=next(logs))

    rng = random.Random(20261202)
    crew = [worker() for _ in range(4)]
    kills, paused_code, paused_row = 0, None, None
    # A kill each time another tenth of the creates has gone out, at a random moment after it,
    # so the number of kills does not depend on how loaded the machine is; the eighth one is
    # a pause past --stale-after instead. (Late: the others keep creating while the paused one
    # is waited for, which on a loaded machine took long enough, as the second, for the run to
    # end before the next kill.)
    for tenth in range(1, 10):
        _wait_for_creates(sim, n * tenth / 10, crew, store_url)
        time.sleep(rng.uniform(0.0, 0.2))
        victim = _one_driving(store_url, crew)
        if victim is None:
            break  # the run finished first
        if tenth == 8:
            # One worker sleeps through its staleness while it drives jobs: the others take
            # its jobs over, and it must change nothing once it wakes.
            crew[victim].send_signal(signal.SIGSTOP)
            time.sleep(1.5)  # silent past --stale-after
            # The others mark it dead at their next heartbeat, which on a loaded machine may
            # come late: wait to see it. On SQLite a pause that lands while the worker holds
            # the file's one write lock stalls the others (README, "Many machines"), and they
            # cannot mark it dead at all; their writes must not wait out the lock either.
            deadline = time.monotonic() + (5 if not is_postgres(store_url) else 60)
            while time.monotonic() < deadline and db_query(
                    store_url, "SELECT state FROM workers WHERE pid = ?",
                    crew[victim].pid) != [("dead",)]:
                time.sleep(0.05)
            crew[victim].send_signal(signal.SIGCONT)
            paused_code, _err = _finish(crew[victim], timeout=30)
            paused_row = db_query(store_url, "SELECT state FROM workers WHERE pid = ?",
                                  crew[victim].pid)
        else:
            crew[victim].kill()
            crew[victim].wait()
        crew[victim] = worker()
        kills += 1
    for proc in crew:
        code, err = _finish(proc, timeout=120)
        assert code in (0, 5), err
    assert kills >= 5
    # Taken over, it exits 5 and its row says dead. Only on SQLite, and only when its pause
    # held the write lock, was it never marked dead: then it finishes as the live worker it
    # is, and nothing was taken over.
    if paused_row != [("dead",)]:
        assert not is_postgres(store_url) and paused_row == [("stopped",)], paused_row
        assert paused_code == 0
    else:
        assert paused_code == 5
    stats = sim.stats()
    assert stats["peak_slots"] <= 10
    assert stats["rejected"].get("slots", 0) == 0, stats["rejected"]
    # Any job still unfinished (its last worker killed right at the end) is finished by one
    # more worker, like a restarted pod would.
    code, err = _finish(worker())
    assert code == 0, err
    _check_every_job_paid_once(workdir, store_url, sim, n)


class TestAccountPools:
    """Several keys of one provider: jobs go to any account with a free slot."""

    KEYS: ClassVar[dict[str, str]] = {"POOL_KEY_A": "sk-pool-a-0001",
                                      "POOL_KEY_B": "sk-pool-b-0002",
                                      "POOL_KEY_C": "sk-pool-c-0003"}

    def _manifest(self, tmp_path: Path, accounts: list[dict[str, Any]], n: int) -> Path:
        data = {
            "version": 1, "name": "pool",
            "provider": {"name": "imarouter", "base_url": VirtualSim.base_url,
                         "accounts": accounts},
            "limits": {"max_in_flight": 8, "submit_rate": 50, "task_timeout": "2h"},
            "jobs": [{"id": f"job-{i:03d}", "prompt": f"scene {i}"} for i in range(n)],
        }
        path = tmp_path / "pool.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    async def _makespan(self, tmp_path: Path, accounts: list[dict[str, Any]],
                        account_slots: list[str], n: int) -> tuple[float, dict[str, Any]]:
        vs = VirtualSim(self.KEYS, account_slots=account_slots)
        folder = tmp_path / f"run-{len(accounts)}"
        folder.mkdir()
        start = vs.clock.monotonic()
        summary = await vs.run(self._manifest(folder, accounts, n), folder / "jobs")
        assert summary.exit_code == 0, summary
        return vs.clock.monotonic() - start, vs.stats()

    async def test_two_accounts_of_five_and_three_slots(self, tmp_path: Path) -> None:
        """Accounts of 5 and 3 slots hold at most 5 and 3 tasks, nothing is refused, and the
        pool finishes within 10 % of one 8-slot account on the same render times."""
        n = 40
        pooled, stats = await self._makespan(
            tmp_path,
            [{"api_key_env": "POOL_KEY_A", "max_in_flight": 5},
             {"api_key_env": "POOL_KEY_B", "max_in_flight": 3}],
            ["sk-pool-a-0001=5", "sk-pool-b-0002=3"], n)
        peaks = stats["peak_slots_by_account"]
        assert peaks == {account_label("sk-pool-a-0001"): 5, account_label("sk-pool-b-0002"): 3}
        assert stats["rejected"].get("slots", 0) == 0
        assert stats["creates"] == n and stats["duplicate_keys"] == []
        single, one = await self._makespan(
            tmp_path, [{"api_key_env": "POOL_KEY_C", "max_in_flight": 8}],
            ["sk-pool-c-0003=8"], n)
        assert one["peak_slots_by_account"] == {account_label("sk-pool-c-0003"): 8}
        assert pooled <= single * 1.10, (pooled, single)

    async def test_adding_a_key_adds_throughput(self, tmp_path: Path) -> None:
        """A second 4-slot key roughly halves the makespan of a 4-slot key alone."""
        n = 32
        alone, _ = await self._makespan(
            tmp_path, [{"api_key_env": "POOL_KEY_A", "max_in_flight": 4}],
            ["sk-pool-a-0001=4"], n)
        both, stats = await self._makespan(
            tmp_path, [{"api_key_env": "POOL_KEY_A", "max_in_flight": 4},
                       {"api_key_env": "POOL_KEY_B", "max_in_flight": 4}],
            ["sk-pool-a-0001=4", "sk-pool-b-0002=4"], n)
        assert both < alone * 0.65, (both, alone)
        assert set(stats["peak_slots_by_account"].values()) == {4}


def test_status_lists_live_workers_and_what_they_drive(tmp_path: Path, workdir: Path) -> None:
    """`status` names every live worker, where it runs, and the jobs it drives; a worker that
    stopped is not listed."""
    from click.testing import CliRunner

    from batchkling.cli import cli
    from batchkling.models import JobSpec
    from batchkling.store.interface import ClaimOutcome, Intent
    from batchkling.store.sqlite import SqliteStore

    async def setup() -> None:
        async with SqliteStore(workdir / "batchkling.db") as store:
            await store.save_run(RUN, manifest_path=None, manifest_text=None,
                                 config_json="{}", provider="imarouter", base_url="http://x",
                                 simulated=False, now=1.0)
            specs = [JobSpec(job_id=f"j{i}", model="kling-v2-6", prompt="p", duration=5,
                             size="16:9") for i in range(3)]
            await store.sync_jobs(RUN, added=list(enumerate(specs)), changed=[], reordered=[],
                                  removed=[], now=1.0)
            await store.ensure_account("acct", provider="imarouter", max_in_flight=5, now=1.0)
            for worker in ("w-busy", "w-gone"):
                await store.register_worker(worker, runs=None, now=1.0)
            claim = await store.claim(RUN, worker_id="w-busy", account_id="acct", slot_cap=5,
                                      intent=lambda job: Intent((1, f"k-{job.job_id}"), 0.1),
                                      max_usd=None, now=2.0)
            assert claim.outcome is ClaimOutcome.CLAIMED
            await store.retire_worker("w-gone", state="stopped", reason=None, now=2.0)

    anyio.run(setup)
    result = CliRunner().invoke(cli, ["status", RUN, "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps at the terminal's width
    assert "w-busy" in text and "drives 1 submitting" in text
    assert "w-gone" not in text
    listing = CliRunner().invoke(cli, ["status", "--workdir", str(workdir)])
    assert "w-busy" in listing.output and "live workers (1)" in listing.output


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_and_pause_soak_in_small(tmp_path: Path) -> None:
    """The soak of tests/soak_kill_pause.py in small: runners SIGKILLed, and SIGSTOPped while a
    second runner takes over: no key created twice, no job lost, the paused runners fenced."""
    from soak_kill_pause import soak

    result = soak(tmp_path, kills=6, pauses=2, jobs=20, seed=11)
    assert result.duplicate_keys == []
    assert result.integrity == "ok"
    assert result.states == {"downloaded": 20}
    assert result.creates == 20
    # A runner that ends its run just before its SIGSTOP lands is no pause (a loaded machine
    # makes that likelier). Every paused runner whose run was seen taken over exits 5, and at
    # least one pause was.
    assert result.pauses >= 1 and result.fenced >= 1, result.paused
    assert all(code == 5 for taken, code in result.paused if taken), result.paused
