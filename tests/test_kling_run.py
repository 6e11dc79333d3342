"""Whole runs on Kling's native API (the simulator's Kling shape): samples, credits, slots,
failures, lost create answers, and SIGKILL at any moment — every paid task made once, and every
interrupted create settled exactly by ``external_task_id`` instead of left `unknown`."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import SPEED, cli_process, finish_process, wait_until_running
from invariants import db_query, store_problems

from batchkling.cli import cli
from batchkling.manifest.document import load_manifest
from batchkling.models import RunSummary
from batchkling.outputs.results import read_results
from batchkling.run.orchestrator import Orchestrator
from batchkling.simulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, SimulatorServer
from batchkling.testing import write_manifest

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).parent.parent
SAMPLES = ROOT / "sample_manifests"
KLING_ENV = {"KLING_ACCESS_KEY": DEFAULT_ACCESS_KEY, "KLING_SECRET_KEY": DEFAULT_SECRET_KEY}
#: The CLI subprocesses compress time like tests/test_kill.py does.
CLI_SPEED = 300.0


def _jobs(n: int, prompt: str = "scene number {i}") -> list[dict[str, Any]]:
    return [{"id": f"job-{i:03d}", "prompt": prompt.format(i=i)} for i in range(n)]


def _manifest(folder: Path, sim: SimulatorServer, jobs: list[dict[str, Any]], *,
              name: str = "test-run", **limits: Any) -> Path:
    settings = {"max_in_flight": 5, "submit_rate": 50, "task_timeout": "2h", **limits}
    return write_manifest(folder, jobs, name=name, provider="kling", base_url=sim.base_url,
                          limits=settings)


async def _run(path: Path, workdir: Path, sim: SimulatorServer, store: str | None = None
               ) -> RunSummary:
    async with Orchestrator(load_manifest(path), workdir=workdir, store=store, env=KLING_ENV,
                            base_url=sim.base_url, time_scale=SPEED, seed=3) as orch:
        return await orch.run()


async def _resume(run_id: str, workdir: Path) -> RunSummary:
    async with Orchestrator(run_id=run_id, workdir=workdir, env=KLING_ENV, time_scale=SPEED,
                            seed=4) as orch:
        return await orch.resume()


def _rows(workdir: Path, run_id: str = "test-run") -> list[dict[str, str]]:
    return read_results(workdir / run_id / "results.csv")


def _db(where: Path | str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` against a workdir's store or the store at a URL."""
    return db_query(where, sql, *args)


def _found(where: Path | str) -> list[bool]:
    """What each reconciliation's lookup found (event data: JSON text, or parsed jsonb)."""
    rows = _db(where, "SELECT data FROM events WHERE event = 'job.reconciled' ORDER BY id")
    return [(json.loads(d) if isinstance(d, str) else d)["found"] for (d,) in rows]


def _assert_paid_once(sim: SimulatorServer) -> dict[str, Any]:
    stats = sim.stats()
    assert stats["duplicate_keys"] == [], stats["duplicate_keys"]
    assert stats["creates_without_key"] == 0
    return stats


def _assert_downloaded(workdir: Path, rows: list[dict[str, str]]) -> None:
    assert {r["status"] for r in rows} == {"succeeded"}, [(r["job_id"], r["status"])
                                                           for r in rows]
    for row in rows:
        assert Path(row["video_path"]).read_bytes()[4:8] == b"ftyp", row["job_id"]
    assert not list(workdir.rglob("*.part"))


class TestSamples:
    async def test_kling_native_sample(self, workdir: Path, simulator: Any) -> None:
        """sample_manifests/kling_native.yaml, unchanged, runs to three downloaded videos."""
        sim = simulator()
        summary = await _run(SAMPLES / "kling_native.yaml", workdir, sim)
        assert summary.exit_code == 0, summary.stop_reason
        assert summary.counts == {"succeeded": 3}
        _assert_downloaded(workdir, _rows(workdir, "quickstart-kling"))
        assert _assert_paid_once(sim)["creates"] == 3
        # Kling reports resource-pack units, not dollars: they are recorded as such.
        units = _db(workdir, "SELECT cost_units, cost_usd FROM jobs")
        assert all(u is not None and u > 0 and usd is None for u, usd in units)
        # …and the summary says so instead of "$0.00".
        assert summary.cost_units == sum(u for u, _usd in units)
        assert summary.cost_text().startswith(f"{summary.cost_units:g} units (")
        assert f"about ${summary.committed_usd:.2f}" in summary.cost_text()
        assert summary.committed_usd > 0

    async def test_quickstart_with_only_the_provider_block_changed(
            self, tmp_path: Path, workdir: Path, simulator: Any) -> None:
        """The quickstart runs on Kling native with nothing but `provider: {name: kling}`."""
        text = (SAMPLES / "quickstart.yaml").read_text()
        swapped, count = re.subn(r"(?ms)^provider:\n.*?\n\n", "provider:\n  name: kling\n\n",
                                 text)
        assert count == 1
        (tmp_path / "quickstart.yaml").write_text(swapped)
        shutil.copytree(SAMPLES / "assets", tmp_path / "assets")
        sim = simulator()
        summary = await _run(tmp_path / "quickstart.yaml", workdir, sim)
        assert summary.exit_code == 0, summary.stop_reason
        _assert_downloaded(workdir, _rows(workdir, "quickstart"))
        assert _assert_paid_once(sim)["creates"] == 3
        tasks = {t["task_id"]: t for t in sim.tasks()}
        assert {t["shape"] for t in tasks.values()} == {"kling"}
        by_job = dict(_db(workdir, "SELECT job_id, task_id FROM jobs"))
        assert {job: tasks[task]["kind"] for job, task in by_job.items()} == {
            "neon-alley": "text2video", "lantern-glow": "image2video",
            "handbag-first-last": "image2video"}


