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
                                           simulator: Any, api_key: str,
                                           store_url: str) -> None:
        """`{date}` expands in run ids; status and export read the finished run, from the
        store `--store` names (SQLite or PostgreSQL)."""
        sim = simulator()
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], base_url=sim.base_url)
        where = ("--workdir", str(workdir), "--store", store_url)
        result = _invoke("run", str(path), "--run-id", "nightly-{date}", *where,
                         "--speed", "400")
        assert result.exit_code == 0, result.output
        run_id = f"nightly-{date.today().isoformat()}"
        status = json.loads(_invoke("status", run_id, "--json", *where).output)
        assert status["counts"] == {"downloaded": 1} and status["in_flight"] == 0
        table = json.loads(_invoke("status", "--json", *where).output)
        assert [r["run_id"] for r in table] == [run_id]
        out = tmp_path / "export.csv"
        assert _invoke("export", run_id, "-o", str(out), *where).exit_code == 0
        assert out.read_text().count("\n") == 2
        assert _invoke("report", run_id, *where).exit_code == 0
        assert (workdir / run_id / "report.html").exists()

    def test_status_without_runs(self, workdir: Path, store_url: str) -> None:
        """status on an empty workdir or database says so, exits 0, and creates nothing; a
        run id there is exit 2 naming where it looked."""
        result = _invoke("status", "--workdir", str(workdir), "--store", store_url)
        assert result.exit_code == 0 and "no runs yet" in result.output
        result = _invoke("export", "ghost", "--workdir", str(workdir), "--store", store_url)
        assert result.exit_code == 2 and "no runs" in result.output
        if store_url.startswith("postgresql://"):
            assert "postgresql://postgres@127.0.0.1" in result.output
            assert db_query(store_url, "SELECT to_regclass('meta')") == [(None,)]
        else:
            assert not Path(store_url).exists()


class TestStoreOption:
    def test_the_store_comes_from_the_environment(self, tmp_path: Path, workdir: Path,
                                                  simulator: Any, api_key: str,
                                                  pg_url: str) -> None:
        """BATCHKLING_STORE names the store when --store does not: the run is in the
        database, and no SQLite file appears in the workdir."""
        sim = simulator()
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], base_url=sim.base_url)
        env = {"BATCHKLING_STORE": pg_url}
        result = _invoke("run", str(path), "--workdir", str(workdir), "--speed", "400", env=env)
        assert result.exit_code == 0, result.output
        assert db_query(pg_url, "SELECT state FROM jobs") == [("downloaded",)]
        assert not (workdir / "batchkling.db").exists()
        table = json.loads(_invoke("status", "--json", "--workdir", str(workdir),
                                   env=env).output)
        assert [r["run_id"] for r in table] == ["test-run"]

    @pytest.mark.parametrize("url", ["mysql://db/jobs", "sqlite://relative.db",
                                     "postgresql://bk:pw-4f1e9a@db/jobs?bogus_option=1"])
    def test_a_store_that_names_no_backend_is_bad_input(self, workdir: Path, url: str) -> None:
        """An unsupported scheme or a malformed URL: exit 2, one line, no password."""
        for command in (["status"], ["resume", "r"], ["export", "r"], ["report", "r"]):
            result = _invoke(*command, "--workdir", str(workdir), "--store", url)
            assert result.exit_code == 2, (command, result.output)
            assert "Traceback" not in result.output and "pw-4f1e9a" not in result.output

    def test_an_unreachable_server_is_exit_3(self, tmp_path: Path, workdir: Path,
                                            api_key: str) -> None:
        """Nothing listening at the URL: exit 3 (try again later), naming host and database
        without the password; nothing is submitted."""
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"postgresql://bk:pw-4f1e9a@127.0.0.1:{port}/jobs"
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}])
        for command in (["run", str(path)], ["status"], ["resume", "r"]):
            result = _invoke(*command, "--workdir", str(workdir), "--store", url)
            assert result.exit_code == 3, (command, result.output)
            assert f"cannot reach the PostgreSQL store postgresql://bk@127.0.0.1:{port}/jobs" \
                in result.output
            assert "pw-4f1e9a" not in result.output and "Traceback" not in result.output

    def test_a_database_that_does_not_exist_is_exit_2(self, workdir: Path,
                                                      pg_cluster: Any) -> None:
        """A URL naming a database the server does not have: exit 2, saying so."""
        result = _invoke("status", "--workdir", str(workdir), "--store",
                         pg_cluster.url("no_such_db"))
        assert result.exit_code == 2, result.output
        assert "has no such database" in result.output

    @pytest.mark.timeout(120)
    def test_a_server_that_goes_away_mid_run_is_exit_3(self, tmp_path: Path, workdir: Path,
                                                       pg_cluster: Any) -> None:
        """The database server stops while a run is going: exit 3 with one line naming the
        store (no password, no traceback, no driver chatter), and the run is resumable."""
        from pgcluster import PgCluster

        n = 8
        path = write_manifest(tmp_path, [{"id": f"j{i}", "prompt": f"p{i}"} for i in range(n)],
                              name="pgdie", limits={"max_in_flight": 2})
        with PgCluster(pg_cluster.bindir) as own:
            # connect_timeout=1: the run waits 3 s, not 30, for the server to come back.
            url = own.create_database("gone").replace("postgres@", "postgres:pw-4f1e9a@")
            url += "?connect_timeout=1"
            env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHKLING")}
            proc = subprocess.Popen(
                [sys.executable, "-m", "batchkling", "run", str(path), "--simulate", "--speed",
                 "20", "--workdir", str(workdir), "--store", url],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_until_running(proc, url, "pgdie")
            own.stop()
            _out, err_bytes = proc.communicate(timeout=90)
        err = err_bytes.decode()
        assert proc.returncode == 3, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("batchkling: error: PostgreSQL store postgresql://postgres@"), err
        assert "pw-4f1e9a" not in err and "Traceback" not in err
        assert "discarding closed connection" not in err and "error connecting" not in err

    def test_a_store_from_a_newer_batchkling_is_exit_2(self, workdir: Path,
                                                       store_url: str) -> None:
        """A store whose schema is newer than this batchkling: exit 2 and "upgrade", on
        either backend, for reading and running commands alike."""
        from batchkling.store import store_from
        from batchkling.testing import write_manifest as manifest_at

        async def create() -> None:
            async with store_from(store_url):
                pass

        import anyio

        anyio.run(create)
        db_query(store_url, "UPDATE meta SET value = '999' WHERE key = 'schema_version'")
        path = manifest_at(workdir, [{"id": "a", "prompt": "x"}])
        for command in (["status"], ["run", str(path)]):
            result = _invoke(*command, "--workdir", str(workdir), "--store", store_url,
                             env={"BATCHKLING_TEST_KEY": TEST_KEY})
            assert result.exit_code == 2, (command, result.output)
            assert "newer batchkling" in result.output and "upgrade" in result.output


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
    # No warning a first-time user cannot act on: a simulated provider takes data URIs fine.
    assert "images_as_data_uri" not in proc.stderr + (
        tmp_path / "jobs" / "quickstart" / "run.log").read_text()


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
