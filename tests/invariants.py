"""The invariants every reliability scenario ends on, checked by one helper.

After any run — faulty, killed, interrupted, hostile — :func:`check_invariants` asserts:

- no idempotency key made two provider tasks (``duplicate_keys == []``), except keys of jobs
  honestly reported ``unknown`` on ImaRouter, which offers no lookup; no create without a key;
- every job is in exactly one documented state (one row per job, a known ``JobState``);
- every ``succeeded`` CSV row has its MP4 on disk: complete (the recorded size and sha256),
  starting with an ``ftyp`` box; and no ``.part`` file is left in the run's folder;
- ``PRAGMA integrity_check`` is ``ok``;
- the results CSV agrees with the database: the same jobs in the same order, each status the
  one :func:`batchkling.outputs.results.csv_status` maps the job's state to.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchkling.models import JobState
from batchkling.outputs.results import csv_status, read_results, unescape_cell

CSV_STATUSES = frozenset({"succeeded", "failed", "timed_out", "unknown", "pending", "skipped"})


@dataclass
class Checked:
    """What the check saw, for the test to assert on further."""

    states: Counter[str] = field(default_factory=Counter)  # DB state -> jobs
    statuses: Counter[str] = field(default_factory=Counter)  # CSV status -> jobs
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # job id -> CSV row
    db: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> jobs row
    creates: int | None = None


def db_query(workdir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` against the workdir's state database (read-only use)."""
    con = sqlite3.connect(workdir / "batchkling.db")
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def check_invariants(workdir: Path, run_id: str, stats: dict[str, Any] | None = None, *,
                     provider: str = "imarouter", download: bool = True,
                     jobs: int | None = None, csv_path: Path | None = None) -> Checked:
    """Assert the invariants above for ``run_id``; ``stats`` is the simulator's, if one ran."""
    out = Checked()
    con = sqlite3.connect(workdir / "batchkling.db")
    con.row_factory = sqlite3.Row
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db_rows = con.execute("SELECT * FROM jobs WHERE run_id = ? ORDER BY seq",
                              (run_id,)).fetchall()
        keys_by_job: dict[str, set[str]] = {}
        for job_id, key in con.execute(
                "SELECT job_id, idempotency_key FROM attempts WHERE run_id = ?", (run_id,)):
            keys_by_job.setdefault(job_id, set()).add(key)
    finally:
        con.close()
    valid_states = {s.value for s in JobState}
    for row in db_rows:
        record = dict(row)
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
