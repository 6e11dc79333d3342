"""Money you can trust (issue #17, docs/money.md): a budget that holds when the price table is
wrong, prices learned from what the provider charged, models declared in the manifest, videos
reused across runs instead of paid for twice, and a deliberate retry of a succeeded job.

Runs play on virtual time (``VirtualSim``) with the simulator billing a multiple of the price
table (``price_factor``); the command-line checks use the simulator on loopback.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from click.testing import CliRunner
from conftest import SQLITE_UNLESS_ALL, TEST_KEY
from invariants import check_invariants, db_query
from s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, make_bucket

from batchkling.cli import cli
from batchkling.errors import ConfigError
from batchkling.outputs.results import read_results
from batchkling.pricing import task_units, task_usd
from batchkling.run.budget import PriceBook, reported
from batchkling.simulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY
from batchkling.testing import VirtualSim, write_manifest

pytestmark = pytest.mark.timeout(120)
RUN = "test-run"
ENV = {"BATCHKLING_TEST_KEY": TEST_KEY, "KLING_ACCESS_KEY": DEFAULT_ACCESS_KEY,
       "KLING_SECRET_KEY": DEFAULT_SECRET_KEY}
#: What the table says one job of the default manifest (kling-v2-6, std, 5 s) costs.
TABLE = task_usd("kling-v2-6", "std", 5)
MARGIN = 1.5


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


async def _ainvoke(*args: str) -> Any:
    """The command line from an async test: in a thread, as it runs its own event loop."""
    return await anyio.to_thread.run_sync(lambda: _invoke(*args))


def _first_price_bound(store: str, charged: float) -> float:
    """How far spending may pass the cap: every create committed no later than the first
    reported price reserved the table's price × margin and may have cost ``charged``."""
    (first,) = db_query(store, "SELECT MIN(at) FROM events WHERE event = 'job.succeeded'")[0]
    (early,) = db_query(store, "SELECT COUNT(*) FROM events WHERE event = 'job.submitting'"
                        " AND at <= ?", first)[0]
    assert early > 0
    return early * (charged - TABLE * MARGIN)


