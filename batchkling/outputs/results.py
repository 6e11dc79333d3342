"""The results CSV: one row per job, a view of the store, written atomically."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
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
    ``next_step`` commands need to find the store. (The end of a run writes it in the
    report's pass instead: :class:`ResultsWriter`.)"""
    with await ResultsWriter.start(store, run_id, dest, download=download,
                                   where=where) as results:
        async for page in store.iter_pages(run_id, page=PAGE):
            results.add(page)
        return results.finish()


#: Jobs read from the store at a time.
PAGE = 1000


class ResultsWriter:
    """The CSV, fed a page of jobs at a time by whoever reads them (``write_results``, or the
    report's pass at the end of a run, so the run's jobs are read once for both files).

    The ``var.*`` columns are known only once every job is read, so the rows go to a scratch
    file first and :meth:`finish` writes the header in front of them. Columns keep the order in
    which the variables first appear; a row written before a variable first appeared ends
    before that column (a short row reads as empty cells there). A file error is kept and
    raised by :meth:`finish`, so the pass that feeds this writer goes on for its other file.
    """

    def __init__(self, run_id: str, dest: Path, *, download: bool, where: Sequence[str],
                 totals: dict[str, float]) -> None:
        self.run_id, self.dest, self.download, self.where = run_id, dest, download, where
        # Only jobs rendered more than once: usually none, so this holds little memory.
        self.totals = totals
        self.var_names: dict[str, None] = {}
        self.error: OSError | None = None
        self._body: Any = None
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Closed by close(): this writer is the context manager.
            self._body = tempfile.TemporaryFile(  # noqa: SIM115
                "w+", encoding="utf-8", newline="", dir=dest.parent)
            self._writer = csv.writer(self._body)
        except OSError as exc:
            self.error = exc

    @classmethod
    async def start(cls, store: Store, run_id: str, dest: Path, *, download: bool,
                    where: Sequence[str] = ()) -> ResultsWriter:
        """A writer for ``run_id``'s CSV, with what the store says jobs cost in all."""
        return cls(run_id, dest, download=download, where=where,
                   totals=await store.cost_totals(run_id))

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the scratch file (``finish`` has copied it, or it is not wanted)."""
        if self._body is not None:
            body, self._body = self._body, None
            body.close()

    def add(self, rows: Sequence[JobRow], specs: Sequence[Mapping[str, Any]] | None = None
            ) -> None:
        """Write ``rows`` (``specs``: their stored requests, parsed, if the caller has them)."""
        if self.error is not None or not rows:
            return
        if specs is None:
            specs = [json.loads(row.spec_json) for row in rows]
        totals, run_id, where = self.totals, self.run_id, self.where
        try:
            self._writer.writerows(
                _cells(run_id, row, spec, self.var_names, download=self.download, where=where,
                       total_usd=totals.get(row.job_id))
                for row, spec in zip(rows, specs, strict=True))
        except OSError as exc:
            self.error = exc

    def finish(self) -> Path:
        """Write the CSV to ``dest`` atomically; raise the file error met on the way, if any."""
        if self.error is not None:
            raise self.error
        body = self._body
        body.seek(0)
        with atomic_text(self.dest, newline="") as fh:
            csv.writer(fh).writerow([*COLUMNS, *(f"var.{name}" for name in self.var_names)])
            shutil.copyfileobj(body, fh, 1 << 20)
        self.close()
        return self.dest


def _cells(run_id: str, row: JobRow, spec: Mapping[str, Any], var_names: dict[str, None], *,
           download: bool, where: Sequence[str], total_usd: float | None = None) -> list[Any]:
    """One CSV row, escaped, in :data:`COLUMNS` order then the variables known so far.

    ``spec`` is the job's stored request as a dict (``JobSpec.to_json``'s keys; a ``JobSpec``
    for each of 100,000 jobs costs more than the row needs). ``cost_usd`` is ``total_usd`` —
    what every attempt of the job cost, for a job rendered more than once — or else what its
    one attempt reported, so a second render is never hidden.
    """
    cost = row.cost_usd if total_usd is None else total_usd
    variables = spec.get("variables") or {}
    for name in variables:
        if name not in var_names:
            var_names[name] = None
    get = spec.get
    cells = [
        run_id, row.job_id, csv_status(row.state, download=download), get("model", ""),
        get("prompt", ""), get("negative_prompt") or "", get("duration", ""), get("size", ""),
        get("mode") or "", get("image") or "", get("image_tail") or "", row.task_id or "",
        row.attempt, row.video_url or "", row.video_path or "", row.video_uri or "",
        row.video_sha256 or "", "" if cost is None else f"{cost:.4f}", row.error_code or "",
        row.error_message or "", _iso(row.submitted_at), _iso(row.completed_at),
        "" if row.render_seconds is None else f"{row.render_seconds:.1f}",
        job_next_step(run_id, row.job_id, row.state.value, error_code=row.error_code,
                      retryable=row.retryable, where=where),
        row.reused_from or "",
        *(variables.get(name, "") for name in var_names),
    ]
    formula = _FORMULA_CHARS
    return ["'" + c if c.__class__ is str and c and c[0] in formula else c for c in cells]


def read_results(path: Path) -> list[dict[str, str]]:
    """Read a results CSV back (for tests and tools)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def unescape_cell(value: str) -> str:
    """Inverse of :func:`escape_cell` for text cells."""
    if value.startswith("'") and value[1:2] in _FORMULA_START and value[1:2] != "":
        return value[1:]
    return value


__all__ = ["COLUMNS", "ResultsWriter", "csv_status", "escape_cell", "read_results",
           "write_results"]
