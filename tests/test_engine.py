"""The run engine against the simulator as a real loopback server, on each store backend
(``store_url``: SQLite, PostgreSQL)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import SPEED, SQLITE_UNLESS_ALL, TEST_KEY
from invariants import db_dump, db_query

from batchkling.errors import RunLocked, WorkerFenced
from batchkling.manifest.document import load_manifest
from batchkling.models import JobState, RunSummary
from batchkling.outputs.results import read_results
from batchkling.run.engine import Engine
from batchkling.run.orchestrator import Orchestrator
from batchkling.simulator import SimulatorServer
from batchkling.store import Store, store_from
from batchkling.store.locate import is_postgres
from batchkling.store.postgres import PostgresStore
from batchkling.store.sqlite import SqliteStore
from batchkling.testing import StepClock, write_manifest

pytestmark = pytest.mark.timeout(60)


def _jobs(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": f"job-{i:03d}", "prompt": f"scene number {i}", **extra} for i in range(n)]


def _manifest(folder: Path, sim: SimulatorServer, jobs: list[dict[str, Any]],
              **sections: Any) -> Path:
    limits = {"max_in_flight": 5, "submit_rate": 50, "task_timeout": "2h", **sections.pop(
        "limits", {})}
    return write_manifest(folder, jobs, base_url=sim.base_url, limits=limits, **sections)


async def _run(path: Path, workdir: Path, **kwargs: Any) -> RunSummary:
    manifest = load_manifest(path)
    async with Orchestrator(manifest, workdir=workdir, time_scale=SPEED, seed=3,
                            **kwargs) as orch:
        return await orch.run()


async def _again(run_id: str, workdir: Path, action: str = "resume", *, store: str,
                 **kwargs: Any) -> RunSummary:
    async with Orchestrator(run_id=run_id, workdir=workdir, store=store, time_scale=SPEED,
                            seed=4) as orch:
        if action == "retry":
            return await orch.retry(**kwargs)
        return await orch.resume()


def _tasks_per_key(sim: SimulatorServer) -> dict[str, int]:
    return dict(sim.stats()["creates_by_key"])


def _assert_no_duplicates(sim: SimulatorServer) -> None:
    stats = sim.stats()
    assert stats["duplicate_keys"] == [], stats["duplicate_keys"]
    assert stats["creates_without_key"] == 0


def _rows(workdir: Path, run_id: str = "test-run") -> list[dict[str, str]]:
    return read_results(workdir / run_id / "results.csv")


def _assert_videos_complete(workdir: Path, rows: list[dict[str, str]]) -> None:
    for row in rows:
        if row["status"] != "succeeded":
            continue
        data = Path(row["video_path"]).read_bytes()
        assert data[4:8] == b"ftyp", row["job_id"]
        assert len(data) > 1000
    assert not list(workdir.rglob("*.part"))


class TestHappyPath:
    async def test_every_job_is_downloaded_once(self, tmp_path: Path, workdir: Path,
                                                simulator: Any, api_key: str,
            store_url: str) -> None:
        """Ten jobs end downloaded, each with one provider task and a verified MP4."""
        sim = simulator()
        summary = await _run(_manifest(tmp_path, sim, _jobs(10)), workdir, store=store_url)
        assert summary.exit_code == 0
        assert summary.counts == {"succeeded": 10}
        rows = _rows(workdir)
        assert [r["job_id"] for r in rows] == [f"job-{i:03d}" for i in range(10)]
        assert {r["status"] for r in rows} == {"succeeded"}
        _assert_videos_complete(workdir, rows)
        assert len({r["video_sha256"] for r in rows}) == 10
        assert sim.stats()["creates"] == 10
        _assert_no_duplicates(sim)

    @SQLITE_UNLESS_ALL
    async def test_slot_limit_is_never_exceeded(self, tmp_path: Path, workdir: Path,
                                                simulator: Any, api_key: str,
            store_url: str) -> None:
        """With max_in_flight 3 the provider never sees more than 3 live tasks."""
        sim = simulator()
        path = _manifest(tmp_path, sim, _jobs(12), limits={"max_in_flight": 3})
        summary = await _run(path, workdir, store=store_url)
        assert summary.exit_code == 0
        assert sim.stats()["peak_slots"] <= 3

    @SQLITE_UNLESS_ALL
    async def test_polls_stay_few(self, tmp_path: Path, workdir: Path, simulator: Any,
                                  api_key: str,
            store_url: str) -> None:
        """Adaptive polling needs only a handful of polls per task on average."""
        sim = simulator()
        summary = await _run(_manifest(tmp_path, sim, _jobs(20)), workdir, store=store_url)
        assert summary.exit_code == 0
        assert sim.stats()["polls"] / 20 <= 6

    async def test_only_the_create_intent_and_task_id_need_an_fsync(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            store_url: str) -> None:
        """The intent and the task id are committed durably (SQLite's synchronous=FULL, a
        flushed WAL on PostgreSQL); running, succeeded and downloaded take the quick commit
        (the kill tests show a SIGKILL loses none of them)."""
        sim = simulator()
        seen: dict[JobState, set[bool]] = {}

        class Recording(type(store_from(store_url))):  # type: ignore[misc]
            async def transition(self, *args: Any, **kwargs: Any) -> None:
                seen.setdefault(args[2], set()).add(kwargs.get("quick", False))
                await super().transition(*args, **kwargs)

            async def claim(self, *args: Any, **kwargs: Any) -> Any:
                # The intent is the claim: one statement on the durable connection.
                claim = await super().claim(*args, **kwargs)
                if claim.job is not None:
                    seen.setdefault(claim.job.state, set()).add(False)
                return claim

        store = Recording(store_url)
        async with store:
            summary = await _run(_manifest(tmp_path, sim, _jobs(4)), workdir, store=store)
        assert summary.counts == {"succeeded": 4}
        assert seen[JobState.SUBMITTING] == {False}
        assert seen[JobState.SUBMITTED] == {False}
        assert seen[JobState.SUCCEEDED] == {True}
        assert seen[JobState.DOWNLOADED] == {True}
        assert seen.get(JobState.RUNNING, {True}) == {True}

    async def test_progress_is_stored_for_the_report(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            store_url: str) -> None:
        """The progress a poll reads is stored on the job (as a fraction), so the report can
        say "rendering · 42%" while a task runs."""
        sim = simulator()
        summary = await _run(_manifest(tmp_path, sim, _jobs(6)), workdir, store=store_url)
        assert summary.counts == {"succeeded": 6}
        stored = [p for (p,) in db_query(store_url, "SELECT progress FROM jobs")
                  if p is not None]
        assert stored, "no job kept the progress its polls read"
        assert all(0.0 <= p < 1.0 for p in stored), stored

    async def test_rerun_of_finished_run_submits_nothing(self, tmp_path: Path, workdir: Path,
                                                         simulator: Any, api_key: str,
            store_url: str) -> None:
        """Running a finished, unchanged manifest again creates no task."""
        sim = simulator()
        path = _manifest(tmp_path, sim, _jobs(4))
        assert (await _run(path, workdir, store=store_url)).exit_code == 0
        assert (await _run(path, workdir, store=store_url)).exit_code == 0
        assert sim.stats()["creates"] == 4


class TestEndOfRunFiles:
    """One pass feeds the report and the CSV; either file failing leaves the other whole."""

    async def test_a_report_that_cannot_be_written_leaves_the_csv_whole(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            monkeypatch: pytest.MonkeyPatch) -> None:
        import batchkling.run.orchestrator as orchestrator

        async def broken(*args: Any, **kwargs: Any) -> Path:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(orchestrator, "write_report", broken)
        sim = simulator()
        summary = await _run(_manifest(tmp_path, sim, _jobs(3)), workdir)
        assert summary.exit_code == 0 and summary.report_html is None
        assert [r["job_id"] for r in _rows(workdir)] == ["job-000", "job-001", "job-002"]

    async def test_a_csv_that_cannot_be_written_leaves_the_report_whole(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            monkeypatch: pytest.MonkeyPatch) -> None:
        import batchkling.outputs.results as results

        def full(*args: Any, **kwargs: Any) -> Any:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(results.tempfile, "TemporaryFile", full)
        sim = simulator()
        summary = await _run(_manifest(tmp_path, sim, _jobs(3)), workdir)
        assert summary.results_csv is None
        assert "batchkling export test-run" in (summary.stop_reason or "")
        assert not (workdir / "test-run" / "results.csv").exists()
        page = (workdir / "test-run" / "report.html").read_text()
        assert all(f"job-00{i}" in page for i in range(3))


class TestEditedManifest:
    async def test_only_the_edited_job_is_submitted_again(self, tmp_path: Path, workdir: Path,
                                                          simulator: Any, api_key: str,
            store_url: str) -> None:
        """Editing one job's prompt in a finished run resubmits exactly that job."""
        sim = simulator()
        jobs = _jobs(5)
        assert (await _run(_manifest(tmp_path, sim, jobs), workdir, store=store_url)).exit_code == 0
        jobs[2]["prompt"] = "a different scene"
        jobs.append({"id": "job-new", "prompt": "brand new"})
        assert (await _run(_manifest(tmp_path, sim, jobs), workdir, store=store_url)).exit_code == 0
        stats = sim.stats()
        assert stats["creates"] == 7
        async with store_from(store_url) as store:
            attempts = await store.attempts("test-run", "job-002")
        assert [a["number"] for a in attempts] == [1, 2]
        assert attempts[0]["fingerprint"] != attempts[1]["fingerprint"]