class TestBudgetHolds:
    async def test_prices_60_percent_above_the_table_never_pass_the_cap(
            self, tmp_path: Path, workdir: Path, store_url: str) -> None:
        """The simulator bills 1.6x the table; 40 jobs, 10 in flight, a cap of half the true
        total: spending stays within the cap (the first tasks reserve the table x 1.5 and every
        task in flight is raised to the price once one is known) and the run ends exit 3."""
        sim = VirtualSim(ENV, price_factor=1.6)
        true_total = 40 * TABLE * 1.6
        cap = round(true_total / 2, 4)
        path = sim.manifest(tmp_path, 40, limits={"max_in_flight": 10},
                            budget={"max_usd": cap})
        summary = await sim.run(path, workdir, store=store_url)
        assert summary.cost_usd <= cap + 1e-9
        assert summary.cost_usd >= cap - 2 * TABLE * 1.6  # the budget was used, not hoarded
        assert summary.exit_code == 3 and summary.stop_kind == "budget"
        assert "budget reached" in (summary.stop_reason or "")
        assert summary.counts["pending"] > 0
        assert sim.stats()["creates"] == summary.counts["succeeded"]
        assert any("above the $0.38 reserved" in note for note in summary.notes)
        check_invariants(workdir, RUN, sim.stats(), jobs=40, store=store_url)

    @SQLITE_UNLESS_ALL
    async def test_three_times_the_table_overshoot_is_bounded_and_said(
            self, tmp_path: Path, workdir: Path, store_url: str) -> None:
        """Prices 3x the table, the same run: whatever spending passes the cap by is at most
        what the tasks created before the first price arrived cost above their reservations,
        and the run says prices were above the table."""
        sim = VirtualSim(ENV, price_factor=3.0)
        cap = round(40 * TABLE * 3 / 2, 4)
        path = sim.manifest(tmp_path, 40, limits={"max_in_flight": 10},
                            budget={"max_usd": cap})
        summary = await sim.run(path, workdir, store=store_url)
        bound = _first_price_bound(store_url, TABLE * 3)
        assert summary.cost_usd - cap <= bound + 1e-9
        assert summary.exit_code == 3 and summary.stop_kind == "budget"
        assert any("cost $0.75 a task, above the $0.38 reserved before its price was known"
                   in note for note in summary.notes)

    @SQLITE_UNLESS_ALL
    async def test_a_cap_the_first_tasks_fill_is_passed_by_at_most_their_surprise(
            self, tmp_path: Path, workdir: Path, store_url: str) -> None:
        """Prices 3x the table and a cap the first tasks' reservations fill: spending passes
        the cap by exactly what those tasks cost above their reservations, no more, no task is
        created after the first price, and the end of the run explains the overshoot."""
        sim = VirtualSim(ENV, price_factor=3.0)
        cap = round(12 * TABLE, 4)  # eight reservations of table x 1.5
        path = sim.manifest(tmp_path, 20, limits={"max_in_flight": 10},
                            budget={"max_usd": cap})
        summary = await sim.run(path, workdir, store=store_url)
        assert sim.stats()["creates"] == 8
        over = summary.cost_usd - cap
        assert over > 0
        assert over <= _first_price_bound(store_url, TABLE * 3) + 1e-9
        assert any(f"spending passed budget.max_usd ${cap:.2f} by ${over:.2f}" in note
                   for note in summary.notes)

    @SQLITE_UNLESS_ALL
    async def test_kling_units_budget_holds(self, tmp_path: Path, workdir: Path,
                                            store_url: str) -> None:
        """Kling reports units, not dollars: budget.max_units caps them the same way (spent
        within the cap, exit 3, the stop names budget.max_units)."""
        sim = VirtualSim(ENV, price_factor=1.2)
        per_job = task_units("kling-v2-6", "std", 5) * 1.2
        cap = 8 * per_job
        path = sim.manifest(tmp_path, 12, provider="kling", limits={"max_in_flight": 4},
                            budget={"max_units": cap})
        summary = await sim.run(path, workdir, store=store_url)
        assert summary.cost_units <= cap + 1e-9
        assert summary.cost_units >= cap - 2 * per_job
        assert summary.exit_code == 3 and "budget.max_units" in (summary.stop_reason or "")
        assert summary.committed_units == pytest.approx(summary.cost_units)

    async def test_a_cost_that_is_not_a_number_leaves_the_reservation(
            self, tmp_path: Path, workdir: Path) -> None:
        """A reported cost that is negative is recorded as unknown and the task's
        reservation stands: spending never goes down, committed money stays held."""
        sim = VirtualSim(ENV)
        sim.sim.charge_usd = lambda spec: -1.0  # type: ignore[method-assign]  # a bad gateway
        path = sim.manifest(tmp_path, 3, limits={"max_in_flight": 3})
        summary = await sim.run(path, workdir)
        assert summary.exit_code == 0
        assert summary.cost_usd == 0
        assert summary.committed_usd == pytest.approx(3 * TABLE * MARGIN)
        assert db_query(workdir, "SELECT DISTINCT cost_usd FROM jobs") == [(None,)]

    def test_reported_costs_are_finite_and_not_negative(self) -> None:
        """The budget's own guard: NaN, infinities, negatives, booleans and text are unknown."""
        for bad in (math.nan, math.inf, -math.inf, -0.01, True, "0.35", None):
            assert reported(bad) is None, bad
        assert reported(0) == 0.0 and reported(0.35) == 0.35


