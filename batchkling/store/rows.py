"""The rows of the checkpoint store, as every backend returns them.

A backend's SQL differs; what it hands the engine and the views does not: a run is a
:class:`RunRow`, a job a :class:`JobRow`, and the columns a transition may set are
:data:`JOB_COLUMNS`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchkling.models import JobSpec, JobState

#: Columns of ``jobs`` a transition may set.
JOB_COLUMNS = frozenset(
    {
        "attempt", "attempt_base", "idempotency_key", "task_id", "progress", "video_url",
        "video_path", "video_size", "video_sha256", "cost_usd", "cost_units", "reserved_usd",
        "error_code", "error_message", "retryable", "submitted_at", "completed_at",
        "render_seconds", "video_uri", "video_etag",
    }
)
#: Job columns that describe one attempt: a new attempt starts with them empty. The video
#: columns are among them: a staged or stored video belongs to the attempt that rendered it.
FRESH_ATTEMPT = (
    "task_id", "progress", "video_url", "submitted_at", "completed_at", "render_seconds",
    "cost_usd", "cost_units", "error_code", "error_message", "retryable", "video_path",
    "video_size", "video_sha256", "video_uri", "video_etag",
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
    #: ``s3://bucket/key`` of the video once the object store confirmed it (``output.store``).
    video_uri: str | None = None
    #: The store's ETag of that object (unquoted).
    video_etag: str | None = None

    @property
    def spec(self) -> JobSpec:
        """The job's request, as expanded from the manifest."""
        return JobSpec.from_json(self.spec_json)


JOB_SELECT = "SELECT " + ", ".join(JobRow.__dataclass_fields__) + " FROM jobs"


def job_row(row: Sequence[Any]) -> JobRow:
    values = list(row)
    values[5] = JobState(values[5])
    values[20] = None if values[20] is None else bool(values[20])
    return JobRow(*values)


def run_row(row: Sequence[Any]) -> RunRow:
    values = list(row)
    values[5] = bool(values[5])
    return RunRow(*values)


RUN_SELECT = "SELECT " + ", ".join(RunRow.__dataclass_fields__) + " FROM runs"
