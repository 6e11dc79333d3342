"""Self-test of the throwaway PostgreSQL cluster fixtures in ``pgcluster``."""

from __future__ import annotations

import psycopg

# The redundant aliases mark the fixtures as deliberate re-exports, so linters do not
# flag them as unused imports shadowed by the test parameters that request them.
from pgcluster import PgCluster
from pgcluster import pg_cluster as pg_cluster
from pgcluster import pg_url as pg_url


async def test_fresh_database_is_empty_and_usable_async(pg_url: str) -> None:
    """A new database has no tables and accepts writes through psycopg's async API."""
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        )
        assert await cur.fetchone() == (0,)
        await conn.execute("CREATE TABLE t (x int)")
        await conn.execute("INSERT INTO t VALUES (42)")
        cur = await conn.execute("SELECT x FROM t")
        assert await cur.fetchall() == [(42,)]


async def test_each_test_gets_its_own_database(pg_cluster: PgCluster, pg_url: str) -> None:
    """pg_url is a database of its own: tables made there are not in another fresh one."""
    other = pg_cluster.create_database("test_pgcluster_other")
    try:
        assert other != pg_url
        async with await psycopg.AsyncConnection.connect(pg_url) as a:
            await a.execute("CREATE TABLE only_here (x int)")
        async with await psycopg.AsyncConnection.connect(other) as b:
            cur = await b.execute("SELECT to_regclass('only_here')")
            assert await cur.fetchone() == (None,)
    finally:
        pg_cluster.drop_database("test_pgcluster_other")


async def test_skip_locked_skips_rows_locked_by_another_connection(pg_url: str) -> None:
    """FOR UPDATE SKIP LOCKED in one session passes over a row another session holds."""
    async with (
        await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as setup,
        await psycopg.AsyncConnection.connect(pg_url) as first,
        await psycopg.AsyncConnection.connect(pg_url) as second,
    ):
        await setup.execute("CREATE TABLE q (id int PRIMARY KEY)")
        await setup.execute("INSERT INTO q VALUES (1), (2)")
        claim = "SELECT id FROM q ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
        assert await (await first.execute(claim)).fetchone() == (1,)
        assert await (await second.execute(claim)).fetchone() == (2,)