class TestReservations:
    def _book(self, **observed: Any) -> PriceBook:
        return PriceBook(provider="imarouter", table_usd=lambda spec: TABLE,
                         table_units=lambda spec: 0.0, observed=dict(observed))

    def test_unobserved_prices_reserve_the_margin_observed_ones_the_larger(self) -> None:
        """Until a group's price is seen, the table x margin; then max(table, observed)."""
        from batchkling.models import JobSpec

        spec = JobSpec(job_id="a", model="kling-v2-6", prompt="p", duration=5, size="16:9",
                       mode="std")
        book = self._book()
        first = book.reserve(spec)
        assert first.usd == pytest.approx(TABLE * MARGIN) and not first.observed
        book.observe(first.group, usd=TABLE * 3, units=None, now=1.0)
        assert book.reserve(spec).usd == pytest.approx(TABLE * 3)
        book.observe(first.group, usd=TABLE / 2, units=None, now=2.0)
        assert book.reserve(spec).usd == pytest.approx(TABLE)  # never below the table


    def test_a_staler_store_price_does_not_undo_a_fresh_observation(self) -> None:
        """Prices read back from the store replace the book's only when they are newer."""
        from batchkling.pricing import ObservedPrice

        book = self._book()
        book.observe("g", usd=0.75, units=None, now=10.0)
        book.learn({"g": ObservedPrice(usd=0.25, units=None, samples=1, updated_at=5.0),
                    "h": ObservedPrice(usd=0.5, units=None, samples=1, updated_at=5.0)})
        assert book.observed["g"].usd == 0.75 and book.observed["h"].usd == 0.5
        book.learn({"g": ObservedPrice(usd=0.9, units=None, samples=2, updated_at=11.0)})
        assert book.observed["g"].usd == 0.9


class TestLearnedPrices:
    async def test_plan_marks_table_estimates_then_observed_prices(
            self, tmp_path: Path, workdir: Path) -> None:
        """plan on a fresh store marks every figure a table estimate; after a run that saw
        the provider charge 1.6x the table, the same plan shows that price, marked observed."""
        sim = VirtualSim(ENV, price_factor=1.6)
        path = sim.manifest(tmp_path, 3)
        fresh = await _ainvoke("plan", str(path), "--workdir", str(workdir), "--json")
        assert fresh.exit_code == 0, fresh.output
        doc = json.loads(fresh.stdout)
        assert {j["price_basis"] for j in doc["jobs"]} == {"table"}
        assert doc["estimate_usd"] == pytest.approx(3 * TABLE)
        human = (await _ainvoke("plan", str(path), "--workdir", str(workdir))).stdout
        assert "every figure (price 'table') is an ESTIMATE" in human
        await sim.run(path, workdir)
        # Planned as a new run: the first one's jobs are done (and not priced again).
        learned = json.loads((await _ainvoke("plan", str(path), "--workdir", str(workdir),
                                             "--run-id", "next", "--json")).stdout)
        assert {j["price_basis"] for j in learned["jobs"]} == {"observed"}
        assert learned["estimate_usd"] == pytest.approx(3 * TABLE * 1.6)
        human = (await _ainvoke("plan", str(path), "--workdir", str(workdir), "--run-id",
                                "next")).stdout
        assert "3 jobs at the price the provider was observed to charge" in human
        assert "observed" in human

    async def test_a_later_run_reserves_the_price_an_earlier_run_observed(
            self, tmp_path: Path, workdir: Path) -> None:
        """Prices are kept across runs: a second run (new id, no margin) reserves what the
        first saw the provider charge, not the lower table price, so it stays within its cap
        from its first create."""
        sim = VirtualSim(ENV, price_factor=1.6)
        await sim.run(sim.manifest(tmp_path, 2), workdir)
        charged = TABLE * 1.6
        later = tmp_path / "later"
        later.mkdir()
        path = sim.manifest(later, 10, prompt="another scene {i}", limits={"max_in_flight": 10},
                            budget={"max_usd": round(4 * charged, 4), "margin": 1})
        summary = await sim.run(path, workdir, run_id="later")
        assert sim.stats()["creates"] == 2 + 4
        assert summary.cost_usd <= 4 * charged + 1e-9
        assert summary.notes == ()  # nothing cost more than it reserved

    def test_the_simulator_bills_the_price_table(self) -> None:
        """One source of prices: the simulator's charge is the table's for every built-in
        model, mode and duration, and price_factor multiplies it."""
        from batchkling.catalog import DURATIONS, MODELS, MODES
        from batchkling.simulator.catalog import Spec, price_usd, units

        for model in MODELS:
            for mode in MODES:
                for duration in DURATIONS:
                    spec = Spec("text2video", model, duration, "16:9", mode, "p")
                    assert price_usd(spec) == task_usd(model, mode, duration)
                    assert price_usd(spec, factor=1.6) == pytest.approx(
                        task_usd(model, mode, duration) * 1.6, abs=1e-4)
                    assert float(units(spec)) == task_units(model, mode, duration)


