"""The PostgreSQL backend of the checkpoint store: one database that many processes share.

Same rows, states, attempts and events as SQLite (:mod:`batchkling.store.sqlite`), through
psycopg 3 (async) and psycopg-pool. Every SQL statement of this backend is in this module and
its schema in :mod:`batchkling.store.postgres_schema`, in the manner of procrastinate's psycopg
connector: a new store method is one more statement here.

**One round trip per transition.** A job state change is one ``UPDATE`` of its ``jobs`` row on
an autocommit connection: a single statement, so a single transaction, and the schema's trigger
writes the attempt's row and the event inside it. Reads are one statement each; writes that
touch many jobs (a manifest sync, a retry reset) are set-based statements over arrays, a few
round trips whatever the number of jobs.

**Two ways to commit**, as on SQLite, from two pools of the same database:

- **durable** (the default): the server's ``synchronous_commit`` (its default ``on``, or what
  the operator chose, such as ``remote_apply``; ``off`` is raised to ``on`` for these
  connections): once the transition returns its WAL record is flushed, so it survives a server
  crash — what the create intent and the task-id commit need (DESIGN.md §4).
- **quick** (``transition(..., quick=True)``): on connections whose session has
  ``synchronous_commit = off``. The commit is visible to every other connection at once and
  survives the batchkling process being killed; a server crash in the next few hundred
  milliseconds may lose it, which costs a repeated poll or download, never a task.

**Time.** Rows keep the times callers pass (``now``), as SQLite does, except what decides
liveness and pauses: workers on different machines do not share a clock, so a worker's
heartbeat (``workers.beat``) and an account's ``paused_until`` are stamped and judged by the
database's ``clock_timestamp()`` — unless the store was given a ``clock`` (a test's virtual
clock), whose ``monotonic()`` then stands in for the server's.

**Claims** (DESIGN.md §10) are one short transaction of two round trips. The first message
picks: the schema's ``batchkling_claim_pick`` reads what the claim decides on and, when a job
may be taken, locks the run's next pending job (``FOR UPDATE SKIP LOCKED``: claims for other
accounts take the next one), and the message reads that job. Python computes the job's intent.
The second message takes: ``batchkling_claim_take`` locks the account's row (claimers of one
account take turns), and the run's when a budget applies, counts the account's tasks in
flight, checks the worker, run, pause, slots and budget again, and the job's update and the
commit follow in the same message — so an account's row is locked for the server's work
only, never across a round trip or the client's turn. Locks are taken in the order job,
account, run (a claim never waits for a job), and a lease takeover takes a worker's row
before a run's: claimers never deadlock one another or a takeover.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from batchkling.clock import Clock
from batchkling.errors import (
    ConfigError,
    RunNotFound,
    SchemaTooNew,
    StoreError,
    StoreRefused,
    WorkerFenced,
)
from batchkling.models import TERMINAL, JobSpec, JobState
from batchkling.pricing import ObservedPrice
from batchkling.store.interface import (
    HOLDING_STATES,
    ORPHAN_STATES,
    RECENT_ENDS,
    SLOT_STATES,
    Claim,
    ClaimOutcome,
    Intent,
    Store,
)
from batchkling.store.lease import BOOT_ID, FENCED, gone_here, run_locked
from batchkling.store.postgres_schema import MIGRATIONS, SCHEMA, SCHEMA_LOCK, SCHEMA_VERSION
from batchkling.store.rows import (
    ATTEMPT_KEYS,
    ATTEMPT_SELECT,
    HELD_SELECT,
    JOB_SELECT,
    PRICES_SELECT,
    RESTORED_STATE,
    RUN_SELECT,
    AccountRow,
    JobRow,
    ReuseSource,
    RunRow,
    WorkerRow,
    batches,
    event_data,
    held_rows,
    job_row,
    price_rows,
    retry_selection,
    run_row,
    transition_fields,
)

__all__ = ["INTEGRITY_CHECKS", "SCHEMA_VERSION", "PostgresStore", "redact_url"]

#: Connections per process for durable writes and reads, and for quick commits.
POOL_SIZE = 4
QUICK_POOL_SIZE = 4
#: Seconds to wait for the server when connecting, unless the URL says ``connect_timeout``.
CONNECT_TIMEOUT = 10
#: A call waits this many connect timeouts for a free (or re-established) connection before it
#: fails: 30 s by default, long enough to ride out a server restart or a failover.
POOL_WAIT_CONNECTS = 3

#: Seconds a claim's transaction may sit idle between its two messages before the server ends
#: it (``idle_in_transaction_session_timeout``): a paused process must not keep a job (or, in a
#: lease takeover, a run) locked against every other worker.
CLAIM_IDLE_LIMIT = 5.0

#: Session settings of the two pools' connections (see the module docstring).
_QUICK_SESSION = "SET synchronous_commit = off"
_DURABLE_SESSION = ("SELECT set_config('synchronous_commit', 'on', false)"
                    " WHERE current_setting('synchronous_commit') = 'off'")

#: The store's clock, in seconds: the injected clock's reading when one is passed as the
#: parameter, else the database's (epoch seconds). Every liveness and pause decision uses it.
_NOW = "COALESCE(%(clock)s::float8, extract(epoch FROM clock_timestamp())::float8)"
_SLOT_VALUES = [state.value for state in SLOT_STATES]
_ORPHAN_VALUES = [state.value for state in ORPHAN_STATES]
_JOB_COLUMNS = ", ".join(JobRow.__dataclass_fields__)
#: The workers that are alive, for the takeover queries.
_ALIVE = "(SELECT worker_id FROM workers WHERE state = 'alive')"

#: Job columns stored as ``boolean`` here: the engine may hand 0/1.
_BOOLEAN_FIELDS = frozenset({"retryable"})

#: The checks :meth:`PostgresStore.integrity_check` runs: ``(problem, query counting cases)``.
#: Tests run the same list against a database they read directly.
INTEGRITY_CHECKS: tuple[tuple[str, LiteralString], ...] = (
    ("jobs in no known state",
     "SELECT count(*) FROM jobs WHERE NOT state = ANY(%(states)s)"),
    ("jobs of no run",
     "SELECT count(*) FROM jobs j WHERE NOT EXISTS"
     " (SELECT 1 FROM runs r WHERE r.run_id = j.run_id)"),
    ("attempts of no job",
     "SELECT count(*) FROM attempts a WHERE NOT EXISTS"
     " (SELECT 1 FROM jobs j WHERE j.run_id = a.run_id AND j.job_id = a.job_id)"),
    ("attempts in no known state",
     "SELECT count(*) FROM attempts WHERE NOT state = ANY(%(states)s)"),
    ("jobs whose current attempt has no row",
     "SELECT count(*) FROM jobs j WHERE j.attempt > 0 AND NOT EXISTS"
     " (SELECT 1 FROM attempts a WHERE a.run_id = j.run_id AND a.job_id = j.job_id"
     " AND a.number = j.attempt)"),
    ("attempts numbered past their job's attempt",
     "SELECT count(*) FROM attempts a JOIN jobs j USING (run_id, job_id)"
     " WHERE a.number > j.attempt"),
    ("jobs below their attempt base",
     "SELECT count(*) FROM jobs WHERE attempt < attempt_base OR attempt_base < 0"),
    ("events of no run",
     "SELECT count(*) FROM events e WHERE NOT EXISTS"
     " (SELECT 1 FROM runs r WHERE r.run_id = e.run_id)"),
    ("jobs held by no known worker",
     "SELECT count(*) FROM jobs j WHERE j.worker_id IS NOT NULL AND NOT EXISTS"
     " (SELECT 1 FROM workers w WHERE w.worker_id = j.worker_id)"),
    ("jobs on no known account",
     "SELECT count(*) FROM jobs j WHERE j.account_id IS NOT NULL AND NOT EXISTS"
     " (SELECT 1 FROM accounts a WHERE a.account_id = j.account_id)"),
    ("runs whose reserved total is not their jobs' reservations",
     "SELECT count(*) FROM runs r WHERE abs(r.reserved_usd - COALESCE((SELECT sum(reserved_usd)"
     " FROM jobs j WHERE j.run_id = r.run_id), 0)) > 1e-6"),
    ("runs whose spent total is not their attempts' costs",
     "SELECT count(*) FROM runs r WHERE abs(r.spent_usd - COALESCE((SELECT sum(cost_usd)"
     " FROM attempts a WHERE a.run_id = r.run_id), 0)) > 1e-6"),
    ("runs whose totals in units are not their jobs' and attempts'",
     "SELECT count(*) FROM runs r WHERE abs(r.reserved_units - COALESCE((SELECT"
     " sum(reserved_units) FROM jobs j WHERE j.run_id = r.run_id), 0)) > 1e-6"
     " OR abs(r.spent_units - COALESCE((SELECT sum(cost_units) FROM attempts a"
     " WHERE a.run_id = r.run_id), 0)) > 1e-6"),
)


def redact_url(url: str) -> str:
    """``url`` without its password (in the user part or a ``password=`` parameter).

    This is the store's ``location``: what messages, ``status`` and logs may show.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}@{hosts}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k != "password"])
    # Rebuilt by hand: urlunsplit would drop the "//" of a URL with no host (a local socket).
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _password(url: str) -> str | None:
    try:
        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    except psycopg.Error:
        return None
    return None if password is None else str(password)


