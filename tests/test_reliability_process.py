"""Process boundaries: a crash loop, resume start-up cost, Ctrl-C and SIGTERM, and a sweep of
everything a faulty run leaves behind for the credentials it used.

The CLI runs in a subprocess against the simulator on loopback; each scenario ends on the
shared invariants (tests/invariants.py). Scenario numbers are docs/reliability.md's.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SQLITE_UNLESS_ALL, TEST_KEY, cli_process, finish_process, wait_until_running
from invariants import check_invariants, db_dump, db_query

from batchkling.manifest.document import load_manifest
from batchkling.run.orchestrator import Orchestrator
from batchkling.simulator import SimConfig, SimulatorServer, create_app
from batchkling.store.sqlite import SqliteStore
from batchkling.testing import RequestLog, write_manifest

RUN = "crashy"


def _cli(*args: str, speed: float, env: dict[str, str] | None = None,
         crash_at: str | None = None) -> subprocess.Popen[bytes]:
    return cli_process(*args, speed=speed, env=env, crash_at=crash_at, stdout=True)


_finish = finish_process


def _manifest(folder: Path, sim: SimulatorServer, n: int, *, provider: str = "imarouter",
              **limits: Any) -> Path:
    settings = {"max_in_flight": 6, "submit_rate": 40, "task_timeout": "2h", **limits}
    jobs = [{"id": f"clip-{i:03d}", "prompt": f"shot {i}"} for i in range(n)]
    return write_manifest(folder, jobs, name=RUN, provider=provider, base_url=sim.base_url,
                          limits=settings)


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


class TestCrashLoop:
    """#2: hundreds of jobs, dozens of SIGKILLs, and what a resume costs."""

    @pytest.mark.slow
    @pytest.mark.timeout(240)
    def test_killed_dozens_of_times_then_completed(self, tmp_path: Path, workdir: Path,
                                                   simulator: Any) -> None:
        """A 300-job run SIGKILLed 30 times — at random moments and at the two labelled
        crash points — and resumed each time ends with every job downloaded from exactly one
        task, although the gateway ignores Idempotency-Key while the kills happen."""
        speed = 300.0
        sim = simulator(speed=speed, honor_idempotency_key=False)
        n = 300
        # Paced so the 300 creates take longer than the kill loop's ~15 s of running time: every
        # kill lands in the middle of the run, however fast the engine is.
        manifest = _manifest(tmp_path, sim, n, max_in_flight=20, submit_rate=15)
        rng = random.Random(20261125)
        kills = 0
        for i in range(30):
            crash_at = None
            if i % 5 == 4:
                crash_at = f"{rng.choice(['after_intent', 'after_create'])}:{rng.randint(1, 8)}"
            proc = _cli("run", str(manifest), "--workdir", str(workdir), speed=speed,
                        crash_at=crash_at)
            if crash_at:
                code, _out, err = _finish(proc, timeout=60)
                assert code in (-9, 0), err
                kills += code == -9
                continue
            wait_until_running(proc, workdir / "batchkling.db", RUN)
            time.sleep(rng.uniform(0.05, 0.9))
            if proc.poll() is None:
                proc.kill()
                kills += 1
            _finish(proc, timeout=30)
        assert kills >= 24
        code, _out, err = _finish(_cli("resume", RUN, "--workdir", str(workdir), speed=speed))
        assert code in (0, 3), err
        checked = check_invariants(workdir, RUN, sim.stats(), jobs=n)
        assert set(checked.statuses) <= {"succeeded", "unknown"}
        unknown = checked.statuses["unknown"]
        assert (code == 0) == (unknown == 0)
        # The honest unknowns are resolved by the key once the gateway honours it.
        sim.update_config(honor_idempotency_key=True)
        code, _out, err = _finish(_cli("retry", RUN, "--unknown", "--workdir", str(workdir),
                                       speed=speed))
        assert code == 0, err
        stats = sim.stats()
        checked = check_invariants(workdir, RUN, stats, jobs=n)
        assert checked.statuses == {"succeeded": n}
        assert stats["creates"] == n and stats["duplicate_keys"] == []
        tasks = dict(db_query(workdir, "SELECT job_id, COUNT(DISTINCT task_id) FROM attempts "
                              "WHERE task_id IS NOT NULL GROUP BY job_id"))
        assert set(tasks.values()) == {1} and len(tasks) == n
        print(f"crash loop: {kills} kills, {unknown} unknown before retry, "
              f"{stats['creates']} creates, {stats['create_requests']} create requests")

    @pytest.mark.timeout(120)
    async def test_resume_start_up_does_not_grow_with_finished_jobs(
            self, tmp_path: Path, workdir: Path) -> None:
        """The time from opening a resume to its first create is about the same with 10,000
        finished jobs in the run as with none."""
        first: dict[int, float] = {}
        for finished in (0, 10_000, 0):
            first[finished] = min(first.get(finished, 1e9),
                                  await _time_to_first_create(tmp_path, finished))
        print(f"resume start-up: {first[0] * 1000:.0f} ms with 0 finished jobs, "
              f"{first[10_000] * 1000:.0f} ms with 10,000")
        assert first[10_000] < 2 * first[0] + 0.25, first