class TestMoneyOnTheCommandLine:
    def test_budget_stop_prints_money_and_the_next_step(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str) -> None:
        """A run stopped by its budget ends exit 3 with spent, committed and the cap, and the
        next step (raise budget.max_usd and run the manifest again); status shows the cap."""
        sim = simulator(price_factor=1.6)
        cap = round(3 * TABLE * 1.6, 4)
        path = write_manifest(tmp_path, [{"id": f"j{i}", "prompt": f"p{i}"} for i in range(6)],
                              base_url=sim.base_url, budget={"max_usd": cap},
                              limits={"max_in_flight": 2})
        result = _invoke("run", str(path), "--workdir", str(workdir), "--speed", "400")
        assert result.exit_code == 3, result.output
        assert f"of budget.max_usd ${cap:.2f}" in result.stderr
        assert "money: spent $" in result.stderr
        assert f"raise budget.max_usd in {path}" in result.stderr
        assert f"batchkling run {path} --run-id {RUN}" in result.stderr
        status = _invoke("status", RUN, "--workdir", str(workdir))
        assert f"of budget.max_usd ${cap:.2f}" in status.stdout


MODEL_DECLARATION = {"kling-v2-7": {"durations": [5, 10], "modes": ["std", "pro"],
                                    "image_tail": True,
                                    "usd_per_second": {"std": 0.07, "pro": 0.112}}}


