"""What is PostgreSQL's own in the store: URLs without passwords, connection errors, the schema
created once under a lock, liveness on the database's clock, the two commit paths, one round
trip per transition and two per claim, claims racing from many connections, and its
consistency checks. (The behaviour both backends share is tested
on both in tests/test_store.py and the engine, fault and kill tests.)"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import psycopg
import pytest
from invariants import db_query
from pgcluster import PgCluster, RoundTrips, count_round_trips
from test_store import _spec, _store_with_jobs

from batchkling.errors import ConfigError, RunLocked, StoreError, StoreRefused, WorkerFenced
from batchkling.models import JobState
from batchkling.store import JobRow, store_exists, store_from
from batchkling.store.interface import SLOT_STATES, Claim, ClaimOutcome, Intent
from batchkling.store.postgres import PostgresStore, redact_url

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TestLocation:
    @pytest.mark.parametrize(("url", "shown"), [
        ("postgresql://bk:s3cret-pw@db.example:5432/jobs",
         "postgresql://bk@db.example:5432/jobs"),
        ("postgres://bk:s3cret-pw@h1:5432,h2:5433/jobs?sslmode=require",
         "postgres://bk@h1:5432,h2:5433/jobs?sslmode=require"),
        ("postgresql://bk@db/jobs?password=s3cret-pw&application_name=x",
         "postgresql://bk@db/jobs?application_name=x"),
        ("postgresql:///jobs", "postgresql:///jobs"),
    ])
    def test_the_password_is_never_part_of_the_location(self, url: str, shown: str) -> None:
        """The location messages, status and logs use has no password, wherever the URL
        carried it; everything else that says where the store is stays."""
        assert redact_url(url) == shown
        assert PostgresStore(url).location == shown
        assert "s3cret" not in store_from(url).location

    def test_a_malformed_url_is_bad_input(self) -> None:
        """A URL libpq cannot parse is a ConfigError (exit 2) that does not repeat the
        password."""
        with pytest.raises(ConfigError, match="not a valid PostgreSQL URL") as caught:
            store_from("postgresql://bk:s3cret-pw@db/jobs?sslmode=require&bogus_option=1")
        assert "s3cret" not in str(caught.value)


class TestConnecting:
    async def test_a_server_that_is_not_there(self) -> None:
        """Connection refused: a StoreError naming host, port and database, not the
        password, and not StoreRefused (the server may come back: exit 3, not 2)."""
        url = f"postgresql://bk:s3cret-pw@127.0.0.1:{_free_port()}/jobs"
        store = PostgresStore(url)
        with pytest.raises(StoreError) as caught:
            await store.open()
        message = str(caught.value)
        assert not isinstance(caught.value, StoreRefused)
        assert "cannot reach the PostgreSQL store postgresql://bk@127.0.0.1:" in message
        assert "/jobs" in message and "s3cret" not in message
        await store.aclose()

    async def test_a_database_that_does_not_exist(self, pg_cluster: PgCluster) -> None:
        """An unknown database is a setup to fix: StoreRefused, saying so."""
        url = pg_cluster.url("no_such_db").replace("postgres@", "postgres:s3cret-pw@")
        with pytest.raises(StoreRefused, match="has no such database") as caught:
            await PostgresStore(url).open()
        assert "s3cret" not in str(caught.value)
        assert "no_such_db" in str(caught.value)

    async def test_exists_does_not_create_the_schema(self, pg_url: str) -> None:
        """Asking whether a database holds a store leaves an empty database empty."""
        assert await store_exists(pg_url) is False
        assert db_query(pg_url, "SELECT to_regclass('meta')") == [(None,)]
        async with store_from(pg_url):
            pass
        assert await store_exists(pg_url) is True


#: Every signature of the claim functions (schema 4's, and schema 3's kept as wrappers).
_DROP_CLAIMS = (
    " DROP FUNCTION batchkling_claim_pick(text, text, text, integer, double precision, text[],"
    " integer), batchkling_claim_pick(text, text, text, integer, double precision, text[],"
    " integer, integer), batchkling_claim_take(text, text, text, integer, double precision,"
    " double precision, double precision, double precision, double precision, text[]),"
    " batchkling_claim_take(text, text, text, integer, double precision, double precision,"
    " double precision, double precision, double precision, text[], integer);"
)
#: What schema 3 added to schema 2 (workers, accounts, claims, money totals, the object-store
#: columns), taken away again.
_V3_ONLY = (
    "DROP TRIGGER job_reserved ON jobs; DROP TRIGGER attempt_cost ON attempts;"
    " DROP TRIGGER attempt_cost_new ON attempts;"
    " DROP FUNCTION batchkling_job_reserved(); DROP FUNCTION batchkling_attempt_cost();"
    + _DROP_CLAIMS +
    " DROP FUNCTION batchkling_in_flight;"
    " DROP INDEX jobs_by_account; DROP INDEX jobs_by_worker; DROP INDEX jobs_by_seq;"
    " DROP TABLE accounts; DROP TABLE workers;"
    " ALTER TABLE jobs DROP COLUMN account_id, DROP COLUMN worker_id, DROP COLUMN claim_epoch,"
    " DROP COLUMN video_uri, DROP COLUMN video_etag;"
    " ALTER TABLE attempts DROP COLUMN video_uri, DROP COLUMN video_size,"
    " DROP COLUMN video_sha256, DROP COLUMN video_etag;"
    " ALTER TABLE runs DROP COLUMN reserved_usd, DROP COLUMN spent_usd,"
    " DROP COLUMN reserved_units, DROP COLUMN spent_units,"
    " ADD COLUMN lease_pid integer, ADD COLUMN lease_host text,"
    " ADD COLUMN lease_heartbeat double precision;"
)
#: What schema 2 added to schema 1 (money in units, price groups, reuse, observed prices).
_V2_ONLY = (
    " DROP INDEX jobs_by_fingerprint; DROP TABLE prices;"
    " ALTER TABLE jobs DROP COLUMN reserved_units, DROP COLUMN price_group,"
    " DROP COLUMN reused_from;"
)

#: Schema 3's claim functions, which took no credit (tests/fixtures).
_V3_CLAIMS = (Path(__file__).parent / "fixtures" / "postgres_schema3_claims.sql").read_text()
#: The claim functions in the catalog: each name with its number of arguments.
_CLAIM_FUNCTIONS = ("SELECT proname, pronargs FROM pg_proc WHERE proname IN"
                    " ('batchkling_claim_pick', 'batchkling_claim_take')"
                    " ORDER BY proname, pronargs")
#: What schema 4 has them take: a credit besides schema 3's arguments; and, from schema 5,
#: schema 3's signatures again, as wrappers for workers of an earlier release.
_V5_CLAIM_FUNCTIONS = [("batchkling_claim_pick", 7), ("batchkling_claim_pick", 8),
                       ("batchkling_claim_take", 10), ("batchkling_claim_take", 11)]
#: A claim as a worker of the schema-3 release makes it (its two calls, in one transaction).
_V3_CLAIM_CALLS = (
    "SELECT job_id FROM batchkling_claim_pick(%(worker)s, %(account)s, %(run)s, %(cap)s,"
    " %(clock)s, %(slot_states)s, %(idle_ms)s)",
    "SELECT outcome, in_flight FROM batchkling_claim_take(%(worker)s, %(account)s, %(run)s,"
    " %(cap)s, NULL, 0.5, NULL, 0, %(clock)s, %(slot_states)s)",
)


class TestSchema:
    async def test_workers_opening_a_new_database_at_once_do_not_race(
            self, pg_url: str) -> None:
        """Eight stores opening the same empty database together all succeed: the schema is
        made once, under the advisory lock, and recorded at this version."""
        stores = [PostgresStore(pg_url, pool_size=1, quick_pool_size=1) for _ in range(8)]
        try:
            async with anyio.create_task_group() as tg:
                for store in stores:
                    tg.start_soon(store.open)
        finally:
            for store in stores:
                await store.aclose()
        from batchkling.store.postgres_schema import SCHEMA_VERSION

        assert db_query(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [
            (str(SCHEMA_VERSION),)]

    @pytest.mark.parametrize("version", [1, 2])
    async def test_an_older_database_is_migrated(self, pg_url: str, version: int) -> None:
        """A schema-1 or -2 store (runs with their own lease columns; no accounts, workers,
        claims, money totals or object-store columns; schema 1 also no money in units, price
        groups or reuse) is upgraded in place: its money is summed into the run's totals, the
        new triggers keep them, and claims work."""
        store = await _store_with_jobs(pg_url, "a", "b")
        await store.aclose()
        db_query(pg_url, _V3_ONLY + (_V2_ONLY if version == 1 else "")
                 + f" UPDATE meta SET value = '{version}' WHERE key = 'schema_version';"
                 " INSERT INTO attempts (run_id, job_id, number, idempotency_key, fingerprint,"
                 " state, cost_usd, cost_units) VALUES ('r', 'a', 1, 'k', 'f', 'downloaded',"
                 " 0.35, 2.5);"
                 " UPDATE jobs SET attempt = 1, state = 'downloaded' WHERE job_id = 'a';"
                 " UPDATE jobs SET reserved_usd = 0.7 WHERE job_id = 'b';"
                 " UPDATE runs SET lease_owner = 'old-runner', lease_pid = 1, lease_host = 'h',"
                 " lease_heartbeat = 1")
        async with PostgresStore(pg_url) as upgraded:
            assert await upgraded.money("r") == pytest.approx((0.35, 1.05))
            assert await upgraded.money_units("r") == pytest.approx((2.5, 2.5))
            await upgraded.register_worker("w", runs=None, now=2.0)
            await upgraded.acquire_lease("r", "w", stale_after=30, now=2.0)  # no live holder
            await upgraded.transition("r", "b", JobState.PENDING, now=2.0, event="e",
                                      reserved_usd=0)
            await upgraded.ensure_account("acc", provider="imarouter", max_in_flight=2, now=2.0)
            claim = await upgraded.claim("r", worker_id="w", account_id="acc", slot_cap=2,
                                         intent=TestClaimRaces._intent(0.5), max_usd=None,
                                         now=3.0)
            assert claim.outcome is ClaimOutcome.CLAIMED
            await upgraded.transition("r", "b", JobState.DOWNLOADED, now=4.0, event="e",
                                      reserved_usd=0, cost_usd=0.4, video_uri="s3://b/r/b.mp4")
            assert await upgraded.money("r") == pytest.approx((0.75, 0.75))
            assert [a["video_uri"] for a in await upgraded.attempts("r", "b")] == [
                "s3://b/r/b.mp4"]
            assert await upgraded.integrity_check() == "ok"
        from batchkling.store.postgres_schema import SCHEMA_VERSION

        assert db_query(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [
            (str(SCHEMA_VERSION),)]
        assert db_query(pg_url, _CLAIM_FUNCTIONS) == _V5_CLAIM_FUNCTIONS

    async def test_a_schema_3_database_is_migrated(self, pg_url: str) -> None:
        """A schema-3 store, whose claim functions take no credit, is upgraded in place: a
        claim with a credit works, and a worker of the schema-3 release that was running
        meanwhile still claims through the old signatures (now wrappers of the new functions,
        with no credit), within the account's slots."""
        store = await _store_with_jobs(pg_url, "a", "b", "c")
        await store.aclose()
        db_query(pg_url, _DROP_CLAIMS + _V3_CLAIMS
                 + " UPDATE meta SET value = '3' WHERE key = 'schema_version';")
        assert db_query(pg_url, _CLAIM_FUNCTIONS) == [("batchkling_claim_pick", 7),
                                                      ("batchkling_claim_take", 10)]
        async with PostgresStore(pg_url) as upgraded:
            await upgraded.register_worker("w", runs=None, now=2.0)
            await upgraded.ensure_account("acc", provider="imarouter", max_in_flight=1, now=2.0)

            async def claim(credit: int) -> Claim:
                return await upgraded.claim("r", worker_id="w", account_id="acc", slot_cap=1,
                                            intent=TestClaimRaces._intent(0.5), max_usd=None,
                                            now=3.0, credit=credit)

            assert (await claim(0)).outcome is ClaimOutcome.CLAIMED
            assert (await claim(0)).outcome is ClaimOutcome.NO_SLOT
            credited = await claim(1)
            assert (credited.outcome, credited.in_flight) == (ClaimOutcome.CLAIMED, 1)
            assert (await claim(1)).outcome is ClaimOutcome.NO_SLOT
            assert await upgraded.integrity_check() == "ok"
        assert db_query(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [
            ("5",)]
        assert db_query(pg_url, _CLAIM_FUNCTIONS) == _V5_CLAIM_FUNCTIONS

        # The old worker's claims: its call resolves, and the slot check is the new one's.
        async with PostgresStore(pg_url) as store:
            await store.register_worker("old", runs=None, now=2.0)
        params = {"worker": "old", "account": "acc", "run": "r", "cap": 5, "clock": 3.0,
                  "slot_states": [state.value for state in SLOT_STATES], "idle_ms": 5000}

        def old_claim() -> tuple[object, ...]:
            with psycopg.connect(pg_url) as conn:
                pick, take = (conn.execute(sql, params).fetchone() for sql in _V3_CLAIM_CALLS)
                assert pick is not None and take is not None
                return pick[0], take[0], take[1]

        assert old_claim() == (None, "no_slot", 2)  # the account's one slot is taken
        db_query(pg_url, "UPDATE accounts SET slot_limit = 3 WHERE account_id = 'acc'")
        assert old_claim() == ("c", "claimed", 2)

    async def test_integrity_check_names_what_is_wrong(self, pg_url: str) -> None:
        """A sound store is ``ok``; a job in no known state, or whose attempt has no row, is
        reported by name."""
        store = await _store_with_jobs(pg_url, "a", "b")
        try:
            await store.transition("r", "a", JobState.SUBMITTING, now=2.0, event="e",
                                   new_attempt=(1, "k1"))
            assert await store.integrity_check() == "ok"
            db_query(pg_url, "UPDATE jobs SET state = 'lost' WHERE job_id = 'a'")
            db_query(pg_url, "UPDATE jobs SET attempt = 3 WHERE job_id = 'b'")
            verdict = await store.integrity_check()
            assert "1 jobs in no known state" in verdict
            assert "1 jobs whose current attempt has no row" in verdict
        finally:
            await store.aclose()


class TestLiveness:
    async def test_the_database_clock_decides_not_the_callers(self, pg_url: str) -> None:
        """A worker whose clock is a day ahead cannot take a live lease by calling it old; a
        heartbeat is stamped with the database's time, whatever the caller's ``now``."""
        store = await _store_with_jobs(pg_url)
        try:
            for worker in ("worker-a", "worker-b"):
                await store.register_worker(worker, runs=["r"], now=0.0)
            await store.acquire_lease("r", "worker-a", now=0.0, stale_after=30)
            with pytest.raises(RunLocked, match="last heartbeat 0s ago"):
                await store.acquire_lease("r", "worker-b", now=time.time() + 86_400,
                                          stale_after=30)
            await store.worker_heartbeat("worker-a", now=0.0)
            ((beat,),) = db_query(pg_url, "SELECT beat FROM workers WHERE worker_id = 'worker-a'")
            assert abs(beat - time.time()) < 60
            assert [w.silent_for < 5 for w in await store.list_workers()] == [True, True]
        finally:
            await store.aclose()

    async def test_silence_is_measured_on_the_database_clock(self, pg_url: str) -> None:
        """A worker whose last beat is older than stale-after on the server's clock is reaped
        and its lease taken over, whatever its own wall-clock heartbeat says."""
        store = await _store_with_jobs(pg_url)
        try:
            for worker in ("worker-a", "worker-b"):
                await store.register_worker(worker, runs=["r"], now=time.time())
            await store.acquire_lease("r", "worker-a", now=0.0, stale_after=30)
            db_query(pg_url, "UPDATE workers SET beat = beat - 31, heartbeat_at = %s"
                     " WHERE worker_id = 'worker-a'" % (time.time() + 3600))
            await store.acquire_lease("r", "worker-b", now=0.0, stale_after=30)
            assert (await store.require_run("r")).lease_owner == "worker-b"
            with pytest.raises(WorkerFenced):
                await store.worker_heartbeat("worker-a", now=time.time())
            db_query(pg_url, "UPDATE workers SET beat = beat - 31 WHERE worker_id = 'worker-b'")
            assert await store.reap_workers(30.0, now=0.0) == ["worker-b"]
        finally:
            await store.aclose()


@pytest.fixture
def round_trips() -> Iterator[RoundTrips]:
    with count_round_trips() as counter:
        yield counter


class TestCommits:
    @pytest.mark.parametrize("quick", [False, True])
    async def test_a_transition_is_one_round_trip(self, pg_url: str, quick: bool,
                                                  round_trips: RoundTrips) -> None:
        """A transition — the job's row, its attempt's row and its event — is one statement,
        one round trip, quick or durable; and all three rows are there after it."""
        store = await _store_with_jobs(pg_url, "a")
        try:
            round_trips.count = 0
            await store.transition("r", "a", JobState.SUBMITTING, now=2.0, event="e1",
                                   new_attempt=(1, "k1"), quick=quick)
            await store.transition("r", "a", JobState.SUBMITTED, now=3.0, event="e2",
                                   task_id="t1", quick=quick)
            assert round_trips.count == 2
        finally:
            await store.aclose()
        assert db_query(pg_url, "SELECT state, task_id FROM attempts") == [("submitted", "t1")]
        assert db_query(pg_url, "SELECT event FROM events WHERE job_id = 'a' ORDER BY id") == [
            ("e1",), ("e2",)]

    async def test_syncing_many_jobs_takes_a_few_round_trips(
            self, pg_url: str, round_trips: RoundTrips) -> None:
        """Recording a 2,000-job manifest, or resetting all of it for retry, is a handful of
        round trips, not one per job."""
        store = PostgresStore(pg_url)
        await store.open()
        try:
            await store.save_run("r", manifest_path=None, manifest_text=None,
                                 config_json="{}", provider="imarouter", base_url="http://x",
                                 simulated=False, now=1.0)
            round_trips.count = 0
            ids = [f"j{i:04d}" for i in range(2000)]
            await store.sync_jobs("r", added=[(i, _spec(j)) for i, j in enumerate(ids)],
                                  changed=[], reordered=[], removed=[], now=1.0)
            assert round_trips.count <= 3  # BEGIN, INSERT, COMMIT
            db_query(pg_url, "UPDATE jobs SET state = 'failed'")
            round_trips.count = 0
            assert await store.reset_for_retry("r", states=[JobState.FAILED], job_ids=[],
                                               now=2.0) == 2000
            assert round_trips.count == 1
        finally:
            await store.aclose()

    async def test_quick_commits_skip_the_flush_and_durable_ones_never_do(
            self, pg_url: str) -> None:
        """Quick commits run on sessions with synchronous_commit off; durable ones wait for the
        flush even on a server whose default is off (as this test cluster's is)."""
        assert db_query(pg_url, "SHOW synchronous_commit") == [("off",)]
        store = PostgresStore(pg_url)
        await store.open()
        try:
            for quick, expected in ((True, "off"), (False, "on")):
                async with store._connection(quick=quick) as conn:
                    cur = await conn.execute("SHOW synchronous_commit")
                    assert await cur.fetchone() == (expected,)
        finally:
            await store.aclose()


class TestClaimRaces:
    """Claims from many connections of several stores (as from several worker processes) on one
    database: the account's lock and SKIP LOCKED keep the slots and the budget whole."""

    @staticmethod
    async def _stores(pg_url: str, n: int, ids: list[str]) -> list[PostgresStore]:
        setup = await _store_with_jobs(pg_url, *ids)
        await setup.aclose()
        stores = [PostgresStore(pg_url, pool_size=8, quick_pool_size=1) for _ in range(n)]
        for i, store in enumerate(stores):
            await store.open()
            await store.register_worker(f"w{i}", runs=None, now=1.0)
        return stores

    @staticmethod
    def _intent(price: float) -> Callable[[JobRow], Intent]:
        def intent(job: JobRow) -> Intent:
            return Intent(new_attempt=(job.attempt + 1, f"{job.job_id}-k"), reserved_usd=price)

        return intent

    async def test_racing_workers_never_exceed_the_account_slots(self, pg_url: str) -> None:
        """Round after round, 4 stores x 8 claimers race for one 5-slot account until it is
        full: each round claims exactly the slots that were freed, never one more, and no job
        is claimed twice."""
        ids = [f"j{i:03d}" for i in range(120)]
        stores = await self._stores(pg_url, 4, ids)
        try:
            await stores[0].ensure_account("acc", provider="imarouter", max_in_flight=5,
                                           now=1.0)
            claimed: list[str] = []
            for _round in range(8):
                round_claims: list[str] = []

                async def claimer(store: PostgresStore, worker: str,
                                  round_claims: list[str]) -> None:
                    while True:
                        claim = await store.claim("r", worker_id=worker, account_id="acc",
                                                  slot_cap=100, intent=self._intent(0.0),
                                                  max_usd=None, now=2.0)
                        if claim.outcome is not ClaimOutcome.CLAIMED:
                            assert claim.outcome is ClaimOutcome.NO_SLOT
                            return
                        assert claim.job is not None
                        round_claims.append(claim.job.job_id)

                async with anyio.create_task_group() as tg:
                    for i, store in enumerate(stores):
                        for _ in range(8):
                            tg.start_soon(claimer, store, f"w{i}", round_claims)
                freed = 5 if _round == 0 else 3
                assert len(round_claims) == freed
                claimed += round_claims
                in_flight = db_query(pg_url, "SELECT job_id FROM jobs WHERE state = 'submitting'"
                                     " ORDER BY job_id")
                assert len(in_flight) == 5
                for (job_id,) in in_flight[:3]:  # three tasks end: three slots free
                    await stores[0].transition("r", job_id, JobState.DOWNLOADED, now=3.0,
                                               event="e")
            assert len(set(claimed)) == len(claimed) == 5 + 7 * 3
        finally:
            for store in stores:
                await store.aclose()

    async def test_the_budget_holds_across_workers(self, pg_url: str) -> None:
        """Two stores, 16 claimers at once on eight accounts of one run (plenty of slots), with
        budget.max_usd = 1.00 and $0.35 a job: committed never passes the cap — 2 jobs, $0.70
        — though all of them read the run's money before any commits (the run's row is held
        by another session while they start)."""
        stores = await self._stores(pg_url, 2, [f"j{i:02d}" for i in range(40)])
        try:
            accounts = [f"acc-{i}" for i in range(8)]
            for account in accounts:
                await stores[0].ensure_account(account, provider="imarouter",
                                               max_in_flight=50, now=1.0)
            outcomes: list[ClaimOutcome] = []

            async def claimer(store: PostgresStore, worker: str, account: str) -> None:
                while True:
                    claim = await store.claim("r", worker_id=worker, account_id=account,
                                              slot_cap=50, intent=self._intent(0.35),
                                              max_usd=1.0, now=2.0)
                    outcomes.append(claim.outcome)
                    if claim.outcome is not ClaimOutcome.CLAIMED:
                        assert claim.outcome is ClaimOutcome.BUDGET
                        assert claim.committed_usd + claim.price > 1.0
                        return

            blocker = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
            try:
                async with anyio.create_task_group() as tg:
                    await blocker.execute("BEGIN")
                    await blocker.execute("SELECT 1 FROM runs WHERE run_id = 'r' FOR UPDATE")
                    for i, store in enumerate(stores):
                        for account in accounts:
                            tg.start_soon(claimer, store, f"w{i}", account)
                    await anyio.sleep(0.5)  # every claimer has picked a job and waits
                    await blocker.execute("COMMIT")
            finally:
                await blocker.close()
            assert outcomes.count(ClaimOutcome.CLAIMED) == 2
            spent, committed = await stores[0].money("r")
            assert (spent, committed) == pytest.approx((0.0, 0.7))
            assert db_query(pg_url, "SELECT count(*) FROM jobs WHERE state = 'submitting'") == [
                (2,)]
            assert await stores[0].integrity_check() == "ok"
        finally:
            for store in stores:
                await store.aclose()


class TestClaimRoundTrips:
    async def test_a_claim_is_two_round_trips_whatever_its_outcome(
            self, pg_url: str, round_trips: RoundTrips) -> None:
        """A claim — the locking read, then the job's update and the commit (or a rollback) —
        is two round trips, claimed or not."""
        store = await _store_with_jobs(pg_url, "a", "b")
        try:
            await store.register_worker("w", runs=None, now=1.0)
            await store.ensure_account("acc", provider="imarouter", max_in_flight=1, now=1.0)
            for expected in (ClaimOutcome.CLAIMED, ClaimOutcome.NO_SLOT):
                round_trips.count = 0
                claim = await store.claim("r", worker_id="w", account_id="acc", slot_cap=5,
                                          intent=TestClaimRaces._intent(0.1), max_usd=1.0,
                                          now=2.0)
                assert claim.outcome is expected
                assert round_trips.count == 2
        finally:
            await store.aclose()


class TestPausedClaims:
    async def test_a_claim_paused_between_its_messages_holds_no_account(
            self, pg_url: str) -> None:
        """A claimer that stalls between its two messages (a paused process) holds only the
        job it picked: another process's claim on the account goes through at once with the
        next job; the server ends the stalled transaction after the idle limit, and the claim
        starts again and takes the job it had picked."""
        stores = await TestClaimRaces._stores(pg_url, 1, ["a", "b"])
        store = stores[0]
        try:
            await store.ensure_account("acc", provider="imarouter", max_in_flight=5, now=1.0)
            await store.register_worker("w1", runs=None, now=1.0)
            store.claim_idle_limit = 0.3
            stalled, ready = threading.Event(), threading.Event()
            calls: list[str] = []
            stall_ended: list[float] = []

            def slow_intent(job: JobRow) -> Intent:
                calls.append(job.job_id)
                if len(calls) == 1:
                    stalled.set()
                    time.sleep(3.0)  # the whole process stalls, as under SIGSTOP
                    stall_ended.append(time.monotonic())
                return TestClaimRaces._intent(0.1)(job)

            def other_process() -> tuple[Claim, float]:
                async def claim() -> tuple[Claim, float]:
                    async with PostgresStore(pg_url, pool_size=1, quick_pool_size=1) as other:
                        ready.set()
                        stalled.wait(30)
                        got = await other.claim("r", worker_id="w1", account_id="acc",
                                                slot_cap=5, intent=TestClaimRaces._intent(0.1),
                                                max_usd=None, now=2.0)
                        return got, time.monotonic()

                return asyncio.run(claim())

            others: list[tuple[Claim, float]] = []

            async def run_other() -> None:
                others.append(await anyio.to_thread.run_sync(other_process))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_other)
                await anyio.to_thread.run_sync(ready.wait, 30)
                first = await store.claim("r", worker_id="w0", account_id="acc", slot_cap=5,
                                          intent=slow_intent, max_usd=None, now=2.0)
            (second, second_at), = others
            assert second.outcome is ClaimOutcome.CLAIMED and second.job is not None
            assert second.job.job_id == "b" and second_at < stall_ended[0]
            assert calls == ["a", "a"]  # picked, its transaction ended, picked again
            assert first.outcome is ClaimOutcome.CLAIMED and first.job is not None
            assert first.job.job_id == "a"
        finally:
            await store.aclose()

    async def test_a_worker_reaped_during_its_claim_claims_nothing(self, pg_url: str) -> None:
        """A worker presumed dead between its claim's read and its update gets WorkerFenced,
        and the job stays pending for the others."""
        store = await _store_with_jobs(pg_url, "a")
        try:
            await store.register_worker("w", runs=None, now=1.0)
            await store.ensure_account("acc", provider="imarouter", max_in_flight=5, now=1.0)

            def reaped_meanwhile(job: JobRow) -> Intent:
                db_query(pg_url, "UPDATE workers SET state = 'dead' WHERE worker_id = 'w'")
                return TestClaimRaces._intent(0.1)(job)

            with pytest.raises(WorkerFenced):
                await store.claim("r", worker_id="w", account_id="acc", slot_cap=5,
                                  intent=reaped_meanwhile, max_usd=None, now=2.0)
            assert db_query(pg_url, "SELECT state, worker_id, claim_epoch FROM jobs") == [
                ("pending", None, 0)]
            assert await store.money("r") == (0.0, 0.0)
        finally:
            await store.aclose()