async def _time_to_first_create(tmp_path: Path, finished: int) -> float:
    """Seconds from opening a resume of a run with ``finished`` downloaded jobs and one pending
    job to the simulator receiving its create."""
    folder = tmp_path / f"f{finished}-{time.monotonic_ns()}"
    folder.mkdir()
    workdir = folder / "jobs"
    app = create_app(SimConfig(speed=400.0, seed=1))
    log = RequestLog(app, time.perf_counter)
    matrices: dict[str, Any] = {}
    if finished:
        (folder / "rows.csv").write_text("n\n" + "".join(f"{i:05d}\n" for i in range(finished)))
        matrices["matrices"] = [{"id": "done-{n}", "prompt": "shot {n}", "vars_from": "rows.csv"}]
    manifest = load_manifest(write_manifest(folder, [{"id": "todo", "prompt": "the one left"}],
                                            name="big", base_url="http://testserver",
                                            **matrices))
    video = folder / "shared.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100)
    digest = hashlib.sha256(video.read_bytes()).hexdigest()
    async with SqliteStore(workdir / "batchkling.db") as store:
        await store.save_run("big", manifest_path=None, manifest_text=None,
                             config_json=manifest.run_config().model_dump_json(),
                             provider="imarouter", base_url="http://testserver",
                             simulated=False, now=time.time())
        await store.sync_jobs("big", added=list(enumerate(manifest.expand())), changed=[],
                              reordered=[], removed=[], now=time.time())
    con = sqlite3.connect(workdir / "batchkling.db")
    with con:
        con.execute("UPDATE jobs SET state = 'downloaded', attempt = 1, task_id = 't-' || job_id,"
                    " idempotency_key = 'k-' || job_id, video_path = ?, video_size = ?,"
                    " video_sha256 = ?, cost_usd = 0.35 WHERE job_id != 'todo'",
                    (str(video), video.stat().st_size, digest))
        con.execute("INSERT INTO attempts (run_id, job_id, number, idempotency_key, fingerprint,"
                    " state, task_id, cost_usd) SELECT run_id, job_id, 1, idempotency_key,"
                    " fingerprint, state, task_id, cost_usd FROM jobs WHERE job_id != 'todo'")
    con.close()
    start = time.perf_counter()
    async with Orchestrator(run_id="big", workdir=workdir, env={"BATCHKLING_TEST_KEY": TEST_KEY},
                            transport=httpx.ASGITransport(app=log), time_scale=400.0) as orch:
        summary = await orch.resume()
    assert summary.exit_code == 0
    creates = log.creates()
    assert len(creates) == 1
    return creates[0][0] - start


class TestSignals:
    """#4: Ctrl-C once, twice, and SIGTERM, on the CLI in a subprocess."""

    @pytest.mark.timeout(90)
    @pytest.mark.parametrize(("signum", "times"), [(signal.SIGINT, 1), (signal.SIGINT, 2),
                                                    (signal.SIGTERM, 1)],
                             ids=["ctrl-c", "ctrl-c-twice", "sigterm"])
    @SQLITE_UNLESS_ALL
    def test_interrupt_then_resume(self, tmp_path: Path, workdir: Path, simulator: Any,
                                   signum: signal.Signals, times: int, store_url: str) -> None:
        """One Ctrl-C (or SIGTERM) stops creating, checkpoints and exits 130 within seconds;
        a second exits at once; either way `resume` adopts the tasks left rendering and pays
        for none twice."""
        speed = 60.0  # ~1.5 s renders: tasks are in flight when the signal comes
        n = 12
        if times == 1:
            sim = simulator(speed=speed, honor_idempotency_key=False)
            manifest = _manifest(tmp_path, sim, n, max_in_flight=4, submit_rate=4)
        else:
            # Answers take a second, so creates are in the air when the first Ctrl-C asks to
            # wind down: only the second makes the process leave at once.
            sim = simulator(speed=speed, honor_idempotency_key=False, slow_response_s=1.0)
            manifest = _manifest(tmp_path, sim, n, max_in_flight=n, submit_rate=4)
        where = ("--workdir", str(workdir), "--store", store_url)
        proc = _cli("run", str(manifest), *where, speed=speed)
        _wait_for(lambda: sim.stats()["creates"] >= 3)
        proc.send_signal(signum)
        sent = time.monotonic()
        if times == 2:
            time.sleep(0.1)
            proc.send_signal(signum)
            sent = time.monotonic()
        code, _out, err = _finish(proc, timeout=30)
        took = time.monotonic() - sent
        # 130 from batchkling itself; a second Ctrl-C landing while the interpreter shuts
        # down kills it by SIGINT, which a shell reports as 130 too.
        assert code in ((130,) if times == 1 else (130, -signal.SIGINT)), err
        assert "Traceback" not in err
        assert took < (1.0 if times == 2 else 5.0), took
        created = sim.stats()["creates"]
        assert 3 <= created < n
        print(f"#4 {signum.name} x{times}: exit {code} {took:.2f} s after the signal, "
              f"{created} of {n} created")
        if times == 1:
            assert "stopping: no new tasks" in err
            states = dict(db_query(store_url, "SELECT state, COUNT(*) FROM jobs GROUP BY state"))
            assert "submitting" not in states  # every create's outcome was checkpointed
            assert states.get("submitted", 0) + states.get("running", 0) > 0
            check_invariants(workdir, RUN, sim.stats(), jobs=n, store=store_url)
        code, _out, err = _finish(_cli("resume", RUN, *where, speed=speed))
        stats = sim.stats()
        checked = check_invariants(workdir, RUN, stats, jobs=n, store=store_url)
        if times == 1:
            assert code == 0, err
            assert checked.statuses == {"succeeded": n}
            assert stats["creates"] == n
        else:
            # Killed at once, a create may have been cut off mid-air: honestly `unknown`.
            assert code in (0, 3), err
            assert set(checked.statuses) <= {"succeeded", "unknown"}
            assert stats["creates"] <= n
        # The tasks left rendering were adopted, not made again: one task per job.
        tasks = db_query(store_url, "SELECT job_id, COUNT(DISTINCT task_id) FROM attempts "
                         "WHERE task_id IS NOT NULL GROUP BY job_id")
        assert {count for _job, count in tasks} == {1}