class TestDeclaredModels:
    async def test_a_declared_model_plans_and_runs_on_the_simulator(
            self, tmp_path: Path, workdir: Path) -> None:
        """A manifest declaring kling-v2-7 plans (at its declared price) and runs against a
        simulator started with that extra model, billed at the declared price."""
        sim = VirtualSim(ENV, extra_models=("kling-v2-7=0.07/0.112",))
        path = sim.manifest(tmp_path, 2, models=MODEL_DECLARATION,
                            defaults={"model": "kling-v2-7", "mode": "pro"})
        planned = await _ainvoke("plan", str(path), "--workdir", str(workdir), "--json")
        assert planned.exit_code == 0, planned.output
        doc = json.loads(planned.stdout)
        assert {j["model"] for j in doc["jobs"]} == {"kling-v2-7"}
        assert doc["estimate_usd"] == pytest.approx(2 * 0.112 * 5)
        assert doc["estimate_basis"]["declared_models"] == ["kling-v2-7"]
        summary = await sim.run(path, workdir)
        assert summary.exit_code == 0, summary.stop_reason
        assert summary.cost_usd == pytest.approx(2 * 0.112 * 5)

    def test_run_simulate_passes_the_declared_models(self, tmp_path: Path) -> None:
        """`run --simulate` starts its simulator with the manifest's declared models."""
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "model": "kling-v2-7"}],
                              models=MODEL_DECLARATION)
        result = _invoke("run", str(path), "--simulate", "--speed", "400", "--workdir",
                         str(tmp_path / "jobs"))
        assert result.exit_code == 0, result.output
        (row,) = read_results(tmp_path / "jobs" / RUN / "results.csv")
        assert row["model"] == "kling-v2-7" and row["cost_usd"] == "0.3500"

    def test_an_undeclared_model_names_the_models_section(self, tmp_path: Path) -> None:
        """An unknown model without a declaration is exit 2 at its line, saying how to
        declare it in `models:`."""
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "model": "kling-v2-7"}])
        result = _invoke("plan", str(path))
        assert result.exit_code == 2
        line = next(n for n, text in enumerate(path.read_text().splitlines(), 1)
                    if "kling-v2-7" in text)
        assert f"{path}:{line}:" in result.stderr
        assert "declare it in the manifest's `models:` section" in result.stderr
        assert "did you mean 'kling-v2-6'" in result.stderr

    def test_a_declared_model_is_held_to_its_declaration(self, tmp_path: Path) -> None:
        """A declared model's durations, modes and last frame are checked, and a mistake in
        the declaration itself is reported at its line."""
        path = tmp_path / "m.yaml"
        path.write_text(
            "version: 1\n"
            "name: decl\n"
            "models:\n"
            "  kling-v3: {durations: [8], modes: [pro], usd_per_second: 0.2,"
            " image_tail: false}\n"
            "  kling-v4: {usd_per_second: 0.2, colour: blue}\n"
            "jobs:\n"
            "  - {id: a, prompt: x, model: kling-v3, duration: 10}\n"
            "  - {id: b, prompt: x, model: kling-v3, duration: 8, mode: std}\n"
            "  - {id: c, prompt: x, model: kling-v3, duration: 8}\n")
        result = _invoke("plan", str(path))
        assert result.exit_code == 2
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert any(":5:" in e and "unknown key 'colour'" in e for e in errors), errors
        assert any(":7:" in e and "duration 10 (job 'a') is not offered by kling-v3" in e
                   for e in errors), errors
        assert any(":8:" in e and "mode 'std' (job 'b') is not offered by kling-v3" in e
                   for e in errors), errors
        assert not any("job 'c'" in e for e in errors)  # the built-in mode gives way

    def test_simulate_refuses_a_bad_model_id(self) -> None:
        """`batchkling simulate --models` checks the ids before serving (exit 2)."""
        result = _invoke("simulate", "--models", "Kling V3!", "--port", "0")
        assert result.exit_code == 2 and "--models" in result.output


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestReuse:
    async def test_a_second_run_reuses_every_video(self, tmp_path: Path, workdir: Path,
                                                   store_url: str) -> None:
        """Under a new run id, the same manifest with reuse: earlier-runs makes no create:
        every job takes the first run's video (verified, hard-linked or copied), costs $0 and
        says where it came from; plan says so beforehand."""
        sim = VirtualSim(ENV)
        path = sim.manifest(tmp_path, 4, reuse="earlier-runs")
        first = await sim.run(path, workdir, store=store_url)
        assert first.exit_code == 0 and sim.stats()["creates"] == 4
        planned = json.loads((await _ainvoke("plan", str(path), "--workdir", str(workdir),
                                             "--store", store_url, "--run-id", "again",
                                             "--json")).stdout)
        assert planned["reuse"] == {"enabled": True, "rendered_before": 4,
                                    "saved_usd": pytest.approx(4 * TABLE)}
        assert planned["estimate_usd"] == 0
        second = await sim.run(path, workdir, store=store_url, run_id="again")
        assert second.exit_code == 0 and second.reused == 4
        assert sim.stats()["creates"] == 4  # none more
        rows = read_results(workdir / "again" / "results.csv")
        assert [r["reused_from"] for r in rows] == [f"{RUN}/job-{i:03d}" for i in range(4)]
        assert {r["cost_usd"] for r in rows} == {"0.0000"}
        for row in rows:
            video = Path(row["video_path"])
            assert video.parent == workdir / "again" / "videos"
            assert _sha256(video) == row["video_sha256"]
        check_invariants(workdir, "again", sim.stats(), jobs=4, store=store_url)

    @SQLITE_UNLESS_ALL
    async def test_one_changed_prompt_makes_one_create(self, tmp_path: Path, workdir: Path,
                                                       store_url: str) -> None:
        """Changing one job's prompt: exactly that job renders, the others are reused."""
        sim = VirtualSim(ENV)
        path = sim.manifest(tmp_path, 4, reuse="earlier-runs")
        await sim.run(path, workdir, store=store_url)
        text = path.read_text().replace("scene number 2", "scene number two")
        path.write_text(text)
        second = await sim.run(path, workdir, store=store_url, run_id="again")
        assert second.exit_code == 0 and second.reused == 3
        assert sim.stats()["creates"] == 5
        rows = {r["job_id"]: r for r in read_results(workdir / "again" / "results.csv")}
        assert rows["job-002"]["reused_from"] == ""
        assert float(rows["job-002"]["cost_usd"]) == pytest.approx(TABLE)

    async def test_a_video_that_changed_since_is_rendered_again(
            self, tmp_path: Path, workdir: Path) -> None:
        """A donor file whose bytes no longer match its recorded sha256 is not reused."""
        sim = VirtualSim(ENV)
        path = sim.manifest(tmp_path, 2, reuse="earlier-runs")
        await sim.run(path, workdir)
        tampered = workdir / RUN / "videos" / "job-001.mp4"
        tampered.write_bytes(tampered.read_bytes() + b"x")
        second = await sim.run(path, workdir, run_id="again")
        assert second.reused == 1 and sim.stats()["creates"] == 3
        rows = {r["job_id"]: r for r in read_results(workdir / "again" / "results.csv")}
        assert rows["job-001"]["reused_from"] == "" and rows["job-000"]["reused_from"]

    async def test_reuse_is_off_by_default(self, tmp_path: Path, workdir: Path) -> None:
        """Without reuse: a second run renders again (a fresh take), and plan says how much
        reuse would have saved."""
        sim = VirtualSim(ENV)
        path = sim.manifest(tmp_path, 2)
        await sim.run(path, workdir)
        human = (await _ainvoke("plan", str(path), "--workdir", str(workdir), "--run-id",
                                "again")).stdout
        assert "2 jobs were already rendered by earlier runs; `reuse: earlier-runs`" in human
        second = await sim.run(path, workdir, run_id="again")
        assert second.reused == 0 and sim.stats()["creates"] == 4


    async def test_a_video_only_in_the_object_store_is_reused_by_its_uri(
            self, tmp_path: Path, workdir: Path, s3_server: Any) -> None:
        """With output.store and no local copy kept, a second run reuses each video by the
        earlier object's URI once a HEAD confirms its size and ETag: no create, no upload."""
        bucket = make_bucket(s3_server.endpoint_url)
        env = {**ENV, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY":
               SECRET_ACCESS_KEY, "AWS_REGION": REGION, "AWS_ENDPOINT_URL":
               s3_server.endpoint_url, "HOME": str(tmp_path)}
        sim = VirtualSim(env)
        path = sim.manifest(tmp_path, 2, reuse="earlier-runs",
                            output={"store": f"s3://{bucket}/v/"})
        assert (await sim.run(path, workdir)).exit_code == 0
        assert not list((workdir / RUN / "videos").glob("*.mp4"))  # the bucket holds them
        second = await sim.run(path, workdir, run_id="again")
        assert second.exit_code == 0 and second.reused == 2
        assert sim.stats()["creates"] == 2
        rows = read_results(workdir / "again" / "results.csv")
        assert [r["video_uri"] for r in rows] == [
            f"s3://{bucket}/v/{RUN}/job-{i:03d}.mp4" for i in range(2)]
        assert [r["reused_from"] for r in rows] == [f"{RUN}/job-{i:03d}" for i in range(2)]