class TestProviderTrouble:
    async def test_flaky_provider_loses_nothing(self, tmp_path: Path, workdir: Path,
                                                simulator: Any, api_key: str,
            store_url: str) -> None:
        """Under 5xx, drops, rate limits, failures, truncation and expiry: every job ends
        succeeded or with a reason, and no key ever made two tasks."""
        sim = simulator("flaky")
        path = _manifest(tmp_path, sim, _jobs(30), on_unknown="resubmit",
                         limits={"max_attempts": 3})
        summary = await _run(path, workdir, store=store_url)
        rows = _rows(workdir)
        assert len(rows) == 30
        for row in rows:
            if row["status"] == "pending":
                # Rendered, but its result URL expired twice before the download (the profile's
                # URLs live 60 simulated seconds: 0.15 s at this speed, which a loaded machine
                # can pass between a poll and the download). Kept, with the way on.
                assert row["error_code"] == "download_failed", row
                assert "downloads it again" in row["next_step"], row
                assert summary.exit_code == 3, summary
                continue
            assert row["status"] in ("succeeded", "failed"), row
            if row["status"] == "failed":
                assert row["error_message"], row
        assert summary.counts.get("succeeded", 0) >= 20
        _assert_videos_complete(workdir, rows)
        _assert_no_duplicates(sim)
        assert sim.stats()["rejected"]  # faults were really injected

    async def test_quirky_gateway_is_understood(self, tmp_path: Path, workdir: Path,
                                                simulator: Any, api_key: str,
            store_url: str) -> None:
        """Status synonyms, wrapped bodies, "42%" progress, ms timestamps, late URLs and
        404-after-create all end in downloaded videos."""
        sim = simulator("quirks")
        summary = await _run(_manifest(tmp_path, sim, _jobs(12)), workdir, store=store_url)
        assert summary.exit_code == 0, summary
        _assert_videos_complete(workdir, _rows(workdir))
        _assert_no_duplicates(sim)

    @SQLITE_UNLESS_ALL
    async def test_account_slots_below_max_in_flight(self, tmp_path: Path, workdir: Path,
                                                     simulator: Any, api_key: str,
                                                     store_url: str) -> None:
        """An account with 3 slots and a run asking for 10: requeued, not failed, and the
        effective limit comes down to what the account holds."""
        sim = simulator(slot_limit=3)
        path = _manifest(tmp_path, sim, _jobs(24), limits={"max_in_flight": 10})
        manifest = load_manifest(path)
        async with Orchestrator(manifest, workdir=workdir, store=store_url,
                                time_scale=SPEED) as orch:
            summary = await orch.run()
            engine = orch._engine
        assert summary.exit_code == 0
        stats = sim.stats()
        assert stats["peak_slots"] == 3
        assert engine is not None and engine.slot_limit <= 4
        # The first round of rejections teaches the limit; probes after that are rare.
        assert stats["rejected"].get("slots", 0) < 24

    @SQLITE_UNLESS_ALL
    async def test_rate_limits_are_honoured(self, tmp_path: Path, workdir: Path,
                                            simulator: Any, api_key: str,
            store_url: str) -> None:
        """429s with Retry-After pause creates; no job fails."""
        sim = simulator(rate_limit_per_s=4, retry_after_s=0.2)
        path = _manifest(tmp_path, sim, _jobs(16), limits={"submit_rate": 200,
                                                           "max_in_flight": 16})
        summary = await _run(path, workdir, store=store_url)
        assert summary.exit_code == 0
        assert sim.stats()["rejected"].get("rate_limited", 0) >= 1
        _assert_no_duplicates(sim)

    async def test_content_policy_failure_is_final(self, tmp_path: Path, workdir: Path,
                                                   simulator: Any, api_key: str,
            store_url: str) -> None:
        """A content-policy failure is not retried, and its reason is in the CSV."""
        sim = simulator(fail_rate=1.0, fail_reasons=("content_policy",))
        summary = await _run(_manifest(tmp_path, sim, _jobs(3)), workdir, store=store_url)
        assert summary.exit_code == 1
        rows = _rows(workdir)
        assert {r["status"] for r in rows} == {"failed"}
        assert all(r["attempts"] == "1" and r["error_message"] for r in rows)
        assert sim.stats()["creates"] == 3

    async def test_internal_failure_is_retried_as_new_attempts(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            store_url: str) -> None:
        """An internal failure gets a new task, up to max_attempts, each its own attempt."""
        sim = simulator(fail_rate=1.0, fail_reasons=("internal",))
        path = _manifest(tmp_path, sim, _jobs(2), limits={"max_attempts": 3})
        summary = await _run(path, workdir, store=store_url)
        assert summary.exit_code == 1
        assert {r["attempts"] for r in _rows(workdir)} == {"3"}
        assert sim.stats()["creates"] == 6
        _assert_no_duplicates(sim)
        async with store_from(store_url) as store:
            attempts = await store.attempts("test-run", "job-000")
        assert len({a["task_id"] for a in attempts}) == 3

    async def test_out_of_credit_stops_creates_then_resume_continues(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            store_url: str) -> None:
        """Out of credit: no create afterwards, in-flight tasks finish, exit 4; after a top-up
        ``resume`` finishes the rest without paying twice."""
        sim = simulator(credits_after_creates=3)
        path = _manifest(tmp_path, sim, _jobs(8), limits={"max_in_flight": 2})
        summary = await _run(path, workdir, store=store_url)
        assert summary.exit_code == 4
        assert "refused the account" in (summary.stop_reason or "")
        stats = sim.stats()
        assert stats["creates"] == 3
        requests_at_stop = stats["create_requests"]
        assert summary.counts.get("succeeded") == 3
        sim.update_config(credits_after_creates=None)
        resumed = await _again("test-run", workdir, store=store_url)
        assert resumed.exit_code == 0
        stats = sim.stats()
        assert stats["creates"] == 8
        assert stats["create_requests"] == requests_at_stop + 5
        _assert_no_duplicates(sim)