# ---- the secret sweep --------------------------------------------------------------------

ACCESS = "AK-sweep-4d1c9e0b7a"
SECRET = "SK-sweep-93be0f55c2d1"
JWT_HEADER = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"  # {"alg":"HS256","typ":"JWT"}
DB_PASSWORD = "pw-sweep-5e0a2c77b1"


def _sweep(workdir: Path, store: str, texts: list[str], secrets: list[str]) -> int:
    """Count hits of any secret in every file under the workdir, a dump of the store, and
    ``texts`` (the process's stdout and stderr); returns the number of places searched."""
    places = 0
    needles = [s.encode() for s in secrets]
    for path in workdir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [n for n in needles if n in data], path
            places += 1
    for text in [db_dump(store), *texts]:
        assert not [s for s in secrets if s in text]
        places += 1
    return places


class TestSecretSweep:
    """The keys of a faulty run appear nowhere it writes."""

    @pytest.mark.timeout(120)
    @pytest.mark.parametrize(("provider", "backend"), [
        ("imarouter", "sqlite"), ("kling", "sqlite"), ("imarouter", "postgres")])
    def test_faulty_run_leaks_no_key(self, tmp_path: Path, workdir: Path, simulator: Any,
                                     provider: str, backend: str, store_url: str) -> None:
        """After a run through 5xx, drops, rate limits, failed tasks, truncated downloads and
        a key revoked mid-run, no file under the workdir, no row of the store, and nothing
        the CLI printed holds the API key, the Kling access or secret key, a JWT, or the
        password in a PostgreSQL store's URL."""
        speed = 400.0
        if provider == "imarouter":
            sim = simulator("flaky", speed=speed, api_key=TEST_KEY, url_ttl_s=None)
            env: dict[str, str] = {}
            secrets = [TEST_KEY]
        else:
            sim = simulator("flaky", speed=speed, access_key=ACCESS, secret_key=SECRET,
                            url_ttl_s=None)
            env = {"KLING_ACCESS_KEY": ACCESS, "KLING_SECRET_KEY": SECRET}
            secrets = [ACCESS, SECRET, JWT_HEADER]
        if backend == "postgres":
            # The test cluster trusts local logins, so a password in the URL is accepted and
            # unused: it must still appear nowhere.
            store_url = store_url.replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
            secrets.append(DB_PASSWORD)
        # The store comes from the environment here (BATCHKLING_STORE), as a deployment has it.
        env["BATCHKLING_STORE"] = store_url
        manifest = _manifest(tmp_path, sim, 10, provider=provider, max_attempts=3)
        code, out, err = _finish(_cli("run", str(manifest), "--workdir", str(workdir),
                                      speed=speed, env=env), timeout=100)
        assert code in (0, 1, 3), err
        sim.update_config(**({"api_key": "sk-revoked-000000"} if provider == "imarouter"
                             else {"secret_key": "revoked-secret"}))
        code2, out2, err2 = _finish(_cli("retry", RUN, "--unknown", "--failed", "--workdir",
                                         str(workdir), speed=speed, env=env), timeout=100)
        assert code2 in (0, 3, 4), err2
        views = [_finish(subprocess.Popen(
            [sys.executable, "-m", "batchkling", *command, "--workdir", str(workdir)],
            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            for command in (["report", RUN], ["status", RUN], ["status", "--json"],
                            ["status", "no-such-run"])]
        assert [code for code, _out, _err in views] == [0, 0, 0, 2]
        assert (workdir / RUN / "run.log").stat().st_size > 0
        assert (workdir / RUN / "results.csv").exists()
        texts = [out, err, out2, err2, *(text for _c, o, e in views for text in (o, e))]
        places = _sweep(workdir, store_url, texts, secrets)
        assert places >= 6
        stats = sim.stats()
        assert sum(stats["rejected"].values()) > 0  # faults were really injected
        check_invariants(workdir, RUN, stats, provider=provider, jobs=10, store=store_url)
