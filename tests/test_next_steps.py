"""Every "what next" hint is a command that helps: each test ends a run one way, takes the hint
the command line printed, runs it as printed (after the fix a person must make), and checks it
made progress. Also the hints themselves, as ``status`` and the CSV give them."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from batchkling.cli import cli
from batchkling.outputs.nextstep import Outcome, next_steps, outcome_of
from batchkling.outputs.results import read_results
from batchkling.testing import write_manifest

SPEED = "400"


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _hints(output: str) -> list[str]:
    """The commands of the ``batchkling: next:`` lines, in order, as argument lists."""
    found = []
    for line in output.splitlines():
        if line.startswith("batchkling: next:"):
            found += [shlex.split(cmd) for cmd in re.findall(r"`batchkling ([^`]+)`", line)]
    return found


def _states(workdir: Path, run_id: str = "test-run") -> dict[str, int]:
    data = json.loads(_invoke("status", run_id, "--json", "--workdir", str(workdir)).output)
    return dict(data["counts"])


def _manifest(tmp_path: Path, sim: Any, n: int = 3, **sections: Any) -> Path:
    jobs = [{"id": f"j{i}", "prompt": f"shot {i}"} for i in range(n)]
    return write_manifest(tmp_path, jobs, base_url=sim.base_url, **sections)


class TestHintsMakeProgress:
    def test_unknown_jobs_are_retried_not_resumed(self, tmp_path: Path, workdir: Path,
                                                  simulator: Any, api_key: str) -> None:
        """Creates with no clear answer stop the run (exit 3) with `retry ID --unknown` as the
        step; it resubmits with the same key, so nothing is billed twice."""
        sim = simulator(create_5xx_after_create_rate=1.0)
        path = _manifest(tmp_path, sim)
        first = _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
        assert first.exit_code == 3, first.output
        hints = _hints(first.output)
        assert hints[0] == ["retry", "test-run", "--unknown", "--workdir", str(workdir)]
        assert not any(h[0] == "resume" for h in hints)  # resume leaves unknown jobs alone
        sim.update_config(create_5xx_after_create_rate=0.0)
        again = _invoke(*hints[0], "--speed", SPEED)
        assert again.exit_code == 0, again.output
        assert _states(workdir) == {"downloaded": 3}
        assert sim.stats()["creates"] == 3  # the same three tasks, adopted by their keys

    def test_budget_stop_names_the_budget_and_run(self, tmp_path: Path, workdir: Path,
                                                  simulator: Any, api_key: str) -> None:
        """A budget stop (exit 3) says to raise budget.max_usd and run the manifest again — not
        `resume`, which would stop at once — and that command creates the rest."""
        sim = simulator()
        path = _manifest(tmp_path, sim, budget={"max_usd": 0.5})
        first = _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
        assert first.exit_code == 3, first.output
        stopped = _states(workdir)
        assert stopped.get("pending", 0) >= 1 and stopped.get("downloaded", 0) >= 1, stopped
        results = next(line for line in first.output.splitlines()
                       if line.startswith("batchkling: results:"))
        assert results.endswith(str(workdir / "test-run" / "report.html"))  # the page is named
        hint_line = next(line for line in first.output.splitlines() if "budget.max_usd" in line
                         and line.startswith("batchkling: next:"))
        assert str(path) in hint_line
        hints = _hints(first.output)
        assert hints[0] == ["run", str(path), "--run-id", "test-run", "--workdir", str(workdir)]
        resume = _invoke("resume", "test-run", "--workdir", str(workdir), "--speed", SPEED)
        assert resume.exit_code == 3 and _states(workdir) == stopped  # the dead end
        data = yaml.safe_load(path.read_text())
        data["budget"]["max_usd"] = 5
        path.write_text(yaml.safe_dump(data))
        again = _invoke(*hints[0], "--speed", SPEED)
        assert again.exit_code == 0, again.output
        assert _states(workdir) == {"downloaded": 3}

    def test_account_stop_is_fixed_then_resumed(self, tmp_path: Path, workdir: Path,
                                                simulator: Any, api_key: str) -> None:
        """Out of credit (exit 4): fix the account, then the hinted `resume` finishes."""
        sim = simulator(credits_after_creates=1)
        path = _manifest(tmp_path, sim, limits={"max_in_flight": 1})
        first = _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
        assert first.exit_code == 4, first.output
        assert "fix its key or credits" in first.output
        hints = _hints(first.output)
        assert hints[0] == ["resume", "test-run", "--workdir", str(workdir)]
        sim.update_config(credits_after_creates=None)
        again = _invoke(*hints[0], "--speed", SPEED)
        assert again.exit_code == 0, again.output
        assert _states(workdir) == {"downloaded": 3}

    def test_failed_jobs_get_a_new_task(self, tmp_path: Path, workdir: Path, simulator: Any,
                                        api_key: str) -> None:
        """Failed jobs (exit 1) are hinted `retry ID`, which gives them new tasks."""
        sim = simulator(fail_rate=1.0, fail_reasons=["internal"])
        path = _manifest(tmp_path, sim, n=2, limits={"max_attempts": 1})
        first = _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
        assert first.exit_code == 1, first.output
        hints = _hints(first.output)
        assert hints[0] == ["retry", "test-run", "--workdir", str(workdir)]
        sim.update_config(fail_rate=0.0)
        again = _invoke(*hints[0], "--speed", SPEED)
        assert again.exit_code == 0, again.output
        assert _states(workdir) == {"downloaded": 2}

    def test_timed_out_jobs_are_polled_again(self, tmp_path: Path, workdir: Path,
                                             simulator: Any, api_key: str) -> None:
        """Timed-out tasks (exit 3) are hinted `resume`, which polls and downloads them."""
        sim = simulator()
        # 10 s is 25 ms at --speed 400 (the renders take ~225 ms), and room for a poll at 1x.
        path = _manifest(tmp_path, sim, n=2, limits={"task_timeout": "10s"})
        first = _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
        assert first.exit_code == 3, first.output
        assert _states(workdir) == {"timed_out": 2}
        hints = _hints(first.output)
        assert hints[0] == ["resume", "test-run", "--workdir", str(workdir)]
        again = _invoke(*hints[0])
        assert again.exit_code == 0, again.output
        assert _states(workdir) == {"downloaded": 2}
        assert sim.stats()["creates"] == 2

    def test_interrupted_run_is_resumed(self, tmp_path: Path, workdir: Path, simulator: Any,
                                        api_key: str) -> None:
        """An interrupted run (exit 130) is hinted `resume`, which adopts the rendering tasks
        and creates the rest."""
        import anyio

        from batchkling.manifest.document import load_manifest
        from batchkling.outputs.nextstep import outcome_of
        from batchkling.run.orchestrator import Orchestrator

        sim = simulator(speed=40.0)
        path = _manifest(tmp_path, sim, n=4, limits={"max_in_flight": 2})

        async def interrupted() -> Any:
            async with Orchestrator(load_manifest(path), workdir=workdir,
                                    time_scale=40) as orch, anyio.create_task_group() as tg:
                async def stop_soon() -> None:
                    while sim.stats()["creates"] < 2:
                        await anyio.sleep(0.01)
                    orch.interrupt()

                tg.start_soon(stop_soon)
                return await orch.run()

        summary = anyio.run(interrupted, backend="asyncio")
        assert summary.exit_code == 130
        steps = next_steps(outcome_of("test-run", exit_code=130, stop_kind=summary.stop_kind,
                                      states=summary.states, manifest=str(path),
                                      simulated=False, live=False, workdir=workdir))
        hint = re.findall(r"`batchkling ([^`]+)`", steps[0])[0]
        assert hint == f"resume test-run --workdir {workdir}"
        assert "picks up the 2 jobs whose task is under way" in steps[0]
        again = _invoke(*shlex.split(hint), "--speed", "40")
        assert again.exit_code == 0, again.output
        assert sim.stats()["creates"] == 4


class TestHintsElsewhere:
    def test_status_gives_the_same_next_step(self, tmp_path: Path, workdir: Path,
                                             simulator: Any, api_key: str) -> None:
        """`status` names the step the run's end printed, keyed by the recorded end."""
        sim = simulator()
        path = _manifest(tmp_path, sim, budget={"max_usd": 0.5})
        first = _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
        status = json.loads(_invoke("status", "test-run", "--json", "--workdir",
                                    str(workdir)).output)
        assert status["state"] == "incomplete" and status["exit_code"] == 3
        page = (workdir / "test-run" / "report.html").read_text()
        assert 'data-state="incomplete"' in page  # the report's badge says what status says
        printed = [line.removeprefix("batchkling: next: ") for line in first.output.splitlines()
                   if line.startswith("batchkling: next:")]
        assert status["next_steps"] == printed

    def test_csv_names_the_real_run_id(self, tmp_path: Path, workdir: Path, simulator: Any,
                                       api_key: str) -> None:
        """An unknown job's row says `retry <its run> --unknown`, never a placeholder."""
        sim = simulator(create_5xx_after_create_rate=1.0)
        path = _manifest(tmp_path, sim, n=1)
        _invoke("run", str(path), "--workdir", str(workdir), "--speed", SPEED)
        row = read_results(workdir / "test-run" / "results.csv")[0]
        assert row["status"] == "unknown"
        assert row["next_step"].startswith(
            f"`batchkling retry test-run --unknown --workdir {workdir}`")
        assert "RUN" not in row["error_message"] + row["next_step"]

    def test_a_dead_run_is_not_running(self, tmp_path: Path, workdir: Path, simulator: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        """A run that stopped on a missing key (exit 2) shows as interrupted, with no ETA."""
        monkeypatch.delenv("BATCHKLING_TEST_KEY", raising=False)
        sim = simulator()
        path = _manifest(tmp_path, sim)
        assert _invoke("run", str(path), "--workdir", str(workdir)).exit_code == 2
        status = json.loads(_invoke("status", "test-run", "--json", "--workdir",
                                    str(workdir)).output)
        assert status["state"] == "interrupted" and status["eta_seconds"] is None


@pytest.mark.parametrize(("outcome", "expected"), [
    (Outcome("r", 0, None, {"downloaded": 3}), []),
    (Outcome("r", 130, "interrupted", {"running": 2, "pending": 1}),
     ["`batchkling resume r` picks up the 2 jobs whose task is under way, creates the 1 job "
      "not started"]),
    (Outcome("r", 3, "budget", {"pending": 4, "downloaded": 1}, manifest="m.yaml",
             simulated=True),
     ["the budget stopped creates: raise budget.max_usd in m.yaml, then `batchkling run m.yaml "
      "--run-id r --simulate` (it creates the 4 jobs not started; finished jobs are never paid "
      "twice)"]),
    (outcome_of("r", exit_code=3, stop_kind="budget", states={"pending": 2},
                manifest="m.yaml", simulated=False, live=False, workdir=None,
                stop_reason="budget reached: 40 units committed, the next job (~10 units) would "
                "pass budget.max_units 45"),
     ["the budget stopped creates: raise budget.max_units in m.yaml, then `batchkling run "
      "m.yaml --run-id r` (it creates the 2 jobs not started; finished jobs are never paid "
      "twice)"]),
])
def test_next_steps_by_ending(outcome: Outcome, expected: list[str]) -> None:
    """The hint follows how the run ended: nothing, resume, or the budget (the cap that
    stopped it) and `run`."""
    assert next_steps(outcome) == expected
