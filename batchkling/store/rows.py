"""The rows of the checkpoint store, as every backend returns them.

A backend's SQL differs; what it hands the engine and the views does not: a run is a
:class:`RunRow`, a job a :class:`JobRow`, and the columns a transition may set are
:data:`JOB_COLUMNS`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString

from batchkling.errors import StoreError
from batchkling.models import JobSpec, JobState
from batchkling.pricing import ObservedPrice

#: Columns of ``jobs`` a transition may set.
JOB_COLUMNS = frozenset(
    {
        "attempt", "attempt_base", "idempotency_key", "task_id", "progress", "video_url",
        "video_path", "video_size", "video_sha256", "cost_usd", "cost_units", "reserved_usd",
        "error_code", "error_message", "retryable", "submitted_at", "completed_at",
        "render_seconds", "worker_id", "video_uri", "video_etag", "reserved_units",
        "price_group", "reused_from",
    }
)
#: Job columns that describe one attempt: a new attempt starts with them empty. The video
#: columns are among them: a staged or stored video belongs to the attempt that rendered it.
FRESH_ATTEMPT = (
    "task_id", "progress", "video_url", "submitted_at", "completed_at", "render_seconds",
    "cost_usd", "cost_units", "error_code", "error_message", "retryable", "video_path",
    "video_size", "video_sha256", "video_uri", "video_etag", "reused_from",
)


@dataclass(frozen=True, slots=True)
class RunRow:
    """A run as stored."""

    run_id: str
    manifest_path: str | None
    config_json: str
    provider: str
    base_url: str
    simulated: bool
    nonce: str
    state: str
    stop_reason: str | None
    created_at: float
    updated_at: float
    lease_owner: str | None
    lease_pid: int | None
    lease_host: str | None
    lease_heartbeat: float | None

    @property
    def downloads(self) -> bool:
        """Whether the run downloads its videos (``output.download`` in its manifest snapshot)."""
        try:
            output = json.loads(self.config_json).get("output") or {}
            return bool(output.get("download", True))
        except (ValueError, AttributeError):
            return True


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job as stored; ``spec`` parses the canonical request on demand."""

    run_id: str
    job_id: str
    seq: int
    spec_json: str
    fingerprint: str
    state: JobState
    attempt: int
    attempt_base: int
    idempotency_key: str | None
    task_id: str | None
    progress: float | None
    video_url: str | None
    video_path: str | None
    video_size: int | None
    video_sha256: str | None
    cost_usd: float | None
    cost_units: float | None
    reserved_usd: float
    error_code: str | None
    error_message: str | None
    retryable: bool | None
    submitted_at: float | None
    completed_at: float | None
    render_seconds: float | None
    updated_at: float
    #: The account whose slot the task holds, the worker driving the job, and the epoch of
    #: that worker's claim (see :meth:`batchkling.store.interface.Store.claim`).
    account_id: str | None = None
    worker_id: str | None = None
    claim_epoch: int = 0
    #: ``s3://bucket/key`` of the video once the object store confirmed it (``output.store``).
    video_uri: str | None = None
    #: The store's ETag of that object (unquoted).
    video_etag: str | None = None
    #: Kling units held for the task until it reports its ``final_unit_deduction``.
    reserved_units: float = 0.0
    #: The jobs that cost the same (:func:`batchkling.pricing.price_group`), set by the claim.
    price_group: str | None = None
    #: ``run/job`` whose verified video this job took instead of rendering (``reuse:``).
    reused_from: str | None = None

    @property
    def spec(self) -> JobSpec:
        """The job's request, as expanded from the manifest."""
        return JobSpec.from_json(self.spec_json)


JOB_SELECT = "SELECT " + ", ".join(JobRow.__dataclass_fields__) + " FROM jobs"


#: Rows per statement when a manifest's new jobs go to the store.
SYNC_BATCH = 2000


def batches(items: Iterable[Any], size: int = SYNC_BATCH) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def job_row(row: Sequence[Any]) -> JobRow:
    values = list(row)
    values[5] = JobState(values[5])
    values[20] = None if values[20] is None else bool(values[20])
    return JobRow(*values)


def run_row(row: Sequence[Any]) -> RunRow:
    values = list(row)
    values[5] = bool(values[5])
    return RunRow(*values)


#: The lease's pid, host and heartbeat are those of the worker that holds it.
_LEASE_FROM_WORKER = {"lease_pid": "w.pid", "lease_host": "w.host",
                      "lease_heartbeat": "w.heartbeat_at"}
RUN_SELECT = (
    "SELECT "
    + ", ".join(_LEASE_FROM_WORKER.get(name, f"r.{name}") for name in RunRow.__dataclass_fields__)
    + " FROM runs r LEFT JOIN workers w ON w.worker_id = r.lease_owner"
)


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A process that drives jobs, as the store last heard of it."""

    worker_id: str
    host: str
    pid: int
    state: str  # alive | stopped | dead
    runs: list[str] | None  # the runs it serves; None = every open run
    started_at: float
    heartbeat_at: float
    #: Seconds since its last heartbeat on the store's clock.
    silent_for: float
    stop_reason: str | None = None


@dataclass(frozen=True, slots=True)
class AccountRow:
    """A provider account's task slots, shared by every worker that serves it."""

    account_id: str
    provider: str
    max_in_flight: int
    slot_limit: int
    #: Seconds until creates on this account may go again (0 when not paused).
    paused_for: float
    in_flight: int