class TestBudget:
    async def test_creates_stop_before_the_budget_is_passed(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            store_url: str) -> None:
        """With $1.00, $0.25 jobs (the price table's, which the simulator bills) and no
        margin, four are created and the rest wait; exit 3 says why, and what was spent stays
        within the budget."""
        sim = simulator()
        path = _manifest(tmp_path, sim, _jobs(10, model="kling-v2-6", duration=5, mode="std"),
                         budget={"max_usd": 1.0, "margin": 1})
        summary = await _run(path, workdir, store=store_url)
        assert summary.exit_code == 3
        assert "budget reached" in (summary.stop_reason or "")
        assert sim.stats()["creates"] == 4
        assert summary.counts == {"succeeded": 4, "pending": 6}
        assert summary.cost_usd == pytest.approx(1.0)


class TestAmbiguousCreates:
    async def test_unanswered_create_becomes_unknown_not_a_second_task(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            store_url: str) -> None:
        """A 5xx after the task was made is reported `unknown`; nothing is resubmitted."""
        sim = simulator(create_5xx_after_create_rate=1.0, honor_idempotency_key=False)
        summary = await _run(_manifest(tmp_path, sim, _jobs(3)), workdir, store=store_url)
        assert summary.exit_code == 3
        assert {r["status"] for r in _rows(workdir)} == {"unknown"}
        assert sim.stats()["creates"] == 3
        _assert_no_duplicates(sim)

    async def test_retry_unknown_reuses_the_key(self, tmp_path: Path, workdir: Path,
                                                simulator: Any, api_key: str,
            store_url: str) -> None:
        """`retry --unknown` sends the same idempotency key: a provider that honours it
        returns the task it already made, so nothing is paid twice."""
        sim = simulator(create_5xx_after_create_rate=1.0)
        summary = await _run(_manifest(tmp_path, sim, _jobs(3)), workdir, store=store_url)
        assert summary.exit_code == 3
        sim.update_config(create_5xx_after_create_rate=0.0)
        summary = await _again("test-run", workdir, "retry", store=store_url,
                               states=[JobState.UNKNOWN])
        assert summary.exit_code == 0
        stats = sim.stats()
        assert stats["creates"] == 3
        assert stats["replays"] == 3
        _assert_no_duplicates(sim)


