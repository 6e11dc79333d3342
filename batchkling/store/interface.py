"""The store's interface: what the engine, the orchestrator and the views may ask of a backend.

A backend keeps runs, jobs, attempts and events, and commits every job state change as one
atomic transition before the caller's next side effect. :class:`Store` names those operations;
the SQLite backend (:mod:`batchkling.store.sqlite`) is the embedded one. Helpers that are the
same on every backend (paging, ``require_run``, the ``async with`` lifecycle) live here, once.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from batchkling.errors import RunNotFound
from batchkling.models import JobSpec, JobState
from batchkling.store.rows import JobRow, RunRow

#: How many of the last jobs to end an ETA goes by.
RECENT_ENDS = 20


class Store(abc.ABC):
    """A checkpoint store. Use as ``async with SomeStore(...) as store``; open once, close once."""

    #: Where the store lives, for messages: a file path, or a URL without its password.
    location: str

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, creating the schema or migrating it to this version's; refuse a newer one."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connections; idempotent. A closed store cannot be opened again."""

    # ---- runs ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> RunRow | None:
        """The run with this id, or None."""

    async def require_run(self, run_id: str) -> RunRow:
        """The run with this id; :class:`RunNotFound` if there is none."""
        run = await self.get_run(run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id!r} in {self.location}")
        return run

    @abc.abstractmethod
    async def list_runs(self) -> list[RunRow]:
        """Every run, newest first."""

    @abc.abstractmethod
    async def save_run(
        self,
        run_id: str,
        *,
        manifest_path: str | None,
        manifest_text: str | None,
        config_json: str,
        provider: str,
        base_url: str,
        simulated: bool,
        now: float,
    ) -> None:
        """Create the run, or refresh its manifest snapshot when it exists."""

    @abc.abstractmethod
    async def set_run_state(
        self, run_id: str, state: str, stop_reason: str | None, now: float
    ) -> None:
        """Record how the latest invocation on this run ended."""

    # ---- the single-runner lease -----------------------------------------------------------

    @abc.abstractmethod
    async def acquire_lease(
        self, run_id: str, owner: str, *, now: float, stale_after: float
    ) -> None:
        """Take the run's lease, or raise :class:`~batchkling.errors.RunLocked`."""

    @abc.abstractmethod
    async def heartbeat(self, run_id: str, owner: str, now: float) -> None:
        """Refresh the lease so other processes see this runner alive."""

    @abc.abstractmethod
    async def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up; a no-op if another process has taken it over."""

    # ---- jobs ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def job_index(self, run_id: str) -> dict[str, tuple[str, JobState]]:
        """``{job_id: (fingerprint, state)}`` for every job of the run."""

    @abc.abstractmethod
    async def sync_jobs(
        self,
        run_id: str,
        *,
        added: list[tuple[int, JobSpec]],
        changed: list[tuple[int, JobSpec]],
        reordered: list[tuple[int, str]],
        removed: list[str],
        now: float,
    ) -> None:
        """Apply a manifest's expansion to the run in one transaction."""

    @abc.abstractmethod
    async def reset_for_retry(
        self, run_id: str, *, states: Iterable[JobState], job_ids: Iterable[str], now: float
    ) -> int:
        """Put jobs back to ``pending`` for ``retry``; return how many."""

    @abc.abstractmethod
    async def get_job(self, run_id: str, job_id: str) -> JobRow | None:
        """One job, or None."""

    @abc.abstractmethod
    async def jobs_in(
        self,
        run_id: str,
        states: Iterable[JobState],
        *,
        after_seq: int = -1,
        limit: int = 500,
    ) -> list[JobRow]:
        """Jobs in any of ``states`` with ``seq > after_seq``, in manifest order, at most
        ``limit``."""

    async def iter_jobs(self, run_id: str, states: Iterable[JobState] | None = None, *,
                        page: int = 500) -> AsyncIterator[JobRow]:
        """The run's jobs (those in ``states``, or all) in manifest order, a page at a time.

        Paging follows ``seq``, so the caller may change a yielded job's state meanwhile: each
        job is seen at most once, and memory holds one page, not the run.
        """
        wanted = list(JobState) if states is None else list(states)
        after = -1
        while rows := await self.jobs_in(run_id, wanted, after_seq=after, limit=page):
            for row in rows:
                yield row
            if len(rows) < page:
                return
            after = rows[-1].seq

    @abc.abstractmethod
    async def counts(self, run_id: str) -> dict[JobState, int]:
        """Number of jobs in each state."""

    @abc.abstractmethod
    async def recent_ends(self, run_id: str, limit: int = RECENT_ENDS) -> list[float]:
        """When the last ``limit`` jobs to end ended, newest first."""

    @abc.abstractmethod
    async def units(self, run_id: str) -> float:
        """Provider units reported so far (Kling bills in units and reports no USD)."""

    @abc.abstractmethod
    async def money(self, run_id: str) -> tuple[float, float]:
        """``(spent, committed)``: reported cost so far, and cost plus open reservations."""

    @abc.abstractmethod
    async def attempts(self, run_id: str, job_id: str) -> list[dict[str, Any]]:
        """The job's attempts, oldest first."""

    @abc.abstractmethod
    async def transition(
        self,
        run_id: str,
        job_id: str,
        state: JobState,
        *,
        now: float,
        event: str,
        new_attempt: tuple[int, str] | None = None,
        data: Mapping[str, Any] | None = None,
        quick: bool = False,
        **fields: Any,
    ) -> None:
        """Move a job to ``state`` and set ``fields``, with its event, atomically.

        ``new_attempt`` = ``(number, idempotency_key)`` opens a new attempt (the create intent).
        ``quick`` allows a commit that survives the process being killed but not necessarily a
        power cut: for the states whose loss costs a repeated poll or download, never a task.
        """

    @abc.abstractmethod
    async def log_event(
        self, run_id: str, job_id: str | None, now: float, event: str,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an event that changes no state (a stop, a limit change)."""

    @abc.abstractmethod
    async def integrity_check(self) -> str:
        """The backend's own verdict on its data: ``ok`` when healthy."""