@dataclass(frozen=True, slots=True)
class ReuseSource:
    """A pending job of a run, and a downloaded video of another run with its fingerprint."""

    job_id: str
    seq: int
    fingerprint: str
    run_id: str  #: the earlier run
    source_job: str  #: its job
    video_path: str | None
    video_size: int | None
    video_sha256: str
    video_uri: str | None
    video_etag: str | None

    @property
    def source(self) -> str:
        """``run/job``, as the CSV's ``reused_from`` shows it."""
        return f"{self.run_id}/{self.source_job}"


#: Every price group's last observed price, as :func:`price_rows` reads it.
PRICES_SELECT = "SELECT price_group, usd, units, samples, updated_at FROM prices"


def price_rows(rows: Iterable[Sequence[Any]]) -> dict[str, ObservedPrice]:
    """``{price group: ObservedPrice}`` from rows of :data:`PRICES_SELECT`."""
    return {r[0]: ObservedPrice(usd=r[1], units=r[2], samples=int(r[3]), updated_at=r[4])
            for r in rows}


#: The keys of each dict :meth:`Store.attempts` returns, in their columns' order.
ATTEMPT_KEYS = ("number", "idempotency_key", "fingerprint", "state", "task_id", "submitted_at",
                "completed_at", "cost_usd", "cost_units", "error_code", "error_message",
                "video_uri", "video_size", "video_sha256", "video_etag")
ATTEMPT_SELECT = "SELECT " + ", ".join(ATTEMPT_KEYS) + " FROM attempts"
#: States ``retry --job`` may not take a job from: its task may still be running.
_NOT_RETRYABLE = frozenset({"submitting", "submitted", "running", "pending"})


#: Jobs held per worker and state, as both backends select them.
HELD_SELECT = ("SELECT worker_id, state, count(*) FROM jobs WHERE worker_id IS NOT NULL"
               " GROUP BY worker_id, state")


def held_rows(rows: Iterable[Sequence[Any]]) -> dict[str, dict[str, int]]:
    """``{worker_id: {state: jobs}}`` from the rows of :data:`HELD_SELECT`."""
    held: dict[str, dict[str, int]] = {}
    for worker_id, state, n in rows:
        held.setdefault(worker_id, {})[state] = int(n)
    return held


def transition_fields(fields: Mapping[str, Any],
                      new_attempt: tuple[int, str] | None) -> dict[str, Any]:
    """The job columns a transition sets: ``fields``, checked against :data:`JOB_COLUMNS`,
    and for a new attempt (``(number, idempotency_key)``) its number and key with the
    attempt's own columns starting empty."""
    unknown = set(fields) - JOB_COLUMNS
    if unknown:
        raise StoreError(f"unknown job fields {sorted(unknown)}")
    if new_attempt is None:
        return dict(fields)
    number, key = new_attempt
    return {**dict.fromkeys(FRESH_ATTEMPT), **fields, "attempt": number, "idempotency_key": key}


def retry_selection(states: Iterable[JobState], job_ids: Iterable[str]
                    ) -> tuple[list[str], list[str]]:
    """``(states, job ids)`` a retry reset picks jobs by: the states asked for, or any state
    where no task is in flight when only ids are named, or ``failed`` when neither is."""
    wanted = {s.value for s in states}
    ids = list(job_ids)
    if not wanted and not ids:
        wanted = {JobState.FAILED.value}
    if ids and not wanted:
        wanted = {s.value for s in JobState if s.value not in _NOT_RETRYABLE}
    return sorted(wanted), ids


def event_data(data: Mapping[str, Any] | None) -> str | None:
    """An event's data as compact JSON, or None when there is none."""
    return json.dumps(dict(data), default=str, separators=(",", ":")) if data else None


#: The state a skipped job returns to when it is back in the manifest, from what its row kept
#: (both backends' ``sync_jobs``). Since #14 only ``pending`` and ``failed`` jobs are skipped: a
#: failed attempt kept its key and ``retryable``; a pending job has no key, or a key but no task
#: (a requeued create). Rows that older versions skipped while a task existed come back
#: ``submitted`` (polled again) or, when the create's outcome was never known, ``unknown``:
#: never created blindly again.
RESTORED_STATE: LiteralString = (
    "CASE WHEN idempotency_key IS NULL THEN 'pending'"
    " WHEN retryable IS NOT NULL THEN 'failed'"
    " WHEN task_id IS NOT NULL THEN 'submitted'"
    " WHEN last_event IN ('job.submitting', 'job.unknown') THEN 'unknown'"
    " ELSE 'pending' END"
)
