"""The checkpoint store: transitions with history, retry resets, schema versioning.

Store-level behaviour runs on both backends (``store_url``: SQLite, PostgreSQL); what is
SQLite's own (page size, its quick connection, its migrations) stays SQLite-only, and
PostgreSQL's own (its schema lock, URLs, the database clock) is in tests/test_store_postgres.py.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import anyio
import pytest
from invariants import db_query

from batchkling.errors import SchemaTooNew, StoreError, WorkerFenced
from batchkling.models import JobSpec, JobState
from batchkling.store import JobRow, Store, store_from
from batchkling.store.interface import Claim, ClaimOutcome, Intent
from batchkling.store.rows import SYNC_BATCH
from batchkling.store.sqlite import SCHEMA_VERSION, SqliteStore
from batchkling.testing import StepClock


def _spec(job_id: str, prompt: str = "p") -> JobSpec:
    return JobSpec(job_id=job_id, model="kling-v2-6", prompt=prompt, duration=5, size="16:9")


async def _store_with_jobs(location: str | Path, *ids: str) -> Store:
    store = store_from(location)
    await store.open()
    await store.save_run("r", manifest_path=None, manifest_text=None, config_json="{}",
                         provider="imarouter", base_url="http://x", simulated=False, now=1.0)
    await store.sync_jobs("r", added=[(i, _spec(j)) for i, j in enumerate(ids)], changed=[],
                          reordered=[], removed=[], now=1.0)
    return store


class TestTransitions:
    async def test_attempts_keep_history(self, store_url: str) -> None:
        """Each attempt is its own row; a retry never overwrites the previous task."""
        store = await _store_with_jobs(store_url, "a")
        for number in (1, 2):
            await store.transition("r", "a", JobState.SUBMITTING, now=2.0, event="e",
                                   new_attempt=(number, f"key-{number}"))
            await store.transition("r", "a", JobState.SUBMITTED, now=3.0, event="e",
                                   task_id=f"task-{number}", submitted_at=3.0)
            await store.transition("r", "a", JobState.FAILED, now=4.0, event="e",
                                   error_message=f"boom {number}")
        attempts = await store.attempts("r", "a")
        assert [(a["task_id"], a["error_message"]) for a in attempts] == [
            ("task-1", "boom 1"), ("task-2", "boom 2")]
        job = await store.get_job("r", "a")
        assert job is not None and job.attempt == 2 and job.task_id == "task-2"
        assert await store.integrity_check() == "ok"
        await store.aclose()

    async def test_retry_resets(self, store_url: str) -> None:
        """Failed jobs get a fresh attempt budget and key; unknown ones keep their key."""
        store = await _store_with_jobs(store_url, "f", "u", "d")
        await store.transition("r", "f", JobState.FAILED, now=2, event="e", attempt=2,
                               idempotency_key="kf")
        await store.transition("r", "u", JobState.UNKNOWN, now=2, event="e", attempt=1,
                               idempotency_key="ku")
        await store.transition("r", "d", JobState.DOWNLOADED, now=2, event="e")
        changed = await store.reset_for_retry("r", states=[JobState.FAILED, JobState.UNKNOWN],
                                              job_ids=[], now=3)
        assert changed == 2
        f, u, d = [await store.get_job("r", j) for j in "fud"]
        assert f is not None and f.state is JobState.PENDING and f.attempt_base == 2
        assert f.idempotency_key is None
        assert u is not None and u.state is JobState.PENDING and u.idempotency_key == "ku"
        assert d is not None and d.state is JobState.DOWNLOADED
        await store.aclose()

    async def test_removed_jobs_are_skipped_but_videos_kept(self, store_url: str) -> None:
        """A job dropped from the manifest is skipped unless it was already downloaded."""
        store = await _store_with_jobs(store_url, "keep", "gone", "done")
        await store.transition("r", "done", JobState.DOWNLOADED, now=2, event="e")
        await store.sync_jobs("r", added=[], changed=[], reordered=[],
                              removed=["gone", "done"], now=3)
        counts = await store.counts("r")
        assert counts == {JobState.PENDING: 1, JobState.SKIPPED: 1, JobState.DOWNLOADED: 1}
        await store.aclose()


async def test_newer_schema_is_refused(store_url: str) -> None:
    """A store written by a newer batchkling is not touched: SchemaTooNew (exit 2) names it."""
    async with store_from(store_url):
        pass
    if store_url.startswith("postgresql://"):
        db_query(store_url, "UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    else:
        con = sqlite3.connect(store_url)
        con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
        con.commit()
        con.close()
    store = store_from(store_url)
    with pytest.raises(SchemaTooNew, match="newer batchkling") as caught:
        await store.open()
    await store.aclose()
    assert store.location in str(caught.value)
    assert db_query(store_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        ("999",)]


async def test_new_jobs_are_recorded_a_batch_at_a_time(store_url: str) -> None:
    """A manifest's new jobs may come from a generator (a spooled manifest, read once): they
    go in batches of SYNC_BATCH in one transaction, every job with its seq, across batch
    boundaries, beside the changed, reordered and removed ones."""
    n = 2 * SYNC_BATCH + 7

    def spec(i: int, prompt: str = "p") -> JobSpec:
        return JobSpec(job_id=f"j{i:05d}", model="kling-v2-6", prompt=f"{prompt}{i}",
                       duration=5, size="16:9")

    async with store_from(store_url) as store:
        await store.save_run("r", manifest_path=None, manifest_text=None, config_json="{}",
                             provider="imarouter", base_url="http://x", simulated=False,
                             now=1.0)
        await store.sync_jobs("r", added=[(0, spec(0)), (1, spec(1)), (2, spec(2))],
                              changed=[], reordered=[], removed=[], now=1.0)
        await store.sync_jobs("r", added=((i, spec(i)) for i in range(3, n)),
                              changed=[(0, spec(0, "edited"))], reordered=[(1, "j00001")],
                              removed=["j00002"], now=2.0)
        rows = db_query(store_url, "SELECT job_id, seq, state FROM jobs ORDER BY seq")
        edited = await store.get_job("r", "j00000")
    assert [(r[0], r[1]) for r in rows] == [(f"j{i:05d}", i) for i in range(n)]
    assert [r[2] for r in rows[:4]] == ["pending", "pending", "skipped", "pending"]
    assert edited is not None and edited.spec.prompt == "edited0"


async def test_closed_store_refuses_reuse(store_url: str) -> None:
    """A closed store cannot be reopened by accident."""
    store = store_from(store_url)
    await store.open()
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(StoreError):
        await store.open()


#: What schema 4 added (money in units, price groups, reuse, observed prices), dropped again.
_V4_ONLY = (
    "DROP TRIGGER job_reserved_units; DROP TRIGGER attempt_cost; DROP TRIGGER attempt_cost_new;"
    " DROP INDEX jobs_by_fingerprint; DROP TABLE prices;"
    " ALTER TABLE jobs DROP COLUMN reserved_units; ALTER TABLE jobs DROP COLUMN price_group;"
    " ALTER TABLE jobs DROP COLUMN reused_from;"
    " ALTER TABLE runs DROP COLUMN reserved_units; ALTER TABLE runs DROP COLUMN spent_units;"
)
_V3_ONLY = (
    "DROP TRIGGER job_reserved;"
    " DROP INDEX jobs_by_account; DROP INDEX jobs_by_worker;"
    " DROP TABLE accounts; DROP TABLE workers;"
    " ALTER TABLE jobs DROP COLUMN account_id; ALTER TABLE jobs DROP COLUMN worker_id;"
    " ALTER TABLE jobs DROP COLUMN claim_epoch;"
    " ALTER TABLE runs DROP COLUMN reserved_usd; ALTER TABLE runs DROP COLUMN spent_usd;"
    " DROP TRIGGER job_new_attempt; DROP TRIGGER job_transition;"
    " ALTER TABLE jobs DROP COLUMN video_uri; ALTER TABLE jobs DROP COLUMN video_etag;"
    + "".join(f" ALTER TABLE attempts DROP COLUMN {c};"
              for c in ("video_uri", "video_size", "video_sha256", "video_etag"))
)


async def test_version_1_database_is_migrated(tmp_path: Path) -> None:
    """A database written by schema 1 (no last_event columns) is upgraded in place and works."""
    path = tmp_path / "db"
    store = await _store_with_jobs(path, "a")
    await store.aclose()
    _downgrade(path, 2)
    con = sqlite3.connect(path)
    con.executescript(
        "ALTER TABLE jobs DROP COLUMN last_event; ALTER TABLE jobs DROP COLUMN last_event_data;"
        " UPDATE meta SET value = '1' WHERE key = 'schema_version';"
    )
    con.close()
    async with SqliteStore(path) as upgraded:
        await upgraded.transition("r", "a", JobState.SUBMITTING, now=2, event="job.submitting",
                                  new_attempt=(1, "k1"))
        assert [a["idempotency_key"] for a in await upgraded.attempts("r", "a")] == ["k1"]
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    con.close()


def _downgrade(path: Path, version: int) -> None:
    """Make a current database look like one written by schema ``version`` (2 or 3)."""
    assert version in (2, 3)
    steps = _V4_ONLY + (_V3_ONLY if version == 2 else "")
    con = sqlite3.connect(path)
    con.executescript(steps + f" UPDATE meta SET value = '{version}' WHERE key = 'schema_version';")
    con.close()


async def test_version_2_database_gains_the_object_store_columns(tmp_path: Path) -> None:
    """A schema-2 database gets video_uri/video_etag on jobs and the video columns on attempts,
    and its remade triggers mirror them onto the current attempt."""
    path = tmp_path / "db"
    store = await _store_with_jobs(path, "a")
    await store.transition("r", "a", JobState.SUBMITTING, now=2, event="job.submitting",
                           new_attempt=(1, "k1"))
    await store.aclose()
    _downgrade(path, 2)
    async with SqliteStore(path) as upgraded:
        await upgraded.transition("r", "a", JobState.DOWNLOADED, now=3, event="job.downloaded",
                                  video_uri="s3://b/p/r/a.mp4", video_etag="e1", video_size=7,
                                  video_sha256="ab")
        job = await upgraded.get_job("r", "a")
        assert job is not None and (job.video_uri, job.video_etag) == ("s3://b/p/r/a.mp4", "e1")
        (attempt,) = await upgraded.attempts("r", "a")
        assert (attempt["video_uri"], attempt["video_size"], attempt["video_sha256"],
                attempt["video_etag"]) == ("s3://b/p/r/a.mp4", 7, "ab", "e1")
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    con.close()


async def test_version_2_database_gets_money_totals(tmp_path: Path) -> None:
    """Upgrading a schema-2 database sums the run's reported costs and open reservations into
    its running totals, and the triggers keep them from then on."""
    path = tmp_path / "db"
    store = await _store_with_jobs(path, "a", "b")
    await store.aclose()
    _downgrade(path, 2)
    con = sqlite3.connect(path)
    con.execute("INSERT INTO attempts (run_id, job_id, number, idempotency_key, fingerprint,"
                " state, cost_usd) VALUES ('r', 'a', 1, 'k', 'f', 'downloaded', 0.35)")
    con.execute("UPDATE jobs SET reserved_usd = 0.7 WHERE job_id = 'b'")
    con.commit()
    con.close()
    async with SqliteStore(path) as upgraded:
        assert await upgraded.money("r") == pytest.approx((0.35, 1.05))
        await upgraded.transition("r", "b", JobState.SUBMITTING, now=3, event="job.submitting",
                                  new_attempt=(1, "k2"), reserved_usd=0.7)
        await upgraded.transition("r", "b", JobState.SUCCEEDED, now=4, event="job.succeeded",
                                  cost_usd=0.5, reserved_usd=0)
        assert await upgraded.money("r") == pytest.approx((0.85, 0.85))


async def test_version_3_database_gains_money_in_units_and_observed_prices(
        tmp_path: Path) -> None:
    """A schema-3 database (no units budget, price groups, reuse or observed prices) upgrades
    in place: its reported units become the run's spent units, and prices, unit reservations
    and reuse work from then on."""
    path = tmp_path / "db"
    store = await _store_with_jobs(path, "a", "b")
    await store.aclose()
    _downgrade(path, 3)
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta").fetchone()[0] == "3"
    con.execute("INSERT INTO attempts (run_id, job_id, number, idempotency_key, fingerprint,"
                " state, cost_units) VALUES ('r', 'a', 1, 'k', 'f', 'downloaded', 2.5)")
    con.commit()
    con.close()
    async with SqliteStore(path) as upgraded:
        assert await upgraded.money_units("r") == (2.5, 2.5)
        await upgraded.record_price("g", usd=None, units=2.5, now=2.0)
        assert (await upgraded.observed_prices())["g"].units == 2.5
        await upgraded.transition("r", "b", JobState.SUBMITTING, now=3, event="job.submitting",
                                  new_attempt=(1, "k2"), reserved_units=3.75, price_group="g")
        assert await upgraded.money_units("r") == (2.5, 6.25)
        assert await upgraded.raise_reservations("g", usd=None, units=5.0) == 1
        assert await upgraded.money_units("r") == (2.5, 7.5)
        assert await upgraded.reuse_sources("r") == []
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION) == "4"
    con.close()


async def test_new_files_use_small_pages_and_old_files_still_open(tmp_path: Path) -> None:
    """A new database has 1 KiB pages and no AUTOINCREMENT bookkeeping; a file made with the
    old 4 KiB pages and AUTOINCREMENT events opens, and its event ids keep growing."""
    store = await _store_with_jobs(tmp_path / "new", "a")
    await store.transition("r", "a", JobState.SUBMITTING, now=2, event="e1",
                           new_attempt=(1, "k1"))
    await store.aclose()
    con = sqlite3.connect(tmp_path / "new")
    assert con.execute("PRAGMA page_size").fetchone()[0] == 1024
    assert con.execute("SELECT name FROM sqlite_master WHERE name = 'sqlite_sequence'"
                       ).fetchone() is None
    con.close()

    old = tmp_path / "old"
    con = sqlite3.connect(old)
    con.execute("PRAGMA page_size=4096")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,"
                " job_id TEXT, at REAL NOT NULL, event TEXT NOT NULL, data TEXT)")
    con.close()
    store = await _store_with_jobs(old, "a")
    for n, event in enumerate(("e1", "e2", "e3"), start=2):
        await store.transition("r", "a", JobState.SUBMITTED, now=n, event=event, quick=n % 2 == 0)
    await store.aclose()
    con = sqlite3.connect(old)
    assert con.execute("PRAGMA page_size").fetchone()[0] == 4096
    assert [r[0] for r in con.execute("SELECT event FROM events ORDER BY id")] == [
        "e1", "e2", "e3"]
    con.close()


async def test_a_lock_held_by_a_paused_process_is_named(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holding the file's write lock (a batchkling paused mid-write) does not
    stop the store from opening at the current schema; a write that waits out ``lock_wait``
    fails saying who most likely holds the lock and what to do, not SQLite's bare words."""
    monkeypatch.setattr(SqliteStore, "lock_wait", 0.2)
    path = tmp_path / "state.db"
    await (await _store_with_jobs(path, "a")).aclose()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        async with SqliteStore(path) as store:
            assert (await store.get_job("r", "a")) is not None
            with pytest.raises(StoreError, match=r"stayed locked by another process .*"
                                                 r"paused .*kill -CONT") as caught:
                await store.transition("r", "a", JobState.SUBMITTING, now=2, event="e",
                                       new_attempt=(1, "k1"))
            assert "database is locked" not in str(caught.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


class TestQuickCommits:
    """``transition(quick=True)``: no fsync (SQLite: no trip to the database thread either;
    PostgreSQL: no wait for the WAL flush), still committed."""

    async def test_a_quick_commit_is_visible_to_other_processes_at_once(
            self, store_url: str) -> None:
        """The row and its event are committed before transition() returns: another
        connection (a `status` in another shell, or the next process after a kill) sees them."""
        store = await _store_with_jobs(store_url, "a")
        try:
            await store.transition("r", "a", JobState.RUNNING, now=2.0, event="job.running",
                                   quick=True)
            state = db_query(store_url, "SELECT state FROM jobs WHERE job_id = 'a'")
            events = db_query(store_url, "SELECT event FROM events WHERE job_id = 'a'")
            assert state == [("running",)]
            assert ("job.running",) in events
        finally:
            await store.aclose()

    async def test_another_writer_sends_it_the_durable_way(self, tmp_path: Path) -> None:
        """While another process holds the write lock, a quick commit neither fails nor
        blocks the event loop: it waits in the database thread like a durable one."""
        store = await _store_with_jobs(tmp_path / "db", "a")
        other = sqlite3.connect(tmp_path / "db", isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            landed = anyio.Event()

            async def quick() -> None:
                await store.transition("r", "a", JobState.RUNNING, now=2.0, event="job.running",
                                       quick=True)
                landed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(quick)
                started = time.monotonic()
                await anyio.sleep(0.3)
                # The loop was free meanwhile: the sleep ended on time, the write still waits.
                assert time.monotonic() - started < 2.0
                assert not landed.is_set()
                other.execute("COMMIT")
                with anyio.fail_after(10):
                    await landed.wait()
            job = await store.get_job("r", "a")
            assert job is not None and job.state is JobState.RUNNING
        finally:
            other.close()
            await store.aclose()

    async def test_reads_between_quick_and_durable_commits(self, store_url: str) -> None:
        """A page read interleaved with quick and durable commits never leaves the durable
        connection on an old snapshot (which made its next write fail, SQLITE_BUSY_SNAPSHOT,
        when a read's cursor stayed open across an await)."""
        ids = [f"j{i:03d}" for i in range(60)]
        store = await _store_with_jobs(store_url, *ids)
        try:
            async def reader(done: anyio.Event) -> None:
                while not done.is_set():
                    await store.jobs_in("r", list(JobState), limit=500)

            async def writer(done: anyio.Event) -> None:
                # Each quick commit lands while a read is in the database thread, and the
                # durable write after it queues behind that read.
                for job_id in ids:
                    await store.transition("r", job_id, JobState.RUNNING, now=2.0, event="e",
                                           quick=True)
                    await store.transition("r", job_id, JobState.FAILED, now=3.0, event="e")
                done.set()

            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader, done)
                tg.start_soon(writer, done)
            counts = await store.counts("r")
            assert counts == {JobState.FAILED: len(ids)}
            assert await store.integrity_check() == "ok"
        finally:
            await store.aclose()


class TestClaims:
    @staticmethod
    def _intent(job: JobRow) -> Intent:
        return Intent(new_attempt=(job.attempt + 1, f"key-{job.job_id}"), reserved_usd=0.5)

    async def _claim(self, store: Store, worker: str = "w1", cap: int = 5,
                     max_usd: float | None = None) -> Claim:
        return await store.claim("r", worker_id=worker, account_id="acct", slot_cap=cap,
                                 intent=self._intent, max_usd=max_usd, now=3.0)

    async def _ready(self, location: str, *ids: str) -> Store:
        store = await _store_with_jobs(location, *ids)
        await store.ensure_account("acct", provider="imarouter", max_in_flight=5, now=1.0)
        await store.register_worker("w1", runs=None, now=1.0)
        return store

    async def test_claims_take_jobs_in_order_within_slots_and_budget(self,
                                                                      store_url: str) -> None:
        """A claim takes the next pending job (the create intent, a new claim epoch); it stops
        at the slot cap, at the budget, and when nothing is pending."""
        store = await self._ready(store_url, "a", "b", "c")
        first = await self._claim(store, cap=2)
        assert first.outcome is ClaimOutcome.CLAIMED and first.job is not None
        assert (first.job.job_id, first.job.state, first.job.claim_epoch) == (
            "a", JobState.SUBMITTING, 1)
        assert (first.job.worker_id, first.job.account_id) == ("w1", "acct")
        assert (await self._claim(store, cap=2)).job.job_id == "b"  # type: ignore[union-attr]
        assert (await self._claim(store, cap=2)).outcome is ClaimOutcome.NO_SLOT
        budget = await self._claim(store, cap=5, max_usd=1.2)  # 1.0 reserved, 0.5 more > 1.2
        assert budget.outcome is ClaimOutcome.BUDGET
        assert budget.committed_usd == pytest.approx(1.0)
        assert (await self._claim(store, cap=5)).job.job_id == "c"  # type: ignore[union-attr]
        assert (await self._claim(store, cap=5)).outcome is ClaimOutcome.EMPTY
        await store.aclose()

    async def test_a_stale_epoch_changes_nothing(self, store_url: str) -> None:
        """After another worker adopts a job, the first worker's write under its old epoch
        raises WorkerFenced and leaves the job as the new holder has it."""
        store = await self._ready(store_url, "a")
        claim = await self._claim(store)
        assert claim.job is not None
        await store.transition("r", "a", JobState.SUBMITTED, now=4.0, event="job.submitted",
                               epoch=claim.job.claim_epoch, task_id="t1")
        await store.register_worker("w2", runs=None, now=4.0)
        await store.retire_worker("w1", state="stopped", reason=None, now=5.0)
        (taken,) = await store.adopt("r", worker_id="w2", states=[JobState.SUBMITTED],
                                     released=False)
        assert taken.claim_epoch == claim.job.claim_epoch + 1 and taken.worker_id == "w2"
        with pytest.raises(WorkerFenced):
            await store.transition("r", "a", JobState.FAILED, now=6.0, event="job.failed",
                                   epoch=claim.job.claim_epoch, error_message="stale")
        job = await store.get_job("r", "a")
        assert job is not None and (job.state, job.worker_id) == (JobState.SUBMITTED, "w2")
        await store.aclose()

    async def test_a_stopped_run_no_one_drives_holds_no_slots(self, store_url: str) -> None:
        """Tasks an interrupted run left in flight hold the account's slots while the run is
        open or a live worker drives them, not after it stopped with nobody driving it."""
        store = await self._ready(store_url, "a", "b")
        await self._claim(store)
        assert (await store.get_account("acct")).in_flight == 1  # type: ignore[union-attr]
        await store.retire_worker("w1", state="stopped", reason=None, now=4.0)
        assert (await store.get_account("acct")).in_flight == 1  # type: ignore[union-attr]
        await store.set_run_state("r", "interrupted", "interrupted", 5.0)
        assert (await store.get_account("acct")).in_flight == 0  # type: ignore[union-attr]
        await store.aclose()


class TestWorkersAndClaims:
    """Cooperating workers on one store (DESIGN.md §10): claims and their outcomes, takeover,
    fencing, liveness on the store's clock, and the run's end — on both backends, with the
    store's clock injected (``StepClock``)."""

    @staticmethod
    async def _crew(location: str | Path, clock: StepClock, *ids: str, slots: int = 2,
                    workers: tuple[str, ...] = ("w1",)) -> Store:
        store = store_from(location, clock=clock)
        await store.open()
        await store.save_run("r", manifest_path=None, manifest_text=None, config_json="{}",
                             provider="imarouter", base_url="http://x", simulated=False,
                             now=1.0)
        await store.sync_jobs("r", added=[(i, _spec(j)) for i, j in enumerate(ids)],
                              changed=[], reordered=[], removed=[], now=1.0)
        await store.ensure_account("acc", provider="imarouter", max_in_flight=slots, now=1.0)
        for worker in workers:
            await store.register_worker(worker, runs=None, now=1.0)
        return store

    @staticmethod
    async def _claim(store: Store, worker: str = "w1", *, cap: int = 10, price: float = 0.5,
                     max_usd: float | None = None, credit: int = 0) -> Claim:
        def intent(job: JobRow) -> Intent:
            number = job.attempt + 1
            return Intent(new_attempt=(number, f"{job.job_id}-{number}"), reserved_usd=price)

        return await store.claim("r", worker_id=worker, account_id="acc", slot_cap=cap,
                                 intent=intent, max_usd=max_usd, now=5.0, credit=credit)

    async def test_held_by_workers_counts_each_workers_jobs_by_state(
            self, store_url: str) -> None:
        """held_by_workers (status's list of workers): the jobs each worker drives, by state;
        pending jobs nobody holds are not counted."""
        store = await self._crew(store_url, StepClock(), "a", "b", "c", slots=5,
                                 workers=("w1", "w2"))
        try:
            assert await store.held_by_workers() == {}
            await self._claim(store, "w1")
            await self._claim(store, "w1")
            await self._claim(store, "w2")
            assert await store.held_by_workers() == {"w1": {"submitting": 2},
                                                     "w2": {"submitting": 1}}
        finally:
            await store.aclose()

    async def test_a_claim_is_the_create_intent(self, store_url: str) -> None:
        """CLAIMED: the run's first pending job moves to submitting with its new attempt and
        key, this worker, the account, a new claim epoch and its reservation, in one go."""
        store = await self._crew(store_url, StepClock(), "a", "b")
        try:
            claim = await self._claim(store, price=0.35)
            assert claim.outcome is ClaimOutcome.CLAIMED and claim.job is not None
            job = claim.job
            assert (job.job_id, job.state, job.attempt, job.idempotency_key) == (
                "a", JobState.SUBMITTING, 1, "a-1")
            assert (job.worker_id, job.account_id, job.claim_epoch) == ("w1", "acc", 1)
            assert job.reserved_usd == pytest.approx(0.35)
            assert await store.get_job("r", "a") == job
            assert [(a["number"], a["idempotency_key"], a["state"])
                    for a in await store.attempts("r", "a")] == [(1, "a-1", "submitting")]
            assert await store.money("r") == pytest.approx((0.0, 0.35))
            account = await store.get_account("acc")
            assert account is not None and account.in_flight == 1
            assert await store.integrity_check() == "ok"
        finally:
            await store.aclose()

    async def test_outcomes_that_take_nothing(self, store_url: str) -> None:
        """NO_SLOT when the account's slots (or the caller's cap) are held, PAUSED while a
        Retry-After runs on the store's clock, BUDGET when the reservation would pass the cap,
        CLOSED once the run is not open, EMPTY with no pending job; none changes a job."""
        clock = StepClock()
        store = await self._crew(store_url, clock, "a", "b", "c", "d", slots=2)
        try:
            assert (await self._claim(store)).outcome is ClaimOutcome.CLAIMED
            no_slot = await self._claim(store, cap=1)
            assert (no_slot.outcome, no_slot.in_flight, no_slot.slot_limit) == (
                ClaimOutcome.NO_SLOT, 1, 1)
            assert (await self._claim(store)).outcome is ClaimOutcome.CLAIMED
            assert (await self._claim(store)).outcome is ClaimOutcome.NO_SLOT
            await store.transition("r", "a", JobState.DOWNLOADED, now=6.0, event="e",
                                   reserved_usd=0, cost_usd=0.5)
            await store.pause_account("acc", 10.0, now=6.0)
            paused = await self._claim(store)
            assert paused.outcome is ClaimOutcome.PAUSED
            assert paused.wait == pytest.approx(10.0)
            clock.now += 10.5
            budget = await self._claim(store, price=0.6, max_usd=1.5)
            assert budget.outcome is ClaimOutcome.BUDGET
            assert (budget.price, budget.committed_usd) == pytest.approx((0.6, 1.0))
            await store.set_run_state("r", "stopped", "budget", now=7.0)
            assert (await self._claim(store)).outcome is ClaimOutcome.CLOSED
            assert await store.counts("r") == {JobState.DOWNLOADED: 1, JobState.SUBMITTING: 1,
                                               JobState.PENDING: 2}
            await store.set_run_state("r", "running", None, now=8.0)
            await store.sync_jobs("r", added=[], changed=[], reordered=[],
                                  removed=["c", "d"], now=8.0)
            assert (await self._claim(store)).outcome is ClaimOutcome.EMPTY
            assert await store.money("r") == pytest.approx((0.5, 1.0))
        finally:
            await store.aclose()

    async def test_a_credit_frees_the_slots_of_tasks_known_ended(self, store_url: str) -> None:
        """A worker's credit (its own tasks the store still counts in flight but it knows have
        ended) frees that many slots for the claim, and no more; the claim still reports the
        store's count, and a refused claim changes nothing."""
        store = await self._crew(store_url, StepClock(), "a", "b", "c", "d", slots=2)
        try:
            assert (await self._claim(store)).outcome is ClaimOutcome.CLAIMED
            assert (await self._claim(store)).outcome is ClaimOutcome.CLAIMED
            refused = await self._claim(store)
            assert (refused.outcome, refused.in_flight, refused.slot_limit) == (
                ClaimOutcome.NO_SLOT, 2, 2)
            credited = await self._claim(store, credit=1)
            assert credited.outcome is ClaimOutcome.CLAIMED and credited.job is not None
            assert (credited.job.job_id, credited.in_flight, credited.slot_limit) == ("c", 2, 2)
            again = await self._claim(store, credit=1)  # the credit covers one task only
            assert (again.outcome, again.in_flight) == (ClaimOutcome.NO_SLOT, 3)
            assert await store.counts("r") == {JobState.SUBMITTING: 3, JobState.PENDING: 1}
            account = await store.get_account("acc")
            assert account is not None and account.in_flight == 3
        finally:
            await store.aclose()

    async def test_a_credit_is_held_between_zero_and_the_count(self, store_url: str) -> None:
        """A negative credit counts as none. A credit larger than the account's tasks in flight
        takes the count to zero, never below: claims pass while the count less the credit
        (at most the count) is below the limit, so a credit of 3 on a 2-slot account lets 5
        tasks be in flight, and a cap of 0 still refuses whatever the credit."""
        store = await self._crew(store_url, StepClock(), *"abcdefg", slots=2)
        try:
            assert (await self._claim(store)).outcome is ClaimOutcome.CLAIMED
            assert (await self._claim(store, credit=-5)).outcome is ClaimOutcome.CLAIMED
            assert (await self._claim(store, credit=-5)).outcome is ClaimOutcome.NO_SLOT
            taken = [await self._claim(store, credit=3) for _ in range(4)]
            assert [(c.outcome, c.in_flight) for c in taken] == [
                (ClaimOutcome.CLAIMED, 2), (ClaimOutcome.CLAIMED, 3),
                (ClaimOutcome.CLAIMED, 4), (ClaimOutcome.NO_SLOT, 5)]
            capped = await self._claim(store, cap=0, credit=10)
            assert (capped.outcome, capped.in_flight, capped.slot_limit) == (
                ClaimOutcome.NO_SLOT, 5, 0)
            assert await store.counts("r") == {JobState.SUBMITTING: 5, JobState.PENDING: 2}
        finally:
            await store.aclose()

    async def test_a_write_under_an_old_epoch_changes_nothing(self, store_url: str) -> None:
        """Once another worker adopted a job (its epoch moved on), a transition under the old
        epoch raises WorkerFenced and leaves the job, its attempt and its events as they
        were."""
        store = await self._crew(store_url, StepClock(), "a", workers=("w1", "w2"))
        try:
            claim = await self._claim(store)
            assert claim.job is not None and claim.job.claim_epoch == 1
            await store.retire_worker("w1", state="stopped", reason=None, now=6.0)
            (adopted,) = await store.adopt("r", worker_id="w2", states=[JobState.SUBMITTING],
                                           released=False)
            assert (adopted.worker_id, adopted.claim_epoch) == ("w2", 2)
            events = len(db_query(store_url, "SELECT id FROM events"))
            with pytest.raises(WorkerFenced, match="presumed dead"):
                await store.transition("r", "a", JobState.SUBMITTED, now=7.0, event="late",
                                       epoch=1, task_id="t-late")
            assert await store.get_job("r", "a") == adopted
            assert [a["task_id"] for a in await store.attempts("r", "a")] == [None]
            assert len(db_query(store_url, "SELECT id FROM events")) == events
            await store.transition("r", "a", JobState.SUBMITTED, now=7.0, event="ok", epoch=2,
                                   task_id="t-2")
            job = await store.get_job("r", "a")
            assert job is not None and job.task_id == "t-2"
        finally:
            await store.aclose()

    async def test_adopt_takes_orphans_and_released_jobs_only_when_asked(
            self, store_url: str) -> None:
        """adopt takes jobs whose worker is dead or stopped; jobs no worker holds (let go) only
        with ``released``; never a live worker's."""
        store = await self._crew(store_url, StepClock(), "a", "b", "c",
                                 workers=("w1", "w2", "w3"))
        try:
            for worker in ("w1", "w2"):
                assert (await self._claim(store, worker)).outcome is ClaimOutcome.CLAIMED
            await store.transition("r", "c", JobState.TIMED_OUT, now=6.0, event="e",
                                   worker_id=None)
            await store.retire_worker("w1", state="stopped", reason=None, now=6.0)
            states = [JobState.SUBMITTING, JobState.TIMED_OUT]
            assert await store.work_left("r") == (0, 1)
            assert await store.held_elsewhere("r", "w3") == 1  # w2's
            taken = await store.adopt("r", worker_id="w3", states=states, released=False)
            assert [(j.job_id, j.worker_id, j.claim_epoch) for j in taken] == [("a", "w3", 2)]
            taken = await store.adopt("r", worker_id="w3", states=states, released=True)
            assert [(j.job_id, j.worker_id, j.claim_epoch) for j in taken] == [("c", "w3", 1)]
            assert await store.adopt("r", worker_id="w3", states=states, released=True) == []
            assert await store.work_left("r") == (0, 0)
            assert await store.held_elsewhere("r", "w3") == 1
        finally:
            await store.aclose()

    async def test_reap_marks_silent_and_vanished_workers_dead(self, store_url: str) -> None:
        """A worker silent past stale-after on the store's clock, or whose process on this
        host is gone, is reaped (and fenced); one that beat in time is not; a dead worker's
        claim is refused with nothing changed."""
        clock = StepClock()
        store = await self._crew(store_url, clock, "a", workers=("w1", "w2", "w3"))
        try:
            db_query(store_url, "UPDATE workers SET pid = 2147483000 WHERE worker_id = 'w3'")
            clock.now += 20
            await store.worker_heartbeat("w2", now=2.0)
            assert await store.reap_workers(30.0, now=2.0) == ["w3"]
            clock.now += 15  # w1 silent 35 s, w2 15 s
            assert await store.reap_workers(30.0, now=3.0) == ["w1"]
            alive = [w.worker_id for w in await store.list_workers()]
            assert alive == ["w2"]
            everyone = {w.worker_id: w for w in await store.list_workers(alive_only=False)}
            assert everyone["w1"].state == "dead" and everyone["w1"].silent_for == 35.0
            assert everyone["w2"].silent_for == 15.0
            with pytest.raises(WorkerFenced):
                await store.worker_heartbeat("w1", now=4.0)
            with pytest.raises(WorkerFenced):
                await self._claim(store, "w1")
            assert await store.counts("r") == {JobState.PENDING: 1}
        finally:
            await store.aclose()

    async def test_close_run_only_when_nothing_is_left(self, store_url: str) -> None:
        """A worker ends an open run only when no job is pending or driven by a live worker
        and no live worker holds its lease."""
        store = await self._crew(store_url, StepClock(), "a", workers=("w1", "w2"))
        try:
            assert await store.close_run("r", "finished", None, now=6.0) is False  # pending
            assert (await self._claim(store)).outcome is ClaimOutcome.CLAIMED
            assert await store.close_run("r", "finished", None, now=6.0) is False  # w1 drives
            await store.transition("r", "a", JobState.DOWNLOADED, now=7.0, event="e",
                                   worker_id=None)
            await store.acquire_lease("r", "w2", stale_after=30.0, now=7.0)
            assert await store.close_run("r", "finished", None, now=7.0) is False  # w2's lease
            await store.release_lease("r", "w2")
            assert await store.close_run("r", "finished", "done", now=8.0) is True
            run = await store.require_run("r")
            assert (run.state, run.stop_reason) == ("finished", "done")
            assert await store.close_run("r", "finished", None, now=9.0) is False  # not open
        finally:
            await store.aclose()

    async def test_account_limits_are_shared(self, store_url: str) -> None:
        """A slot rejection lowers the shared limit (never below 1, never up); two rounds of
        creates probe one more slot, up to the configured maximum; ensure_account keeps a
        lowered limit."""
        store = await self._crew(store_url, StepClock(), slots=4)
        try:
            assert await store.account_rejected("acc", limit=2, now=2.0) == 2
            assert await store.account_rejected("acc", limit=3, now=2.0) == 2
            assert [await store.account_created("acc", now=3.0) for _ in range(4)] == [
                2, 2, 2, 3]
            again = await store.ensure_account("acc", provider="imarouter", max_in_flight=4,
                                               now=4.0)
            assert (again.max_in_flight, again.slot_limit, again.in_flight) == (4, 3, 0)
            assert await store.account_rejected("acc", limit=0, now=5.0) == 1
            # A refused probe holds the next one off: three more creates than usual first.
            assert await store.account_rejected("acc", limit=1, now=6.0, hold_off=3) == 1
            assert [await store.account_created("acc", now=7.0) for _ in range(5)] == [
                1, 1, 1, 1, 2]
        finally:
            await store.aclose()
