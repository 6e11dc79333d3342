"""Screens around a run: `show`, `forget`, reusing a rehearsal's id, help texts, `status` from
elsewhere, did-you-mean for run and job ids, and a quiet library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from invariants import db_query

from batchkling.cli import cli
from batchkling.testing import write_manifest

SPEED = "400"


def _invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def _finished_run(tmp_path: Path, workdir: Path, sim: Any, n: int = 2) -> Path:
    jobs = [{"id": f"shot-{i}", "prompt": f"scene {i}"} for i in range(n)]
    path = write_manifest(tmp_path, jobs, base_url=sim.base_url)
    result = _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
    assert result.exit_code == 0, result.output
    return path


class TestShow:
    def test_show_gives_request_attempts_events_and_file(self, tmp_path: Path, workdir: Path,
                                                         simulator: Any, api_key: str) -> None:
        """`show RUN JOB --json`: the expanded request, every attempt with its task id and
        cost, the job's events in order, and the downloaded file; the text form says the same."""
        sim = simulator()
        _finished_run(tmp_path, workdir, sim)
        data = json.loads(_invoke("show", "test-run", "shot-1", "--json", "--workdir",
                                  str(workdir)).output)
        assert data["request"]["prompt"] == "scene 1" and data["state"] == "downloaded"
        (attempt,) = data["attempts"]
        assert attempt["task_id"] and attempt["cost_usd"] > 0
        assert attempt["render_seconds"] is not None
        events = [e["event"] for e in data["events"]]
        assert events[0] == "job.submitting" and events[-1] == "job.downloaded"
        assert data["video"]["exists"] and data["video"]["bytes"] > 0
        text = _invoke("show", "test-run", "shot-1", "--workdir", str(workdir)).output
        assert attempt["task_id"] in text and "job.downloaded" in text and "scene 1" in text

    def test_show_suggests_a_close_job_id(self, tmp_path: Path, workdir: Path,
                                          simulator: Any, api_key: str) -> None:
        """A mistyped job id: exit 2 with the closest id."""
        sim = simulator()
        _finished_run(tmp_path, workdir, sim)
        result = _invoke("show", "test-run", "shot1", "--workdir", str(workdir))
        assert result.exit_code == 2 and "did you mean 'shot-1'?" in result.output


class TestForget:
    def test_forget_removes_records_and_folder(self, tmp_path: Path, workdir: Path,
                                               simulator: Any, api_key: str) -> None:
        """`forget RUN --files` deletes its jobs, attempts, events and folder; a later run of
        the id starts afresh."""
        sim = simulator()
        path = _finished_run(tmp_path, workdir, sim)
        result = _invoke("forget", "test-run", "--files", "--workdir", str(workdir))
        assert result.exit_code == 0, result.output
        for table in ("runs", "jobs", "attempts", "events"):
            assert db_query(workdir, f"SELECT COUNT(*) FROM {table}") == [(0,)], table
        assert not (workdir / "test-run").exists()
        again = _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
        assert again.exit_code == 0 and sim.stats()["creates"] == 4

    def test_forget_is_refused_while_the_run_is_alive(self, tmp_path: Path, workdir: Path,
                                                      simulator: Any, api_key: str) -> None:
        """A run whose lease a live process holds is not forgotten (exit 3), records intact."""
        import time

        import anyio

        from batchkling.store.sqlite import SqliteStore

        sim = simulator()
        _finished_run(tmp_path, workdir, sim)

        async def hold() -> None:  # this process, a live worker, holds the run
            async with SqliteStore(workdir / "batchkling.db") as store:
                await store.register_worker("w-live", runs=["test-run"], now=time.time())
                await store.acquire_lease("test-run", "w-live", stale_after=30,
                                          now=time.time())

        anyio.run(hold, backend="asyncio")
        result = _invoke("forget", "test-run", "--workdir", str(workdir))
        assert result.exit_code == 3 and "is being run" in result.output
        assert db_query(workdir, "SELECT COUNT(*) FROM jobs") == [(2,)]


