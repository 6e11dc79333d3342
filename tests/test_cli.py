"""The command line: exit codes, one-line errors, and the README quickstart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import TEST_KEY, wait_until_running
from invariants import db_query

from batchkling.cli import cli
from batchkling.logs import REDACTED, Redactor
from batchkling.testing import write_manifest

ROOT = Path(__file__).resolve().parent.parent


def _invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


class TestBadInput:
    def test_missing_key_variable(self, tmp_path: Path, workdir: Path, simulator: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """No API key in the environment: exit 2 naming the variable; nothing submitted."""
        monkeypatch.delenv("BATCHKLING_TEST_KEY", raising=False)
        sim = simulator()
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], base_url=sim.base_url)
        result = _invoke("run", str(path), "--workdir", str(workdir))
        assert result.exit_code == 2
        assert "BATCHKLING_TEST_KEY is not set" in result.output
        assert "Traceback" not in result.output
        assert sim.stats()["create_requests"] == 0

    def test_missing_manifest(self, workdir: Path) -> None:
        """A manifest that does not exist: exit 2, one clear line."""
        result = _invoke("run", "nope.yaml", "--workdir", str(workdir))
        assert result.exit_code == 2
        assert "nope.yaml" in result.output and "Traceback" not in result.output

    def test_unknown_run(self, workdir: Path) -> None:
        """resume of a run that does not exist: exit 2."""
        assert _invoke("resume", "ghost", "--workdir", str(workdir)).exit_code == 2

    def test_unsafe_run_id(self, tmp_path: Path, workdir: Path, api_key: str) -> None:
        """A run id that is not a safe folder name is refused before anything happens."""
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}])
        result = _invoke("run", str(path), "--run-id", "../escape", "--workdir", str(workdir))
        assert result.exit_code == 2 and "not a safe folder name" in result.output
        assert not (workdir / "batchkling.db").exists()

    def test_retry_of_a_job_that_does_not_exist(self, tmp_path: Path, workdir: Path,
                                                simulator: Any, api_key: str) -> None:
        """`retry --job` with a mistyped id: exit 2 naming it, and nothing is submitted."""
        sim = simulator()
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], base_url=sim.base_url)
        assert _invoke("run", str(path), "--workdir", str(workdir), "--speed",
                       "400").exit_code == 0
        result = _invoke("retry", "test-run", "--job", "aa", "--workdir", str(workdir))
        assert result.exit_code == 2
        assert "has no job 'aa'" in result.output and "Traceback" not in result.output
        assert sim.stats()["create_requests"] == 1

    def test_bad_option(self, workdir: Path) -> None:
        """A bad flag value is a usage error: exit 2."""
        assert _invoke("run", "x.yaml", "--max-in-flight", "0").exit_code == 2


class TestViews:
    def test_status_export_and_date_run_id(self, tmp_path: Path, workdir: Path,
                                           simulator: Any, api_key: str) -> None:
        """`{date}` expands in run ids; status and export read the finished run."""
        sim = simulator()
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], base_url=sim.base_url)
        result = _invoke("run", str(path), "--run-id", "nightly-{date}", "--workdir",
                         str(workdir), "--speed", "400")
        assert result.exit_code == 0, result.output
        run_id = f"nightly-{date.today().isoformat()}"
        status = json.loads(_invoke("status", run_id, "--json", "--workdir",
                                    str(workdir)).output)
        assert status["counts"] == {"downloaded": 1} and status["in_flight"] == 0
        table = json.loads(_invoke("status", "--json", "--workdir", str(workdir)).output)
        assert [r["run_id"] for r in table] == [run_id]
        out = tmp_path / "export.csv"
        assert _invoke("export", run_id, "-o", str(out), "--workdir",
                       str(workdir)).exit_code == 0
        assert out.read_text().count("\n") == 2

    def test_status_without_runs(self, workdir: Path) -> None:
        """status on an empty workdir says so and exits 0."""
        result = _invoke("status", "--workdir", str(workdir))
        assert result.exit_code == 0 and "no runs yet" in result.output


@pytest.mark.timeout(120)
def test_readme_quickstart(tmp_path: Path) -> None:
    """The README's first command (minus the install) renders three playable videos."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHKLING")}
    proc = subprocess.run(
        [sys.executable, "-m", "batchkling", "run",
         str(ROOT / "sample_manifests" / "quickstart.yaml"), "--simulate"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    videos = sorted((tmp_path / "jobs" / "quickstart" / "videos").glob("*.mp4"))
    assert len(videos) == 3
    assert all(v.read_bytes()[4:8] == b"ftyp" for v in videos)
    csv_text = (tmp_path / "jobs" / "quickstart" / "results.csv").read_text()
    assert csv_text.count(",succeeded,") == 3


@pytest.mark.timeout(120)
def test_simulated_run_resumes_its_tasks(tmp_path: Path) -> None:
    """Ctrl-C in `run --simulate`, then `resume`: the simulated account kept the tasks that were
    rendering (workdir/simulator-tasks.jsonl), so they finish with no new create and no failed
    poll, and no two jobs share a task (a restarted simulator used to reuse task ids)."""
    n = 6
    path = write_manifest(tmp_path, [{"id": f"job-{i}", "prompt": f"scene {i}"} for i in range(n)],
                          name="simres", limits={"max_in_flight": 3})
    workdir, db = tmp_path / "jobs", tmp_path / "jobs" / "batchkling.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHKLING")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchkling", "run", str(path), "--simulate", "--speed", "60",
         "--workdir", str(workdir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until_running(proc, db, "simres")
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if db_query(workdir, "SELECT job_id FROM jobs WHERE state = 'running'"):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    in_flight = {j for (j,) in db_query(workdir, "SELECT job_id FROM jobs WHERE state IN "
                                            "('submitted', 'running')")}
    assert in_flight
    resumed = subprocess.run(
        [sys.executable, "-m", "batchkling", "resume", "simres", "--speed", "60",
         "--workdir", str(workdir)],
        env=env, capture_output=True, text=True, timeout=100)
    assert resumed.returncode == 0, resumed.stderr
    attempts = db_query(workdir, "SELECT job_id, task_id FROM attempts")
    assert sorted(j for j, _t in attempts) == [f"job-{i}" for i in range(n)]  # one each
    assert len({t for _j, t in attempts}) == n
    assert "job.poll_failed" not in (workdir / "simres" / "run.log").read_text()
    assert {s for (s,) in db_query(workdir, "SELECT state FROM jobs")} == {"downloaded"}


class TestRedaction:
    def test_secret_values_and_secret_keys(self) -> None:
        """Registered secrets vanish from any string; secret-named fields are masked."""
        redactor = Redactor()
        redactor.register(TEST_KEY)
        event = {"event": "x", "error": f"401 for Bearer {TEST_KEY}",
                 "headers": {"Authorization": "Bearer abc"}, "nested": [TEST_KEY]}
        out = redactor(None, "info", event)
        assert TEST_KEY not in json.dumps(out)
        assert out["headers"]["Authorization"] == REDACTED
        assert out["error"] == f"401 for Bearer {REDACTED}"

    def test_short_values_are_not_registered(self) -> None:
        """A tiny 'secret' would mangle ordinary text, so it is ignored."""
        redactor = Redactor()
        redactor.register("ab")
        assert redactor.scrub("abc") == "abc"