class TestDownloads:
    async def test_failed_downloads_never_rerender(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            store_url: str) -> None:
        """URLs that are always expired and bodies that are often truncated: the paid renders
        stay `succeeded` with the reason, nothing is re-rendered, and `resume` fetches them
        once the provider behaves."""
        sim = simulator(download_truncate_rate=0.5, url_ttl_s=0.0001)
        summary = await _run(_manifest(tmp_path, sim, _jobs(8)), workdir, store=store_url)
        assert summary.exit_code == 3
        rows = _rows(workdir)
        assert {r["status"] for r in rows} == {"pending"}
        assert all("expired" in r["error_message"] for r in rows)
        assert not list(workdir.rglob("*.mp4*"))
        polls_before = sim.stats()["polls"]
        sim.update_config(url_ttl_s=None)
        resumed = await _again("test-run", workdir, store=store_url)
        assert resumed.exit_code == 0
        _assert_videos_complete(workdir, _rows(workdir))
        stats = sim.stats()
        assert stats["creates"] == 8
        assert stats["polls"] - polls_before <= 8  # at most one URL refresh per job


class TestInterruptAndLease:
    async def test_interrupt_then_resume_pays_once(self, tmp_path: Path, workdir: Path,
                                                   simulator: Any, api_key: str,
            store_url: str) -> None:
        """An interrupt stops creating and exits 130; resume adopts the in-flight tasks."""
        sim = simulator()
        manifest = load_manifest(_manifest(tmp_path, sim, _jobs(10),
                                           limits={"max_in_flight": 3, "submit_rate": 5}))
        async with Orchestrator(manifest, workdir=workdir, store=store_url,
                                time_scale=SPEED) as orch:
            import anyio

            async with anyio.create_task_group() as tg:
                async def stop_soon() -> None:
                    while sim.stats()["creates"] < 2:
                        await anyio.sleep(0.01)
                    orch.interrupt()

                tg.start_soon(stop_soon)
                summary = await orch.run()
        assert summary.exit_code == 130
        first = sim.stats()["creates"]
        assert 2 <= first < 10
        resumed = await _again("test-run", workdir, store=store_url)
        assert resumed.exit_code == 0
        assert sim.stats()["creates"] == 10
        _assert_no_duplicates(sim)

    async def test_second_runner_is_refused(self, store_url: str) -> None:
        """A live lease holder (this very process) locks the run against another runner."""
        async with store_from(store_url) as store:
            await store.save_run("r", manifest_path=None, manifest_text=None, config_json="{}",
                                 provider="imarouter", base_url="http://x", simulated=False,
                                 now=100.0)
            await store.register_worker("worker-a", runs=["r"], now=100.0)
            await store.acquire_lease("r", "worker-a", now=100.0, stale_after=30)
            with pytest.raises(RunLocked, match="being run by process"):
                await store.acquire_lease("r", "worker-b", now=101.0, stale_after=30)

    async def test_a_paused_driver_holding_the_write_lock_is_named_at_once(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str) -> None:
        """A live driver paused (Ctrl-Z, a suspended VM) in the middle of a SQLite write holds
        the file's only write lock. A second `run` of its run must still say at once who drives
        it, not wait for the lock and then fail with "database is locked"; so opening a
        database at the current schema, and the lease check, only read."""
        sim = simulator()
        path = _manifest(tmp_path, sim, _jobs(2))
        assert (await _run(path, workdir)).exit_code == 0
        db = workdir / "batchkling.db"
        async with store_from(str(db)) as store:
            await store.register_worker("paused-driver", runs=["test-run"], now=100.0)
            await store.acquire_lease("test-run", "paused-driver", now=100.0, stale_after=30)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the paused driver, mid-commit
        try:
            with anyio.fail_after(10):  # the old code waited 30 s for the lock
                with pytest.raises(RunLocked, match="being run by process"):
                    await _run(path, workdir)
        finally:
            holder.execute("ROLLBACK")
            holder.close()

    async def test_a_driver_paused_at_the_end_whose_run_was_taken_over_changes_nothing(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Paused after its last job (no job write left for a claim epoch to fence) while
        another process took its run over: it must not mark the run ended under the new
        driver, nor write the run's files; it exits 5 like any fenced process."""
        sim = simulator()
        path = _manifest(tmp_path, sim, _jobs(2))
        finished = Engine.run

        async def finish_then_lose_the_run(engine: Engine, *args: Any, **kwargs: Any) -> None:
            await finished(engine, *args, **kwargs)
            await engine.store.register_worker("taker", runs=["test-run"], now=100.0)
            await engine.store.set_run_state("test-run", "running", None, 100.0)
            db_query(store_url, "UPDATE runs SET lease_owner = 'taker'")

        monkeypatch.setattr(Engine, "run", finish_then_lose_the_run)
        summary = await _run(path, workdir, store=store_url)
        assert summary.exit_code == 5, summary
        assert "presumed dead" in (summary.stop_reason or "")
        assert db_query(store_url, "SELECT state, lease_owner FROM runs") == [
            ("running", "taker")]
        assert not (workdir / "test-run" / "results.csv").exists()

    async def test_jobs_of_a_worker_found_dead_at_the_end_are_taken_over(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str,
            store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Just as the run runs out of pending jobs, another process marks a worker dead that
        held one of its tasks (and takes over only the runs it drives itself). The run must
        take that task over before it ends, not end "incomplete" (exit 3) with the task left
        in flight until someone runs `resume`."""
        sim = simulator()
        path = _manifest(tmp_path, sim, _jobs(3))
        backend = PostgresStore if is_postgres(store_url) else SqliteStore
        looked = backend.held_elsewhere
        planted: list[str] = []

        async def a_worker_dies_as_we_look(store: Store, run_id: str, worker_id: str) -> int:
            if not planted:
                job_id = db_query(store_url, "SELECT job_id FROM jobs ORDER BY seq LIMIT 1")[0][0]
                planted.append(job_id)
                await store.register_worker("ghost", runs=[run_id], now=100.0)
                await store.transition(run_id, job_id, JobState.SUBMITTED, now=100.0,
                                       event="test.held_by_ghost", worker_id="ghost")
                db_query(store_url, "UPDATE workers SET state = 'dead' WHERE worker_id = 'ghost'")
            return await looked(store, run_id, worker_id)  # type: ignore[arg-type]

        monkeypatch.setattr(backend, "held_elsewhere", a_worker_dies_as_we_look)
        summary = await _run(path, workdir, store=store_url)
        assert planted
        assert summary.exit_code == 0, summary
        events = [e for (e,) in db_query(store_url, "SELECT event FROM events WHERE job_id = ?"
                                         " ORDER BY id", planted[0])]
        after = events[events.index("test.held_by_ghost") + 1:]
        assert after == ["job.succeeded", "job.downloaded"], events  # polled and fetched again
        assert db_query(store_url, "SELECT state FROM jobs WHERE job_id = ?",
                        planted[0]) == [("downloaded",)]
        assert {r["status"] for r in read_results(workdir / "test-run" / "results.csv")} == {
            "succeeded"}

    async def test_stale_lease_is_taken_over(self, store_url: str) -> None:
        """A lease whose process is gone, or whose heartbeat is old on the store's clock, is
        taken over, and the worker that held it is fenced."""
        clock = StepClock()
        async with store_from(store_url, clock=clock) as store:
            await store.save_run("r", manifest_path=None, manifest_text=None, config_json="{}",
                                 provider="imarouter", base_url="http://x", simulated=False,
                                 now=100.0)
            for worker in ("worker-a", "worker-b", "worker-c"):
                await store.register_worker(worker, runs=["r"], now=100.0)
            await store.acquire_lease("r", "worker-a", now=100.0, stale_after=30)
            db_query(store_url, "UPDATE workers SET pid = 2147483000"
                     " WHERE worker_id = 'worker-a'")  # no such process
            await store.acquire_lease("r", "worker-b", now=101.0, stale_after=30)
            with pytest.raises(WorkerFenced):
                await store.worker_heartbeat("worker-a", now=101.0)
            clock.now += 31  # worker-b silent past stale_after on the store's clock
            await store.worker_heartbeat("worker-c", now=101.0)
            await store.acquire_lease("r", "worker-c", now=101.0, stale_after=30)
            run = await store.require_run("r")
            assert run.lease_owner == "worker-c"
            with pytest.raises(WorkerFenced):
                await store.worker_heartbeat("worker-b", now=102.0)

    async def test_a_wall_clock_step_does_not_take_a_live_lease(self, store_url: str) -> None:
        """Staleness is judged on the store's monotonic clock: a runner whose wall clock jumps
        two minutes ahead still finds the live holder's lease locked."""
        clock = StepClock()
        async with store_from(store_url, clock=clock) as store:
            await store.save_run("r", manifest_path=None, manifest_text=None, config_json="{}",
                                 provider="imarouter", base_url="http://x", simulated=False,
                                 now=100.0)
            await store.register_worker("worker-a", runs=["r"], now=100.0)
            await store.register_worker("worker-b", runs=["r"], now=100.0)
            await store.acquire_lease("r", "worker-a", now=100.0, stale_after=30)
            with pytest.raises(RunLocked):
                await store.acquire_lease("r", "worker-b", now=100.0 + 120, stale_after=30)


class TestSecrets:
    async def test_key_never_reaches_disk(self, tmp_path: Path, workdir: Path,
                                          simulator: Any, api_key: str,
            store_url: str) -> None:
        """The API key appears in no file batchkling writes: DB, WAL, CSV, run.log."""
        sim = simulator("flaky")
        await _run(_manifest(tmp_path, sim, _jobs(6), on_unknown="resubmit"), workdir,
                   store=store_url)
        needle = TEST_KEY.encode()
        files = [p for p in workdir.rglob("*") if p.is_file()]
        assert any(p.name == "run.log" for p in files)
        for path in files:
            assert needle not in path.read_bytes(), path
        assert TEST_KEY not in db_dump(store_url)


class TestStoreFailure:
    async def test_a_failing_database_stops_all_creates(
            self, tmp_path: Path, workdir: Path, simulator: Any, api_key: str, store_url: str,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """When checkpoints cannot be written, no further task is paid for; exit 3."""
        sim = simulator()
        path = _manifest(tmp_path, sim, _jobs(8), limits={"max_in_flight": 2, "submit_rate": 5})
        backend = type(store_from(store_url))
        original = backend.transition
        calls = {"n": 0}

        async def flaky(self: Store, *args: Any, **kwargs: Any) -> None:
            calls["n"] += 1
            if calls["n"] > 6:
                from batchkling.errors import StoreError
                raise StoreError("disk I/O error")
            await original(self, *args, **kwargs)

        monkeypatch.setattr(backend, "transition", flaky)
        summary = await _run(path, workdir, store=store_url)
        assert summary.exit_code == 3
        assert "state database failed" in (summary.stop_reason or "")
        assert sim.stats()["creates"] <= 3
