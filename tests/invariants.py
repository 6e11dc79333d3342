"""The invariants every reliability scenario ends on, checked by one helper.

After any run — faulty, killed, interrupted, hostile — :func:`check_invariants` asserts:

- no idempotency key made two provider tasks (``duplicate_keys == []``), except keys of jobs
  honestly reported ``unknown`` on ImaRouter, which offers no lookup; no create without a key;
- every job is in exactly one documented state (one row per job, a known ``JobState``);
- every ``succeeded`` CSV row has its MP4 on disk: complete (the recorded size and sha256),
  starting with an ``ftyp`` box; and no ``.part`` file is left in the run's folder;
- the store is sound: ``PRAGMA integrity_check`` is ``ok`` on SQLite, and on PostgreSQL
  the backend's own consistency checks (``postgres.INTEGRITY_CHECKS``) find nothing;
- the results CSV agrees with the database: the same jobs in the same order, each status the
  one :func:`batchkling.outputs.results.csv_status` maps the job's state to.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchkling.models import JobState
from batchkling.outputs.results import csv_status, read_results, unescape_cell
from batchkling.store import default_location, is_postgres

CSV_STATUSES = frozenset({"succeeded", "failed", "timed_out", "unknown", "pending", "skipped"})


@dataclass
class Checked:
    """What the check saw, for the test to assert on further."""

    states: Counter[str] = field(default_factory=Counter)  # DB state -> jobs
    statuses: Counter[str] = field(default_factory=Counter)  # CSV status -> jobs
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # job id -> CSV row
    db: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> jobs row
    creates: int | None = None


def _location(where: Path | str) -> str:
    """A store location from a workdir, a SQLite file or a PostgreSQL URL."""
    if is_postgres(where):
        return str(where)
    path = Path(where)
    return str(default_location(path) if path.is_dir() else path)


def db_query(where: Path | str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``?`` placeholders) against a store, directly: ``where`` is a workdir
    (its ``batchkling.db``), a SQLite file, or a PostgreSQL URL. A write is committed."""
    return [tuple(r.values()) for r in db_dicts(where, sql, *args)]


def db_dicts(where: Path | str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Like :func:`db_query`, each row a dict by column name."""
    location = _location(where)
    if is_postgres(location):
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(location, autocommit=True, row_factory=dict_row) as conn:
            cur = conn.execute(sql.replace("?", "%s"), args)
            return list(cur.fetchall()) if cur.description else []
    con = sqlite3.connect(location)
    con.row_factory = sqlite3.Row
    try:
        with con:
            return [dict(r) for r in con.execute(sql, args).fetchall()]
    finally:
        con.close()


def db_dump(where: Path | str) -> str:
    """Every row of every table of a store, as text (to search for what must not be there)."""
    location = _location(where)
    if not is_postgres(location):
        con = sqlite3.connect(location)
        try:
            return "\n".join(con.iterdump())
        finally:
            con.close()
    tables = [t for (t,) in db_query(location, "SELECT tablename FROM pg_tables"
                                               " WHERE schemaname = current_schema()")]
    assert tables, "no tables in the store"
    return "\n".join(str(row) for table in tables
                     for row in db_query(location, f"SELECT t::text FROM {table} t"))


def store_problems(where: Path | str) -> list[str]:
    """What the store's own health check finds wrong (empty when sound)."""
    location = _location(where)
    if not is_postgres(location):
        verdict = db_query(location, "PRAGMA integrity_check")[0][0]
        return [] if verdict == "ok" else [verdict]
    import psycopg

    from batchkling.store.postgres import INTEGRITY_CHECKS

    problems = []
    with psycopg.connect(location, autocommit=True) as conn:
        for problem, query in INTEGRITY_CHECKS:
            row = conn.execute(query, {"states": [s.value for s in JobState]}).fetchone()
            if row and row[0]:
                problems.append(f"{row[0]} {problem}")
    return problems


def check_invariants(workdir: Path, run_id: str, stats: dict[str, Any] | None = None, *,
                     provider: str = "imarouter", download: bool = True,
                     jobs: int | None = None, csv_path: Path | None = None,
                     store: str | os.PathLike[str] | None = None) -> Checked:
    """Assert the invariants above for ``run_id``; ``stats`` is the simulator's, if one ran;
    ``store`` is where the run's store is (default: the workdir's SQLite file)."""
    out = Checked()
    where = os.fspath(store) if store is not None else workdir
    assert store_problems(where) == []
    db_rows = db_dicts(where, "SELECT * FROM jobs WHERE run_id = ? ORDER BY seq", run_id)
    keys_by_job: dict[str, set[str]] = {}
    for job_id, key in db_query(where, "SELECT job_id, idempotency_key FROM attempts"
                                       " WHERE run_id = ?", run_id):
        keys_by_job.setdefault(job_id, set()).add(key)
    valid_states = {s.value for s in JobState}
    for record in db_rows:
        assert record["job_id"] not in out.db, f"job {record['job_id']} has two rows"
        assert record["state"] in valid_states, record
        out.db[record["job_id"]] = record
        out.states[record["state"]] += 1
    if jobs is not None:
        assert len(out.db) == jobs, (len(out.db), jobs)

    # The CSV is a view of the DB: same jobs, same order, mapped statuses.
    rows = read_results(csv_path or workdir / run_id / "results.csv")
    assert [unescape_cell(r["job_id"]) for r in rows] == list(out.db), "CSV and DB disagree"
    for row in rows:
        job_id = unescape_cell(row["job_id"])
        record = out.db[job_id]
        status = row["status"]
        assert status in CSV_STATUSES, row
        assert status == csv_status(JobState(record["state"]), download=download), (
            job_id, status, record["state"])
        out.rows[job_id] = row
        out.statuses[status] += 1
        if status == "succeeded" and download:
            assert record["state"] == JobState.DOWNLOADED.value
            path = Path(unescape_cell(row["video_path"]))
            assert path.is_file(), f"{job_id}: succeeded but {path} is not on disk"
            data = path.read_bytes()
            assert len(data) >= 12 and data[4:8] == b"ftyp", f"{job_id}: not an MP4"
            assert len(data) == record["video_size"], f"{job_id}: size differs from the record"
            assert hashlib.sha256(data).hexdigest() == record["video_sha256"] == \
                row["video_sha256"], f"{job_id}: sha256 differs from the record"
    run_dir = workdir / run_id
    leftovers = list(run_dir.resolve().rglob("*.part")) if run_dir.exists() else []
    assert leftovers == [], leftovers

    if stats is not None:
        out.creates = stats["creates"]
        assert stats["creates_without_key"] == 0
        allowed: set[str] = set()
        if provider == "imarouter":
            for job_id, record in out.db.items():
                if record["state"] == JobState.UNKNOWN.value:
                    allowed |= keys_by_job.get(job_id, set())
        duplicates = set(stats["duplicate_keys"]) - allowed
        assert not duplicates, f"keys that made two paid tasks: {sorted(duplicates)}"
    return out
