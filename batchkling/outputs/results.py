"""The results CSV: one row per job, a view of the store, written atomically."""

from __future__ import annotations

import csv
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
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
_FORMULA_CHARS = frozenset("".join(_FORMULA_START))


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
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):  # not a date (a store written before #14)
        return ""


async def write_results(store: Store, run_id: str, dest: Path, *, download: bool,
                        where: Sequence[str] = ()) -> Path:
    """Write the run's CSV to ``dest`` atomically (temp file, fsync, rename), in one pass over
    the store, a page of jobs in memory at a time; ``where`` are the options the
    ``next_step`` commands need to find the store.

    The ``var.*`` columns are known only once every job is read, so the rows go to a scratch
    file first and the header is written in front of them at the end. Columns keep the order
    in which the variables first appear; a row written before a variable first appeared ends
    before that column (a short row reads as empty cells there).
    """
    var_names: dict[str, None] = {}
    # Only jobs rendered more than once: usually none, so this holds little memory.
    totals = await store.cost_totals(run_id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="", dir=dest.parent) as body:
        writer = csv.writer(body)
        async for row in store.iter_jobs(run_id):
            writer.writerow(_cells(run_id, row, var_names, download=download, where=where,
                                   total_usd=totals.get(row.job_id)))
        body.seek(0)
        with atomic_text(dest, newline="") as fh:
            csv.writer(fh).writerow([*COLUMNS, *(f"var.{name}" for name in var_names)])
            shutil.copyfileobj(body, fh, 1 << 20)
    return dest


def _cells(run_id: str, row: JobRow, var_names: dict[str, None], *, download: bool,
           where: Sequence[str], total_usd: float | None = None) -> list[Any]:
    """One CSV row, escaped, in :data:`COLUMNS` order then the variables known so far.

    ``cost_usd`` is ``total_usd`` — what every attempt of the job cost, for a job rendered more
    than once — or else what its one attempt reported, so a second render is never hidden.
    """
    spec = row.spec
    cost = row.cost_usd if total_usd is None else total_usd
    variables = spec.variables
    for name in variables:
        if name not in var_names:
            var_names[name] = None
    cells = [
        run_id, row.job_id, csv_status(row.state, download=download), spec.model, spec.prompt,
        spec.negative_prompt or "", spec.duration, spec.size, spec.mode or "",
        spec.image or "", spec.image_tail or "", row.task_id or "", row.attempt,
        row.video_url or "", row.video_path or "", row.video_uri or "", row.video_sha256 or "",
        "" if cost is None else f"{cost:.4f}", row.error_code or "",
        row.error_message or "", _iso(row.submitted_at), _iso(row.completed_at),
        "" if row.render_seconds is None else f"{row.render_seconds:.1f}",
        job_next_step(run_id, row.job_id, row.state.value, error_code=row.error_code,
                      retryable=row.retryable, where=where),
        row.reused_from or "",
        *(variables.get(name, "") for name in var_names),
    ]
    return [_escape_text(c) if c.__class__ is str and c else c for c in cells]


def _escape_text(value: str) -> str:
    return "'" + value if value[0] in _FORMULA_CHARS else value


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