class TestAccount:
    async def test_out_of_credit_stops_creates_then_resume_finishes(
            self, tmp_path: Path, workdir: Path, simulator: Any) -> None:
        """1102 after four creates: no further create, in-flight tasks finish, exit 4; once the
        account is topped up a resume completes the rest, each key paid once."""
        sim = simulator(credits_after_creates=4)
        path = _manifest(tmp_path, sim, _jobs(10), max_in_flight=3)
        summary = await _run(path, workdir, sim)
        assert summary.exit_code == 4
        assert summary.stop_reason and "1102" in summary.stop_reason
        assert summary.counts == {"succeeded": 4, "pending": 6}
        stats = _assert_paid_once(sim)
        assert stats["creates"] == 4
        # Creates stopped at once: only those already under way when 1102 came were refused.
        assert stats["rejected"]["credits"] <= 3
        sim.update_config(credits_after_creates=None)
        summary = await _resume("test-run", workdir)
        assert summary.exit_code == 0, summary.stop_reason
        _assert_downloaded(workdir, _rows(workdir))
        assert _assert_paid_once(sim)["creates"] == 10

    async def test_slot_rejections_requeue(self, tmp_path: Path, workdir: Path,
                                           simulator: Any) -> None:
        """1303 (account slots full) requeues jobs: none fails, the account limit holds."""
        sim = simulator(slot_limit=2)
        path = _manifest(tmp_path, sim, _jobs(6), max_in_flight=5)
        summary = await _run(path, workdir, sim)
        assert summary.exit_code == 0, summary.stop_reason
        _assert_downloaded(workdir, _rows(workdir))
        stats = _assert_paid_once(sim)
        assert stats["rejected"].get("slots", 0) > 0
        assert stats["peak_slots"] <= 2 and stats["creates"] == 6

    async def test_wrong_secret_stops_with_exit_4(self, tmp_path: Path, workdir: Path,
                                                  simulator: Any) -> None:
        """A JWT the account refuses (1002) stops creates with exit 4; the secret is not shown."""
        sim = simulator(secret_key="the-real-secret-key-0042")
        path = _manifest(tmp_path, sim, _jobs(3))
        summary = await _run(path, workdir, sim)
        assert summary.exit_code == 4
        assert summary.stop_reason and "1002" in summary.stop_reason
        assert DEFAULT_SECRET_KEY not in summary.stop_reason
        assert sim.stats()["creates"] == 0


class TestFailures:
    async def test_content_policy_is_final_and_internal_is_retried(
            self, tmp_path: Path, workdir: Path, simulator: Any) -> None:
        """A content-policy failure ends the job at once; an internal one gets a new attempt."""
        sim = simulator()
        jobs = [{"id": "fine", "prompt": "a calm lake"},
                {"id": "policy", "prompt": "a scene [sim:fail=content_policy]"},
                {"id": "internal", "prompt": "a scene [sim:fail=internal]"}]
        summary = await _run(_manifest(tmp_path, sim, jobs, max_attempts=2), workdir, sim)
        assert summary.exit_code == 1
        rows = {r["job_id"]: r for r in _rows(workdir)}
        assert rows["fine"]["status"] == "succeeded"
        assert rows["policy"]["status"] == rows["internal"]["status"] == "failed"
        assert rows["policy"]["attempts"] == "1" and rows["internal"]["attempts"] == "2"
        assert rows["policy"]["error_code"] == "content_policy"
        assert "risk control" in rows["policy"]["error_message"]
        assert rows["internal"]["error_code"] == "task_failed"
        assert _assert_paid_once(sim)["creates"] == 4
        retryable = dict(_db(workdir, "SELECT job_id, retryable FROM jobs"))
        assert retryable["policy"] == 0 and retryable["internal"] == 1

    async def test_lost_create_answers_are_adopted_by_lookup(
            self, tmp_path: Path, workdir: Path, simulator: Any, store_url: str) -> None:
        """Creates whose answer is a 5xx after the task was made are found by external_task_id
        and adopted: no job ends `unknown`, none is paid twice (on each store backend)."""
        sim = simulator(create_5xx_after_create_rate=0.5)
        summary = await _run(_manifest(tmp_path, sim, _jobs(10)), workdir, sim, store_url)
        assert summary.exit_code == 0, summary.stop_reason
        _assert_downloaded(workdir, _rows(workdir))
        stats = _assert_paid_once(sim)
        assert stats["creates"] == 10
        assert stats["rejected"]["server_error_after_create"] > 0
        found = _found(store_url)
        assert len(found) == stats["rejected"]["server_error_after_create"]
        assert all(found)