class PostgresStore(Store):
    """The checkpoint store in a PostgreSQL database: ``async with PostgresStore(url) as s``.

    ``url`` is a libpq URL, ``postgresql://user@host:5432/dbname?sslmode=require``. Keep the
    password out of it where you can (``PGPASSWORD``, ``~/.pgpass``): it is never shown, but a
    command line is visible to other users of the machine. A call waits up to three connect
    timeouts (the URL's ``connect_timeout``, else 10 s) for a connection — through a server
    restart — before it raises :class:`StoreError`.
    """

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE,
                 quick_pool_size: int = QUICK_POOL_SIZE, clock: Clock | None = None) -> None:
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ConfigError(f"store URL {redact_url(url)!r} is not a valid PostgreSQL URL: "
                              f"{_scrub(str(exc), _password(url))}") from None
        self.url = url
        self.location = redact_url(url)
        self._secret = _password(url)
        self._connect_args: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            self._connect_args["connect_timeout"] = CONNECT_TIMEOUT
        try:
            connect_timeout = float(params.get("connect_timeout") or CONNECT_TIMEOUT)
        except ValueError:
            raise ConfigError(f"store URL {self.location!r}: connect_timeout must be a number "
                              "of seconds") from None
        self._pool_timeout = POOL_WAIT_CONNECTS * max(connect_timeout, 1.0)
        self._pool_size = pool_size
        self._quick_pool_size = quick_pool_size
        self._pool: AsyncConnectionPool | None = None
        self._quick: AsyncConnectionPool | None = None
        self._closed = False
        # The store's clock for heartbeats and pauses: the server's, unless a test injects its
        # virtual clock (then the engine's waits and the store's judgements share one time).
        self._clock = clock
        self.claim_idle_limit = CLAIM_IDLE_LIMIT

    # ---- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the schema or migrate it to this version's; refuse a newer one."""
        if self._closed:
            raise StoreError("this store was closed; open a new one")
        if self._pool is not None:
            return
        # One plain connection first: its failure says why (refused, password, no database),
        # where a pool would only time out.
        conn = await self._connect()
        try:
            await self._migrate(conn)
        except psycopg.Error as exc:
            raise self._error("cannot prepare the schema of", exc) from exc
        finally:
            await conn.close()
        pool = self._make_pool(self._pool_size, quick=False)
        quick = self._make_pool(self._quick_pool_size, quick=True)
        try:
            await pool.open(wait=True, timeout=self._pool_timeout)
            await quick.open(wait=True, timeout=self._pool_timeout)
        except BaseException as exc:
            await pool.close()
            await quick.close()
            if isinstance(exc, psycopg.Error):
                raise self._error("cannot connect to", exc) from exc
            raise
        self._pool, self._quick = pool, quick

    async def exists(self) -> bool:
        """Whether the database holds a batchkling schema (without creating one)."""
        conn = await self._connect()
        try:
            cur = await conn.execute("SELECT to_regclass('meta') IS NOT NULL"
                                     " AND to_regclass('runs') IS NOT NULL")
            row = await cur.fetchone()
            return bool(row and row[0])
        except psycopg.Error as exc:
            raise self._error("cannot read", exc) from exc
        finally:
            await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(self.url, **self._connect_args)
        except psycopg.Error as exc:
            raise self._connect_error(exc) from exc

    def _make_pool(self, size: int, *, quick: bool) -> AsyncConnectionPool:
        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            # Once per connection, not per commit. Durable: whatever the server says
            # (remote_apply, local, ...) unless it says off — then on, or the create intent
            # could be lost in a crash after batchkling was told it was committed.
            await conn.execute(_QUICK_SESSION if quick else _DURABLE_SESSION)

        return AsyncConnectionPool(
            self.url, kwargs=self._connect_args, min_size=1, max_size=size, open=False,
            configure=configure, timeout=self._pool_timeout,
            name="batchkling-quick" if quick else "batchkling",
        )

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` under an advisory lock, in one
        transaction: two processes opening a new database at once take turns, and a crash
        mid-upgrade leaves the old schema intact."""
        if await self._version(conn) == SCHEMA_VERSION:
            return  # the common case: no lock, no DDL (DDL would wait on running workers)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            # Again under the lock: another process may have done it meanwhile.
            version = await self._version(conn)
            if version is None:
                version = SCHEMA_VERSION  # a new database: the schema below is the whole of it
            for step in range(version, SCHEMA_VERSION):
                await conn.execute(MIGRATIONS[step])
            await conn.execute(SCHEMA)
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    async def _version(self, conn: psycopg.AsyncConnection[Any]) -> int | None:
        cur = await conn.execute("SELECT to_regclass('meta') IS NOT NULL")
        row = await cur.fetchone()
        if not (row and row[0]):
            return None
        cur = await conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        row = await cur.fetchone()
        version = None if row is None else int(row[0])
        if version is not None and version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the PostgreSQL store {self.location} was written by a newer batchkling "
                f"(schema {version}; this one knows {SCHEMA_VERSION}): upgrade batchkling "
                "to use it"
            )
        return version

    async def aclose(self) -> None:
        """Close both pools; idempotent."""
        self._closed = True
        for pool in (self._quick, self._pool):
            if pool is not None:
                await pool.close()
        self._pool = self._quick = None

    # ---- the one way to the database -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self, *, quick: bool = False
                          ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled autocommit connection; psycopg's errors leave as :class:`StoreError`."""
        pool = self._quick if quick else self._pool
        if pool is None:
            raise StoreError("the store is not open")
        try:
            async with pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise self._error("failed:", exc) from exc

    async def _rows(self, sql: LiteralString, params: Sequence[Any] | Mapping[str, Any] = ()
                    ) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    async def _execute(self, sql: LiteralString,
                       params: Sequence[Any] | Mapping[str, Any] = (), *,
                       quick: bool = False) -> int:
        async with self._connection(quick=quick) as conn:
            cur = await conn.execute(sql, params)
            return cur.rowcount

    def _error(self, doing: str, exc: psycopg.Error) -> StoreError:
        text = _scrub(_first_line(exc), self._secret)
        if doing.endswith(":"):
            return StoreError(f"PostgreSQL store {self.location} {doing} {text}")
        return StoreError(f"{doing} the PostgreSQL store {self.location}: {text}")

    def _connect_error(self, exc: psycopg.Error) -> StoreError:
        """Why a connection failed, named by host and database, never the password."""
        text = _scrub(_first_line(exc), self._secret)
        where = f"the PostgreSQL store {self.location}"
        sqlstate = getattr(exc, "sqlstate", None) or ""
        lowered = text.lower()
        if sqlstate.startswith("28") or "authentication failed" in lowered \
                or "no pg_hba.conf entry" in lowered or "password" in lowered:
            return StoreRefused(f"{where} refused the login: {text} — check the user and its "
                                "password (PGPASSWORD or ~/.pgpass)")
        if sqlstate == "3D000" or ("database" in lowered and "does not exist" in lowered):
            return StoreRefused(f"{where} has no such database: {text} — create it "
                                "(createdb) or fix the URL")
        if sqlstate == "42501" or "permission denied" in lowered:
            return StoreRefused(f"{where} refused access: {text}")
        return StoreError(f"cannot reach {where}: {text}")

    # ---- runs ------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRow | None:
        """The run with this id, or None."""
        rows = await self._rows(f"{RUN_SELECT} WHERE run_id = %s", (run_id,))
        return run_row(rows[0]) if rows else None

    async def list_runs(self) -> list[RunRow]:
        """Every run, newest first."""
        return [run_row(r) for r in await self._rows(f"{RUN_SELECT} ORDER BY created_at DESC")]

    async def save_run(
        self,
        run_id: str,
        *,
        manifest_path: str | None,
        manifest_text: str | None,
        config_json: str,
        provider: str,
        base_url: str,
        simulated: bool,
        now: float,
    ) -> None:
        """Create the run, or refresh its manifest snapshot when it exists."""
        await self._execute(
            "INSERT INTO runs (run_id, manifest_path, manifest_text, config_json, provider,"
            " base_url, simulated, nonce, state, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'running', %s, %s)"
            " ON CONFLICT (run_id) DO UPDATE SET manifest_path = excluded.manifest_path,"
            " manifest_text = excluded.manifest_text, config_json = excluded.config_json,"
            " provider = excluded.provider, base_url = excluded.base_url,"
            " updated_at = excluded.updated_at",
            (run_id, manifest_path, manifest_text, config_json, provider, base_url,
             bool(simulated), secrets.token_hex(4), now, now),
        )

    async def set_run_state(
        self, run_id: str, state: str, stop_reason: str | None, now: float, *,
        owner: str | None = None,
    ) -> None:
        """Record how the latest invocation on this run ended (see :meth:`Store.set_run_state`
        for ``owner``)."""
        if owner is None:
            await self._execute(
                "UPDATE runs SET state = %s, stop_reason = %s, updated_at = %s WHERE run_id = %s",
                (state, stop_reason, now, run_id))
            return
        changed = await self._execute(
            "UPDATE runs SET state = %s, stop_reason = %s, updated_at = %s WHERE run_id = %s"
            " AND lease_owner = %s", (state, stop_reason, now, run_id, owner))
        if changed == 0:
            raise WorkerFenced(FENCED)

    # ---- workers and the run's lease -------------------------------------------------------

    def _clock_now(self) -> float | None:
        """The injected clock's reading, or None: the database's clock then decides."""
        return None if self._clock is None else self._clock.monotonic()

    async def register_worker(self, worker_id: str, *, runs: Sequence[str] | None,
                              now: float) -> None:
        """Record this process as a live worker (serving ``runs``, or every open run)."""
        await self._execute(
            "INSERT INTO workers (worker_id, host, pid, boot_id, state, runs, started_at,"
            f" heartbeat_at, beat) VALUES (%(worker)s, %(host)s, %(pid)s, %(boot)s, 'alive',"
            f" %(runs)s::jsonb, %(now)s, %(now)s, {_NOW})"
            " ON CONFLICT (worker_id) DO UPDATE SET state = 'alive', heartbeat_at ="
            " excluded.heartbeat_at, beat = excluded.beat",
            {"worker": worker_id, "host": socket.gethostname(), "pid": os.getpid(),
             "boot": BOOT_ID, "runs": None if runs is None else json.dumps(list(runs)),
             "now": now, "clock": self._clock_now()},
        )

    async def worker_heartbeat(self, worker_id: str, now: float) -> None:
        """Say this worker is alive, on the database's clock; :class:`WorkerFenced` if it was
        presumed dead meanwhile."""
        changed = await self._execute(
            f"UPDATE workers SET heartbeat_at = %(now)s, beat = {_NOW}"
            " WHERE worker_id = %(worker)s AND state = 'alive'",
            {"now": now, "worker": worker_id, "clock": self._clock_now()},
        )
        if changed == 0:
            raise WorkerFenced(FENCED)

    async def retire_worker(self, worker_id: str, *, state: str, reason: str | None,
                            now: float) -> None:
        """Mark this worker ``stopped`` (it exits) so its unfinished jobs are adopted at once."""
        await self._execute(
            "UPDATE workers SET state = %s, stop_reason = %s, heartbeat_at = %s"
            " WHERE worker_id = %s AND state = 'alive'",
            (state, reason, now, worker_id),
        )

    async def reap_workers(self, stale_after: float, now: float) -> list[str]:
        """Mark ``dead`` the live workers silent past ``stale_after`` on the database's clock,
        or gone from this host; return their ids.

        One statement decides and marks, on each row's latest version: a worker that beat
        meanwhile stays alive. A row being written (a heartbeat) is skipped, not waited for:
        that worker is alive this very moment. (Which of this host's workers are gone is read
        first: only this process can ask the kernel.)
        """
        del now  # the store's clock decides, not the caller's
        host = socket.gethostname()
        here = await self._rows(
            "SELECT worker_id, boot_id, pid FROM workers WHERE state = 'alive' AND host = %s",
            (host,))
        gone = [worker_id for worker_id, boot_id, pid in here if gone_here(host, boot_id, pid)]
        rows = await self._rows(
            "UPDATE workers SET state = 'dead', stop_reason = %(why)s WHERE worker_id IN"
            " (SELECT worker_id FROM workers WHERE state = 'alive' AND"
            f" ({_NOW} - beat > %(stale)s OR worker_id = ANY(%(gone)s::text[]))"
            " ORDER BY worker_id FOR UPDATE SKIP LOCKED)"
            f" AND state = 'alive' AND ({_NOW} - beat > %(stale)s"
            " OR worker_id = ANY(%(gone)s::text[])) RETURNING worker_id",
            {"why": f"silent for more than {stale_after:g}s", "stale": stale_after,
             "gone": gone, "clock": self._clock_now()},
        )
        return sorted(r[0] for r in rows)

    async def list_workers(self, *, alive_only: bool = True) -> list[WorkerRow]:
        """Workers, most recently heard of first."""
        where = " WHERE state = 'alive'" if alive_only else ""
        rows = await self._rows(
            "SELECT worker_id, host, pid, state, runs, started_at, heartbeat_at,"
            f" greatest(0, {_NOW} - beat), stop_reason FROM workers{where}"
            " ORDER BY heartbeat_at DESC",
            {"clock": self._clock_now()},
        )
        return [WorkerRow(worker_id=r[0], host=r[1], pid=r[2], state=r[3],
                          runs=None if r[4] is None else [str(run) for run in r[4]],
                          started_at=r[5], heartbeat_at=r[6], silent_for=float(r[7]),
                          stop_reason=r[8])
                for r in rows]

    async def held_by_workers(self) -> dict[str, dict[str, int]]:
        """``{worker_id: {state: jobs}}`` for every worker that drives a job."""
        return held_rows(await self._rows(HELD_SELECT))

    async def check_lease(self, run_id: str, worker_id: str, *, stale_after: float,
                          now: float) -> None:
        """Raise :class:`RunLocked` if another live process drives the run (a read; the
        database's clock decides, as in :meth:`acquire_lease`)."""
        del now
        rows = await self._rows(
            f"SELECT r.lease_owner, w.host, w.pid, w.boot_id, {_NOW} - w.beat, w.state"
            " FROM runs r LEFT JOIN workers w ON w.worker_id = r.lease_owner"
            " WHERE r.run_id = %(run)s", {"run": run_id, "clock": self._clock_now()})
        if not rows:
            raise RunNotFound(f"no run {run_id!r} in {self.location}")
        holder, *seen = rows[0]
        if holder is not None and holder != worker_id:
            _stale_holder(run_id, seen, stale_after)

    async def acquire_lease(self, run_id: str, worker_id: str, *, stale_after: float,
                            now: float) -> None:
        """Make ``worker_id`` the run's driver, or raise :class:`RunLocked`; a stale holder is
        fenced (marked dead) as its lease is taken over.

        The database's clock decides, not ``now``: the holder's heartbeat was stamped with it
        and its silence is measured on it, so workers whose clocks disagree still agree on who
        is alive. The holder's row is locked before the run's, and the run's holder is checked
        again under its lock. Like a claim, the transaction may not idle long with the run's
        row locked (``claim_idle_limit``).
        """
        del now  # the database's clock is the one all workers share
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s,"
                               " true)", (str(max(1, round(self.claim_idle_limit * 1000))),))
            while True:
                cur = await conn.execute("SELECT lease_owner FROM runs WHERE run_id = %s",
                                         (run_id,))
                row = await cur.fetchone()
                if row is None:
                    raise RunNotFound(f"no run {run_id!r} in {self.location}")
                holder: str | None = row[0]
                seen = None
                if holder is not None and holder != worker_id:
                    cur = await conn.execute(
                        f"SELECT host, pid, boot_id, {_NOW} - beat, state FROM workers"
                        " WHERE worker_id = %(holder)s FOR UPDATE",
                        {"holder": holder, "clock": self._clock_now()})
                    seen = await cur.fetchone()
                cur = await conn.execute(
                    "SELECT lease_owner FROM runs WHERE run_id = %s FOR UPDATE", (run_id,))
                again = await cur.fetchone()
                if again is not None and again[0] == holder:
                    break
                # Another process took or gave the lease up in between: decide again.
            if seen is not None and _stale_holder(run_id, seen, stale_after):
                # Presumed dead: from now on its writes change nothing.
                await conn.execute(
                    "UPDATE workers SET state = 'dead', stop_reason = %s WHERE worker_id = %s",
                    (f"its run {run_id!r} was taken over", holder))
            await conn.execute("UPDATE runs SET lease_owner = %s WHERE run_id = %s",
                               (worker_id, run_id))

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up; a no-op if another process has taken it over."""
        await self._execute(
            "UPDATE runs SET lease_owner = NULL WHERE run_id = %s AND lease_owner = %s",
            (run_id, owner),
        )

    # ---- accounts and claims ---------------------------------------------------------------

    async def ensure_account(self, account_id: str, *, provider: str, max_in_flight: int,
                             now: float) -> AccountRow:
        """Create the account, or set its configured ``max_in_flight``; return it."""
        await self._execute(
            "INSERT INTO accounts (account_id, provider, max_in_flight, slot_limit, updated_at)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account_id) DO UPDATE SET"
            " max_in_flight = excluded.max_in_flight,"
            " slot_limit = least(accounts.slot_limit, excluded.max_in_flight),"
            " updated_at = excluded.updated_at",
            (account_id, provider, max_in_flight, max_in_flight, now),
        )
        account = await self.get_account(account_id)
        assert account is not None
        return account

    async def get_account(self, account_id: str) -> AccountRow | None:
        """The account with its slots in flight now, or None."""
        rows = await self._rows(
            "SELECT account_id, provider, max_in_flight, slot_limit,"
            f" greatest(0, paused_until - {_NOW}),"
            " batchkling_in_flight(account_id, %(slot_states)s::text[])"
            " FROM accounts a WHERE account_id = %(account)s",
            {"account": account_id, "slot_states": _SLOT_VALUES, "clock": self._clock_now()},
        )
        if not rows:
            return None
        r = rows[0]
        return AccountRow(account_id=r[0], provider=r[1], max_in_flight=r[2], slot_limit=r[3],
                          paused_for=float(r[4]), in_flight=int(r[5]))

    async def account_rejected(self, account_id: str, *, limit: int, now: float,
                               hold_off: int = 0) -> int:
        """Lower the shared slot limit to ``limit`` (never raise it); return the limit. The
        streak restarts below zero by ``hold_off``: the next probe comes that much later."""
        rows = await self._rows(
            "UPDATE accounts SET slot_limit = greatest(1, least(slot_limit, %s)), streak = %s,"
            " updated_at = %s WHERE account_id = %s RETURNING slot_limit",
            (limit, -max(0, hold_off), now, account_id))
        return int(rows[0][0]) if rows else limit

    async def account_created(self, account_id: str, *, now: float) -> int:
        """Count a create; after two rounds of the limit, probe one more slot. One round trip:
        the limit in force comes back whether or not this create moved it."""
        rows = await self._rows(
            "WITH probed AS (UPDATE accounts SET"
            " slot_limit = CASE WHEN streak + 1 >= 2 * slot_limit THEN slot_limit + 1"
            " ELSE slot_limit END,"
            " streak = CASE WHEN streak + 1 >= 2 * slot_limit THEN 0 ELSE streak + 1 END,"
            " updated_at = %(now)s WHERE account_id = %(account)s"
            " AND slot_limit < max_in_flight RETURNING slot_limit)"
            " SELECT slot_limit FROM probed UNION ALL"
            " SELECT slot_limit FROM accounts WHERE account_id = %(account)s"
            " AND NOT EXISTS (SELECT 1 FROM probed)",
            {"now": now, "account": account_id})
        return int(rows[0][0]) if rows else 0

    async def pause_account(self, account_id: str, seconds: float, now: float) -> None:
        """Hold every worker's creates on this account back for ``seconds``, on the
        database's clock."""
        await self._execute(
            f"UPDATE accounts SET paused_until = greatest(paused_until, {_NOW} + %(wait)s),"
            " updated_at = %(now)s WHERE account_id = %(account)s",
            {"wait": max(0.0, seconds), "now": now, "account": account_id,
             "clock": self._clock_now()})

    async def claim(
        self,
        run_id: str,
        *,
        worker_id: str,
        account_id: str,
        slot_cap: int,
        intent: Callable[[JobRow], Intent],
        max_usd: float | None,
        now: float,
        max_units: float | None = None,
        credit: int = 0,
    ) -> Claim:
        """Take the run's next pending job: see :meth:`Store.claim` and the module docstring.

        Two round trips whatever the outcome: the pick (``_CLAIM_PICK``), then the take under
        the account's lock with the job's update and the commit (``_CLAIM_TAKE``) — or a
        rollback when the pick finds nothing to take. A worker presumed dead meanwhile gets
        :class:`WorkerFenced`, and the job stays pending.

        A claim's transaction may sit idle for at most ``claim_idle_limit`` seconds between its
        messages (the process paused, say, with the picked job locked); past that the server
        ends it, releasing the job for the other workers, and this claim starts again.
        """
        params = {"worker": worker_id, "account": account_id, "run": run_id,
                  "slot_states": _SLOT_VALUES, "cap": slot_cap, "credit": max(0, credit),
                  "clock": self._clock_now(),
                  "idle_ms": max(1, round(self.claim_idle_limit * 1000))}
        missing = f"no run {run_id!r} (or account {account_id!r}) in {self.location}"
        for _ in range(3):
            try:
                # Shielded: a claim cancelled between its messages would leave the job locked
                # until the connection went back to the pool; this way it ends first.
                with anyio.CancelScope(shield=True):
                    async with self._connection() as conn:
                        return await _claim_in(conn, params, slot_cap=slot_cap,
                                               intent=intent, max_usd=max_usd,
                                               max_units=max_units, now=now,
                                               missing=missing)
            except StoreError as exc:
                # Ended by the server for idling: it rolled back, so nothing was claimed.
                if not isinstance(exc.__cause__, psycopg.errors.IdleInTransactionSessionTimeout):
                    raise
        raise StoreError(f"PostgreSQL store {self.location} failed: claims keep being ended "
                         f"by the server for idling over {self.claim_idle_limit:g}s in a "
                         "transaction")

    async def adopt(self, run_id: str, *, worker_id: str, states: Iterable[JobState],
                    released: bool, limit: int = 500) -> list[JobRow]:
        """Take over jobs in ``states`` whose worker is dead or stopped (and, with
        ``released``, those no worker holds); bump their epoch; return them in seq order.

        The rows are locked in manifest order (as every multi-row write here takes them), and
        each is checked again once locked: a job another worker adopted first is left to it.
        """
        whose = (f"(worker_id IS NULL OR worker_id NOT IN {_ALIVE})" if released
                 else f"(worker_id IS NOT NULL AND worker_id NOT IN {_ALIVE})")
        rows = await self._rows(
            "UPDATE jobs SET worker_id = %(worker)s, claim_epoch = claim_epoch + 1"
            " WHERE (run_id, job_id) IN (SELECT run_id, job_id FROM jobs"
            f" WHERE run_id = %(run)s AND state = ANY(%(states)s::text[]) AND {whose}"
            f" ORDER BY seq LIMIT %(limit)s FOR UPDATE) RETURNING {_JOB_COLUMNS}",
            {"worker": worker_id, "run": run_id, "states": [s.value for s in states],
             "limit": limit},
        )
        return sorted((job_row(r) for r in rows), key=lambda job: job.seq)

    async def held_elsewhere(self, run_id: str, worker_id: str) -> int:
        """Jobs of the run that live workers other than ``worker_id`` are driving."""
        rows = await self._rows(
            "SELECT count(*) FROM jobs WHERE run_id = %s AND state = ANY(%s::text[])"
            f" AND worker_id IS NOT NULL AND worker_id != %s AND worker_id IN {_ALIVE}",
            (run_id, _ORPHAN_VALUES, worker_id))
        return int(rows[0][0])

    async def work_left(self, run_id: str) -> tuple[int, int]:
        """``(pending, orphaned)`` jobs of the run (see :meth:`Store.work_left`)."""
        rows = await self._rows(
            "SELECT count(*) FILTER (WHERE state = 'pending'),"
            " count(*) FILTER (WHERE state = ANY(%s::text[]) AND worker_id IS NOT NULL"
            f" AND worker_id NOT IN {_ALIVE}) FROM jobs WHERE run_id = %s",
            (_ORPHAN_VALUES, run_id))
        return int(rows[0][0]), int(rows[0][1])

    async def close_run(self, run_id: str, state: str, stop_reason: str | None,
                        now: float) -> bool:
        """End an open, driverless run with nothing left to do (see :meth:`Store.close_run`)."""
        return bool(await self._execute(
            "UPDATE runs SET state = %s, stop_reason = %s, updated_at = %s WHERE run_id = %s"
            f" AND state = 'running' AND (lease_owner IS NULL OR lease_owner NOT IN {_ALIVE})"
            " AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.run_id = runs.run_id AND"
            " (state = 'pending' OR (state = ANY(%s::text[])"
            f" AND worker_id IN {_ALIVE})))",
            (state, stop_reason, now, run_id, _ORPHAN_VALUES),
        ))

    # ---- jobs ------------------------------------------------------------------------------

    async def job_index(self, run_id: str) -> dict[str, tuple[str, JobState]]:
        """``{job_id: (fingerprint, state)}`` for every job of the run."""
        rows = await self._rows(
            "SELECT job_id, fingerprint, state FROM jobs WHERE run_id = %s", (run_id,))
        return {r[0]: (r[1], JobState(r[2])) for r in rows}

    async def sync_jobs(
        self,
        run_id: str,
        *,
        added: Iterable[tuple[int, JobSpec]],
        changed: list[tuple[int, JobSpec]],
        reordered: list[tuple[int, str]],
        removed: list[str],
        now: float,
    ) -> None:
        """Apply a manifest's expansion to the run in one transaction.

        New jobs start ``pending``; changed jobs (new fingerprint) go back to ``pending`` keeping
        their attempt history. Removed jobs that have no task which may exist (``pending``,
        ``failed``) become ``skipped``; the others keep their state, so a paid task is still
        tracked. A skipped job back in the manifest unchanged returns to the state it left
        (``rows.RESTORED_STATE`` says how). Each kind is one statement over arrays, however many
        jobs it names (new jobs: one per :data:`~batchkling.store.rows.SYNC_BATCH`).
        """
        async with self._connection() as conn, conn.transaction():
            for batch in batches(added):
                await conn.execute(
                    "INSERT INTO jobs (run_id, job_id, seq, spec_json, fingerprint, state,"
                    " updated_at) SELECT %s, job_id, seq, spec, fp, 'pending', %s"
                    " FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[])"
                    " AS t(job_id, seq, spec, fp)",
                    (run_id, now, *_columns(batch)),
                )
            if changed:
                await conn.execute(
                    "WITH t AS (SELECT * FROM unnest(%s::text[], %s::int[], %s::text[],"
                    " %s::text[]) AS t(job_id, seq, spec, fp)),"
                    " reset AS (UPDATE jobs SET seq = t.seq, spec_json = t.spec,"
                    " fingerprint = t.fp, state = 'pending', task_id = NULL,"
                    " idempotency_key = NULL, progress = NULL, video_url = NULL,"
                    " video_path = NULL, video_size = NULL, video_sha256 = NULL,"
                    " video_uri = NULL, video_etag = NULL, cost_usd = NULL, cost_units = NULL,"
                    " reserved_usd = 0, error_code = NULL,"
                    " error_message = NULL, retryable = NULL, submitted_at = NULL,"
                    " completed_at = NULL, render_seconds = NULL, reserved_units = 0,"
                    " reused_from = NULL, updated_at = %s"
                    " FROM t WHERE jobs.run_id = %s AND jobs.job_id = t.job_id)"
                    " INSERT INTO events (run_id, job_id, at, event)"
                    " SELECT %s, job_id, %s, 'job.changed' FROM t",
                    (*_columns(changed), now, run_id, run_id, now),
                )
            if reordered:
                ids = [job_id for _, job_id in reordered]
                await conn.execute(
                    "WITH back AS (UPDATE jobs SET state = " + RESTORED_STATE + ", updated_at = %s"
                    " WHERE run_id = %s AND job_id = ANY(%s::text[]) AND state = 'skipped'"
                    " RETURNING job_id) INSERT INTO events (run_id, job_id, at, event)"
                    " SELECT %s, job_id, %s, 'job.restored' FROM back",
                    (now, run_id, ids, run_id, now),
                )
                await conn.execute(
                    "UPDATE jobs SET seq = t.seq FROM unnest(%s::int[], %s::text[])"
                    " AS t(seq, job_id) WHERE jobs.run_id = %s AND jobs.job_id = t.job_id",
                    ([seq for seq, _ in reordered], ids, run_id),
                )
            if removed:
                await conn.execute(
                    "UPDATE jobs SET state = 'skipped', updated_at = %s WHERE run_id = %s"
                    " AND job_id = ANY(%s::text[]) AND state IN ('pending', 'failed')",
                    (now, run_id, removed),
                )

    async def reset_for_retry(
        self, run_id: str, *, states: Iterable[JobState], job_ids: Iterable[str], now: float
    ) -> int:
        """Put jobs back to ``pending`` for ``retry``; return how many.

        ``unknown`` jobs keep their attempt and idempotency key (the create is repeated, so a
        provider that honours the key cannot bill twice). Every other job gets a fresh attempt
        budget: ``attempt_base`` moves up to the current attempt. Jobs named in ``job_ids`` are
        taken from any state where no task is in flight. Without states or ids: failed jobs.
        One statement: the jobs picked, reset and their events written together.
        """
        wanted, ids = retry_selection(states, job_ids)
        rows = await self._rows(
            "WITH picked AS (SELECT job_id, state FROM jobs WHERE run_id = %(run)s"
            " AND state = ANY(%(states)s::text[])"
            " AND (%(any_id)s OR job_id = ANY(%(ids)s::text[]))"
            " FOR UPDATE),"
            " reset AS (UPDATE jobs j SET state = 'pending', error_code = NULL,"
            " error_message = NULL, updated_at = %(now)s,"
            # An unknown job repeats its create with the same attempt and key.
            " attempt_base = CASE WHEN p.state = 'unknown' THEN j.attempt_base"
            " ELSE j.attempt END,"
            " idempotency_key = CASE WHEN p.state = 'unknown' THEN j.idempotency_key END,"
            " task_id = CASE WHEN p.state = 'unknown' THEN j.task_id END,"
            " progress = CASE WHEN p.state = 'unknown' THEN j.progress END,"
            " video_url = CASE WHEN p.state = 'unknown' THEN j.video_url END,"
            " retryable = CASE WHEN p.state = 'unknown' THEN j.retryable END,"
            " reserved_usd = CASE WHEN p.state = 'unknown' THEN j.reserved_usd ELSE 0 END,"
            " reserved_units = CASE WHEN p.state = 'unknown' THEN j.reserved_units ELSE 0 END,"
            " reused_from = NULL"
            " FROM picked p WHERE j.run_id = %(run)s AND j.job_id = p.job_id"
            " RETURNING j.job_id, p.state),"
            " logged AS (INSERT INTO events (run_id, job_id, at, event, data)"
            " SELECT %(run)s, job_id, %(now)s, 'job.retry_requested',"
            " jsonb_build_object('from', state) FROM reset)"
            " SELECT count(*) FROM reset",
            {"run": run_id, "states": wanted, "any_id": not ids, "ids": ids,
             "now": now},
        )
        return int(rows[0][0])

    async def get_job(self, run_id: str, job_id: str) -> JobRow | None:
        """One job, or None."""
        rows = await self._rows(f"{JOB_SELECT} WHERE run_id = %s AND job_id = %s",
                                (run_id, job_id))
        return job_row(rows[0]) if rows else None

    async def jobs_in(
        self,
        run_id: str,
        states: Iterable[JobState],
        *,
        after_seq: int = -1,
        limit: int = 500,
    ) -> list[JobRow]:
        """Jobs in any of ``states``, in manifest order, a page at a time."""
        wanted = {s.value for s in states}
        if len(wanted) == len(JobState):
            # Every job (the CSV, the report): the (run_id, seq) index, in order, no sort.
            rows = await self._rows(f"{JOB_SELECT} WHERE run_id = %s AND seq > %s"
                                    " ORDER BY seq LIMIT %s", (run_id, after_seq, limit))
            return [job_row(r) for r in rows]
        rows = await self._rows(
            f"{JOB_SELECT} WHERE run_id = %s AND state = ANY(%s::text[]) AND seq > %s"
            " ORDER BY seq LIMIT %s",
            (run_id, sorted(wanted), after_seq, limit),
        )
        return [job_row(r) for r in rows]

    async def task_owner(self, run_id: str, job_id: str, task_id: str) -> tuple[str, str] | None:
        """Another job holding ``task_id``: of this run, or of a run on the same provider and
        base URL (``jobs_by_task`` makes it one index lookup)."""
        rows = await self._rows(
            "SELECT j.run_id, j.job_id FROM jobs j JOIN runs r ON r.run_id = j.run_id,"
            " runs me WHERE me.run_id = %s AND j.task_id = %s"
            " AND NOT (j.run_id = me.run_id AND j.job_id = %s)"
            " AND (j.run_id = me.run_id OR (r.provider = me.provider"
            " AND r.base_url = me.base_url)) LIMIT 1",
            (run_id, task_id, job_id),
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def counts(self, run_id: str) -> dict[JobState, int]:
        """Number of jobs in each state."""
        rows = await self._rows(
            "SELECT state, count(*) FROM jobs WHERE run_id = %s GROUP BY state", (run_id,))
        return {JobState(r[0]): int(r[1]) for r in rows}

    async def recent_ends(self, run_id: str, limit: int = RECENT_ENDS) -> list[float]:
        """When the last ``limit`` jobs to end (downloaded, failed, skipped) ended, newest first."""
        rows = await self._rows(
            "SELECT updated_at FROM jobs WHERE run_id = %s AND state = ANY(%s::text[])"
            " ORDER BY updated_at DESC LIMIT %s",
            (run_id, sorted(s.value for s in TERMINAL), limit),
        )
        return [float(r[0]) for r in rows]

    async def render_times(self, *, provider: str, base_url: str, model: str, duration: int,
                           mode: str | None, limit: int = 64) -> list[float]:
        """Render times of a group's finished tasks on this endpoint: the latest runs first,
        each from its last jobs back, in one round trip (each run's walk of the state index
        stops at ``limit`` rows)."""
        rows = await self._rows(
            "SELECT j.render_seconds FROM runs r CROSS JOIN LATERAL ("
            " SELECT render_seconds, seq FROM jobs WHERE run_id = r.run_id"
            " AND state = ANY(%(states)s::text[]) AND render_seconds > 0"
            " AND spec_json::jsonb ->> 'model' = %(model)s"
            " AND spec_json::jsonb ->> 'duration' = %(duration)s"
            " AND COALESCE(spec_json::jsonb ->> 'mode', '') = %(mode)s"
            " ORDER BY seq DESC LIMIT %(limit)s) j"
            " WHERE r.provider = %(provider)s AND r.base_url = %(base_url)s"
            " ORDER BY r.updated_at DESC, r.run_id, j.seq DESC LIMIT %(limit)s",
            {"states": [JobState.DOWNLOADED.value, JobState.SUCCEEDED.value], "model": model,
             "duration": str(duration), "mode": mode or "", "limit": limit,
             "provider": provider, "base_url": base_url})
        return [float(r[0]) for r in rows]

    async def units(self, run_id: str) -> float:
        """Provider units reported so far (Kling bills in units and reports no USD)."""
        rows = await self._rows(
            "SELECT COALESCE(SUM(cost_units), 0) FROM attempts WHERE run_id = %s", (run_id,))
        return float(rows[0][0])

    async def money(self, run_id: str) -> tuple[float, float]:
        """``(spent, committed)``: reported cost so far, and cost plus open reservations."""
        # Running totals the triggers keep: no scan of the run's attempts.
        rows = await self._rows("SELECT spent_usd, reserved_usd FROM runs WHERE run_id = %s",
                                (run_id,))
        if not rows:
            return 0.0, 0.0
        spent, reserved = float(rows[0][0]), float(rows[0][1])
        return spent, spent + reserved

    async def attempts(self, run_id: str, job_id: str) -> list[dict[str, Any]]:
        """The job's attempts, oldest first."""
        rows = await self._rows(
            f"{ATTEMPT_SELECT} WHERE run_id = %s AND job_id = %s ORDER BY number", (run_id, job_id))
        return [dict(zip(ATTEMPT_KEYS, r, strict=True)) for r in rows]

    async def events(
        self, run_id: str, job_id: str | None, *, last: int | None = None
    ) -> list[dict[str, Any]]:
        """Events as ``{"at", "event", "data"}``, oldest first: one job's, or the run's own."""
        who = "job_id = %(job)s" if job_id is not None else "job_id IS NULL"
        # Newest first with a LIMIT walks the (run_id, id) index back from the end.
        rows = await self._rows(
            f"SELECT at, event, data FROM events WHERE run_id = %(run)s AND {who}"
            " ORDER BY id DESC LIMIT %(last)s",
            {"run": run_id, "job": job_id, "last": last})
        # jsonb comes back decoded.
        return [{"at": float(at), "event": event, "data": data}
                for at, event, data in reversed(rows)]

    async def forget_run(self, run_id: str) -> int:
        """Delete the run with its jobs, attempts and events in one transaction (the jobs and
        attempts go with the run: ``ON DELETE CASCADE``)."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM events WHERE run_id = %s", (run_id,))
            cur = await conn.execute(
                "WITH gone AS (DELETE FROM jobs WHERE run_id = %s RETURNING 1)"
                " SELECT count(*) FROM gone", (run_id,))
            row = await cur.fetchone()
            await conn.execute("DELETE FROM runs WHERE run_id = %s", (run_id,))
        return int(row[0]) if row else 0

    async def transition(
        self,
        run_id: str,
        job_id: str,
        state: JobState,
        *,
        now: float,
        event: str,
        new_attempt: tuple[int, str] | None = None,
        data: Mapping[str, Any] | None = None,
        quick: bool = False,
        epoch: int | None = None,
        **fields: Any,
    ) -> None:
        """Move a job to ``state`` and set ``fields``: one ``UPDATE``, one round trip.

        The schema's trigger inserts the attempt's row when the attempt number grows
        (``new_attempt`` = ``(number, idempotency_key)``, the create intent, with the attempt
        fields starting empty), mirrors the attempt fields onto it otherwise, and appends the
        event — all in the statement's own transaction. ``quick`` commits without waiting for
        the WAL flush (see the module docstring). ``epoch`` fences the write to the claim the
        caller holds: if the job's claim epoch moved on, nothing changes and
        :class:`WorkerFenced` is raised.
        """
        fields = transition_fields(fields, new_attempt)
        for name in _BOOLEAN_FIELDS & fields.keys():
            if fields[name] is not None:
                fields[name] = bool(fields[name])
        # Column names come from JOB_COLUMNS (transition_fields checks), never from outside.
        sets = "".join(f", {name} = %s" for name in fields)
        fence = "" if epoch is None else " AND claim_epoch = %s"
        changed = await self._execute(
            "UPDATE jobs SET state = %s, updated_at = %s, last_event = %s,"
            f" last_event_data = %s{sets} WHERE run_id = %s AND job_id = %s{fence}",
            (state.value, now, event, event_data(data), *fields.values(), run_id, job_id,
             *(() if epoch is None else (epoch,))),
            quick=quick,
        )
        if changed == 0 and epoch is not None:
            raise WorkerFenced(FENCED)

    async def log_event(
        self, run_id: str, job_id: str | None, now: float, event: str,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an event that changes no state (a stop, a limit change)."""
        await self._execute(
            "INSERT INTO events (run_id, job_id, at, event, data) VALUES (%s, %s, %s, %s, %s)",
            (run_id, job_id, now, event, event_data(data)),
        )

    async def integrity_check(self) -> str:
        """``ok``, or the consistency problems found (:data:`INTEGRITY_CHECKS`), one per line."""
        async with self._connection() as conn:
            problems = await integrity_problems(conn)
        return "\n".join(problems) or "ok"

    # ---- money: observed prices, reservations, reuse (docs/money.md) -----------------------

    async def money_units(self, run_id: str) -> tuple[float, float]:
        """``(spent, committed)`` in provider units (running totals, no scan)."""
        rows = await self._rows(
            "SELECT spent_units, reserved_units FROM runs WHERE run_id = %s", (run_id,))
        if not rows:
            return 0.0, 0.0
        spent, reserved = float(rows[0][0]), float(rows[0][1])
        return spent, spent + reserved

    async def record_price(self, group: str, *, usd: float | None, units: float | None,
                           now: float) -> None:
        """Remember the latest price of ``group`` (see :meth:`Store.record_price`)."""
        await self._execute(
            "INSERT INTO prices (price_group, usd, units, samples, updated_at)"
            " VALUES (%s, %s, %s, 1, %s) ON CONFLICT (price_group) DO UPDATE SET"
            " usd = COALESCE(excluded.usd, prices.usd),"
            " units = COALESCE(excluded.units, prices.units),"
            " samples = prices.samples + 1, updated_at = excluded.updated_at",
            (group, usd, units, now))

    async def observed_prices(self) -> dict[str, ObservedPrice]:
        """Every price group's last observed price."""
        return price_rows(await self._rows(PRICES_SELECT))

    async def raise_reservations(self, group: str, *, usd: float | None,
                                 units: float | None) -> int:
        """Raise the reservations of the group's jobs that hold money; return how many."""
        if usd is None and units is None:
            return 0
        rows = await self._rows(
            "WITH raised AS (UPDATE jobs SET"
            " reserved_usd = GREATEST(reserved_usd, COALESCE(%(usd)s, reserved_usd)),"
            " reserved_units = GREATEST(reserved_units, COALESCE(%(units)s, reserved_units))"
            " WHERE price_group = %(group)s AND state = ANY(%(states)s::text[])"
            " AND (reserved_usd < %(usd)s OR reserved_units < %(units)s) RETURNING 1)"
            " SELECT count(*) FROM raised",
            {"usd": usd, "units": units, "group": group,
             "states": [s.value for s in HOLDING_STATES]})
        return int(rows[0][0])

    async def reuse_sources(self, run_id: str, *, after_seq: int = -1,
                            limit: int = 500) -> list[ReuseSource]:
        """Pending jobs with a downloaded video of the same fingerprint in another run."""
        rows = await self._rows(_REUSE_SELECT, {"run": run_id, "after": after_seq,
                                                "limit": limit})
        return [ReuseSource(*r) for r in rows]

    async def downloaded_fingerprints(self, *, after: str = "", limit: int = 10000) -> list[str]:
        """Fingerprints with a downloaded video (with a checksum), a page at a time."""
        rows = await self._rows(
            "SELECT DISTINCT fingerprint FROM jobs WHERE fingerprint > %s"
            " AND state = 'downloaded' AND video_sha256 IS NOT NULL ORDER BY fingerprint"
            " LIMIT %s", (after, limit))
        return [r[0] for r in rows]

    async def mark_reused(self, run_id: str, job_id: str, source: ReuseSource, *,
                          video_path: str | None, video_uri: str | None,
                          video_etag: str | None, now: float) -> bool:
        """Record a pending job as downloaded with an earlier run's video (no attempt)."""
        # No last_event: the trigger stays quiet, so no attempt row is touched (a changed
        # job's last attempt belongs to its old request); the event is written here.
        rows = await self._rows(
            "WITH reused AS (UPDATE jobs SET state = 'downloaded', reused_from = %(from)s,"
            " video_path = %(path)s, video_size = %(size)s, video_sha256 = %(sha)s,"
            " video_uri = %(uri)s, video_etag = %(etag)s, task_id = NULL, video_url = NULL,"
            " progress = NULL, cost_usd = 0, cost_units = NULL, reserved_usd = 0,"
            " reserved_units = 0, error_code = NULL, error_message = NULL, retryable = NULL,"
            " submitted_at = NULL, completed_at = %(now)s, render_seconds = NULL,"
            " worker_id = NULL, updated_at = %(now)s WHERE run_id = %(run)s"
            " AND job_id = %(job)s AND state = 'pending' AND fingerprint = %(fp)s"
            " RETURNING job_id),"
            " logged AS (INSERT INTO events (run_id, job_id, at, event, data)"
            " SELECT %(run)s, job_id, %(now)s, 'job.reused', %(data)s::jsonb FROM reused)"
            " SELECT count(*) FROM reused",
            {"from": source.source, "path": video_path, "size": source.video_size,
             "sha": source.video_sha256, "uri": video_uri, "etag": video_etag, "now": now,
             "run": run_id, "job": job_id, "fp": source.fingerprint,
             "data": event_data({"from": source.source})})
        return bool(rows[0][0])

    async def cost_totals(self, run_id: str) -> dict[str, float]:
        """Reported USD summed over attempts, for jobs with more than one attempt."""
        rows = await self._rows(
            "SELECT job_id, SUM(cost_usd) FROM attempts WHERE run_id = %s GROUP BY job_id"
            " HAVING COUNT(*) > 1 AND COUNT(cost_usd) > 0", (run_id,))
        return {r[0]: float(r[1]) for r in rows}


async def integrity_problems(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """What :data:`INTEGRITY_CHECKS` finds wrong in the database ``conn`` is connected to."""
    params = {"states": [s.value for s in JobState]}
    problems = []
    for problem, sql in INTEGRITY_CHECKS:
        cur = await conn.execute(sql, params)
        row = await cur.fetchone()
        if row and row[0]:
            problems.append(f"{row[0]} {problem}")
    return problems


#: Pending jobs of a run (a page, in manifest order) with a downloaded video of the same
#: fingerprint in another run, and the newest three such videos of each.
_REUSE_SELECT: LiteralString = (
    "SELECT job_id, seq, fingerprint, d_run, d_job, video_path, video_size, video_sha256,"
    " video_uri, video_etag FROM (SELECT j.job_id, j.seq, j.fingerprint, d.run_id AS d_run,"
    " d.job_id AS d_job, d.video_path, d.video_size, d.video_sha256, d.video_uri,"
    " d.video_etag, row_number() OVER (PARTITION BY j.job_id ORDER BY d.updated_at DESC) AS n"
    " FROM (SELECT run_id, job_id, seq, fingerprint FROM jobs p WHERE run_id = %(run)s"
    " AND state = 'pending' AND seq > %(after)s AND EXISTS (SELECT 1 FROM jobs e"
    " WHERE e.fingerprint = p.fingerprint AND e.run_id != p.run_id"
    " AND e.state = 'downloaded' AND e.video_sha256 IS NOT NULL)"
    " ORDER BY seq LIMIT %(limit)s) j"
    " JOIN jobs d ON d.fingerprint = j.fingerprint AND d.run_id != j.run_id"
    " AND d.state = 'downloaded' AND d.video_sha256 IS NOT NULL) AS found"
    " WHERE n <= 3 ORDER BY seq, n"
)


def _stale_holder(run_id: str, seen: Sequence[Any], stale_after: float) -> bool:
    """For the run's lease holder, its worker row ``(host, pid, boot_id, silence, state)`` with
    the silence on the database's clock: raise :class:`RunLocked` if it is alive, return
    whether it is a live-marked holder gone stale (to be fenced as its lease is taken)."""
    host, pid, boot_id, silent, state = seen
    if state != "alive":
        return False
    if silent <= stale_after and not gone_here(host, boot_id, pid):
        raise run_locked(run_id, pid, host, silent)
    return True


def _columns(jobs: list[tuple[int, JobSpec]]) -> tuple[list[str], list[int], list[str], list[str]]:
    """``(job ids, seqs, specs, fingerprints)``: one array per column, for ``unnest``."""
    return ([spec.job_id for _, spec in jobs], [seq for seq, _ in jobs],
            [spec.to_json() for _, spec in jobs], [spec.fingerprint for _, spec in jobs])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


#: A claim's first message: the schema's ``batchkling_claim_pick`` (an unlocked read of what
#: the claim decides on, and the run's next pending job locked when one may be taken), and
#: that job.
_CLAIM_PICK = (
    "BEGIN;"
    " SELECT worker_state, slot_limit, paused_for, run_state, committed, committed_units,"
    " in_flight, pending FROM batchkling_claim_pick(%(worker)s, %(account)s, %(run)s,"
    " %(cap)s, %(clock)s, %(slot_states)s, %(idle_ms)s, %(credit)s);"
    f" SELECT {_JOB_COLUMNS} FROM jobs WHERE run_id = %(run)s"
    " AND job_id = current_setting('batchkling.claim_job')"
)
#: The second: ``batchkling_claim_take`` (the decision again, under the account's lock and,
#: with a budget, the run's), then the job's update if it said so (the columns are the
#: intent's), and the commit.
_CLAIM_TAKE = (
    "SELECT outcome, slot_limit, paused_for, in_flight, committed, committed_units"
    " FROM batchkling_claim_take(%(worker)s, %(account)s, %(run)s, %(cap)s, %(max_usd)s,"
    " %(usd)s, %(max_units)s, %(units)s, %(clock)s, %(slot_states)s, %(credit)s);"
    " UPDATE jobs SET state = 'submitting', updated_at = %(now)s,"
    " last_event = 'job.submitting', last_event_data = NULL, worker_id = %(worker)s,"
    " account_id = %(account)s, claim_epoch = claim_epoch + 1{sets}"
    " WHERE run_id = %(run)s AND job_id = %(job)s"
    " AND current_setting('batchkling.claim_ok') = 'yes'"
    f" RETURNING {_JOB_COLUMNS};"
    " COMMIT"
)


async def _claim_in(conn: psycopg.AsyncConnection[Any], params: dict[str, Any], *,
                    slot_cap: int, intent: Callable[[JobRow], Intent], max_usd: float | None,
                    max_units: float | None, now: float, missing: str) -> Claim:
    """One claim's transaction on ``conn`` (see :meth:`PostgresStore.claim`)."""
    # A client-side cursor: each message is several statements (simple query protocol).
    cur = psycopg.AsyncClientCursor(conn)
    try:
        await cur.execute(_CLAIM_PICK, params)
        cur.nextset()  # past BEGIN
        (head,) = await cur.fetchall()
        cur.nextset()
        picked = await cur.fetchall()
        decided = _decide(head, picked, slot_cap=slot_cap, intent=intent, max_usd=max_usd,
                          max_units=max_units, missing=missing)
        if isinstance(decided, Claim):
            await cur.execute("ROLLBACK")
            return decided
        job, plan = decided
        fields = transition_fields({"reserved_usd": plan.reserved_usd,
                                    "reserved_units": plan.reserved_units,
                                    "price_group": plan.price_group, "error_code": None,
                                    "error_message": None}, plan.new_attempt)
        # Column names come from JOB_COLUMNS (transition_fields checks them); each value is
        # its own named parameter.
        sets = "".join(f", {name} = %(f_{name})s" for name in fields)
        await cur.execute(_CLAIM_TAKE.replace("{sets}", sets), {
            **params, **{f"f_{name}": value for name, value in fields.items()},
            "max_usd": max_usd, "usd": plan.reserved_usd, "max_units": max_units,
            "units": plan.reserved_units, "now": now, "job": job.job_id})
        outcome, slot_limit, paused_for, in_flight, committed, committed_units = (
            await cur.fetchall())[0]
        cur.nextset()
        claimed = await cur.fetchone()
    except BaseException:
        if conn.info.transaction_status in (psycopg.pq.TransactionStatus.INTRANS,
                                            psycopg.pq.TransactionStatus.INERROR):
            with contextlib.suppress(psycopg.Error):
                await conn.rollback()
        raise
    seen = _Seen(int(in_flight), min(int(slot_limit), slot_cap))
    if outcome == "fenced":  # presumed dead since the pick: nothing was changed
        raise WorkerFenced(FENCED)
    if outcome == "claimed":
        assert claimed is not None  # the job was locked by this transaction
        return seen.claim(ClaimOutcome.CLAIMED, job=job_row(claimed))
    # Since the pick, another claim took the last slot, a pause began, the run closed or the
    # budget filled: nothing was changed.
    if outcome == "paused":
        return seen.claim(ClaimOutcome.PAUSED, wait=float(paused_for))
    if outcome == "budget":
        return seen.claim(ClaimOutcome.BUDGET, price=plan.reserved_usd,
                          committed_usd=float(committed))
    if outcome == "budget_units":
        return seen.claim(ClaimOutcome.BUDGET, price=plan.reserved_units,
                          committed_usd=float(committed_units), cap="units")
    return seen.claim(ClaimOutcome(outcome))


@dataclass(frozen=True, slots=True)
class _Seen:
    """The account's tasks in flight and its limit, as the claim saw them."""

    in_flight: int
    slot_limit: int

    def claim(self, outcome: ClaimOutcome, **more: Any) -> Claim:
        return Claim(outcome, in_flight=self.in_flight, slot_limit=self.slot_limit, **more)


def _decide(head: tuple[Any, ...], picked: list[tuple[Any, ...]], *, slot_cap: int,
            intent: Callable[[JobRow], Intent], max_usd: float | None,
            max_units: float | None, missing: str) -> Claim | tuple[JobRow, Intent]:
    """What a claim's pick says: a :class:`Claim` that takes nothing, or the picked job with
    its intent (to be decided again under the locks)."""
    (worker_state, slot_limit, paused_for, run_state, committed, committed_units, in_flight,
     pending) = head
    if worker_state != "alive":
        raise WorkerFenced(FENCED)
    if slot_limit is None or run_state is None:
        raise RunNotFound(missing)
    seen = _Seen(int(in_flight), min(int(slot_limit), slot_cap))
    if run_state != "running":
        return seen.claim(ClaimOutcome.CLOSED)
    if not picked:
        if not pending:
            return seen.claim(ClaimOutcome.EMPTY)
        if paused_for > 0:
            return seen.claim(ClaimOutcome.PAUSED, wait=float(paused_for))
        # No free slot — or every pending job is being claimed for another account right
        # now: either way, look again in a moment.
        return seen.claim(ClaimOutcome.NO_SLOT)
    row = job_row(picked[0])
    plan = intent(row)
    if max_usd is not None and committed + plan.reserved_usd > max_usd + 1e-9:
        return seen.claim(ClaimOutcome.BUDGET, price=plan.reserved_usd,
                          committed_usd=float(committed))
    if max_units is not None and committed_units + plan.reserved_units > max_units + 1e-9:
        return seen.claim(ClaimOutcome.BUDGET, price=plan.reserved_units,
                          committed_usd=float(committed_units), cap="units")
    return row, plan
