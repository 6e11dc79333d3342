"""batchkling: YAML manifests of Kling video jobs to finished, downloaded videos — exactly once."""

from typing import TYPE_CHECKING, Any

from batchkling.errors import (
    AccountBlocked,
    AmbiguousCreate,
    BatchklingError,
    ConfigError,
    DownloadError,
    ManifestError,
    ObjectCorrupted,
    ObjectMissing,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnavailable,
    Problem,
    ProviderError,
    RateLimited,
    RunLocked,
    RunNotFound,
    SchemaTooNew,
    SlotsExhausted,
    StoreError,
    StoreRefused,
    TaskFailed,
    TransientError,
    UnsafeURL,
)
from batchkling.models import JobKind, JobSpec, JobState, RunSummary

if TYPE_CHECKING:
    from batchkling.manifest.document import Manifest, load_manifest
    from batchkling.run.orchestrator import Orchestrator

# The run machinery (httpx, aiosqlite, pydantic models) loads on first use, so the command line
# starts fast and `import batchkling` stays cheap.
_LAZY = {
    "Manifest": "batchkling.manifest.document",
    "load_manifest": "batchkling.manifest.document",
    "Orchestrator": "batchkling.run.orchestrator",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchkling' has no attribute {name!r}")


__all__ = [
    "AccountBlocked",
    "AmbiguousCreate",
    "BatchklingError",
    "ConfigError",
    "DownloadError",
    "JobKind",
    "JobSpec",
    "JobState",
    "Manifest",
    "ManifestError",
    "ObjectCorrupted",
    "ObjectMissing",
    "ObjectStoreDenied",
    "ObjectStoreError",
    "ObjectStoreUnavailable",
    "Orchestrator",
    "Problem",
    "ProviderError",
    "RateLimited",
    "RunLocked",
    "RunNotFound",
    "RunSummary",
    "SchemaTooNew",
    "SlotsExhausted",
    "StoreError",
    "StoreRefused",
    "TaskFailed",
    "TransientError",
    "UnsafeURL",
    "load_manifest",
]
