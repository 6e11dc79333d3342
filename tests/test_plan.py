"""``batchkling plan`` and the price/time estimates behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchkling.cli import cli
from batchkling.models import JobSpec
from batchkling.pricing import (
    PRICE_TABLE_DATE,
    estimate_render_seconds,
    estimate_usd,
    estimate_wall_seconds,
)

ROOT = Path(__file__).parent.parent
SAMPLES = ROOT / "sample_manifests"
EXPECTED_JOBS = {"quickstart.yaml": 3, "kling_native.yaml": 3, "nightly_campaign.yaml": 14,
                 "ad_matrix.yaml": 26}


def plan(*args: str) -> tuple[int, str, str]:
    """Run ``batchkling plan`` in-process with no API key in the environment."""
    env = {k: None for k in os.environ if k.endswith(("_API_KEY", "_ACCESS_KEY", "_SECRET_KEY"))}
    result = CliRunner(env=env).invoke(cli, ["plan", *args])
    return result.exit_code, result.stdout, result.stderr


def write(folder: Path, body: str) -> Path:
    """Write a manifest (dedented) and return its path."""
    path = folder / "m.yaml"
    path.write_text(textwrap.dedent(body))
    return path


class TestSamples:
    def test_every_sample_is_covered(self) -> None:
        """Each shipped sample manifest has an expected job count here."""
        assert {p.name for p in SAMPLES.glob("*.yaml")} == set(EXPECTED_JOBS)

    @pytest.mark.parametrize(("name", "count"), sorted(EXPECTED_JOBS.items()))
    def test_plan_json_counts_jobs(self, name: str, count: int) -> None:
        """plan --json on each sample exits 0 with the right number of jobs, needing no key."""
        code, out, err = plan(str(SAMPLES / name), "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert len(doc["jobs"]) == doc["totals"]["jobs"] == count
        assert doc["estimate_usd"] == pytest.approx(sum(j["estimate_usd"] for j in doc["jobs"]))
        assert {"id", "kind", "model", "duration", "size", "mode", "fingerprint",
                "estimate_usd", "variables"} <= set(doc["jobs"][0])

    @pytest.mark.parametrize("name", sorted(EXPECTED_JOBS))
    def test_plan_table(self, name: str) -> None:
        """The human plan shows the job count, an estimate with its date, and submits nothing."""
        code, out, err = plan(str(SAMPLES / name))
        assert code == 0, err
        assert f"{EXPECTED_JOBS[name]} jobs" in out
        assert "ESTIMATE" in out and PRICE_TABLE_DATE in out
        assert "Nothing was submitted." in out

    def test_quickstart_has_one_job_of_each_kind(self) -> None:
        """The quickstart holds a text, an image and a first-last job."""
        doc = json.loads(plan(str(SAMPLES / "quickstart.yaml"), "--json")[1])
        assert sorted(j["kind"] for j in doc["jobs"]) == ["first-last", "image", "text"]

    def test_real_subprocess(self) -> None:
        """``python -m batchkling plan --json`` works as a real process."""
        proc = subprocess.run(
            [sys.executable, "-m", "batchkling", "plan", str(SAMPLES / "ad_matrix.yaml"), "--json"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)["jobs"]) == 26


class TestPlanOutput:
    def test_large_plans_elide_the_middle(self, tmp_path: Path) -> None:
        """Above 200 jobs the table shows the first and last rows and says how many it hid."""
        path = write(tmp_path, f"""\
            version: 1
            name: big
            matrices:
              - {{id: "job-{{n}}", prompt: x, vars: {{n: {list(range(300))}}}}}
            """)
        code, out, _ = plan(str(path))
        assert code == 0
        assert "job-0 " in out and "job-299 " in out and "job-150 " not in out
        assert "260 more jobs not shown" in out

    def test_budget_exceeded_is_reported(self, tmp_path: Path) -> None:
        """A plan over budget.max_usd says so and how many jobs fit."""
        path = write(tmp_path, """\
            version: 1
            name: b
            budget: {max_usd: 1}
            matrices:
              - {id: "j{n}", prompt: x, vars: {n: [1, 2, 3, 4, 5, 6]}}
            """)
        code, out, _ = plan(str(path))
        assert code == 0 and "exceeds budget.max_usd" in out
        doc = json.loads(plan(str(path), "--json")[1])
        assert doc["budget"] == {"max_usd": 1.0, "exceeded": True, "jobs_within_budget": 4}

    def test_pricing_overrides_and_max_in_flight(self, tmp_path: Path) -> None:
        """Manifest pricing replaces the table; --max-in-flight shortens the time estimate."""
        path = write(tmp_path, """\
            version: 1
            name: p
            pricing: {kling-v2-6: 0.2}
            limits: {max_in_flight: 1, submit_rate: 100}
            matrices:
              - {id: "j{n}", prompt: x, vars: {n: [1, 2, 3, 4]}}
            """)
        slow = json.loads(plan(str(path), "--json")[1])
        fast = json.loads(plan(str(path), "--json", "--max-in-flight", "4")[1])
        assert slow["estimate_usd"] == pytest.approx(4 * 5 * 0.2)
        assert fast["estimate_seconds"] < slow["estimate_seconds"] / 3

    def test_warnings_go_to_stderr_and_json(self, tmp_path: Path) -> None:
        """Warnings print on stderr (one line each) and are listed in the JSON document."""
        path = write(tmp_path, "version: 1\nname: w\njobs:\n"
                               "  - {id: a, prompt: x, model: kling-v2-master, mode: pro}\n")
        code, out, err = plan(str(path), "--json")
        assert code == 0
        assert err.startswith("warning: ") and err.count("\n") == 1
        assert len(json.loads(out)["warnings"]) == 1


def spec(**changes: object) -> JobSpec:
    """A job spec with sensible defaults."""
    fields: dict[str, object] = {"job_id": "j", "model": "kling-v2-6", "prompt": "x",
                                 "duration": 5, "size": "16:9", "mode": "std", **changes}
    return JobSpec(**fields)  # type: ignore[arg-type]  # test helper: fields checked by JobSpec


class TestEstimates:
    def test_price_table_and_overrides(self) -> None:
        """std/pro prices differ, 10 s costs twice 5 s, overrides pick model:mode over model."""
        assert estimate_usd(spec()) < estimate_usd(spec(mode="pro"))
        assert estimate_usd(spec(duration=10)) == pytest.approx(2 * estimate_usd(spec()))
        overrides = {"kling-v2-6": 0.1, "kling-v2-6:pro": 0.3}
        assert estimate_usd(spec(), overrides) == pytest.approx(0.5)
        assert estimate_usd(spec(mode="pro"), overrides) == pytest.approx(1.5)

    def test_sound_and_master(self) -> None:
        """sound on doubles kling-v2-6; master models have one price whatever the mode."""
        assert estimate_usd(spec(sound="on")) == pytest.approx(2 * estimate_usd(spec()))
        assert estimate_usd(spec(model="kling-v2-master", mode=None)) == pytest.approx(
            estimate_usd(spec(model="kling-v2-master", mode="pro")))

    def test_render_time_estimates(self) -> None:
        """A 5 s std render is about 90 s; 10 s and pro take longer."""
        base = estimate_render_seconds(spec())
        assert base == pytest.approx(90)
        assert estimate_render_seconds(spec(duration=10)) > base
        assert estimate_render_seconds(spec(mode="pro")) > base

    def test_wall_time_simulation(self) -> None:
        """10 jobs of 90 s on 5 slots take two waves; a slow submit rate stretches it."""
        waves = estimate_wall_seconds([90.0] * 10, slots=5, submit_rate=1000)
        assert waves.seconds == pytest.approx(180, abs=1) and waves.bound == "slots"
        paced = estimate_wall_seconds([90.0] * 10, slots=100, submit_rate=0.1)
        assert paced.seconds == pytest.approx(9 * 10 + 90)
        assert estimate_wall_seconds([], slots=5, submit_rate=1).seconds == 0


class TestPlanAgainstARun:
    def test_plan_shows_prompts_and_images(self, tmp_path: Path) -> None:
        """The table shows each job's prompt (cut short) and image names; --json has them whole."""
        from PIL import Image

        Image.new("RGB", (640, 360), "red").save(tmp_path / "first.png")
        Image.new("RGB", (640, 360), "blue").save(tmp_path / "last.png")
        long_prompt = "A slow orbit around the watch on dark marble, " * 4
        path = write(tmp_path, f"""\
            version: 1
            name: p
            jobs:
              - {{id: a, prompt: "{long_prompt}", image: first.png, image_tail: last.png}}
            """)
        code, out, _ = plan(str(path))
        assert code == 0
        assert "A slow orbit around the watch" in out and "first.png → last.png" in out
        doc = json.loads(plan(str(path), "--json")[1])
        job = doc["jobs"][0]
        assert job["prompt"] == long_prompt and job["image"] == str(tmp_path / "first.png")
        assert job["image_tail"] == str(tmp_path / "last.png")

    def test_plan_against_the_run_prices_only_what_run_would_submit(
        self, tmp_path: Path, simulator: object, api_key: str
    ) -> None:
        """After one job of a finished run is edited and one added, `plan` counts 1 changed,
        1 new and the rest reused, and prices the 2 that `run` would submit — which `run`
        then submits, no more."""
        from typing import Any

        sim: Any = simulator  # type: ignore[assignment]
        server = sim()
        workdir = tmp_path / "jobs"
        jobs = [{"id": f"j{i}", "prompt": f"shot {i}"} for i in range(4)]
        from batchkling.testing import write_manifest

        path = write_manifest(tmp_path, jobs, base_url=server.base_url)
        runner = CliRunner()
        first = runner.invoke(cli, ["run", str(path), "--workdir", str(workdir), "--speed",
                                    "400"])
        assert first.exit_code == 0, first.output
        jobs[1]["prompt"] = "shot 1, edited"
        jobs.append({"id": "j4", "prompt": "shot 4"})
        path = write_manifest(tmp_path, jobs, base_url=server.base_url)
        result = runner.invoke(cli, ["plan", str(path), "--json", "--workdir", str(workdir)])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        statuses = {j["id"]: j["against_run"] for j in doc["jobs"]}
        assert statuses == {"j0": "reused", "j1": "changed", "j2": "reused", "j3": "reused",
                            "j4": "new"}
        assert doc["against_run"]["submitted_jobs"] == 2
        assert doc["estimate_usd"] == pytest.approx(2 * doc["jobs"][0]["estimate_usd"])
        table = runner.invoke(cli, ["plan", str(path), "--workdir", str(workdir)]).stdout
        assert "Would submit 2 of 5 jobs" in table and "against run test-run" in table
        creates = server.stats()["creates"]
        again = runner.invoke(cli, ["run", str(path), "--workdir", str(workdir), "--speed",
                                    "400"])
        assert again.exit_code == 0 and server.stats()["creates"] - creates == 2
