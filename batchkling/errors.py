"""The exceptions batchkling raises.

The tree, in one place::

    BatchklingError
    ├── ManifestError          bad manifest: every problem at once, each with file:line:column
    ├── ConfigError            bad options or environment (a missing API-key variable, a run id)
    ├── RunLocked              another live process holds the run's lease
    ├── WorkerFenced           this worker was presumed dead and its jobs taken over: it stops
    ├── RunNotFound            no run with that id in the store
    ├── StoreError             the checkpoint store failed (sqlite3 and psycopg errors translated)
    │   └── StoreRefused       the store answered but will not serve this batchkling: wrong
    │       │                  credentials, no such database (a setup to fix, not a blip)
    │       └── SchemaTooNew   the store was written by a newer batchkling
    ├── DownloadError          a result could not be fetched or verified (never re-renders)
    │   └── UnsafeURL          a result URL points somewhere batchkling refuses to go
    ├── ObjectStoreError       the object store (``output.store``) failed a request
    │   ├── ObjectStoreDenied      credentials refused, bucket not writable (403/401)
    │   ├── ObjectMissing          no such bucket, or no such object (404)
    │   ├── ObjectStoreUnavailable 5xx, timeouts, dropped connections after retries: try later
    │   └── ObjectCorrupted        what the store holds is not what was sent (ETag, size, sha256)
    └── ProviderError          the provider answered with an error, or not at all
        ├── RateLimited        too many requests; ``retry_after`` seconds to wait (may be None)
        ├── SlotsExhausted     account task slots full (Kling 1303): requeue, shrink concurrency
        ├── AccountBlocked     auth or credits (Kling 1000-1003, 1100-1102, 1304): stop creates
        ├── TaskFailed         the job is refused or its task failed; ``retryable`` says which
        ├── AmbiguousCreate    a create may or may not have made a task: reconcile, never retry
        └── TransientError     a request safe to repeat failed (connect error, 5xx on a poll)

Foreign exceptions (httpx, sqlite3, psycopg, obstore, OSError) are translated at the boundary
with ``raise … from exc``. Only the CLI maps these to exit codes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class BatchklingError(Exception):
    """Base class of every error batchkling raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found in a manifest, located as precisely as the source allows."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        field = f" {self.path}:" if self.path else ""
        return f"{where}:{field} {self.message}"


class ManifestError(BatchklingError):
    """The manifest is invalid; ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems) or "invalid manifest")


class ConfigError(BatchklingError):
    """The options or the environment are wrong; nothing was submitted."""


class RunLocked(BatchklingError):
    """Another live process is running this run id."""


class WorkerFenced(BatchklingError):
    """This worker was silent past ``stale-after`` and another took its jobs over.

    Every write the worker makes names the claim epoch it holds; once its jobs have been taken
    over, those writes change nothing and raise this. The worker must stop at once: whatever it
    was doing is now another worker's to finish.
    """


class RunNotFound(BatchklingError):
    """No run with the given id exists in the store."""


class StoreError(BatchklingError):
    """The checkpoint store could not be read or written."""


class StoreRefused(StoreError):
    """The store is there but refuses this batchkling (credentials, database name, schema).

    Unlike a store that cannot be reached, trying again later will not help: the setup is wrong.
    """


class SchemaTooNew(StoreRefused):
    """The store's schema was written by a newer batchkling; upgrade to use it."""


class DownloadError(BatchklingError):
    """A finished video could not be downloaded or failed verification."""


class UnsafeURL(DownloadError):
    """A result URL was refused (scheme, private address, redirect target)."""


class ObjectStoreError(BatchklingError):
    """The object store refused or failed a request; ``retryable`` says whether a later try may
    succeed without a person acting."""

    retryable = False


class ObjectStoreDenied(ObjectStoreError):
    """The credentials were refused, or they may not write (or read) there."""


class ObjectMissing(ObjectStoreError):
    """The bucket or the object does not exist."""


class ObjectStoreUnavailable(ObjectStoreError):
    """5xx answers, timeouts or dropped connections, after the client's own retries."""

    retryable = True


class ObjectCorrupted(ObjectStoreError):
    """The store's copy differs from the bytes sent (ETag, size or sha256): upload again."""

    retryable = True


class ProviderError(BatchklingError):
    """The provider refused a request or could not be reached.

    ``code`` is the provider's own error code (Kling's numeric code, or ImaRouter's string) when
    it gave one; ``status`` the HTTP status when there was a response.
    """

    def __init__(
        self, message: str, *, code: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class RateLimited(ProviderError):
    """Too many requests; wait ``retry_after`` seconds (None: back off on our own schedule)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after


class SlotsExhausted(ProviderError):
    """The account's parallel task slots are full: requeue the job and shrink concurrency."""


class AccountBlocked(ProviderError):
    """Authentication or credit failure: no further create can succeed until a person acts."""


class TaskFailed(ProviderError):
    """The job was refused or its task failed; ``retryable`` says whether a new attempt may help."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.retryable = retryable


class AmbiguousCreate(ProviderError):
    """A create request may have produced a paid task; its outcome must be reconciled."""


class TransientError(ProviderError):
    """A request failed in a way that is safe to repeat."""


@contextmanager
def unwrapped_groups() -> Iterator[None]:
    """Re-raise a task group's exception group as the batchkling error inside it, if any."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = unwrap_group(group)
        if found is group:
            raise
        raise found from None


def unwrap_group(exc: BaseException) -> BaseException:
    """The batchkling error inside a task group's exception group, else ``exc`` itself.

    Task groups wrap what their tasks raise; callers of batchkling should see the
    :class:`BatchklingError` that ended the run, not the structure of its concurrency.
    """
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = unwrap_group(inner)
            if isinstance(found, BatchklingError):
                return found
    return exc
