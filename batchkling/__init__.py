"""batchkling: YAML manifests of Kling video jobs to finished, downloaded videos — exactly once."""

from batchkling.errors import (
    AccountBlocked,
    AmbiguousCreate,
    BatchklingError,
    ConfigError,
    DownloadError,
    ManifestError,
    Problem,
    ProviderError,
    RateLimited,
    RunLocked,
    RunNotFound,
    SlotsExhausted,
    StoreError,
    TaskFailed,
    TransientError,
    UnsafeURL,
)
from batchkling.models import JobKind, JobSpec, JobState, RunSummary

__all__ = [
    "AccountBlocked",
    "AmbiguousCreate",
    "BatchklingError",
    "ConfigError",
    "DownloadError",
    "JobKind",
    "JobSpec",
    "JobState",
    "ManifestError",
    "Problem",
    "ProviderError",
    "RateLimited",
    "RunLocked",
    "RunNotFound",
    "RunSummary",
    "SlotsExhausted",
    "StoreError",
    "TaskFailed",
    "TransientError",
    "UnsafeURL",
]