class TestRetrySucceeded:
    def test_retrying_a_succeeded_job_needs_force(self, tmp_path: Path, workdir: Path,
                                                  simulator: Any, api_key: str) -> None:
        """`retry --job` of a succeeded job is refused without --force (exit 2, nothing
        sent); with it the job renders again and the CSV's cost_usd is both attempts' total,
        with attempts beside it."""
        sim = simulator()
        path = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], base_url=sim.base_url)
        where = ("--workdir", str(workdir), "--speed", "400")
        assert _invoke("run", str(path), *where).exit_code == 0
        refused = _invoke("retry", RUN, "--job", "a", *where)
        assert refused.exit_code == 2
        assert "job 'a' of run 'test-run' already succeeded" in refused.stderr
        assert "--force" in refused.stderr
        assert sim.stats()["create_requests"] == 1
        forced = _invoke("retry", RUN, "--job", "a", "--force", *where)
        assert forced.exit_code == 0, forced.output
        assert sim.stats()["creates"] == 2
        (row,) = read_results(workdir / RUN / "results.csv")
        assert row["attempts"] == "2"
        assert float(row["cost_usd"]) == pytest.approx(2 * TABLE)

    async def test_the_library_refuses_too(self, tmp_path: Path, workdir: Path) -> None:
        """Orchestrator.retry without force raises ConfigError for a succeeded job."""
        sim = VirtualSim(ENV)
        path = sim.manifest(tmp_path, 1)
        await sim.run(path, workdir)
        orch = sim.orchestrator(None, workdir, run_id=RUN)
        async with sim.clock.running(), orch.store, orch:
            with pytest.raises(ConfigError, match="already succeeded"):
                await orch.retry([], ["job-000"])
