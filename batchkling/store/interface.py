"""The store's interface: what the engine, the orchestrator and the views may ask of a backend.

A backend keeps runs, jobs, attempts and events, and commits every job state change as one
atomic transition before the caller's next side effect. :class:`Store` names those operations;
the SQLite backend (:mod:`batchkling.store.sqlite`) is the embedded one. Helpers that are the
same on every backend (paging, ``require_run``, the ``async with`` lifecycle) live here, once.

Cooperating workers (DESIGN.md §10) share a store. Each registers a row and heartbeats on the
*store's* clock (a host-wide monotonic clock for SQLite, the server's for PostgreSQL), so a
wall-clock step on one machine cannot make a live worker look dead. A worker takes a job with
:meth:`Store.claim` — the create intent itself, committed with the account's slot check and the
budget check in one transaction — or with :meth:`Store.adopt` for jobs whose worker is gone.
Both bump the job's ``claim_epoch``; every later write of that worker names the epoch it holds
(``transition(..., epoch=...)``), and a write under an epoch that moved on changes nothing and
raises :class:`~batchkling.errors.WorkerFenced`.
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Self

from batchkling.errors import RunNotFound
from batchkling.models import JobSpec, JobState
from batchkling.pricing import ObservedPrice
from batchkling.store.rows import AccountRow, JobRow, ReuseSource, RunRow, WorkerRow

#: How many of the last jobs to end an ETA goes by.
RECENT_ENDS = 20

#: States in which a job's task holds (or may hold) one of its account's slots.
SLOT_STATES = (JobState.SUBMITTING, JobState.SUBMITTED, JobState.RUNNING)
#: States in which a job may hold money: its task may exist and bill (the reservation stands).
HOLDING_STATES = (*SLOT_STATES, JobState.TIMED_OUT, JobState.UNKNOWN)
#: States of a job whose worker is gone that another worker takes over at once.
ORPHAN_STATES = (JobState.SUBMITTING, JobState.SUBMITTED, JobState.RUNNING, JobState.SUCCEEDED)


class ClaimOutcome(StrEnum):
    """What :meth:`Store.claim` found."""

    CLAIMED = "claimed"  # a job moved to ``submitting``: send its create now
    EMPTY = "empty"  # no pending job in the run
    NO_SLOT = "no_slot"  # the account's slots are all held
    PAUSED = "paused"  # the account's creates are paused (a Retry-After)
    BUDGET = "budget"  # the next job's reservation would pass the run's budget
    CLOSED = "closed"  # the run is not open for creates (stopped, interrupted, finished)


@dataclass(frozen=True, slots=True)
class Intent:
    """What a claim commits for the job it takes: its attempt, and the money it reserves.

    ``new_attempt`` = ``(number, idempotency_key)`` opens a new attempt; None repeats the
    current one with its key (an ``unknown`` create sent again). ``reserved_units`` is held
    against ``budget.max_units`` (Kling's units) as ``reserved_usd`` is against ``max_usd``;
    ``price_group`` is stored on the job, so a price seen above the reservations raises them
    (:meth:`Store.raise_reservations`).
    """

    new_attempt: tuple[int, str] | None
    reserved_usd: float
    reserved_units: float = 0.0
    price_group: str | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of :meth:`Store.claim`, with what the caller needs to act on it."""

    outcome: ClaimOutcome
    #: CLAIMED: the job as now stored (``submitting``, this worker's, its new claim epoch).
    job: JobRow | None = None
    #: The account's tasks in flight as the store counts them (before the caller's
    #: ``credit``), and its slot limit, when the claim was decided.
    in_flight: int = 0
    slot_limit: int = 0
    #: PAUSED: seconds until the pause ends.
    wait: float = 0.0
    #: BUDGET: the reservation that did not fit, and what the run had committed.
    price: float = 0.0
    committed_usd: float = 0.0
    #: BUDGET: which cap refused it: ``usd`` (``price`` and ``committed_usd`` in USD) or
    #: ``units`` (both in units).
    cap: str = "usd"


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
            ids = [r.run_id for r in await self.list_runs()]
            close = difflib.get_close_matches(run_id, ids, n=1, cutoff=0.6)
            hint = (f" (did you mean {close[0]!r}?)" if close else
                    f"; it has {len(ids)} other run{'s' if len(ids) != 1 else ''}: "
                    "`batchkling status` lists them" if ids else "; it has no runs yet")
            raise RunNotFound(f"no run {run_id!r} in {self.location}{hint}")
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
        self, run_id: str, state: str, stop_reason: str | None, now: float, *,
        owner: str | None = None,
    ) -> None:
        """Record how the latest invocation on this run ended.

        With ``owner``, only while ``owner`` holds the run's lease: a driver whose run was
        taken over while it was paused gets :class:`~batchkling.errors.WorkerFenced` and
        changes nothing (its jobs' writes are fenced by their claim epochs; this is the run's).
        """

    # ---- workers and the run's lease ------------------------------------------------------

    @abc.abstractmethod
    async def register_worker(self, worker_id: str, *, runs: Sequence[str] | None,
                              now: float) -> None:
        """Record this process as a live worker (serving ``runs``, or every open run)."""

    @abc.abstractmethod
    async def worker_heartbeat(self, worker_id: str, now: float) -> None:
        """Say this worker is alive; :class:`~batchkling.errors.WorkerFenced` if it was
        presumed dead meanwhile."""

    @abc.abstractmethod
    async def retire_worker(self, worker_id: str, *, state: str, reason: str | None,
                            now: float) -> None:
        """Mark this worker ``stopped`` (it exits) so its unfinished jobs are adopted at once."""

    @abc.abstractmethod
    async def reap_workers(self, stale_after: float, now: float) -> list[str]:
        """Mark ``dead`` every live worker silent for more than ``stale_after`` seconds on the
        store's clock (or, on this host, whose process is gone); return their ids."""

    @abc.abstractmethod
    async def list_workers(self, *, alive_only: bool = True) -> list[WorkerRow]:
        """Workers, most recently heard of first."""

    @abc.abstractmethod
    async def held_by_workers(self) -> dict[str, dict[str, int]]:
        """``{worker_id: {state: jobs}}``: what each worker drives now (for ``status``)."""

    @abc.abstractmethod
    async def check_lease(self, run_id: str, worker_id: str, *, stale_after: float,
                          now: float) -> None:
        """Raise :class:`~batchkling.errors.RunLocked` if another live process drives the run,
        as :meth:`acquire_lease` would, by reading only: it answers at once even while a
        paused process holds a write lock (SQLite has one for the whole file)."""

    @abc.abstractmethod
    async def acquire_lease(self, run_id: str, worker_id: str, *, stale_after: float,
                            now: float) -> None:
        """Make ``worker_id`` the run's driver, or raise :class:`~batchkling.errors.RunLocked`.

        A lease held by a worker that is stale (see :meth:`reap_workers`) is taken over, and
        that worker is fenced: it is marked dead, so its writes change nothing from now on.
        """

    @abc.abstractmethod
    async def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up; a no-op if another process has taken it over."""

    # ---- accounts and claims ---------------------------------------------------------------

    @abc.abstractmethod
    async def ensure_account(self, account_id: str, *, provider: str, max_in_flight: int,
                             now: float) -> AccountRow:
        """Create the account, or set its configured ``max_in_flight``; return it."""

    @abc.abstractmethod
    async def get_account(self, account_id: str) -> AccountRow | None:
        """The account with its slots in flight now, or None."""

    @abc.abstractmethod
    async def account_rejected(self, account_id: str, *, limit: int, now: float,
                               hold_off: int = 0) -> int:
        """A create was refused for lack of slots: lower the shared limit to ``limit`` (never
        raise it); return the limit now in force. ``hold_off`` more successful creates than
        usual must pass before the next probe (refused probes come ever rarer:
        :func:`batchkling.run.limits.probe_after`)."""

    @abc.abstractmethod
    async def account_created(self, account_id: str, *, now: float) -> int:
        """A create succeeded below the configured maximum: after two rounds of the limit,
        probe one more slot. Return the limit now in force."""

    @abc.abstractmethod
    async def pause_account(self, account_id: str, seconds: float, now: float) -> None:
        """Hold every worker's creates on this account back for ``seconds`` (a Retry-After)."""

    @abc.abstractmethod
    async def claim(
        self,
        run_id: str,
        *,
        worker_id: str,
        account_id: str,
        slot_cap: int,
        intent: Callable[[JobRow], Intent],
        max_usd: float | None,
        now: float,
        max_units: float | None = None,
        credit: int = 0,
    ) -> Claim:
        """Take the run's next pending job for a create: the committed create intent.

        In one transaction: the worker must be alive; the account must have a free slot (jobs
        in :data:`SLOT_STATES` counted across every run and worker, less ``credit``, below the
        smaller of its shared limit and ``slot_cap``) and no pause; the run must be open; the
        job's reservation (``intent(job).reserved_usd``) must fit ``max_usd`` with what the
        run has spent and reserved, and likewise its ``reserved_units`` must fit
        ``max_units``. The job then moves to ``submitting`` with the intent's attempt,
        reservations and price group, this worker, the account, and a new claim epoch.
        Otherwise nothing changes, and the outcome says why.

        ``credit`` is the number of this worker's own jobs on the account that the store still
        counts in flight but whose tasks the worker knows have ended (a provider's callback
        said so; the worker records them shortly). The slot check subtracts it from the count,
        held between 0 and the count, so a slot freed that way is taken at once. Each worker
        credits only its own jobs, so no job is credited twice. The default, 0, counts every
        job in a slot state. The returned :class:`Claim` reports the store's count
        (``in_flight``), before the credit.
        """

    @abc.abstractmethod
    async def adopt(self, run_id: str, *, worker_id: str, states: Iterable[JobState],
                    released: bool, limit: int = 500) -> list[JobRow]:
        """Take over jobs of the run in ``states``, bumping their claim epoch; return them
        (at most ``limit``, in manifest order).

        Always the jobs whose worker is dead or stopped; with ``released``, also the jobs no
        worker holds (a worker lets a job go when it stops tracking it short of an end: a
        timeout, a refused key, a failed download) — a run's driver takes those when it starts.
        """

    @abc.abstractmethod
    async def held_elsewhere(self, run_id: str, worker_id: str) -> int:
        """Jobs of the run that live workers other than ``worker_id`` are driving."""

    @abc.abstractmethod
    async def work_left(self, run_id: str) -> tuple[int, int]:
        """``(pending, orphaned)``: jobs waiting for a create, and jobs in flight whose worker
        is dead or stopped (a worker looking for work takes both)."""

    @abc.abstractmethod
    async def close_run(self, run_id: str, state: str, stop_reason: str | None,
                        now: float) -> bool:
        """End an open run nobody drives once nothing is left to do in it: ``state`` is set
        only if the run is ``running``, no live worker holds its lease, and it has no pending
        job nor one a live worker drives. Returns whether this call ended it."""

    # ---- jobs ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def job_index(self, run_id: str) -> dict[str, tuple[str, JobState]]:
        """``{job_id: (fingerprint, state)}`` for every job of the run."""

    @abc.abstractmethod
    async def sync_jobs(
        self,
        run_id: str,
        *,
        added: Iterable[tuple[int, JobSpec]],
        changed: list[tuple[int, JobSpec]],
        reordered: list[tuple[int, str]],
        removed: list[str],
        now: float,
    ) -> None:
        """Apply a manifest's expansion to the run in one transaction.

        ``added`` is read once, a batch at a time (:data:`~batchkling.store.rows.SYNC_BATCH`):
        a generator keeps a big manifest's new jobs out of memory.

        Removed jobs become ``skipped`` unless a task of theirs may exist (then they keep their
        state and are still tracked); a skipped job back in the manifest unchanged returns to
        the state it was skipped from.
        """

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
        async for rows in self.iter_pages(run_id, states, page=page):
            for row in rows:
                yield row

    async def iter_pages(self, run_id: str, states: Iterable[JobState] | None = None, *,
                         page: int = 500) -> AsyncIterator[list[JobRow]]:
        """Like :meth:`iter_jobs`, a page of up to ``page`` jobs at a time (for writers that
        work a page at a time: the results CSV, the report)."""
        wanted = list(JobState) if states is None else list(states)
        after = -1
        while rows := await self.jobs_in(run_id, wanted, after_seq=after, limit=page):
            yield rows
            if len(rows) < page:
                return
            after = rows[-1].seq

    @abc.abstractmethod
    async def task_owner(self, run_id: str, job_id: str, task_id: str) -> tuple[str, str] | None:
        """``(run_id, job_id)`` of another job that holds provider task ``task_id`` — in this
        run, or in a run on the same provider and base URL — or None.

        The engine asks before recording a create's answer: one task id answered for two
        creates (a gateway bug, a replay) must not make two jobs "succeed" with one video.
        """

    @abc.abstractmethod
    async def counts(self, run_id: str) -> dict[JobState, int]:
        """Number of jobs in each state."""

    @abc.abstractmethod
    async def recent_ends(self, run_id: str, limit: int = RECENT_ENDS) -> list[float]:
        """When the last ``limit`` jobs to end ended, newest first."""

    @abc.abstractmethod
    async def render_times(self, *, provider: str, base_url: str, model: str, duration: int,
                           mode: str | None, limit: int = 64) -> list[float]:
        """How long finished tasks of this model, duration and mode took (create to end,
        ``render_seconds``), at most ``limit``: the latest runs on this provider and base URL
        first, each from its last jobs back.

        The poll planner's prior: the first tasks of a run are then not polled blind. Runs on
        another endpoint (a simulator, whose speed differs) do not count.
        """

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
    async def events(
        self, run_id: str, job_id: str | None, *, last: int | None = None
    ) -> list[dict[str, Any]]:
        """Events as ``{"at", "event", "data"}``, oldest first: one job's, or with ``job_id``
        None the run's own (how each invocation ended). ``last`` keeps only the newest ones."""

    @abc.abstractmethod
    async def forget_run(self, run_id: str) -> int:
        """Delete the run with its jobs, attempts and events in one transaction; return how many
        jobs it had. The caller holds the run's lease, so no runner is using it."""

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
        epoch: int | None = None,
        **fields: Any,
    ) -> None:
        """Move a job to ``state`` and set ``fields``, with its event, atomically.

        ``new_attempt`` = ``(number, idempotency_key)`` opens a new attempt (the create intent).
        ``quick`` allows a commit that survives the process being killed but not necessarily a
        power cut: for the states whose loss costs a repeated poll or download, never a task.
        ``epoch``: the claim epoch the caller holds; if the job's has moved on (another worker
        took it over), nothing changes and :class:`~batchkling.errors.WorkerFenced` is raised.
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

    # ---- money: observed prices, reservations, reuse (docs/money.md) -----------------------

    @abc.abstractmethod
    async def money_units(self, run_id: str) -> tuple[float, float]:
        """``(spent, committed)`` in provider units: reported units, and units plus open unit
        reservations (``budget.max_units``)."""

    @abc.abstractmethod
    async def record_price(self, group: str, *, usd: float | None, units: float | None,
                           now: float) -> None:
        """Remember what the provider charged for a finished task of ``group`` (kept across
        runs): the latest price wins; a None leaves that currency's last price as it was."""

    @abc.abstractmethod
    async def observed_prices(self) -> dict[str, ObservedPrice]:
        """Every price group's last observed price."""

    @abc.abstractmethod
    async def raise_reservations(self, group: str, *, usd: float | None,
                                 units: float | None) -> int:
        """Raise to ``usd`` (and ``units``) the reservation of every job of ``group`` that
        holds money (:data:`HOLDING_STATES`) below it, in every run; return how many jobs
        were raised. Reservations are never lowered here."""

    @abc.abstractmethod
    async def reuse_sources(self, run_id: str, *, after_seq: int = -1,
                            limit: int = 500) -> list[ReuseSource]:
        """Pending jobs of the run (``seq > after_seq``, in manifest order) whose fingerprint
        has a downloaded video with a checksum in another run: one row per such video, the
        newest first for each job. At most ``limit`` jobs."""

    @abc.abstractmethod
    async def downloaded_fingerprints(self, *, after: str = "", limit: int = 10000) -> list[str]:
        """Fingerprints (greater than ``after``, ascending, at most ``limit``) of which some run
        has a downloaded video with a checksum: what ``reuse: earlier-runs`` could take."""

    @abc.abstractmethod
    async def mark_reused(self, run_id: str, job_id: str, source: ReuseSource, *,
                          video_path: str | None, video_uri: str | None,
                          video_etag: str | None, now: float) -> bool:
        """Record a pending job as ``downloaded`` with the earlier video of ``source``: no
        attempt, cost 0, ``reused_from`` set, a ``job.reused`` event. Returns False (and
        changes nothing) if the job is no longer pending or its fingerprint changed."""

    @abc.abstractmethod
    async def cost_totals(self, run_id: str) -> dict[str, float]:
        """Reported USD over every attempt, for the run's jobs that have more than one."""
