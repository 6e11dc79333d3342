"""What is PostgreSQL's own in the store: URLs without passwords, connection errors, the schema
created once under a lock, the lease on the database's clock, the two commit paths, one round
trip per transition, and its consistency checks. (The behaviour both backends share is tested
on both in tests/test_store.py and the engine, fault and kill tests.)"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import anyio
import pytest
from invariants import db_query
from pgcluster import PgCluster, RoundTrips, count_round_trips
from test_store import _spec, _store_with_jobs

from batchkling.errors import ConfigError, RunLocked, StoreError, StoreRefused
from batchkling.models import JobState
from batchkling.store import store_exists, store_from
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


class TestLease:
    async def test_the_database_clock_decides_not_the_callers(self, pg_url: str) -> None:
        """A runner whose clock is a day ahead cannot take a live lease by calling it old, and
        the heartbeat it writes is the database's time, not its own."""
        store = await _store_with_jobs(pg_url)
        try:
            await store.acquire_lease("r", "owner-a", now=0.0, stale_after=30)
            with pytest.raises(RunLocked, match="last heartbeat 0s ago"):
                await store.acquire_lease("r", "owner-b", now=time.time() + 86_400,
                                          stale_after=30)
            await store.heartbeat("r", "owner-a", now=0.0)
            run = await store.require_run("r")
            assert run.lease_heartbeat is not None
            assert abs(run.lease_heartbeat - time.time()) < 60
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
