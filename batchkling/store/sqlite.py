"""The SQLite backend of the checkpoint store: the embedded default, one file per workdir.

Every job state change is one ``UPDATE`` of its ``jobs`` row — a single statement, so a single
atomic transaction — and triggers do the rest inside it: a new attempt number inserts the
attempt's row, and every transition mirrors the attempt's fields and appends an event.

Two ways to commit, both WAL:

- **durable** (the default): ``PRAGMA synchronous=FULL`` on aiosqlite's connection, in its
  thread. Once the transition returns it survives a power cut — what the create intent and the
  task-id commit need (DESIGN.md §4). The fsync must not stall the event loop, so it pays a trip
  to the database thread and back.
- **quick** (``transition(..., quick=True)``): ``synchronous=NORMAL`` on a second connection, in
  the event loop's own thread. The frames go to the WAL with one ``write``, no fsync: the commit
  survives the process being killed, and the next durable commit (which syncs the whole WAL)
  makes it survive a power cut too. For the states whose loss costs only a repeated poll or
  download (``running``, ``succeeded``, ``downloaded``). It takes tens of microseconds, and
  spares the trip to the database thread and back (docs/benchmarks.md). If another process
  holds the write lock, the transition takes the durable path instead of waiting on the loop.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from batchkling.errors import RunLocked, RunNotFound, StoreError
from batchkling.models import TERMINAL, JobSpec, JobState
from batchkling.store.interface import RECENT_ENDS, Store
from batchkling.store.rows import (
    FRESH_ATTEMPT,
    JOB_COLUMNS,
    JOB_SELECT,
    RUN_SELECT,
    JobRow,
    RunRow,
    job_row,
    run_row,
)
from batchkling.store.sqlite_schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SqliteStore"]


class SqliteStore(Store):
    """The checkpoint database in one SQLite file: ``async with SqliteStore(path) as store``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self._db: aiosqlite.Connection | None = None
        self._quick: sqlite3.Connection | None = None
        self._closed = False
        # aiosqlite serialises statements, not transactions: this lock keeps one coroutine's
        # BEGIN..COMMIT from interleaving with another's. Taken without a contender, it does not
        # yield to the event loop: one loop turn less per transition.
        self._lock = anyio.Lock(fast_acquire=True)

    async def open(self) -> None:
        """Open (creating if needed) the database and bring its schema up to date."""
        if self._closed:
            raise StoreError("this store was closed; open a new one")
        if self._db is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None, timeout=30)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the state database {self.path}: {exc}") from exc
        try:
            # Small pages for a new file (an existing one keeps its own): a commit writes every
            # page it touched to the WAL, and a transition touches five or six (the job, its
            # index entry, its attempt, its event and the event's index entry). At 1 KiB a
            # commit writes 7 KiB instead of 28 and takes about half the CPU
            # (docs/benchmarks.md).
            await db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await self._migrate(db)
            self._quick = _quick_connection(self.path)
        except BaseException as exc:
            # aiosqlite's thread is not a daemon: a connection left open keeps the process alive.
            with anyio.CancelScope(shield=True):
                await db.close()
            if isinstance(exc, sqlite3.Error | OSError):
                raise StoreError(f"cannot open the state database {self.path}: {exc}") from exc
            raise
        self._db = db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        """Create the schema, or bring an older one up to :data:`SCHEMA_VERSION`."""
        await db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        async with db.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
            row = await cur.fetchone()
        version = SCHEMA_VERSION if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer batchkling (schema {version}); "
                "upgrade batchkling to use it"
            )
        steps = "".join(MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
        # One script, one transaction: a crash mid-upgrade leaves the old schema intact.
        await db.executescript(
            f"BEGIN IMMEDIATE; {steps} {SCHEMA}"
            f" INSERT OR REPLACE INTO meta (key, value) VALUES"
            f" ('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
        )

    async def aclose(self) -> None:
        """Close the database; idempotent."""
        self._closed = True
        if self._quick is not None:
            quick, self._quick = self._quick, None
            quick.close()
        if self._db is not None:
            db, self._db = self._db, None
            with anyio.CancelScope(shield=True):
                await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    async def _write(self, statements: Iterable[tuple[str, Iterable[Any]]]) -> None:
        """Run statements as one transaction (a lone statement is its own transaction)."""
        db = self.db
        batch = list(statements)
        async with self._lock:
            try:
                if len(batch) == 1:
                    sql, params = batch[0]
                    await db.execute(sql, tuple(params))
                    return
                await db.execute("BEGIN IMMEDIATE")
                try:
                    # A run of the same statement goes in one trip to the database thread: a
                    # 10,000-job manifest is one executemany, not 10,000 round trips.
                    for sql, group in itertools.groupby(batch, key=lambda item: item[0]):
                        rows = [tuple(params) for _sql, params in group]
                        if len(rows) == 1:
                            await db.execute(sql, rows[0])
                        else:
                            await db.executemany(sql, rows)
                    await db.execute("COMMIT")
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"state database write failed ({self.path}): {exc}") from exc

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            # One trip that runs, reads and finishes the statement: a cursor left open across
            # an await would hold a read snapshot, and the next write on this connection would
            # fail (SQLITE_BUSY_SNAPSHOT) once a quick commit had moved the database on.
            return list(await self.db.execute_fetchall(sql, tuple(params)))
        except sqlite3.Error as exc:
            raise StoreError(f"state database read failed ({self.path}): {exc}") from exc

    # ---- runs ------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRow | None:
        """The run with this id, or None."""
        rows = await self._fetchall(f"{RUN_SELECT} WHERE run_id = ?", (run_id,))
        return run_row(rows[0]) if rows else None

    async def list_runs(self) -> list[RunRow]:
        """Every run, newest first."""
        rows = await self._fetchall(f"{RUN_SELECT} ORDER BY created_at DESC")
        return [run_row(r) for r in rows]

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
        await self._write(
            [
                (
                    "INSERT INTO runs (run_id, manifest_path, manifest_text, config_json, provider,"
                    " base_url, simulated, nonce, state, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)"
                    " ON CONFLICT (run_id) DO UPDATE SET manifest_path = excluded.manifest_path,"
                    " manifest_text = excluded.manifest_text, config_json = excluded.config_json,"
                    " provider = excluded.provider, base_url = excluded.base_url,"
                    " updated_at = excluded.updated_at",
                    (run_id, manifest_path, manifest_text, config_json, provider, base_url,
                     int(simulated), secrets.token_hex(4), now, now),
                )
            ],
        )

    async def set_run_state(
        self, run_id: str, state: str, stop_reason: str | None, now: float
    ) -> None:
        """Record how the latest invocation on this run ended."""
        await self._write(
            [
                (
                    "UPDATE runs SET state = ?, stop_reason = ?, updated_at = ? WHERE run_id = ?",
                    (state, stop_reason, now, run_id),
                )
            ]
        )

    # ---- the single-runner lease -----------------------------------------------------------

    async def acquire_lease(
        self, run_id: str, owner: str, *, now: float, stale_after: float
    ) -> None:
        """Take the run's lease, or raise :class:`RunLocked` naming the live holder.

        A lease is stale when its heartbeat is older than ``stale_after`` seconds, or when its
        holder was on this host and that process no longer exists (a SIGKILLed runner).
        """
        pid, host = os.getpid(), socket.gethostname()
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    async with self.db.execute(
                        "SELECT lease_owner, lease_pid, lease_host, lease_heartbeat FROM runs"
                        " WHERE run_id = ?",
                        (run_id,),
                    ) as cur:
                        row = await cur.fetchone()
                    if row is None:
                        raise RunNotFound(f"no run {run_id!r} in {self.path}")
                    holder, holder_pid, holder_host, beat = row
                    if holder is not None and holder != owner and not _lease_is_stale(
                        holder_pid, holder_host, beat, now=now, stale_after=stale_after
                    ):
                        raise RunLocked(
                            f"run {run_id!r} is being run by process {holder_pid} on "
                            f"{holder_host} (last heartbeat {now - (beat or now):.0f}s ago); "
                            "wait for it to finish, or stop it first"
                        )
                    await self.db.execute(
                        "UPDATE runs SET lease_owner = ?, lease_pid = ?, lease_host = ?,"
                        " lease_heartbeat = ? WHERE run_id = ?",
                        (owner, pid, host, now, run_id),
                    )
                    await self.db.execute("COMMIT")
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self.db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"state database write failed ({self.path}): {exc}") from exc

    async def heartbeat(self, run_id: str, owner: str, now: float) -> None:
        """Refresh the lease so other processes see this runner alive."""
        await self._write(
            [
                (
                    "UPDATE runs SET lease_heartbeat = ? WHERE run_id = ? AND lease_owner = ?",
                    (now, run_id, owner),
                )
            ]
        )

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up; a no-op if another process has taken it over."""
        await self._write(
            [
                (
                    "UPDATE runs SET lease_owner = NULL, lease_pid = NULL, lease_host = NULL,"
                    " lease_heartbeat = NULL WHERE run_id = ? AND lease_owner = ?",
                    (run_id, owner),
                )
            ]
        )

    # ---- jobs ------------------------------------------------------------------------------

    async def job_index(self, run_id: str) -> dict[str, tuple[str, JobState]]:
        """``{job_id: (fingerprint, state)}`` for every job of the run."""
        rows = await self._fetchall(
            "SELECT job_id, fingerprint, state FROM jobs WHERE run_id = ?", (run_id,)
        )
        return {r[0]: (r[1], JobState(r[2])) for r in rows}

    async def sync_jobs(
        self,
        run_id: str,
        *,
        added: list[tuple[int, JobSpec]],
        changed: list[tuple[int, JobSpec]],
        reordered: list[tuple[int, str]],
        removed: list[str],
        now: float,
    ) -> None:
        """Apply a manifest's expansion to the run in one transaction.

        New jobs start ``pending``; changed jobs (new fingerprint) go back to ``pending`` keeping
        their attempt history; removed jobs become ``skipped`` (finished ones keep their video).
        """
        statements: list[tuple[str, Iterable[Any]]] = []
        for seq, spec in added:
            statements.append(
                (
                    "INSERT INTO jobs (run_id, job_id, seq, spec_json, fingerprint, state,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                    (run_id, spec.job_id, seq, spec.to_json(), spec.fingerprint, now),
                )
            )
        for seq, spec in changed:
            statements.append(
                (
                    "UPDATE jobs SET seq = ?, spec_json = ?, fingerprint = ?, state = 'pending',"
                    " task_id = NULL, idempotency_key = NULL, progress = NULL, video_url = NULL,"
                    " video_path = NULL, video_size = NULL, video_sha256 = NULL,"
                    " video_uri = NULL, video_etag = NULL,"
                    " cost_usd = NULL, cost_units = NULL, reserved_usd = 0, error_code = NULL,"
                    " error_message = NULL, retryable = NULL, submitted_at = NULL,"
                    " completed_at = NULL, render_seconds = NULL, updated_at = ?"
                    " WHERE run_id = ? AND job_id = ?",
                    (seq, spec.to_json(), spec.fingerprint, now, run_id, spec.job_id),
                )
            )
            statements.append(_event(run_id, spec.job_id, now, "job.changed", None))
        for seq, job_id in reordered:
            statements.append(
                ("UPDATE jobs SET seq = ? WHERE run_id = ? AND job_id = ?", (seq, run_id, job_id))
            )
        for job_id in removed:
            statements.append(
                (
                    "UPDATE jobs SET state = 'skipped', updated_at = ?"
                    " WHERE run_id = ? AND job_id = ? AND state != 'downloaded'",
                    (now, run_id, job_id),
                )
            )
        if statements:
            await self._write(statements)

    async def reset_for_retry(
        self, run_id: str, *, states: Iterable[JobState], job_ids: Iterable[str], now: float
    ) -> int:
        """Put jobs back to ``pending`` for ``retry``; return how many.

        ``unknown`` jobs keep their attempt and idempotency key (the create is repeated, so a
        provider that honours the key cannot bill twice). Every other job gets a fresh attempt
        budget: ``attempt_base`` moves up to the current attempt. Jobs named in ``job_ids`` are
        taken from any state where no task is in flight. Without states or ids: failed jobs.
        """
        wanted = {s.value for s in states}
        ids = list(job_ids)
        if not wanted and not ids:
            wanted = {JobState.FAILED.value}
        if ids:
            movable = [s.value for s in JobState if s.value not in
                       ("submitting", "submitted", "running", "pending")]
            wanted = wanted or set(movable)
        clauses = [f"state IN ({','.join('?' * len(wanted))})"]
        params: list[Any] = [run_id, *sorted(wanted)]
        if ids:
            clauses.append(f"job_id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        where = "run_id = ? AND " + " AND ".join(clauses)
        rows = await self._fetchall(f"SELECT job_id, state FROM jobs WHERE {where}", params)
        fresh = (
            "UPDATE jobs SET state = 'pending', attempt_base = attempt, idempotency_key = NULL,"
            " task_id = NULL, progress = NULL, video_url = NULL, error_code = NULL,"
            " error_message = NULL, retryable = NULL, reserved_usd = 0, updated_at = ?"
            " WHERE run_id = ? AND job_id = ?"
        )
        again = (
            "UPDATE jobs SET state = 'pending', error_code = NULL, error_message = NULL,"
            " updated_at = ? WHERE run_id = ? AND job_id = ?"
        )
        statements: list[tuple[str, Iterable[Any]]] = []
        for job_id, state in rows:
            sql = again if state == JobState.UNKNOWN.value else fresh
            statements.append((sql, (now, run_id, job_id)))
            statements.append(_event(run_id, job_id, now, "job.retry_requested",
                                     {"from": state}))
        if statements:
            await self._write(statements)
        return len(rows)

    async def get_job(self, run_id: str, job_id: str) -> JobRow | None:
        """One job, or None."""
        rows = await self._fetchall(
            f"{JOB_SELECT} WHERE run_id = ? AND job_id = ?", (run_id, job_id)
        )
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
        wanted = [s.value for s in states]
        marks = ",".join("?" * len(wanted))
        rows = await self._fetchall(
            f"{JOB_SELECT} WHERE run_id = ? AND state IN ({marks}) AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (run_id, *wanted, after_seq, limit),
        )
        return [job_row(r) for r in rows]

    async def counts(self, run_id: str) -> dict[JobState, int]:
        """Number of jobs in each state."""
        rows = await self._fetchall(
            "SELECT state, COUNT(*) FROM jobs WHERE run_id = ? GROUP BY state", (run_id,)
        )
        return {JobState(r[0]): int(r[1]) for r in rows}

    async def recent_ends(self, run_id: str, limit: int = RECENT_ENDS) -> list[float]:
        """When the last ``limit`` jobs to end (downloaded, failed, skipped) ended, newest first."""
        states = sorted(s.value for s in TERMINAL)
        marks = ",".join("?" * len(states))
        rows = await self._fetchall(
            f"SELECT updated_at FROM jobs WHERE run_id = ? AND state IN ({marks})"
            " ORDER BY updated_at DESC LIMIT ?",
            (run_id, *states, limit),
        )
        return [float(r[0]) for r in rows]

    async def units(self, run_id: str) -> float:
        """Provider units reported so far (Kling bills in units and reports no USD)."""
        rows = await self._fetchall(
            "SELECT COALESCE(SUM(cost_units), 0) FROM attempts WHERE run_id = ?", (run_id,))
        return float(rows[0][0])

    async def money(self, run_id: str) -> tuple[float, float]:
        """``(spent, committed)``: reported cost so far, and cost plus open reservations."""
        rows = await self._fetchall(
            "SELECT COALESCE((SELECT SUM(cost_usd) FROM attempts WHERE run_id = ?), 0),"
            " COALESCE((SELECT SUM(reserved_usd) FROM jobs WHERE run_id = ?), 0)",
            (run_id, run_id),
        )
        spent, reserved = float(rows[0][0]), float(rows[0][1])
        return spent, spent + reserved

    async def attempts(self, run_id: str, job_id: str) -> list[dict[str, Any]]:
        """The job's attempts, oldest first."""
        rows = await self._fetchall(
            "SELECT number, idempotency_key, fingerprint, state, task_id, submitted_at,"
            " completed_at, cost_usd, cost_units, error_code, error_message, video_uri,"
            " video_size, video_sha256, video_etag FROM attempts"
            " WHERE run_id = ? AND job_id = ? ORDER BY number",
            (run_id, job_id),
        )
        keys = ("number", "idempotency_key", "fingerprint", "state", "task_id", "submitted_at",
                "completed_at", "cost_usd", "cost_units", "error_code", "error_message",
                "video_uri", "video_size", "video_sha256", "video_etag")
        return [dict(zip(keys, r, strict=True)) for r in rows]

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
        **fields: Any,
    ) -> None:
        """Move a job to ``state`` and set ``fields``; its event row lands in the same statement.

        ``new_attempt`` = ``(number, idempotency_key)`` opens a new attempt (the submit intent):
        the attempt fields start empty, and a trigger inserts the attempt's row. Afterwards the
        attempt fields of every transition are mirrored onto the current attempt's row.
        ``quick`` commits without fsync, on the event loop's thread (see the module docstring).
        """
        unknown = set(fields) - JOB_COLUMNS
        if unknown:
            raise StoreError(f"unknown job fields {sorted(unknown)}")
        if new_attempt is not None:
            number, key = new_attempt
            fields = {**dict.fromkeys(FRESH_ATTEMPT), **fields, "attempt": number,
                      "idempotency_key": key}
        blob = json.dumps(dict(data), default=str, separators=(",", ":")) if data else None
        sets = "".join(f", {name} = ?" for name in fields)
        statement = (
            f"UPDATE jobs SET state = ?, updated_at = ?, last_event = ?, last_event_data = ?"
            f"{sets} WHERE run_id = ? AND job_id = ?",
            (state.value, now, event, blob, *fields.values(), run_id, job_id),
        )
        if quick and await self._write_quick(*statement):
            return
        await self._write([statement])

    async def _write_quick(self, sql: str, params: tuple[Any, ...]) -> bool:
        """Commit one statement without fsync on this thread; False if the lock is taken."""
        if self._quick is None:
            return False
        async with self._lock:
            try:
                self._quick.execute(sql, params)
            except sqlite3.Error as exc:
                # Another process is writing: the durable path waits for it, off the loop.
                if getattr(exc, "sqlite_errorcode", None) in _BUSY:
                    return False
                raise StoreError(f"state database write failed ({self.path}): {exc}") from exc
        return True

    async def log_event(
        self, run_id: str, job_id: str | None, now: float, event: str,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an event that changes no state (a stop, a limit change)."""
        await self._write([_event(run_id, job_id, now, event, data)])

    async def integrity_check(self) -> str:
        """SQLite's own verdict on the file: ``ok`` when healthy."""
        rows = await self._fetchall("PRAGMA integrity_check")
        return str(rows[0][0])


#: Page size of a new database file.
PAGE_SIZE = 1024

# SQLITE_BUSY and SQLITE_LOCKED, with their extended codes.
_BUSY = frozenset({5, 6, 261, 262, 517})


def _quick_connection(path: Path) -> sqlite3.Connection:
    """A second connection for quick commits: WAL frames written, not fsynced.

    It never waits for the write lock (``timeout=0``: the caller falls back to the durable
    path) and never checkpoints: that is the durable connection's work, off the event loop, on
    its next commit past the WAL's threshold — at the latest the lease heartbeat, every 5 s.
    """
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA wal_autocheckpoint=0")
    except BaseException:
        conn.close()
        raise
    return conn


def _event(
    run_id: str, job_id: str | None, now: float, event: str, data: Mapping[str, Any] | None
) -> tuple[str, tuple[Any, ...]]:
    blob = json.dumps(dict(data), default=str, separators=(",", ":")) if data else None
    return (
        "INSERT INTO events (run_id, job_id, at, event, data) VALUES (?, ?, ?, ?, ?)",
        (run_id, job_id, now, event, blob),
    )


def _lease_is_stale(
    pid: int | None, host: str | None, beat: float | None, *, now: float, stale_after: float
) -> bool:
    if beat is None or now - beat > stale_after:
        return True
    if host == socket.gethostname() and pid is not None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by someone else
            return False
    return False