class TestPlan:
    def test_plan_rejects_kling_native_rule_breaks(self, tmp_path: Path) -> None:
        """plan refuses cfg_scale on kling-v2*, camera_control with image_tail, and sound on a
        model without audio, each at its line, exit 2."""
        shutil.copytree(SAMPLES / "assets", tmp_path / "assets")
        path = tmp_path / "m.yaml"
        path.write_text(textwrap.dedent("""\
            version: 1
            name: rules
            provider: {name: kling}
            jobs:
              - id: cfg
                model: kling-v2-6
                prompt: p
                cfg_scale: 0.5
              - id: camera
                prompt: p
                image: assets/handbag_first.jpg
                image_tail: assets/handbag_last.jpg
                camera_control: {type: simple, config: {zoom: 5}}
              - id: sound
                model: kling-v1-6
                prompt: p
                sound: "on"
            """))
        env = {k: None for k in os.environ if k.startswith("KLING_")}
        result = CliRunner(env=env).invoke(cli, ["plan", str(path)])
        assert result.exit_code == 2, result.output
        errors = result.stderr
        assert "cfg_scale" in errors and "camera_control" in errors and "sound" in errors
        assert "m.yaml:8" in errors and "Traceback" not in errors


# ---- the kill test, on Kling -------------------------------------------------------------


def _cli(*args: str, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    return cli_process(*args, speed=CLI_SPEED, env=KLING_ENV, crash_at=crash_at)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 90) -> tuple[int, str]:
    code, _out, err = finish_process(proc, timeout)
    return code, err


def _check_exact(workdir: Path, sim: SimulatorServer, n: int, store: Path | str) -> None:
    """Every job downloaded from exactly one task, each key paid once, nothing `unknown`."""
    stats = _assert_paid_once(sim)
    assert store_problems(store) == []
    rows = read_results(workdir / "killme" / "results.csv")
    assert len(rows) == n
    _assert_downloaded(workdir, rows)
    tasks = dict(_db(store, "SELECT job_id, COUNT(DISTINCT task_id) FROM attempts "
                            "WHERE task_id IS NOT NULL GROUP BY job_id"))
    assert tasks == {r["job_id"]: 1 for r in rows}
    assert stats["creates"] == n  # one paid task per job, not one more


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("point", "creates_before"), [("after_intent", 2),
                                                       ("after_create", 3)])
def test_crash_at_the_worst_moment(tmp_path: Path, workdir: Path, simulator: Any,
                                   point: str, creates_before: int, store_url: str) -> None:
    """Killed between intent and create, or between create and the task-id commit: the resume
    looks the key up and creates the task (none existed) or adopts it (it did) — no `unknown`
    (on each store backend)."""
    sim = simulator(speed=CLI_SPEED, honor_idempotency_key=False)
    manifest = _manifest(tmp_path, sim, _jobs(6), name="killme", max_in_flight=6,
                         submit_rate=40)
    where = ("--workdir", str(workdir), "--store", store_url)
    code, _err = _finish(_cli("run", str(manifest), *where, crash_at=f"{point}:3"))
    assert code == -9  # SIGKILL
    assert sim.stats()["creates"] >= creates_before
    code, err = _finish(_cli("resume", "killme", *where))
    assert code == 0, err
    _check_exact(workdir, sim, 6, store_url)
    found = _found(store_url)
    # The crashed job's lookup says what happened to it; creates of other jobs still in the
    # air at the kill are reconciled too (found, when their request had arrived).
    assert (point == "after_create") in found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_then_resume(tmp_path: Path, workdir: Path,
                                               simulator: Any) -> None:
    """SIGKILLed a dozen times mid-run and resumed: every job ends downloaded from one task,
    none `unknown`, no key paid twice — with a simulator that ignores idempotency keys."""
    # Slow answers widen the window in which a kill leaves a create unanswered (`submitting`).
    sim = simulator(speed=CLI_SPEED, honor_idempotency_key=False, slow_response_s=0.1)
    n = 40
    manifest = _manifest(tmp_path, sim, _jobs(n), name="killme", max_in_flight=6,
                         submit_rate=40)
    rng = random.Random(20261125)
    kills = 0
    for _ in range(12):
        proc = _cli("run", str(manifest), "--workdir", str(workdir))
        wait_until_running(proc, workdir / "batchkling.db", "killme")
        time.sleep(rng.uniform(0.05, 0.9))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(timeout=30)
    code, err = _finish(_cli("resume", "killme", "--workdir", str(workdir)))
    assert code == 0, err
    assert kills >= 6
    _check_exact(workdir, sim, n, workdir)
    assert not _db(workdir, "SELECT job_id FROM events WHERE event = 'job.unknown'")
