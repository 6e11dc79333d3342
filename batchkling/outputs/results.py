"""The results CSV: one row per job, a view of the store, written atomically."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchkling.models import JobState
from batchkling.outputs.atomic import atomic_text
from batchkling.outputs.nextstep import job_next_step
from batchkling.store import JobRow, Store

COLUMNS = (
    "run_id", "job_id", "status", "model", "prompt", "negative_prompt", "duration", "size",
    "mode", "image", "image_tail", "task_id", "attempts", "video_url", "video_path",
    "video_uri", "video_sha256", "cost_usd", "error_code", "error_message", "submitted_at",
    "completed_at", "render_seconds", "next_step", "reused_from",
)

# A spreadsheet runs cells starting with these as formulas (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_status(state: JobState, *, download: bool) -> str:
    """The CSV's status vocabulary: succeeded, failed, timed_out, unknown, pending, skipped."""
    if state is JobState.DOWNLOADED or (state is JobState.SUCCEEDED and not download):
        return "succeeded"
    if state in (JobState.FAILED, JobState.TIMED_OUT, JobState.UNKNOWN, JobState.SKIPPED):
        return state.value
    # Submitted, running, or rendered but not yet on disk: still work to do.
    return "pending"


def escape_cell(value: Any) -> Any:
    """Neutralise text a spreadsheet would run as a formula; other values pass unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    from datetime import UTC, datetime

    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):  # not a date (a store written before #14)
        return ""


def job_record(run_id: str, row: JobRow, *, download: bool,
               where: Sequence[str] = (), total_usd: float | None = None) -> dict[str, Any]:
    """One CSV row as a mapping (unescaped); ``where`` locates the store for ``next_step``.

    ``cost_usd`` is ``total_usd`` — what every attempt of the job cost, for a job rendered more
    than once — or else what its one attempt reported, so a second render is never hidden.
    """
    spec = row.spec
    cost = row.cost_usd if total_usd is None else total_usd
    return {
        "run_id": run_id,
        "job_id": row.job_id,
        "status": csv_status(row.state, download=download),
        "model": spec.model,
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt or "",
        "duration": spec.duration,
        "size": spec.size,
        "mode": spec.mode or "",
        "image": spec.image or "",
        "image_tail": spec.image_tail or "",
        "task_id": row.task_id or "",
        "attempts": row.attempt,
        "video_url": row.video_url or "",
        "video_path": row.video_path or "",
        "video_uri": row.video_uri or "",
        "video_sha256": row.video_sha256 or "",
        "cost_usd": "" if cost is None else f"{cost:.4f}",
        "error_code": row.error_code or "",
        "error_message": row.error_message or "",
        "submitted_at": _iso(row.submitted_at),
        "completed_at": _iso(row.completed_at),
        "render_seconds": "" if row.render_seconds is None else f"{row.render_seconds:.1f}",
        "next_step": job_next_step(run_id, row.job_id, row.state.value, error_code=row.error_code,
                                   retryable=row.retryable, where=where),
        "reused_from": row.reused_from or "",
        **{f"var.{k}": v for k, v in spec.variables.items()},
    }


async def write_results(store: Store, run_id: str, dest: Path, *, download: bool,
                        where: Sequence[str] = ()) -> Path:
    """Write the run's CSV to ``dest`` atomically (temp file, fsync, rename); ``where`` are
    the options the ``next_step`` commands need to find the store."""
    var_names: dict[str, None] = {}
    async for row in store.iter_jobs(run_id):
        for name in row.spec.variables:
            var_names.setdefault(f"var.{name}", None)
    header = [*COLUMNS, *var_names]
    # Only jobs rendered more than once: usually none, so this holds little memory.
    totals = await store.cost_totals(run_id)
    with atomic_text(dest, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore", restval="")
        writer.writeheader()
        async for row in store.iter_jobs(run_id):
            record = job_record(run_id, row, download=download, where=where,
                                total_usd=totals.get(row.job_id))
            writer.writerow({k: escape_cell(v) for k, v in record.items()})
    return dest


def read_results(path: Path) -> list[dict[str, str]]:
    """Read a results CSV back (for tests and tools)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def unescape_cell(value: str) -> str:
    """Inverse of :func:`escape_cell` for text cells."""
    if value.startswith("'") and value[1:2] in _FORMULA_START and value[1:2] != "":
        return value[1:]
    return value


__all__ = ["COLUMNS", "csv_status", "escape_cell", "read_results", "write_results"]