def test_a_rehearsal_id_can_be_run_for_real(tmp_path: Path, workdir: Path, simulator: Any,
                                            api_key: str) -> None:
    """`run --simulate` then `run` of the same manifest: the real run replaces the rehearsal
    and submits every job (its simulated "successes" are not taken for real ones)."""
    jobs = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}]
    path = write_manifest(tmp_path, jobs, name="spring")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHKLING_HOME")}
    rehearsal = _invoke("run", str(path), "--simulate", "--workdir", str(workdir), "--speed",
                        SPEED, env=env)
    assert rehearsal.exit_code == 0, rehearsal.output
    sim = simulator()
    data = path.read_text().replace("provider:\n", f"provider:\n  base_url: {sim.base_url}\n")
    path.write_text(data)
    real = _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
    assert real.exit_code == 0, real.output
    assert sim.stats()["creates"] == 2
    assert db_query(workdir, "SELECT simulated FROM runs") == [(0,)]
    simulated_again = _invoke("run", str(path), "--simulate", "--workdir", str(workdir))
    assert simulated_again.exit_code == 2 and "real provider" in simulated_again.output


class TestHelpAndErrors:
    def test_simulate_help_lists_the_fault_profiles(self) -> None:
        """Every named profile is described in `simulate --help`."""
        from batchkling.simulator.config import PROFILES

        text = " ".join(_invoke("simulate", "--help").output.split())
        for name in PROFILES:
            assert f"{name}: " in text, name

    def test_resume_help_does_not_offer_simulate(self) -> None:
        """`resume` takes no --simulate, and its help does not mention it."""
        for command in ("resume", "retry"):
            assert "--simulate" not in _invoke(command, "--help").output

    def test_status_elsewhere_names_the_store(self, tmp_path: Path) -> None:
        """From a folder with no runs, `status` says where it looked and how to point it."""
        workdir = tmp_path / "nothing-here"
        text = _invoke("status", "--workdir", str(workdir)).output
        assert str(workdir.absolute()) in text and "--workdir" in text
        missing = _invoke("status", "spring", "--workdir", str(workdir))
        assert missing.exit_code == 2 and str(workdir.absolute()) in missing.output

    def test_a_mistyped_run_id_gets_a_suggestion(self, tmp_path: Path, workdir: Path,
                                                 simulator: Any, api_key: str) -> None:
        """`status`, `resume` and `show` with a near-miss run id suggest the real one."""
        sim = simulator()
        _finished_run(tmp_path, workdir, sim)
        for args in (("status", "test-rn"), ("resume", "test-rn"),
                     ("show", "test-rn", "shot-0")):
            result = _invoke(*args, "--workdir", str(workdir))
            assert result.exit_code == 2 and "did you mean 'test-run'?" in result.output, args


def test_library_prints_nothing_by_default(tmp_path: Path, simulator: Any, api_key: str) -> None:
    """A program using the library, with no logging set up, prints nothing on stdout or
    stderr; the run's events still reach run.log."""
    sim = simulator()
    path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], base_url=sim.base_url)
    program = textwrap.dedent(f"""
        import anyio
        from batchkling import Orchestrator, load_manifest

        async def main():
            async with Orchestrator(load_manifest({str(path)!r}), workdir={str(tmp_path / "w")!r},
                                    time_scale=400) as orch:
                summary = await orch.run()
            assert summary.exit_code == 0, summary

        anyio.run(main, backend="asyncio")
    """)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert "job.downloaded" in (tmp_path / "w" / "test-run" / "run.log").read_text()


def test_readme_documents_the_screens() -> None:
    """README: the next step of every exit code, the fault profiles, shell completion (which
    works as written), `show` and `forget`."""
    import re

    from batchkling.simulator.config import PROFILES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("### Exit codes"):readme.index("A first Ctrl-C")]
    rows = dict(re.findall(r"^\| (\d+) \|[^|]*\| (.+) \|$", table, re.M))
    assert sorted(rows, key=int) == ["0", "1", "2", "3", "4", "5", "130"]
    for code in ("1", "3", "4", "130"):
        assert "`batchkling " in rows[code], code
    assert "retry RUN_ID --unknown" in rows["3"] and "budget.max_usd" in rows["3"]
    profiles = readme[readme.index("**Fault profiles**"):readme.index("**Shell completion**")]
    for name in PROFILES:
        assert f"`{name}`" in profiles, name
    assert "`batchkling show RUN_ID JOB_ID" in readme and "`batchkling forget RUN_ID" in readme
    assert 'eval "$(_BATCHKLING_COMPLETE=bash_source batchkling)"' in readme
    script = subprocess.run([sys.executable, "-m", "batchkling"], capture_output=True, text=True,
                            env={**os.environ, "_BATCHKLING_COMPLETE": "bash_source"},
                            timeout=60)
    assert "_batchkling_completion" in script.stdout
