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

import contextlib
import errno
import itertools
import json
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio

from batchkling.clock import Clock
from batchkling.errors import RunNotFound, SchemaTooNew, StoreError, WorkerFenced
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
from batchkling.store.lease import BOOT_ID as _BOOT_ID
from batchkling.store.lease import FENCED as _FENCED
from batchkling.store.lease import host_clock as _host_clock
from batchkling.store.lease import process_alive as _process_alive
from batchkling.store.lease import run_locked
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
from batchkling.store.sqlite_schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SqliteStore"]


class SqliteStore(Store):
    """The checkpoint database in one SQLite file: ``async with SqliteStore(path) as store``."""

    #: Seconds a write waits for the file's write lock, held by another process, before it
    #: fails with a message that says who may hold it.
    lock_wait = 30.0

    def __init__(self, path: str | os.PathLike[str], *, clock: Clock | None = None) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        # The store's clock, for heartbeats and pauses: host-wide and monotonic, so a wall-clock
        # step cannot make a live worker look dead. A test injects its virtual clock.
        self._clock = clock
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
            db = await aiosqlite.connect(self.path, isolation_level=None,
                                      timeout=self.lock_wait)
        except (sqlite3.Error, OSError) as exc:
            raise _failure(self.path, "cannot open the state database", exc) from exc
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
            if isinstance(exc, sqlite3.Error | OSError | ValueError):
                raise _failure(self.path, "cannot open the state database", exc) from exc
            raise
        self._db = db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        """Create the schema, or bring an older one up to :data:`SCHEMA_VERSION`.

        A database already at this version is only read: opening it never waits for the write
        lock, which a paused process (Ctrl-Z, a suspended VM) may hold for as long as it sleeps.
        """
        version: int | None = None
        async with db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                              " AND name = 'meta'") as cur:
            has_meta = await cur.fetchone() is not None
        if has_meta:
            async with db.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
                row = await cur.fetchone()
            version = None if row is None else int(row[0])
        if version == SCHEMA_VERSION:
            return
        if version is None:
            version = SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
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

    async def _write(self, statements: Iterable[tuple[str, Iterable[Any]]]) -> int:
        """Run statements as one transaction (a lone statement is its own transaction).

        Returns the number of rows a lone statement changed (-1 for a batch). ``statements``
        is read lazily, so a generator of many keeps only a batch of them in memory.
        """
        db = self.db
        pending = iter(statements)
        first = next(pending, None)
        if first is None:
            return -1
        second = next(pending, None)
        async with self._lock:
            try:
                if second is None:
                    sql, params = first
                    cursor = await db.execute(sql, tuple(params))
                    return cursor.rowcount
                await db.execute("BEGIN IMMEDIATE")
                try:
                    # A run of the same statement goes in one trip to the database thread per
                    # SYNC_BATCH rows: a 10,000-job manifest is five executemany calls, not
                    # 10,000 round trips, and never all its rows in memory at once.
                    ordered = itertools.chain((first, second), pending)
                    for sql, group in itertools.groupby(ordered, key=lambda item: item[0]):
                        for chunk in batches(tuple(params) for _sql, params in group):
                            if len(chunk) == 1:
                                await db.execute(sql, chunk[0])
                            else:
                                await db.executemany(sql, chunk)
                    await db.execute("COMMIT")
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _failure(self.path, "state database write failed", exc) from exc
        return -1

    async def _write_returning(self, sql: str, params: Iterable[Any]) -> list[sqlite3.Row]:
        """One statement with ``RETURNING``, as its own (durable) transaction."""
        async with self._lock:
            try:
                return list(await self.db.execute_fetchall(sql, tuple(params)))
            except sqlite3.Error as exc:
                raise _failure(self.path, "state database write failed", exc) from exc

    def _now(self) -> float:
        """The store's clock (see ``__init__``)."""
        return self._clock.monotonic() if self._clock is not None else _host_clock()

    def _rows(self, convert: Callable[[Any], _T], rows: Iterable[Any]) -> list[_T]:
        """``rows`` converted; a value no version of batchkling wrote means a damaged file."""
        try:
            return [convert(row) for row in rows]
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise _failure(self.path, "state database read failed", exc) from exc

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            # One trip that runs, reads and finishes the statement: a cursor left open across
            # an await would hold a read snapshot, and the next write on this connection would
            # fail (SQLITE_BUSY_SNAPSHOT) once a quick commit had moved the database on.
            return list(await self.db.execute_fetchall(sql, tuple(params)))
        except sqlite3.Error as exc:
            raise _failure(self.path, "state database read failed", exc) from exc

    # ---- runs ------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRow | None:
        """The run with this id, or None."""
        rows = await self._fetchall(f"{RUN_SELECT} WHERE run_id = ?", (run_id,))
        return self._rows(run_row, rows[:1])[0] if rows else None

    async def list_runs(self) -> list[RunRow]:
        """Every run, newest first."""
        rows = await self._fetchall(f"{RUN_SELECT} ORDER BY created_at DESC")
        return self._rows(run_row, rows)

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
        self, run_id: str, state: str, stop_reason: str | None, now: float, *,
        owner: str | None = None,
    ) -> None:
        """Record how the latest invocation on this run ended (see :meth:`Store.set_run_state`
        for ``owner``)."""
        fence = "" if owner is None else " AND lease_owner = ?"
        changed = await self._write([(
            f"UPDATE runs SET state = ?, stop_reason = ?, updated_at = ? WHERE run_id = ?{fence}",
            (state, stop_reason, now, run_id, *(() if owner is None else (owner,))),
        )])
        if owner is not None and changed == 0:
            raise WorkerFenced(_FENCED)

    # ---- workers and the run's lease -------------------------------------------------------

    async def register_worker(self, worker_id: str, *, runs: Sequence[str] | None,
                              now: float) -> None:
        """Record this process as a live worker (serving ``runs``, or every open run)."""
        await self._write([(
            "INSERT INTO workers (worker_id, host, pid, boot_id, state, runs, started_at,"
            " heartbeat_at, beat) VALUES (?, ?, ?, ?, 'alive', ?, ?, ?, ?)"
            " ON CONFLICT (worker_id) DO UPDATE SET state = 'alive', heartbeat_at ="
            " excluded.heartbeat_at, beat = excluded.beat",
            (worker_id, socket.gethostname(), os.getpid(), _BOOT_ID,
             None if runs is None else json.dumps(list(runs)), now, now, self._now()),
        )])

    async def worker_heartbeat(self, worker_id: str, now: float) -> None:
        """Say this worker is alive; :class:`WorkerFenced` if it was presumed dead meanwhile."""
        changed = await self._write([(
            "UPDATE workers SET heartbeat_at = ?, beat = ? WHERE worker_id = ? AND state = 'alive'",
            (now, self._now(), worker_id),
        )])
        if changed == 0:
            raise WorkerFenced(_FENCED)

    async def retire_worker(self, worker_id: str, *, state: str, reason: str | None,
                            now: float) -> None:
        """Mark this worker ``stopped`` (it exits) so its unfinished jobs are adopted at once."""
        await self._write([(
            "UPDATE workers SET state = ?, stop_reason = ?, heartbeat_at = ?"
            " WHERE worker_id = ? AND state = 'alive'",
            (state, reason, now, worker_id),
        )])

    async def reap_workers(self, stale_after: float, now: float) -> list[str]:
        """Mark ``dead`` the live workers silent past ``stale_after``; return their ids."""
        rows = await self._fetchall(
            "SELECT worker_id, host, pid, boot_id, beat, heartbeat_at FROM workers"
            " WHERE state = 'alive'")
        dead = [(r[0], r[4]) for r in rows
                if self._stale(r[1], r[2], r[3], r[4], r[5], stale_after=stale_after, now=now)]
        reaped = []
        for worker_id, beat in dead:
            # Only if it has not beaten since we looked: a worker that woke up stays alive.
            if await self._write([(
                "UPDATE workers SET state = 'dead', stop_reason = ? WHERE worker_id = ?"
                " AND state = 'alive' AND beat = ?",
                (f"silent for more than {stale_after:g}s", worker_id, beat),
            )]):
                reaped.append(worker_id)
        return reaped

    def _silent_for(self, boot_id: str, beat: float, heartbeat_at: float, now: float) -> float:
        if boot_id == _BOOT_ID:
            return self._now() - beat
        # Another boot, or another machine sharing the file: only wall time compares.
        return now - heartbeat_at

    def _stale(self, host: str, pid: int, boot_id: str, beat: float, heartbeat_at: float, *,
               stale_after: float, now: float) -> bool:
        if self._silent_for(boot_id, beat, heartbeat_at, now) > stale_after:
            return True
        # A process of this host and boot that no longer exists (SIGKILLed) is gone at once.
        return (host == socket.gethostname() and boot_id == _BOOT_ID
                and not _process_alive(pid))

    async def list_workers(self, *, alive_only: bool = True) -> list[WorkerRow]:
        """Workers, most recently heard of first."""
        where = " WHERE state = 'alive'" if alive_only else ""
        rows = await self._fetchall(
            "SELECT worker_id, host, pid, state, runs, started_at, heartbeat_at, boot_id, beat,"
            f" stop_reason FROM workers{where} ORDER BY heartbeat_at DESC")
        wall = time.time()
        return [WorkerRow(worker_id=r[0], host=r[1], pid=r[2], state=r[3],
                          runs=None if r[4] is None else list(json.loads(r[4])),
                          started_at=r[5], heartbeat_at=r[6],
                          silent_for=max(0.0, self._silent_for(r[7], r[8], r[6], wall)),
                          stop_reason=r[9])
                for r in rows]

    async def held_by_workers(self) -> dict[str, dict[str, int]]:
        """``{worker_id: {state: jobs}}`` for every worker that drives a job."""
        return held_rows(await self._fetchall(HELD_SELECT))

    async def check_lease(self, run_id: str, worker_id: str, *, stale_after: float,
                          now: float) -> None:
        """Raise :class:`RunLocked` if another live process drives the run; only reads, so
        the answer comes at once even while a paused process holds the write lock."""
        await self._live_holder(self.db, run_id, worker_id, stale_after=stale_after, now=now)

    async def acquire_lease(self, run_id: str, worker_id: str, *, stale_after: float,
                            now: float) -> None:
        """Make ``worker_id`` the run's driver, or raise :class:`RunLocked`; a stale holder is
        fenced (marked dead) as its lease is taken over."""
        async with self._transaction() as db:
            holder = await self._live_holder(db, run_id, worker_id, stale_after=stale_after,
                                             now=now)
            if holder is not None:
                # Presumed dead: from now on its writes change nothing.
                await db.execute(
                    "UPDATE workers SET state = 'dead', stop_reason = ? WHERE worker_id = ?",
                    (f"its run {run_id!r} was taken over", holder))
            await db.execute("UPDATE runs SET lease_owner = ? WHERE run_id = ?",
                             (worker_id, run_id))

    async def _live_holder(self, db: aiosqlite.Connection, run_id: str, worker_id: str, *,
                           stale_after: float, now: float) -> str | None:
        """The run's other holder if it is stale (to be fenced), None if there is none; raise
        :class:`RunLocked` if it is alive."""
        rows = await db.execute_fetchall(
            "SELECT r.lease_owner, w.host, w.pid, w.boot_id, w.beat, w.heartbeat_at,"
            " w.state FROM runs r LEFT JOIN workers w ON w.worker_id = r.lease_owner"
            " WHERE r.run_id = ?", (run_id,))
        if not rows:
            raise RunNotFound(f"no run {run_id!r} in {self.path}")
        holder, host, pid, boot_id, beat, heartbeat_at, state = next(iter(rows))
        if holder is None or holder == worker_id or state != "alive":
            return None
        if not self._stale(host, pid, boot_id, beat, heartbeat_at,
                           stale_after=stale_after, now=now):
            raise run_locked(run_id, pid, host, self._silent_for(boot_id, beat, heartbeat_at, now))
        return str(holder)

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up; a no-op if another process has taken it over."""
        await self._write([(
            "UPDATE runs SET lease_owner = NULL WHERE run_id = ? AND lease_owner = ?",
            (run_id, owner),
        )])

    # ---- accounts and claims ---------------------------------------------------------------

    async def ensure_account(self, account_id: str, *, provider: str, max_in_flight: int,
                             now: float) -> AccountRow:
        """Create the account, or set its configured ``max_in_flight``; return it."""
        await self._write([(
            "INSERT INTO accounts (account_id, provider, max_in_flight, slot_limit, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET"
            " max_in_flight = excluded.max_in_flight,"
            " slot_limit = MIN(accounts.slot_limit, excluded.max_in_flight),"
            " updated_at = excluded.updated_at",
            (account_id, provider, max_in_flight, max_in_flight, now),
        )])
        account = await self.get_account(account_id)
        assert account is not None
        return account

    async def get_account(self, account_id: str) -> AccountRow | None:
        """The account with its slots in flight now, or None."""
        rows = await self._fetchall(
            f"SELECT account_id, provider, max_in_flight, slot_limit, paused_until,"
            f" {_in_flight('a.account_id')} FROM accounts a WHERE account_id = ?",
            (account_id,))
        if not rows:
            return None
        r = rows[0]
        return AccountRow(account_id=r[0], provider=r[1], max_in_flight=r[2], slot_limit=r[3],
                          paused_for=max(0.0, r[4] - self._now()), in_flight=r[5])

    async def account_rejected(self, account_id: str, *, limit: int, now: float,
                               hold_off: int = 0) -> int:
        """Lower the shared slot limit to ``limit`` (never raise it); return the limit. The
        streak restarts below zero by ``hold_off``: the next probe comes that much later."""
        rows = await self._write_returning(
            "UPDATE accounts SET slot_limit = MAX(1, MIN(slot_limit, ?)), streak = ?,"
            " updated_at = ? WHERE account_id = ? RETURNING slot_limit",
            (limit, -max(0, hold_off), now, account_id))
        return int(rows[0][0]) if rows else limit

    async def account_created(self, account_id: str, *, now: float) -> int:
        """Count a create; after two rounds of the limit, probe one more slot."""
        rows = await self._write_returning(
            "UPDATE accounts SET"
            " slot_limit = CASE WHEN streak + 1 >= 2 * slot_limit THEN slot_limit + 1"
            " ELSE slot_limit END,"
            " streak = CASE WHEN streak + 1 >= 2 * slot_limit THEN 0 ELSE streak + 1 END,"
            " updated_at = ? WHERE account_id = ? AND slot_limit < max_in_flight"
            " RETURNING slot_limit",
            (now, account_id))
        if rows:
            return int(rows[0][0])
        account = await self.get_account(account_id)
        return account.slot_limit if account else 0

    async def pause_account(self, account_id: str, seconds: float, now: float) -> None:
        """Hold every worker's creates on this account back for ``seconds``."""
        until = self._now() + max(0.0, seconds)
        await self._write([(
            "UPDATE accounts SET paused_until = MAX(paused_until, ?), updated_at = ?"
            " WHERE account_id = ?", (until, now, account_id))])

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
        """Take the run's next pending job: see :meth:`Store.claim`.

        A read decides, then one conditional ``UPDATE … RETURNING`` commits the intent; its
        ``WHERE`` re-checks everything the read saw, inside SQLite's single write transaction,
        so a claim that raced another process changes nothing and is decided again.
        """
        seen = _Seen(0, 0)
        credit = max(0, credit)
        for _ in range(5):
            rows = await self._fetchall(_CLAIM_READ, (
                worker_id, account_id, run_id, run_id))
            if not rows:
                raise RunNotFound(f"no run {run_id!r} (or account {account_id!r}) in "
                                  f"{self.path}")
            head = rows[0]
            worker_state, slot_limit, paused_until, in_flight, run_state, committed = head[:6]
            committed_units = head[_CLAIM_UNITS]
            limit = min(int(slot_limit), slot_cap)
            seen = _Seen(int(in_flight), limit)
            if worker_state != "alive":
                raise WorkerFenced(_FENCED)
            if run_state != "running":
                return seen.claim(ClaimOutcome.CLOSED)
            if head[6] is None:
                return seen.claim(ClaimOutcome.EMPTY)
            store_now = self._now()
            if paused_until > store_now:
                return seen.claim(ClaimOutcome.PAUSED, wait=paused_until - store_now)
            if in_flight - min(credit, in_flight) >= limit:
                return seen.claim(ClaimOutcome.NO_SLOT)
            job = job_row(head[6:_CLAIM_UNITS])
            plan = intent(job)
            if max_usd is not None and committed + plan.reserved_usd > max_usd + 1e-9:
                return seen.claim(ClaimOutcome.BUDGET, price=plan.reserved_usd,
                                  committed_usd=float(committed))
            if max_units is not None and committed_units + plan.reserved_units > max_units + 1e-9:
                return seen.claim(ClaimOutcome.BUDGET, price=plan.reserved_units,
                                  committed_usd=float(committed_units), cap="units")
            fields = transition_fields({"reserved_usd": plan.reserved_usd,
                                        "reserved_units": plan.reserved_units,
                                        "price_group": plan.price_group, "error_code": None,
                                        "error_message": None}, plan.new_attempt)
            sets = "".join(f", {name} = ?" for name in fields)
            claimed = await self._write_returning(
                "UPDATE jobs SET state = 'submitting', updated_at = ?,"
                " last_event = 'job.submitting', last_event_data = NULL, worker_id = ?,"
                f" account_id = ?, claim_epoch = claim_epoch + 1{sets}"
                " WHERE run_id = ? AND job_id = ? AND state = 'pending' AND claim_epoch = ?"
                " AND (SELECT state FROM workers WHERE worker_id = ?) = 'alive'"
                " AND (SELECT state FROM runs WHERE run_id = ?) = 'running'"
                f" AND MAX({_in_flight('?')} - ?, 0) < MIN(?, (SELECT slot_limit FROM accounts"
                " WHERE account_id = ?))"
                " AND (SELECT paused_until FROM accounts WHERE account_id = ?) <= ?"
                " AND (? IS NULL OR (SELECT spent_usd + reserved_usd FROM runs WHERE run_id = ?)"
                " + ? <= ? + 1e-9)"
                " AND (? IS NULL OR (SELECT spent_units + reserved_units FROM runs"
                " WHERE run_id = ?) + ? <= ? + 1e-9)"
                f" RETURNING {_JOB_COLUMNS}",
                (now, worker_id, account_id, *fields.values(), run_id, job.job_id,
                 job.claim_epoch, worker_id, run_id, account_id, credit, slot_cap,
                 account_id, account_id, store_now, max_usd, run_id, plan.reserved_usd,
                 max_usd, max_units, run_id, plan.reserved_units, max_units))
            if claimed:
                return seen.claim(ClaimOutcome.CLAIMED, job=job_row(claimed[0]))
            # Something moved between the read and the write (another worker claimed this
            # job or a slot, a pause began): decide again from a fresh read.
        return seen.claim(ClaimOutcome.NO_SLOT)

    async def adopt(self, run_id: str, *, worker_id: str, states: Iterable[JobState],
                    released: bool, limit: int = 500) -> list[JobRow]:
        """Take over jobs in ``states`` whose worker is dead or stopped (and, with
        ``released``, those no worker holds); bump their epoch; return them in seq order."""
        wanted = [s.value for s in states]
        marks = ",".join("?" * len(wanted))
        orphan = ("worker_id NOT IN (SELECT worker_id FROM workers WHERE state = 'alive')")
        whose = f"(worker_id IS NULL OR {orphan})" if released else \
            f"(worker_id IS NOT NULL AND {orphan})"
        rows = await self._write_returning(
            f"UPDATE jobs SET worker_id = ?, claim_epoch = claim_epoch + 1 WHERE rowid IN"
            f" (SELECT rowid FROM jobs WHERE run_id = ? AND state IN ({marks}) AND {whose}"
            f" ORDER BY seq LIMIT ?) RETURNING {_JOB_COLUMNS}",
            (worker_id, run_id, *wanted, limit))
        return sorted((job_row(r) for r in rows), key=lambda job: job.seq)

    async def held_elsewhere(self, run_id: str, worker_id: str) -> int:
        """Jobs of the run that live workers other than ``worker_id`` are driving."""
        marks = ",".join("?" * len(ORPHAN_STATES))
        rows = await self._fetchall(
            f"SELECT COUNT(*) FROM jobs WHERE run_id = ? AND state IN ({marks})"
            " AND worker_id IS NOT NULL AND worker_id != ?"
            " AND worker_id IN (SELECT worker_id FROM workers WHERE state = 'alive')",
            (run_id, *[s.value for s in ORPHAN_STATES], worker_id))
        return int(rows[0][0])

    async def work_left(self, run_id: str) -> tuple[int, int]:
        """``(pending, orphaned)`` jobs of the run (see :meth:`Store.work_left`)."""
        marks = ",".join("?" * len(ORPHAN_STATES))
        rows = await self._fetchall(
            "SELECT COUNT(*) FILTER (WHERE state = 'pending'),"
            f" COUNT(*) FILTER (WHERE state IN ({marks}) AND worker_id IS NOT NULL"
            " AND worker_id NOT IN (SELECT worker_id FROM workers WHERE state = 'alive'))"
            " FROM jobs WHERE run_id = ?",
            (*[s.value for s in ORPHAN_STATES], run_id))
        return int(rows[0][0]), int(rows[0][1])

    async def close_run(self, run_id: str, state: str, stop_reason: str | None,
                        now: float) -> bool:
        """End an open, driverless run with nothing left to do (see :meth:`Store.close_run`)."""
        marks = ",".join("?" * len(ORPHAN_STATES))
        return bool(await self._write([(
            "UPDATE runs SET state = ?, stop_reason = ?, updated_at = ? WHERE run_id = ?"
            " AND state = 'running' AND (lease_owner IS NULL OR lease_owner NOT IN"
            " (SELECT worker_id FROM workers WHERE state = 'alive'))"
            " AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.run_id = runs.run_id AND"
            f" (state = 'pending' OR (state IN ({marks}) AND worker_id IN"
            " (SELECT worker_id FROM workers WHERE state = 'alive'))))",
            (state, stop_reason, now, run_id, *[s.value for s in ORPHAN_STATES]),
        )]))

    # ---- jobs ------------------------------------------------------------------------------

    async def job_index(self, run_id: str) -> dict[str, tuple[str, JobState]]:
        """``{job_id: (fingerprint, state)}`` for every job of the run."""
        rows = await self._fetchall(
            "SELECT job_id, fingerprint, state FROM jobs WHERE run_id = ?", (run_id,)
        )
        return dict(self._rows(lambda r: (r[0], (r[1], JobState(r[2]))), rows))

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
        ``failed``) become ``skipped``; the others keep their state, so a task that is paid for
        is still tracked and its video fetched. A skipped job back in the manifest unchanged
        returns to the state it was skipped from (``rows.RESTORED_STATE`` says how).
        """
        statements: list[tuple[str, Iterable[Any]]] = []
        back: set[str] = set()
        if reordered:
            skipped = await self._fetchall(
                "SELECT job_id FROM jobs WHERE run_id = ? AND state = 'skipped'", (run_id,))
            back = {str(r[0]) for r in skipped}
        new = (("INSERT INTO jobs (run_id, job_id, seq, spec_json, fingerprint, state,"
                " updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                (run_id, spec.job_id, seq, spec.to_json(), spec.fingerprint, now))
               for seq, spec in added)
        for seq, spec in changed:
            statements.append(
                (
                    "UPDATE jobs SET seq = ?, spec_json = ?, fingerprint = ?, state = 'pending',"
                    " task_id = NULL, idempotency_key = NULL, progress = NULL, video_url = NULL,"
                    " video_path = NULL, video_size = NULL, video_sha256 = NULL,"
                    " video_uri = NULL, video_etag = NULL,"
                    " cost_usd = NULL, cost_units = NULL, reserved_usd = 0, error_code = NULL,"
                    " error_message = NULL, retryable = NULL, submitted_at = NULL,"
                    " completed_at = NULL, render_seconds = NULL, reserved_units = 0,"
                    " reused_from = NULL, updated_at = ?"
                    " WHERE run_id = ? AND job_id = ?",
                    (seq, spec.to_json(), spec.fingerprint, now, run_id, spec.job_id),
                )
            )
            statements.append(_event(run_id, spec.job_id, now, "job.changed", None))
        for seq, job_id in reordered:
            if job_id in back:
                statements.append((f"UPDATE jobs SET seq = ?, state = {RESTORED_STATE},"
                                   " updated_at = ? WHERE run_id = ? AND job_id = ?",
                                   (seq, now, run_id, job_id)))
                statements.append(_event(run_id, job_id, now, "job.restored", None))
                continue
            statements.append(
                ("UPDATE jobs SET seq = ? WHERE run_id = ? AND job_id = ?", (seq, run_id, job_id))
            )
        for job_id in removed:
            statements.append(
                (
                    "UPDATE jobs SET state = 'skipped', updated_at = ?"
                    " WHERE run_id = ? AND job_id = ? AND state IN ('pending', 'failed')",
                    (now, run_id, job_id),
                )
            )
        await self._write(itertools.chain(new, statements))

    async def reset_for_retry(
        self, run_id: str, *, states: Iterable[JobState], job_ids: Iterable[str], now: float
    ) -> int:
        """Put jobs back to ``pending`` for ``retry``; return how many.

        ``unknown`` jobs keep their attempt and idempotency key (the create is repeated, so a
        provider that honours the key cannot bill twice). Every other job gets a fresh attempt
        budget: ``attempt_base`` moves up to the current attempt. Jobs named in ``job_ids`` are
        taken from any state where no task is in flight. Without states or ids: failed jobs.
        """
        wanted, ids = retry_selection(states, job_ids)
        clauses = [f"state IN ({','.join('?' * len(wanted))})"]
        params: list[Any] = [run_id, *wanted]
        if ids:
            clauses.append(f"job_id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        where = "run_id = ? AND " + " AND ".join(clauses)
        rows = await self._fetchall(f"SELECT job_id, state FROM jobs WHERE {where}", params)
        fresh = (
            "UPDATE jobs SET state = 'pending', attempt_base = attempt, idempotency_key = NULL,"
            " task_id = NULL, progress = NULL, video_url = NULL, error_code = NULL,"
            " error_message = NULL, retryable = NULL, reserved_usd = 0, reserved_units = 0,"
            " reused_from = NULL, updated_at = ? WHERE run_id = ? AND job_id = ?"
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
        return self._rows(job_row, rows[:1])[0] if rows else None

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
        if len(set(wanted)) == len(JobState):
            # Every job: walk the (run_id, seq) index. With the IN list SQLite gathered and
            # sorted every job after the cursor for each page, O(n) memory and O(n²) time
            # over a whole run (90 MB and seconds per pass at 100,000 jobs).
            rows = await self._fetchall(
                f"{JOB_SELECT} INDEXED BY jobs_by_seq WHERE run_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (run_id, after_seq, limit),
            )
            return [job_row(r) for r in rows]
        marks = ",".join("?" * len(wanted))
        rows = await self._fetchall(
            f"{JOB_SELECT} WHERE run_id = ? AND state IN ({marks}) AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (run_id, *wanted, after_seq, limit),
        )
        return self._rows(job_row, rows)

    async def task_owner(self, run_id: str, job_id: str, task_id: str) -> tuple[str, str] | None:
        """Another job holding ``task_id``: of this run, or of a run on the same provider and
        base URL (the ``jobs_by_task`` index makes it one lookup)."""
        rows = await self._fetchall(
            "SELECT j.run_id, j.job_id FROM jobs j JOIN runs r ON r.run_id = j.run_id,"
            " runs me WHERE me.run_id = ? AND j.task_id = ?"
            " AND NOT (j.run_id = me.run_id AND j.job_id = ?)"
            " AND (j.run_id = me.run_id OR (r.provider = me.provider"
            " AND r.base_url = me.base_url)) LIMIT 1",
            (run_id, task_id, job_id),
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def counts(self, run_id: str) -> dict[JobState, int]:
        """Number of jobs in each state."""
        rows = await self._fetchall(
            "SELECT state, COUNT(*) FROM jobs WHERE run_id = ? GROUP BY state", (run_id,)
        )
        return dict(self._rows(lambda r: (JobState(r[0]), int(r[1])), rows))

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

    async def render_times(self, *, provider: str, base_url: str, model: str, duration: int,
                           mode: str | None, limit: int = 64) -> list[float]:
        """Render times of a group's finished tasks on this endpoint: the latest runs first,
        each from its last jobs back (walking the state index, so a large finished run costs
        as many rows as are wanted, not a scan of them all)."""
        runs = await self._fetchall(
            "SELECT run_id FROM runs WHERE provider = ? AND base_url = ?"
            " ORDER BY updated_at DESC", (provider, base_url))
        out: list[float] = []
        for (run_id,) in runs:
            for state in (JobState.DOWNLOADED, JobState.SUCCEEDED):
                rows = await self._fetchall(
                    "SELECT render_seconds FROM jobs WHERE run_id = ? AND state = ?"
                    " AND render_seconds > 0"
                    " AND json_extract(spec_json, '$.model') = ?"
                    " AND json_extract(spec_json, '$.duration') = ?"
                    " AND IFNULL(json_extract(spec_json, '$.mode'), '') = ?"
                    " ORDER BY seq DESC LIMIT ?",
                    (run_id, state.value, model, duration, mode or "", limit - len(out)))
                out.extend(float(r[0]) for r in rows)
                if len(out) >= limit:
                    return out
        return out

    async def units(self, run_id: str) -> float:
        """Provider units reported so far (Kling bills in units and reports no USD)."""
        rows = await self._fetchall(
            "SELECT COALESCE(SUM(cost_units), 0) FROM attempts WHERE run_id = ?", (run_id,))
        return float(rows[0][0])

    async def money(self, run_id: str) -> tuple[float, float]:
        """``(spent, committed)``: reported cost so far, and cost plus open reservations."""
        return await self._totals(run_id, "usd")

    async def _totals(self, run_id: str, currency: str) -> tuple[float, float]:
        # Running totals the triggers keep: no scan of the run's attempts.
        rows = await self._fetchall(
            f"SELECT spent_{currency}, reserved_{currency} FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            return 0.0, 0.0
        spent, reserved = float(rows[0][0]), float(rows[0][1])
        return spent, spent + reserved

    async def attempts(self, run_id: str, job_id: str) -> list[dict[str, Any]]:
        """The job's attempts, oldest first."""
        rows = await self._fetchall(
            f"{ATTEMPT_SELECT} WHERE run_id = ? AND job_id = ? ORDER BY number", (run_id, job_id))
        return [dict(zip(ATTEMPT_KEYS, r, strict=True)) for r in rows]

    async def events(
        self, run_id: str, job_id: str | None, *, last: int | None = None
    ) -> list[dict[str, Any]]:
        """Events as ``{"at", "event", "data"}``, oldest first: one job's, or the run's own."""
        who = "job_id = ?" if job_id is not None else "job_id IS NULL"
        params: list[Any] = [run_id] if job_id is None else [run_id, job_id]
        # Newest first with a LIMIT walks the (run_id, id) index back from the end.
        sql = f"SELECT at, event, data FROM events WHERE run_id = ? AND {who} ORDER BY id DESC"
        if last is not None:
            sql += " LIMIT ?"
            params.append(last)
        rows = await self._fetchall(sql, params)
        return [{"at": float(at), "event": event, "data": None if data is None else
                 json.loads(data)} for at, event, data in reversed(rows)]

    async def forget_run(self, run_id: str) -> int:
        """Delete the run with its jobs, attempts and events in one transaction."""
        rows = await self._fetchall("SELECT COUNT(*) FROM jobs WHERE run_id = ?", (run_id,))
        await self._write([(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
                           for table in ("events", "attempts", "jobs", "runs")])
        return int(rows[0][0])

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
        """Move a job to ``state`` and set ``fields``; its event row lands in the same statement.

        ``new_attempt`` = ``(number, idempotency_key)`` opens a new attempt (the submit intent):
        the attempt fields start empty, and a trigger inserts the attempt's row. Afterwards the
        attempt fields of every transition are mirrored onto the current attempt's row.
        ``quick`` commits without fsync, on the event loop's thread (see the module docstring).
        ``epoch`` fences the write to the claim the caller holds (:class:`WorkerFenced`).
        """
        fields = transition_fields(fields, new_attempt)
        blob = event_data(data)
        sets = "".join(f", {name} = ?" for name in fields)
        fence = "" if epoch is None else " AND claim_epoch = ?"
        statement = (
            f"UPDATE jobs SET state = ?, updated_at = ?, last_event = ?, last_event_data = ?"
            f"{sets} WHERE run_id = ? AND job_id = ?{fence}",
            (state.value, now, event, blob, *fields.values(), run_id, job_id,
             *(() if epoch is None else (epoch,))),
        )
        changed = await self._write_quick(*statement) if quick else None
        if changed is None:
            changed = await self._write([statement])
        if changed == 0 and epoch is not None:
            raise WorkerFenced(_FENCED)

    async def _write_quick(self, sql: str, params: tuple[Any, ...]) -> int | None:
        """Commit one statement without fsync on this thread; return the rows it changed, or
        None if the write lock is taken (the caller then takes the durable path)."""
        if self._quick is None:
            return None
        async with self._lock:
            try:
                return self._quick.execute(sql, params).rowcount
            except sqlite3.Error as exc:
                # Another process is writing: the durable path waits for it, off the loop.
                if getattr(exc, "sqlite_errorcode", None) in _BUSY:
                    return None
                raise _failure(self.path, "state database write failed", exc) from exc

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

    # ---- money: observed prices, reservations, reuse ----------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One durable write transaction (``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back on any
        error, SQLite's own as :class:`StoreError`)."""
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                    await self.db.execute("COMMIT")
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self.db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _failure(self.path, "state database write failed", exc) from exc

    async def money_units(self, run_id: str) -> tuple[float, float]:
        """``(spent, committed)`` in provider units (running totals, no scan)."""
        return await self._totals(run_id, "units")

    async def record_price(self, group: str, *, usd: float | None, units: float | None,
                           now: float) -> None:
        """Remember the latest price of ``group`` (see :meth:`Store.record_price`)."""
        await self._write([(
            "INSERT INTO prices (price_group, usd, units, samples, updated_at)"
            " VALUES (?, ?, ?, 1, ?) ON CONFLICT (price_group) DO UPDATE SET"
            " usd = COALESCE(excluded.usd, prices.usd),"
            " units = COALESCE(excluded.units, prices.units),"
            " samples = prices.samples + 1, updated_at = excluded.updated_at",
            (group, usd, units, now))])

    async def observed_prices(self) -> dict[str, ObservedPrice]:
        """Every price group's last observed price."""
        return price_rows(await self._fetchall(PRICES_SELECT))

    async def raise_reservations(self, group: str, *, usd: float | None,
                                 units: float | None) -> int:
        """Raise the reservations of the group's jobs that hold money; return how many."""
        marks = ",".join("?" * len(HOLDING_STATES))
        states = [s.value for s in HOLDING_STATES]
        statements = [
            (f"UPDATE jobs SET {column} = ? WHERE price_group = ? AND state IN ({marks})"
             f" AND {column} < ?", (value, group, *states, value))
            for column, value in (("reserved_usd", usd), ("reserved_units", units))
            if value is not None
        ]
        raised = 0
        async with self._transaction() as db:
            for sql, params in statements:
                raised = max(raised, (await db.execute(sql, params)).rowcount)
        return raised

    async def reuse_sources(self, run_id: str, *, after_seq: int = -1,
                            limit: int = 500) -> list[ReuseSource]:
        """Pending jobs with a downloaded video of the same fingerprint in another run."""
        rows = await self._fetchall(_REUSE_SELECT, (run_id, after_seq, limit))
        return [ReuseSource(*r) for r in rows]

    async def downloaded_fingerprints(self, *, after: str = "", limit: int = 10000) -> list[str]:
        """Fingerprints with a downloaded video (with a checksum), a page at a time."""
        rows = await self._fetchall(
            "SELECT DISTINCT fingerprint FROM jobs WHERE fingerprint > ? AND state = 'downloaded'"
            " AND video_sha256 IS NOT NULL ORDER BY fingerprint LIMIT ?", (after, limit))
        return [r[0] for r in rows]

    async def mark_reused(self, run_id: str, job_id: str, source: ReuseSource, *,
                          video_path: str | None, video_uri: str | None,
                          video_etag: str | None, now: float) -> bool:
        """Record a pending job as downloaded with an earlier run's video (no attempt)."""
        # No last_event: the transition triggers stay quiet, so no attempt row is touched (a
        # changed job's last attempt belongs to its old request); the event is written here.
        async with self._transaction() as db:
            cursor = await db.execute(_REUSE_UPDATE, (
                source.source, video_path, source.video_size, source.video_sha256, video_uri,
                video_etag, now, now, run_id, job_id, source.fingerprint))
            if cursor.rowcount:
                await db.execute(*_event(run_id, job_id, now, "job.reused",
                                         {"from": source.source}))
        return bool(cursor.rowcount)

    async def cost_totals(self, run_id: str) -> dict[str, float]:
        """Reported USD summed over attempts, for jobs with more than one attempt."""
        rows = await self._fetchall(
            "SELECT job_id, SUM(cost_usd) FROM attempts WHERE run_id = ? GROUP BY job_id"
            " HAVING COUNT(*) > 1 AND COUNT(cost_usd) > 0", (run_id,))
        return {r[0]: float(r[1]) for r in rows}


#: Page size of a new database file.
PAGE_SIZE = 1024

_T = TypeVar("_T")
# SQLite's primary result codes that mean a full disk, and a file that is not (or no longer)
# a sound database.
_FULL = 13
_DAMAGED = frozenset({11, 26})


def _failure(path: Path, doing: str, exc: BaseException) -> StoreError:
    """A StoreError that says what a person can do: a full disk and a damaged file get their
    own words (which file, and how to go on); anything else keeps SQLite's."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    if primary == _FULL or getattr(exc, "errno", None) == errno.ENOSPC:
        return StoreError(
            f"the disk holding the state database {path} is full ({exc}): free some space, "
            "then `batchkling resume RUN_ID` continues the run; nothing already created is "
            "paid for again")
    text = str(exc)
    unreadable = isinstance(exc, ValueError | TypeError | KeyError | IndexError)
    if primary in _DAMAGED or unreadable or "decode" in text:
        detail = "".join(c if c.isprintable() else "?" for c in text)[:160]
        return StoreError(
            f"the state database {path} is damaged ({detail}) and cannot be used. To recover: "
            f"restore it from a backup; or salvage what it holds with `sqlite3 {path} .recover "
            f"| sqlite3 recovered.db` and put recovered.db in its place; or move {path} (and "
            "its -wal and -shm files) aside to start afresh, forgetting its runs")
    if primary in _BUSY:
        return StoreError(
            f"the state database {path} stayed locked by another process for "
            f"{SqliteStore.lock_wait:.0f}s: most likely a batchkling that is paused (Ctrl-Z, "
            "kill -STOP, a suspended VM) in the middle of a write. Continue it (`fg`, "
            "`kill -CONT PID`) or stop it, then run the command again: the write that waited "
            "was not made, and nothing already created is paid for again")
    return StoreError(f"{doing} ({path}): {exc}")

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
    return (
        "INSERT INTO events (run_id, job_id, at, event, data) VALUES (?, ?, ?, ?, ?)",
        (run_id, job_id, now, event, event_data(data)),
    )


@dataclass(frozen=True, slots=True)
class _Seen:
    """What a claim's read saw of the account, for every outcome it returns."""

    in_flight: int
    slot_limit: int

    def claim(self, outcome: ClaimOutcome, **more: Any) -> Claim:
        return Claim(outcome, in_flight=self.in_flight, slot_limit=self.slot_limit, **more)


#: Pending jobs of a run (a page, in manifest order) with a downloaded video of the same
#: fingerprint in another run, and the newest three such videos of each.
_REUSE_DONOR = ("{d}.fingerprint = {j}.fingerprint AND {d}.run_id != {j}.run_id"
                " AND {d}.state = 'downloaded' AND {d}.video_sha256 IS NOT NULL")
_REUSE_SELECT = (
    "SELECT job_id, seq, fingerprint, d_run, d_job, video_path, video_size, video_sha256,"
    " video_uri, video_etag FROM (SELECT j.job_id, j.seq, j.fingerprint, d.run_id AS d_run,"
    " d.job_id AS d_job, d.video_path, d.video_size, d.video_sha256, d.video_uri,"
    " d.video_etag, ROW_NUMBER() OVER (PARTITION BY j.job_id ORDER BY d.updated_at DESC) AS n"
    " FROM (SELECT run_id, job_id, seq, fingerprint FROM jobs p WHERE run_id = ?"
    " AND state = 'pending' AND seq > ? AND EXISTS (SELECT 1 FROM jobs e WHERE "
    + _REUSE_DONOR.format(d="e", j="p") + ") ORDER BY seq LIMIT ?) j"
    " JOIN jobs d ON " + _REUSE_DONOR.format(d="d", j="j") + ")"
    " WHERE n <= 3 ORDER BY seq, n"
)
_REUSE_UPDATE = (
    "UPDATE jobs SET state = 'downloaded', reused_from = ?, video_path = ?, video_size = ?,"
    " video_sha256 = ?, video_uri = ?, video_etag = ?, task_id = NULL, video_url = NULL,"
    " progress = NULL, cost_usd = 0, cost_units = NULL, reserved_usd = 0, reserved_units = 0,"
    " error_code = NULL, error_message = NULL, retryable = NULL, submitted_at = NULL,"
    " completed_at = ?, render_seconds = NULL, worker_id = NULL, updated_at = ?"
    " WHERE run_id = ? AND job_id = ? AND state = 'pending' AND fingerprint = ?"
)
_SLOT_VALUES = tuple(state.value for state in SLOT_STATES)
_JOB_COLUMNS = ", ".join(JobRow.__dataclass_fields__)


def _in_flight(account: str) -> str:
    """SQL counting an account's tasks that hold its slots: jobs in :data:`SLOT_STATES` of an
    open run, or driven by a live worker. (A run that was stopped and that nobody drives leaves
    its last tasks in flight in the store; they do not hold the account's slots forever.)"""
    states = ", ".join(f"'{state}'" for state in _SLOT_VALUES)
    return (f"(SELECT COUNT(*) FROM jobs f WHERE f.account_id = {account} AND f.state IN"
            f" ({states}) AND (f.run_id IN (SELECT run_id FROM runs WHERE state = 'running')"
            " OR f.worker_id IN (SELECT worker_id FROM workers WHERE state = 'alive')))")


#: Where the run's committed units sit in a row of ``_CLAIM_READ`` (after the job's columns).
_CLAIM_UNITS = 6 + len(JobRow.__dataclass_fields__)


#: What a claim decides on, in one read: the worker's state, the account's limit, pause and
#: slots in flight, the run's state and committed money, and the run's next pending job.
_CLAIM_READ = (
    "SELECT (SELECT state FROM workers WHERE worker_id = ?), a.slot_limit, a.paused_until,"
    f" {_in_flight('a.account_id')}, r.state, r.spent_usd + r.reserved_usd, "
    + ", ".join(f"j.{name}" for name in JobRow.__dataclass_fields__)
    + ", r.spent_units + r.reserved_units"
    + " FROM runs r JOIN accounts a ON a.account_id = ?"
    " LEFT JOIN jobs j ON j.rowid = (SELECT rowid FROM jobs WHERE run_id = ?"
    " AND state = 'pending' ORDER BY seq LIMIT 1)"
    " WHERE r.run_id = ?"
)
