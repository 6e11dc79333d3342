"""The run engine: submit, poll, download — every job state change checkpointed first.

One task group per run. A submitter per provider account takes a local slot and a turn at the
create rate, then *claims* the run's next pending job from the store: the claim is the committed
create intent, taken only if the account has a free slot across every worker and run, the
account is not paused, and the job's reservation fits the budget (DESIGN.md §10). ``_submit``
then creates the task and commits its id, shielded from cancellation so the outcome of a create
that left the machine is always recorded. A tracker per task polls on the planner's schedule
until the task ends or its deadline passes, then downloads outside the slot. A job's failure is
recorded on the job and never cancels its siblings.

Every write names the claim epoch this engine holds for the job; if another worker took the job
over (this one was presumed dead), the write changes nothing and raises
:class:`~batchkling.errors.WorkerFenced`, and the engine stops at once.

Where each state change happens, in this file:
``pending → submitting`` in :meth:`Engine._submitter` (the claim), ``submitting → submitted`` in
:meth:`Engine._submit`, ``running / succeeded / failed / timed_out`` in :meth:`Engine._track`,
``downloaded`` in :meth:`Engine._fetch` (or, with an object store, :meth:`Engine._upload`, once
the store confirms the video), and the reconciliation of ``submitting`` jobs left by a process
that died in :meth:`Engine._settle_ambiguous`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from batchkling.clock import Clock
from batchkling.errors import (
    AccountBlocked,
    AmbiguousCreate,
    BatchklingError,
    DownloadError,
    ObjectStoreError,
    ProviderError,
    RateLimited,
    SlotsExhausted,
    StoreError,
    TaskFailed,
    TransientError,
    UnsafeURL,
    WorkerFenced,
)
from batchkling.logs import get_logger, redactor
from batchkling.models import TERMINAL, JobSpec, JobState
from batchkling.providers.base import Phase, Provider, TaskStatus
from batchkling.providers.http import HttpClient
from batchkling.run import crashpoints
from batchkling.run.budget import PriceBook, reported
from batchkling.run.download import (
    Downloaded,
    DownloadPolicy,
    ExpiredURL,
    TooLarge,
    TooSlow,
    download,
)
from batchkling.run.limits import (
    RateGate,
    SlotPool,
    full_jitter,
    limit_after_rejection,
    probe_after,
)
from batchkling.run.polling import Looks, PollPlanner, TaskPlan
from batchkling.run.reuse import take_video
from batchkling.run.upload import InputImages, VideoUploads
from batchkling.run.watch import Watch
from batchkling.store import RECENT_ENDS, JobRow, Store
from batchkling.store.interface import Claim, ClaimOutcome, Intent
from batchkling.store.rows import ReuseSource

# Downloads are free to repeat; truncations and 5xx are usually passing.
_DOWNLOAD_TRIES = 5
# Downloaded jobs whose files are looked at in one trip to a worker thread on resume.
_REFETCH_PAGE = 500
# Consecutive create failures of a kind that proves nothing was made (connection refused,
# 5xx with no task) before the run stops creating: with backoff capped at a minute, several
# minutes of an unreachable provider.
_MAX_CREATE_FAILURES = 12
# Polls of one task refused for the account (a revoked key) before the run stops tracking; the
# first refusal is enough once creates have stopped for the same reason.
_MAX_REFUSED_POLLS = 3
# A callback said a task ended and the provider's answer still shows it running: the answer
# may lag the callback (ImaRouter's gateway looks upstream about every 15 s, API.md). The task
# is asked again this many times, from the blind floor and doubling, before its hint is dropped.
_HINT_RECHECKS = 4
# States whose commit may skip the fsync (Store.transition's ``quick``): losing one to a power
# cut costs a repeated poll or download, never a second task. The create intent and the task
# id (``submitting``, ``submitted``) and every other state stay fully durable.
_QUICK = frozenset({JobState.RUNNING, JobState.SUCCEEDED, JobState.DOWNLOADED})
_ENDED = frozenset({Phase.SUCCEEDED, Phase.FAILED})
# States in which this engine stops driving a job: the write also lets the job go (no worker
# holds it), so whoever picks the run up next — a resume, another worker — may take it.
_LETS_GO = frozenset({JobState.PENDING, JobState.UNKNOWN, JobState.TIMED_OUT, *TERMINAL})


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """How one invocation drives a run (from the manifest's limits, output and budget)."""

    max_in_flight: int = 5
    submit_rate: float = 2.0
    task_timeout: float = 2700.0
    max_attempts: int = 2
    max_usd: float | None = None
    max_units: float | None = None
    #: ``reuse: earlier-runs``: take a verified video of another run with the same request.
    reuse: bool = False
    download: bool = True
    on_unknown: str = "wait"
    min_poll_interval: float = 5.0  # the floor of blind polls (nothing known yet)
    max_poll_interval: float = 120.0
    hard_poll_floor: float = 0.5  # the floor between two polls of one task, always
    slot_wait_cap: float = 15.0  # longest pause after a slot refusal with nothing in flight
    callbacks: bool = False  # the provider POSTs status changes to this run's receiver
    download_concurrency: int = 4
    max_video_bytes: int = 500 * 1024 * 1024
    allow_private_urls: bool = False
    trusted_hosts: frozenset[str] = frozenset()
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    #: How often to look again when the account's slots are held by other workers, or when
    #: only other workers still drive jobs of this run.
    recheck_interval: float = 2.0


@dataclass(slots=True)
class StopState:
    """Why creates stopped, if they did; the orchestrator turns it into an exit code."""

    reason: str | None = None
    kind: str | None = None  # "account", "budget", "interrupted", "store", "unreachable"


@dataclass(slots=True)
class Account:
    """One provider account this engine creates on: its key's adapter and its flow control."""

    account_id: str
    provider: Provider
    slots: SlotPool
    create_gate: RateGate
    #: News of this account's tasks besides their own polls: its list of tasks, callbacks.
    watch: Watch
    #: When the provider's gateway looks at its upstream, once learned (ImaRouter's lag).
    looks: Looks
    #: Tasks a callback said ended, their slots freed here, that the store still counts in
    #: flight until the provider confirms them: the claims' credit (Store.claim).
    hinted: int = 0


def idempotency_key(nonce: str, job_id: str, attempt: int) -> str:
    """A key unique per run, job and attempt — and per account, thanks to the run's nonce."""
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:16]
    return f"bk-{nonce}-{digest}-{attempt}"


def _group(spec: JobSpec) -> str:
    return f"{spec.model}/{spec.duration}/{spec.mode or '-'}"


def _duration(start: float | None, end: float | None) -> float | None:
    """``end - start`` in the provider's own clock, when it reported both."""
    if start is None or end is None:
        return None
    return end - start


def _precision(*stamps: float | None) -> float:
    """How far apart two provider timestamps may be from the times they stand for: a second
    when they are whole seconds (ImaRouter's), a millisecond otherwise (Kling's)."""
    return 1.0 if all(s is None or float(s).is_integer() for s in stamps) else 0.001


class Engine:
    """Drives the non-terminal jobs of one run to an end state, as one worker. One use."""

    def __init__(
        self,
        *,
        store: Store,
        accounts: list[tuple[str, Provider, int]],
        run_id: str,
        nonce: str,
        worker_id: str,
        options: EngineOptions,
        run_dir: Path,
        clock: Clock,
        http: HttpClient,
        book: PriceBook,
        rng: random.Random | None = None,
        uploads: VideoUploads | None = None,
        inputs: InputImages | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.nonce = nonce
        self.worker_id = worker_id
        self.opts = options
        self.videos = run_dir / "videos"
        self.clock = clock
        self.http = http
        # What a create reserves, and what reported costs taught (run/budget.py).
        self.book = book
        self._prices_due = 0.0  # when to read other workers' observed prices again
        self._priced: dict[str, tuple[float | None, float | None]] = {}  # last recorded
        self.reused = 0  # jobs that took an earlier run's video (reuse: earlier-runs)
        self.rng = rng or random.Random()
        # One submitter per account; each account has its own slots and create pace.
        self.planner = PollPlanner(min_interval=options.min_poll_interval,
                                   max_interval=options.max_poll_interval,
                                   hard_floor=options.hard_poll_floor)
        self.accounts = [
            Account(account_id, provider, SlotPool(min(cap, options.max_in_flight)),
                    RateGate(options.submit_rate, clock),
                    Watch(provider, clock, self.planner, floor=options.hard_poll_floor,
                          callbacks=options.callbacks,
                          status=functools.partial(self._provider_status, provider)),
                    Looks(options.min_poll_interval, 12 * options.min_poll_interval,
                          sought=provider.may_lag))
            for account_id, provider, cap in accounts
        ]
        self._by_account = {a.account_id: a for a in self.accounts}
        self.poll_gate = RateGate(None, clock)
        # Where earlier runs' render times come from (read when the run starts).
        self._endpoint: tuple[str, str] | None = None
        self.downloads = anyio.CapacityLimiter(options.download_concurrency)
        self.policy = DownloadPolicy(max_bytes=options.max_video_bytes,
                                     allow_private=options.allow_private_urls,
                                     trusted_hosts=options.trusted_hosts)
        self.stop = StopState()
        self.fenced: WorkerFenced | None = None
        self.log = get_logger(run_id=run_id)
        self.polls = 0
        # The claim epoch this engine holds for each job it drives (jobs in flight only).
        self._epochs: dict[str, int] = {}
        self._active = 0  # submits and trackers alive: the submitter waits for them to drain
        self._wake = anyio.Event()
        # For progress displays, kept here so a redraw costs no query over the whole run: when
        # the last jobs to end ended (newest first).
        self.recent_ends: deque[float] = deque(maxlen=RECENT_ENDS)
        self._create_failures = 0
        self._slot_refusals = 0  # slot refusals in a row with nothing of this run in flight
        self._tg: anyio.abc.TaskGroup | None = None
        # With output.store: videos go to the bucket, local input images go as its URLs.
        self.uploads = uploads
        self.inputs = inputs
        self._input_failures = 0
        # Serialises "does another job own this task id?" with the commit of the answer.
        self._task_ids = anyio.Lock()

    # ---- bookkeeping ---------------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        """Tasks this engine holds a slot for, over its accounts."""
        return sum(a.slots.in_use for a in self.accounts)

    @property
    def slot_limit(self) -> int:
        """The slots this engine may hold now, over its accounts."""
        return sum(a.slots.limit for a in self.accounts)

    @property
    def slot_peak(self) -> int:
        """The most slots held at once, summed over accounts."""
        return sum(a.slots.peak for a in self.accounts)

    @property
    def lists(self) -> int:
        """List requests sent (each reports many tasks)."""
        return sum(a.watch.lists for a in self.accounts)

    @property
    def confirm_polls(self) -> int:
        """Polls sent to confirm a callback."""
        return sum(a.watch.polls for a in self.accounts)

    @property
    def hints(self) -> int:
        """Callbacks received about tasks this engine tracks."""
        return sum(a.watch.hints for a in self.accounts)

    def hint(self, status: TaskStatus) -> bool:
        """A callback said how a task stands: wake its tracker (True if it is one of ours)."""
        return any(a.watch.hint(status) for a in self.accounts if a.watch.watching(status))

    def _account(self, job: JobRow) -> Account:
        """The account a job's task lives on (jobs from before accounts: the first)."""
        return self._by_account.get(job.account_id or "", self.accounts[0])

    def _poke(self) -> None:
        self._wake.set()
        self._wake = anyio.Event()

    def stop_creating(self, reason: str, kind: str) -> None:
        """Stop starting new tasks; in-flight ones are still tracked and downloaded."""
        if self.stop.reason is None:
            self.stop.reason, self.stop.kind = reason, kind
            self.log.warning("run.creates_stopped", reason=reason, kind=kind)
        self._poke()

    def _account_refused(self, exc: ProviderError) -> None:
        """Stop creates: a refused key or exhausted credit needs a person, not a retry."""
        self.stop_creating(f"the provider refused the account: {exc.message}", "account")

    async def _set(self, job: JobRow | str, state: JobState, event: str, *,
                   let_go: bool = False, **fields: Any) -> None:
        """Commit a transition under this engine's claim on the job.

        ``let_go`` (implied by the states in ``_LETS_GO``) also gives the job up: no worker
        holds it afterwards.
        """
        job_id = job if isinstance(job, str) else job.job_id
        # Provider messages are stored and exported: a key they quote must not be.
        fields = {k: redactor.scrub(v) if isinstance(v, str) else v for k, v in fields.items()}
        if fields.get("data"):
            fields["data"] = redactor.scrub(fields["data"])
        let_go = let_go or state in _LETS_GO
        if let_go:
            fields["worker_id"] = None
        now = self.clock.wall()
        # A transition's write must land even while the run is being cancelled.
        with anyio.CancelScope(shield=True):
            await self.store.transition(self.run_id, job_id, state, now=now, event=event,
                                        quick=state in _QUICK, epoch=self._epochs.get(job_id),
                                        **fields)
        if let_go:
            self._epochs.pop(job_id, None)
        if state in TERMINAL:
            self.recent_ends.appendleft(now)

    def _fence(self, exc: WorkerFenced) -> None:
        """Another worker took this one's jobs over: stop everything, change nothing more."""
        if self.fenced is None:
            self.fenced = exc
            self.log.error("worker.fenced", error=str(exc))
            self.stop_creating(str(exc), "fenced")
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _spawn(self, fn: Callable[..., Any], job: JobRow, *args: Any) -> None:
        assert self._tg is not None
        self._active += 1

        async def wrapper() -> None:
            try:
                await fn(job, *args)
            except WorkerFenced as exc:
                self._fence(exc)
            except StoreError as exc:
                # Without a checkpoint no create may be paid for: stop them all. The job's last
                # committed state stands, so `resume` continues once the disk is fixed.
                self.stop_creating("the state database failed: "
                                   + str(exc).replace("RUN_ID", self.run_id), "store")
            except Exception as exc:  # a bug must cost one job's progress, not the run
                self.log.exception("job.internal_error", job_id=job.job_id)
                with anyio.CancelScope(shield=True):
                    await self.store.log_event(self.run_id, job.job_id, self.clock.wall(),
                                               "job.internal_error",
                                               {"error": redactor.scrub(repr(exc))})
            finally:
                self._active -= 1
                self._poke()

        self._tg.start_soon(wrapper)

    async def _nap(self, wake: anyio.Event, seconds: float | None) -> None:
        """Wait for a poke, or ``seconds`` on the engine's clock (None: a poke only)."""
        if seconds is None:
            await wake.wait()
            return
        async with anyio.create_task_group() as tg:

            async def alarm() -> None:
                await self.clock.sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(alarm)
            await wake.wait()
            tg.cancel_scope.cancel()

    # ---- the run -------------------------------------------------------------------------

    async def run(self, *, driver: bool = True) -> None:
        """Take over what was left, submit pending jobs, and wait for all to end.

        As the run's ``driver`` (``run``, ``resume``, ``retry``) it also takes the jobs that a
        previous invocation let go of — timed out, refused, a failed download — which a
        cooperating worker leaves to a person's ``resume``. Raises :class:`WorkerFenced` if
        another worker took this one's jobs over meanwhile.
        """
        run = await self.store.get_run(self.run_id)
        if run is not None:
            self._endpoint = (run.provider, run.base_url)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                # The ETA's earlier ends come in beside the first creates: at 100,000 jobs
                # the read is a scan, and a resume's first create need not wait for it.
                tg.start_soon(self._earlier_ends)
                for account in self.accounts:
                    tg.start_soon(account.watch.run)
                await self.take_over(released=driver)
                if self.opts.reuse and self.opts.download:
                    self.reused += await self.reuse_earlier()
                if self.opts.download:
                    tg.start_soon(self._refetch_missing)
                async with anyio.create_task_group() as submitters:
                    for account in self.accounts:
                        submitters.start_soon(self._submitter, account)
                # Creates have stopped; trackers and downloads finish on their own.
                for account in self.accounts:
                    account.watch.close()
        except WorkerFenced as exc:
            self._fence(exc)
        finally:
            self._tg = None
        if self.fenced is not None:
            raise self.fenced

    async def _earlier_ends(self) -> None:
        """Add the run's earlier ends (older than any this invocation saw) for the ETA."""
        for at in await self.store.recent_ends(self.run_id):
            if len(self.recent_ends) >= RECENT_ENDS:
                break
            self.recent_ends.append(at)

    async def take_over(self, *, released: bool = False) -> None:
        """Drive the jobs of workers that are gone (and, with ``released``, jobs nobody holds).

        ``submitting`` jobs are reconciled (never blindly resubmitted), tasks in flight are
        tracked again, finished renders are downloaded. A no-op once the run has ended here.
        """
        if self._tg is None:
            return
        states = [JobState.SUBMITTING, JobState.SUBMITTED, JobState.RUNNING]
        if released:
            states.append(JobState.TIMED_OUT)
        if self.opts.download:
            states.append(JobState.SUCCEEDED)
        while jobs := await self.store.adopt(self.run_id, worker_id=self.worker_id,
                                             states=states, released=released, limit=500):
            for job in jobs:
                self._epochs[job.job_id] = job.claim_epoch
                if job.state is JobState.SUCCEEDED:
                    self._spawn(self._fetch, job, job.video_url)
                elif job.state is JobState.SUBMITTING:
                    self._spawn(self._reconcile, job)
                else:
                    self._account(job).slots.take()
                    if job.state is JobState.TIMED_OUT:
                        await self._set(job, JobState.SUBMITTED, "job.readopted")
                    self._spawn(self._track, job, job.task_id, job.submitted_at)
            if len(jobs) < 500:
                break

    async def reuse_earlier(self) -> int:
        """``reuse: earlier-runs``: pending jobs whose request another run already turned into
        a verified video take that video (``downloaded``, cost 0, no create); return how many.
        """
        reused, after = 0, -1
        while sources := await self.store.reuse_sources(self.run_id, after_seq=after):
            by_job: dict[str, list[ReuseSource]] = {}
            for source in sources:
                by_job.setdefault(source.job_id, []).append(source)
            for job_id, candidates in by_job.items():
                for source in candidates:
                    objects = self.uploads.store if self.uploads is not None else None
                    found = await take_video(source, self.videos, objects)
                    if found is None:
                        continue
                    if await self.store.mark_reused(
                            self.run_id, job_id, source, video_path=found.video_path,
                            video_uri=found.video_uri, video_etag=found.video_etag,
                            now=self.clock.wall()):
                        reused += 1
                        self.log.info("job.reused", job_id=job_id, source=source.source)
                    break
            after = sources[-1].seq
            if len(by_job) < 500:
                break
        return reused

    async def _reconcile(self, job: JobRow) -> None:
        """A create whose process died before its answer was committed: never blind-resubmit."""
        found = await self._settle_ambiguous(job, "the previous process stopped during a create")
        if found is not None:
            self._account(job).slots.take()
            await self._track(job, found.task_id, found.created_at or self.clock.wall())

    async def _settle_ambiguous(self, job: JobRow, why: str) -> TaskStatus | None:
        """Reconcile a create of unknown outcome; return the task when a lookup found it."""
        key = job.idempotency_key or ""
        provider = self._account(job).provider
        if provider.can_lookup:
            try:
                found = await provider.lookup(key, job.spec)
            except Exception as exc:  # a reader's bug too: unknown, never a stuck `submitting`
                await self._set(job, JobState.UNKNOWN, "job.unknown", error_code="reconcile",
                                error_message=f"{why}; lookup failed: {exc}")
                return None
            if found is None:
                # No task carries this key, so none was paid for: the same attempt may go again.
                await self._set(job, JobState.PENDING, "job.reconciled", data={"found": False})
                self._poke()
                return None
            await self._set(job, JobState.SUBMITTED, "job.reconciled",
                            task_id=found.task_id, submitted_at=found.created_at
                            or self.clock.wall(), data={"found": True})
            return found
        if self.opts.on_unknown == "resubmit":
            # The same key again: a gateway that honours Idempotency-Key returns the same task.
            await self._set(job, JobState.PENDING, "job.resubmit_unknown",
                            error_message=f"{why}; resubmitting with the same idempotency key")
            self._poke()
            return None
        await self._set(job, JobState.UNKNOWN, "job.unknown", error_code="ambiguous_create",
                        error_message=f"{why}; the provider offers no lookup, so the task may or"
                        " may not exist (next_step says what to do)")
        self.log.warning("job.unknown", job_id=job.job_id, reason=why)
        return None

    async def _refetch_missing(self) -> None:
        """Fetch again the videos recorded as downloaded whose file is gone (no new task).

        Runs beside the submitter, so a resume's first create does not wait for these checks;
        the files of a page of jobs are looked at in one trip to a worker thread (one trip per
        file made a resume of 100,000 jobs wait on 100,000 thread hand-offs).
        """
        page: list[JobRow] = []
        async for job in self.store.iter_jobs(self.run_id, [JobState.DOWNLOADED]):
            if job.video_uri:
                continue  # an object the store confirmed is not checked again
            page.append(job)
            if len(page) >= _REFETCH_PAGE:
                await self._refetch_page(page)
                page = []
        if page:
            await self._refetch_page(page)

    async def _refetch_page(self, jobs: list[JobRow]) -> None:
        paths = [job.video_path or "" for job in jobs]
        present = await anyio.to_thread.run_sync(
            lambda: [bool(path) and os.path.isfile(path) for path in paths])
        for job, here in zip(jobs, present, strict=True):
            if here:
                continue
            await self._set(job, JobState.SUCCEEDED, "job.video_missing",
                            error_code="video_missing",
                            error_message=f"{job.video_path} is gone; downloading it again")
            self._spawn(self._fetch, job, job.video_url)

    # ---- create --------------------------------------------------------------------------

    def _intent(self, job: JobRow) -> Intent:
        """The attempt a claim opens for ``job`` and the money it reserves."""
        held = self.book.reserve(job.spec)
        if job.idempotency_key is not None:
            # An `unknown` create sent again: the same attempt and key, so a provider that
            # honours the key returns the task it may already have made.
            return Intent(new_attempt=None, reserved_usd=held.usd, reserved_units=held.units,
                          price_group=held.group)
        number = job.attempt + 1
        return Intent(new_attempt=(number, idempotency_key(self.nonce, job.job_id, number)),
                      reserved_usd=held.usd, reserved_units=held.units, price_group=held.group)

    async def _learn_prices(self) -> None:
        """Every few seconds, take the prices other workers have observed since (they matter
        to a budget only: without one, no read)."""
        if self.opts.max_usd is None and self.opts.max_units is None:
            return
        if self.clock.monotonic() < self._prices_due:
            return
        self._prices_due = self.clock.monotonic() + self.opts.recheck_interval
        self.book.learn(await self.store.observed_prices())

    def _budget_refused(self, claim: Claim) -> str:
        if claim.cap == "units":
            return (f"budget reached: {claim.committed_usd:g} units committed, the next job "
                    f"(~{claim.price:g} units) would pass budget.max_units "
                    f"{self.opts.max_units or 0:g}")
        return (f"budget reached: ${claim.committed_usd:.2f} committed (spent plus what tasks in "
                f"flight reserve), the next job (~${claim.price:.2f}) would pass "
                f"budget.max_usd ${self.opts.max_usd or 0:.2f}")

    async def _submitter(self, account: Account) -> None:
        """Claim pending jobs onto ``account`` while it has slots, and create their tasks."""
        while self.stop.reason is None:
            wake = self._wake
            await account.slots.acquire()
            await account.create_gate.wait()
            if self.stop.reason is not None:
                account.slots.cancel()
                break
            await self._learn_prices()
            claim = await self.store.claim(
                self.run_id, worker_id=self.worker_id, account_id=account.account_id,
                slot_cap=account.slots.limit, intent=self._intent, max_usd=self.opts.max_usd,
                max_units=self.opts.max_units, now=self.clock.wall(), credit=account.hinted)
            if claim.outcome is ClaimOutcome.CLAIMED:
                assert claim.job is not None
                account.watch.draining = False
                self._epochs[claim.job.job_id] = claim.job.claim_epoch
                self._spawn(self._submit, claim.job, account)
                continue
            account.slots.cancel()
            if claim.outcome is ClaimOutcome.BUDGET:
                # Tasks in flight may settle below what they reserve (the margin, until a price
                # is observed): wait for them before calling the budget reached.
                if self._active:
                    await self._nap(wake, None)
                    continue
                if await self.store.held_elsewhere(self.run_id, self.worker_id):
                    await self._nap(wake, self.opts.recheck_interval)
                    continue
                self.stop_creating(self._budget_refused(claim), "budget")
                break
            if claim.outcome is ClaimOutcome.CLOSED:
                # Ended or stopped by another process (a worker that finished it, a driver's
                # Ctrl-C): nothing more to create here; what is in flight still ends.
                self.log.info("run.closed_elsewhere")
                break
            if claim.outcome is ClaimOutcome.PAUSED:
                await self._nap(wake, claim.wait)
                continue
            if claim.outcome is ClaimOutcome.NO_SLOT:
                # Other workers or runs hold the account's slots: look again when one of ours
                # ends, or after a while for theirs.
                await self._nap(wake, self.opts.recheck_interval)
                continue
            # No pending job: done once nothing of ours can put one back, and no other live
            # worker drives a job of this run (it could requeue one, or die and leave it).
            # Until one comes back, a task's end frees no slot for this run: the account's
            # list looks for the last end only (Watch.draining).
            account.watch.draining = True
            if wake.is_set():
                continue  # a job may have been put back since the claim looked
            if self._active == 0:
                if await self.store.held_elsewhere(self.run_id, self.worker_id) == 0:
                    # A worker found dead (or stopped) just now by another process, which
                    # takes over only the runs it drives, would leave its jobs of this run in
                    # flight in an ended run: take them first, and end only when none was.
                    await self.take_over()
                    if self._active == 0:
                        break
                    continue
                await self._nap(wake, self.opts.recheck_interval)
                continue
            await self._nap(wake, None)
        self._poke()

    async def _submit(self, job: JobRow, account: Account) -> None:
        """Create the task of a claimed job and commit its id."""
        spec = job.spec
        key = job.idempotency_key
        assert key is not None
        log = self.log.bind(job_id=job.job_id, attempt=job.attempt)
        if self.stop.reason is not None and self.stop.kind != "budget":
            # The account, the network or the user said stop. A budget stop only refuses new
            # reservations: this job's money was reserved within the budget.
            account.slots.cancel()
            await self._set(job, JobState.PENDING, "job.requeued", reserved_usd=0)
            return
        if self.inputs is not None:
            try:
                spec = await self.inputs.resolve(spec)
            except (ObjectStoreError, TaskFailed) as exc:
                await self._inputs_failed(job, account, exc)
                return
            self._input_failures = 0
        # From the intent (the claim) to the task-id commit nothing may interrupt: a create
        # that left the machine must have its outcome recorded.
        with anyio.CancelScope(shield=True):
            crashpoints.reached("after_intent")
            if account.create_gate.paused_until > self.clock.monotonic():
                # A 429 arrived while this intent was being committed: its pause covers this
                # create too. Nothing was sent, so the same attempt (same key) goes again later.
                account.slots.cancel()
                await self._set(job, JobState.PENDING, "job.requeued", reserved_usd=0)
                self._poke()
                return
            try:
                task_id = await self._provider_create(account.provider, spec, key)
            except ProviderError as exc:
                if isinstance(exc, SlotsExhausted):
                    # Counted while this create still holds its slot: the refusal proves room
                    # for the others in flight, not one fewer.
                    account.slots.rejected()
                else:
                    account.slots.cancel()
                await self._create_failed(job, account, exc, log)
                return
            crashpoints.reached("after_create")
            submitted_at = self.clock.wall()
            try:
                if not await self._record_task(job, task_id, submitted_at):
                    account.slots.release()
                    return
            except WorkerFenced:
                # Taken over while the create was under way: leave the task's id where the
                # worker that took over (or a person) can find it, and change nothing else.
                await self.store.log_event(self.run_id, job.job_id, self.clock.wall(),
                                           "job.task_orphaned", {"task_id": task_id})
                raise
        self._create_failures = 0
        self._slot_refusals = 0
        if account.slots.limit < account.slots.maximum:
            account.slots.limit = await self.store.account_created(account.account_id,
                                                                   now=self.clock.wall())
        account.slots.created()
        log.info("job.submitted", task_id=task_id)
        await self._track(job, task_id, submitted_at)

    async def _inputs_failed(self, job: JobRow, account: Account, exc: BatchklingError) -> None:
        """A job's local image could not be put in the object store: no task was made."""
        account.slots.cancel()
        message = str(exc)
        if isinstance(exc, TaskFailed):  # the file is unreadable or changed: a person must act
            await self._set(job, JobState.FAILED, "job.failed", error_code="input_image",
                            error_message=message, retryable=0, reserved_usd=0)
            self.log.warning("job.failed", job_id=job.job_id, error_code="input_image",
                             error=message)
            return
        self._input_failures += 1
        if not isinstance(exc, ObjectStoreError) or not exc.retryable:
            self.stop_creating(f"the object store refused an input image: {message}",
                               "object_store")
        elif self._input_failures >= _MAX_CREATE_FAILURES:
            self.stop_creating(f"the object store could not be reached for "
                               f"{self._input_failures} input images in a row: {message}",
                               "unreachable")
        else:
            account.create_gate.pause(self._backoff(self._input_failures))
        await self._set(job, JobState.PENDING, "job.requeued", error_code="input_upload_failed",
                        error_message=message, reserved_usd=0)
        self._poke()

    async def _provider_create(self, provider: Provider, spec: JobSpec, key: str) -> str:
        """``provider.create``, where anything but a ProviderError counts as an ambiguous create.

        An adapter bug or an answer no reader expected must not leave the job in
        ``submitting`` holding its slot: the request may have left, so it is reconciled.
        """
        try:
            return await provider.create(spec, key)
        except ProviderError:
            raise
        except Exception as exc:
            self.log.exception("job.create_error", job_id=spec.job_id)
            raise AmbiguousCreate(f"the create's answer could not be read ({exc!r:.300})") from exc

    async def _provider_status(self, provider: Provider, task_id: str,
                               spec: JobSpec) -> TaskStatus:
        """``provider.status``, unreadable answers counting as a failed poll. (Costs are
        judged where money is settled, :meth:`_settle`.)"""
        try:
            return await provider.status(task_id, spec)
        except ProviderError:
            raise
        except Exception as exc:
            self.log.exception("job.poll_error", job_id=spec.job_id)
            raise TransientError(f"the poll's answer could not be read ({exc!r:.300})") from exc

    async def _record_task(self, job: JobRow, task_id: str, submitted_at: float) -> bool:
        """Commit the task id a create answered, unless another job owns it already.

        A gateway bug or a replayed answer can give several creates one task id: recording it
        would let each job "succeed" with one video. The later job becomes ``unknown`` with the
        reason (its own task, if one was made, cannot be known); its reservation stands.
        """
        async with self._task_ids:
            owner = await self.store.task_owner(self.run_id, job.job_id, task_id)
            if owner is None:
                await self._set(job, JobState.SUBMITTED, "job.submitted", task_id=task_id,
                                submitted_at=submitted_at, data={"task_id": task_id})
                return True
        run_id, other = owner
        whose = f"job {other!r}" + (f" of run {run_id!r}" if run_id != self.run_id else "")
        await self._set(job, JobState.UNKNOWN, "job.unknown", error_code="duplicate_task",
                        error_message=f"the provider answered this create with task {task_id}, "
                        f"which already belongs to {whose} (a gateway bug or a replayed "
                        f"answer): whether a task was made for this job is not known. "
                        f"`batchkling retry {self.run_id} --unknown` asks again with the same "
                        "idempotency key", data={"task_id": task_id, "owner": other})
        self.log.warning("job.duplicate_task", job_id=job.job_id, task_id=task_id, owner=other)
        return False

    async def _create_failed(self, job: JobRow, account: Account, exc: ProviderError,
                             log: Any) -> None:
        """Decide what a refused or unanswered create means for the job and the run."""
        err: dict[str, Any] = {"error_code": exc.code or type(exc).__name__,
                               "error_message": exc.message}
        gate = account.create_gate
        if isinstance(exc, SlotsExhausted | RateLimited | TransientError | AccountBlocked):
            # No task was made: the same attempt (same key) goes again later.
            if isinstance(exc, SlotsExhausted):
                await self._slots_refused(account, log)
            else:
                self._create_failures += 1
            if isinstance(exc, RateLimited):
                wait = exc.retry_after
                pause = wait if wait is not None else self._backoff(self._create_failures)
                gate.pause(pause)
                # Every worker on this account holds back, not just this one.
                await self.store.pause_account(account.account_id, pause, self.clock.wall())
                log.info("job.requeued", reason="rate_limited", retry_after=wait)
            elif isinstance(exc, AccountBlocked):
                self._account_refused(exc)
            elif not isinstance(exc, TransientError):
                pass  # a slot refusal: handled above
            elif self._create_failures >= _MAX_CREATE_FAILURES:
                self.stop_creating(f"the provider could not be reached for "
                                   f"{self._create_failures} creates in a row: {exc.message}",
                                   "unreachable")
            else:
                gate.pause(self._backoff(self._create_failures))
                log.info("job.requeued", reason="transient", error=exc.message)
            # Committed only now: the pause or stop above must hold every other create back
            # from the moment the answer arrived, not from when the commit lands.
            await self._set(job, JobState.PENDING, "job.requeued", reserved_usd=0, **err)
            self._poke()
            return
        if isinstance(exc, AmbiguousCreate):
            log.warning("job.ambiguous_create", error=exc.message)
            fresh = await self.store.get_job(self.run_id, job.job_id) or job
            # The task may exist and bill: its reservation stays committed until we know.
            found = await self._settle_ambiguous(
                fresh, f"the create got no clear answer ({exc.message})")
            if found is not None:
                # The lookup found the task: it exists, holds an account slot and renders, so
                # it is tracked now like any created task rather than at the next resume.
                account.slots.take()
                self._spawn(self._track, fresh, found.task_id,
                            found.created_at or self.clock.wall())
            return
        assert isinstance(exc, TaskFailed)
        await self._finish_attempt(job, retryable=exc.retryable, reserved_usd=0, **err)

    async def _slots_refused(self, account: Account, log: Any) -> None:
        """A create was refused for lack of slots: set the limit, and wait only if need be.

        The limit now equals what was in flight, so the next create waits for one of those
        to end, not for a timer. Only with nothing of this run in flight (the account's slots
        are held elsewhere) is there nothing to wait for but time, and then not long.
        """
        await self._slots_rejected(account)
        if account.slots.in_use == 0:
            self._slot_refusals += 1
            account.create_gate.pause(full_jitter(
                self._slot_refusals, base=self.opts.backoff_base,
                cap=min(self.opts.backoff_cap, self.opts.slot_wait_cap), rng=self.rng))
        log.info("job.requeued", reason="slots", limit=account.slots.limit,
                 in_flight=account.slots.in_use)

    async def _slots_rejected(self, account: Account) -> None:
        """The provider refused a create for lack of slots: what it holds is what it proves.

        The limit becomes the number of the account's tasks in flight besides this create, for
        every worker (the account row is shared).
        """
        current = await self.store.get_account(account.account_id)
        # The refused job is still `submitting` here, so it is among the account's in flight,
        # and so are this worker's tasks that a callback said ended (their confirmation has
        # not come yet). (The local pool counted its own refusal when it came:
        # SlotPool.rejected.)
        held = (max(0, current.in_flight - 1 - account.hinted) if current is not None
                else account.slots.in_use)
        limit = limit_after_rejection(held, account.slots.maximum)
        # The store probes again after two rounds of the limit; refused probes in a row wait
        # longer (probe_after), so a full account is asked rarely.
        hold_off = max(0, probe_after(limit, account.slots.refusals) - 2 * limit)
        limit = await self.store.account_rejected(account.account_id, limit=limit,
                                                  now=self.clock.wall(), hold_off=hold_off)
        account.slots.limit = min(account.slots.limit, limit)

    async def _finish_attempt(self, job: JobRow, *, retryable: bool, **fields: Any) -> None:
        """A task (or create) failed: a new attempt if allowed, else the job fails."""
        current = await self.store.get_job(self.run_id, job.job_id)
        attempts = (current or job).attempt - (current or job).attempt_base
        if retryable and attempts < self.opts.max_attempts:
            await self._set(job, JobState.PENDING, "job.retrying", idempotency_key=None,
                            retryable=1, **fields)
            self.log.info("job.retrying", job_id=job.job_id, attempt=attempts,
                          error=fields.get("error_message"))
            self._poke()
            return
        await self._set(job, JobState.FAILED, "job.failed", retryable=int(retryable), **fields)
        self.log.warning("job.failed", job_id=job.job_id, error_code=fields.get("error_code"),
                         error=fields.get("error_message"))

    def _backoff(self, failures: int, *, low: float = 0.0) -> float:
        return low + full_jitter(failures, base=self.opts.backoff_base,
                                 cap=self.opts.backoff_cap, rng=self.rng)

    # ---- poll ----------------------------------------------------------------------------

    async def _model_for(self, spec: JobSpec, group: str) -> None:
        """Give the group's render-time model the times of earlier runs, once per group."""
        model = self.planner.model(group)
        if self._endpoint is None:
            return
        provider, base_url = self._endpoint
        model.set_prior(await self.store.render_times(
            provider=provider, base_url=base_url, model=spec.model, duration=spec.duration,
            mode=spec.mode))

    async def _track(self, job: JobRow, task_id: str | None, submitted_at: float | None) -> None:
        """Poll one task to its end (or deadline); its slot is released when it ends.

        Polls go where the planner predicts the end; news from the account's watch (a list of
        its tasks, a callback) can come first: a listed status is the provider's own answer, a
        callback only a hint that a poll (or a place in the next list) confirms.
        """
        assert task_id is not None
        spec = job.spec
        account = self._account(job)
        group = _group(spec)
        if not self.planner.has(group):
            await self._model_for(spec, group)
        plan = self.planner.plan(group)
        started = submitted_at or self.clock.wall()
        mono_start = self.clock.monotonic() - max(0.0, self.clock.wall() - started)
        deadline = self.clock.monotonic() + self.opts.task_timeout
        hint, errors, refused, running = None, 0, 0, False
        failure: str | None = None  # the last failed poll's reason, for a timeout's message
        shown: float | None = None  # the progress last stored
        released = False
        credited = False  # counted in account.hinted
        rechecks = 0  # polls since a hinted end was contradicted (_HINT_RECHECKS)
        watch, looks = account.watch, account.looks
        watched = watch.add(task_id, spec, plan, mono_start)

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                account.slots.release()

        def uncredit() -> None:
            nonlocal credited
            if credited:
                credited = False
                account.hinted -= 1

        try:
            while True:
                delay = self.planner.delay(plan, self.clock.monotonic() - mono_start, hint,
                                           late=watch.covers(watched))
                if 0 < rechecks <= _HINT_RECHECKS:
                    # The callback's news came already: ask soon rather than wait for more.
                    delay = min(delay, self.opts.min_poll_interval * 2 ** (rechecks - 1))
                    delay = max(delay, hint or 0.0)
                early = None
                if looks.period is not None and not watch.covers(watched):
                    delay = self._after_look(looks, plan, mono_start, delay, hint)
                    if delay > 2.5 * looks.period:
                        # Looks counted far ahead drift: plan again a period before, counting
                        # from the latest look dated by then.
                        early = delay - 1.5 * looks.period
                listed = watch.listed(watched)
                if listed:
                    # The account's list looks first; this task's own poll is the safety net
                    # behind it, and each sighting by a list moves it on (below).
                    delay = 2 * delay + self.opts.min_poll_interval
                if errors:
                    delay = max(delay, self._backoff(errors, low=self.opts.min_poll_interval))
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    release()
                    await self._set(job, JobState.TIMED_OUT, "job.timed_out",
                                    error_code="timed_out",
                                    error_message=f"no result after {self.opts.task_timeout:.0f}s"
                                    " of polling; the task may still finish: `resume` polls it "
                                    "again" + (f" (the last poll failed: {failure})" if errors
                                               and failure else ""))
                    self.log.warning("job.timed_out", job_id=job.job_id, task_id=task_id)
                    return
                sighted = plan.not_done_at
                news = await watch.wait(watched, min(early or delay, remaining))
                if news is None and listed and plan.not_done_at > sighted:
                    continue  # a list saw the task still running: plan again from there
                if news is None and early is not None and early < remaining:
                    continue
                hinted = news is not None and not news[1]
                if news is not None and hinted and news[0].phase not in _ENDED:
                    # A callback on the way: the render started, say. Planning only.
                    plan.observe(self.clock.monotonic() - mono_start,
                                 running=news[0].phase is Phase.RUNNING,
                                 progress=news[0].progress,
                                 start=_duration(news[0].created_at, news[0].started_at))
                    continue
                if hinted:
                    # A callback says the task ended: its account slot is free if that is
                    # true (if not, one create is refused), here and, as this worker's
                    # credit, in the claims. The provider's word decides.
                    release()
                    if not credited:
                        credited = True
                        account.hinted += 1
                try:
                    if news is not None and not hinted:
                        status = news[0]  # from a list: the provider's own answer
                        if status.phase in _ENDED:
                            watch.ended_unannounced(watched)
                    else:
                        await self.poll_gate.wait()
                        plan.polled(self.clock.monotonic() - mono_start)
                        if hinted:
                            status = await watch.confirm(watched)
                        else:
                            self.polls += 1
                            status = await self._provider_status(account.provider, task_id,
                                                                 spec)
                            if status.phase in _ENDED:
                                watch.ended_unannounced(watched)
                except RateLimited as exc:
                    self.poll_gate.pause(exc.retry_after or self._backoff(errors + 1))
                    errors += 1
                    continue
                except AccountBlocked as exc:
                    # A dead key cannot see the task finish: waiting out the deadline would only
                    # delay the exit. The task is kept; `resume` with a working key polls it.
                    errors += 1
                    refused += 1
                    dead = refused >= _MAX_REFUSED_POLLS or self.stop.kind == "account"
                    # At the deadline the tracking ends too, as refused: a task the key cannot
                    # see was not seen to time out. Fewer refusals than that do not stop the
                    # run's creates, though: they may be a passing gateway blip.
                    if dead or self.clock.monotonic() >= deadline:
                        release()
                        if dead:
                            self._account_refused(exc)
                        await self._set(job, JobState.RUNNING if running else JobState.SUBMITTED,
                                        "job.poll_refused", let_go=True,
                                        error_code=exc.code or "account",
                                        error_message=f"polling stopped, the provider refused "
                                        f"the account: {exc.message}; `resume` with a working "
                                        "key polls the task again")
                        self.log.warning("job.poll_refused", job_id=job.job_id, task_id=task_id,
                                         error=exc.message)
                        return
                    continue
                except ProviderError as exc:
                    errors += 1
                    failure = exc.message
                    if errors in (1, 10) or errors % 50 == 0:
                        self.log.info("job.poll_failed", job_id=job.job_id, error=exc.message,
                                      consecutive=errors)
                    continue
                errors = refused = 0
                uncredit()  # before the state below is written: a claim never counts it twice
                progress, hint = status.progress, status.poll_after
                seen = self.clock.monotonic() - mono_start
                if status.phase in _ENDED:
                    watch.ended(watched)
                elif released:
                    # The hint was wrong, or the answer lags it: the task still holds its slot.
                    released = False
                    account.slots.take()
                    rechecks = 1
                elif rechecks:
                    rechecks += 1
                if status.phase is Phase.SUCCEEDED:
                    release()
                    # Our own clock teaches the planner (it is what polls are scheduled on),
                    # narrowed by the provider's own duration when that is more precise.
                    reported, precision = self._dated_end(looks, mono_start, status)
                    self.planner.finished(group, plan, seen, reported, precision,
                                          starts=plan.timing in (None, looks.epoch))
                    await self._succeeded(job, status, started)
                    return
                if status.phase is Phase.FAILED:
                    release()
                    self._dated_end(looks, mono_start, status)
                    await self._task_failed(job, status)
                    return
                look = looks.last(mono_start + seen)
                if look is not None and look > mono_start:
                    seen = look - mono_start  # what the answer shows is as of the last look
                plan.timing = looks.epoch if plan.timing in (None, looks.epoch) else -1
                plan.observe(seen, running=status.phase is Phase.RUNNING, progress=progress,
                             start=_duration(status.created_at, status.started_at))
                if status.phase is Phase.RUNNING:
                    # Stored as a fraction, for the report's "rendering · 42%" while it runs.
                    fraction = None if progress is None else progress / 100.0
                    if not running:
                        running = True
                        await self._set(job, JobState.RUNNING, "job.running", progress=fraction)
                    elif fraction is not None and fraction != shown:
                        await self._set(job, JobState.RUNNING, "job.progress", progress=fraction)
                    shown = fraction
        finally:
            uncredit()
            release()
            watch.remove(watched)

    def _after_look(self, looks: Looks, plan: TaskPlan, origin: float, delay: float,
                    hint: float | None) -> float:
        """The planner's ``delay`` moved to just after a look of a gateway that answers from
        its last one (:meth:`Looks.poll_at`); the provider's hint and the hard floor hold."""
        now = self.clock.monotonic()
        last = None if plan.last_poll is None else origin + plan.last_poll
        span = plan.span and (origin + plan.span[0], origin + plan.span[1], plan.span[2])
        return max(looks.poll_at(now + delay, last, span) - now, hint or 0.0,
                   0.0 if last is None else last + self.opts.hard_poll_floor - now)

    def _dated_end(self, looks: Looks, origin: float,
                   status: TaskStatus) -> tuple[float | None, float]:
        """An ended task's duration as the provider dates it (create to end), and how precise
        that is. The date also teaches the account's gateway schedule (:class:`Looks`); once
        that is known, the date is the look that saw the end, which came within a period
        before it."""
        reported = _duration(status.created_at, status.completed_at)
        precision = _precision(status.created_at, status.completed_at)
        if reported is None:
            return None, precision
        known = looks.period is not None
        looks.saw(origin + reported, precision)
        if looks.period is None:
            return reported, precision
        if not known:
            # Until now readings counted as of the poll, not of the look they showed: the
            # render starts learned from them are wrong.
            self.planner.forget_starts()
        return reported - looks.period / 2, precision + looks.period / 2

    async def _succeeded(self, job: JobRow, status: TaskStatus, started: float) -> None:
        completed = status.completed_at or self.clock.wall()
        render = max(0.0, completed - (status.created_at or started))
        costs = await self._settle(job, status, learn=True)
        await self._set(job, JobState.SUCCEEDED, "job.succeeded", video_url=status.video_url,
                        completed_at=completed, render_seconds=render, **costs)
        self.log.info("job.succeeded", job_id=job.job_id, render_seconds=round(render, 1),
                      cost_usd=costs["cost_usd"])
        if self.opts.download:
            await self._fetch(job, status.video_url)

    async def _task_failed(self, job: JobRow, status: TaskStatus) -> None:
        # A failed task is usually not billed; what the provider reports replaces the hold.
        costs = await self._settle(job, status, learn=False)
        await self._finish_attempt(
            job, retryable=status.retryable, error_code=status.error_code,
            error_message=status.error_message,
            completed_at=status.completed_at or self.clock.wall(), **costs,
        )

    async def _settle(self, job: JobRow, status: TaskStatus, *, learn: bool) -> dict[str, Any]:
        """The cost fields a finished task's report sets, and what it teaches the budget.

        A trusted cost (finite, ≥ 0) settles the reservation; a finished task's price is
        remembered for its group (``learn``), and one above the reservation raises the
        reservations of the group's tasks in flight at once. A cost that is not a number is
        recorded as unknown and the reservation stands.
        """
        usd, units = reported(status.cost_usd), reported(status.cost_units)
        garbled = [name for name, raw, ok in (("cost_usd", status.cost_usd, usd),
                                              ("cost_units", status.cost_units, units))
                   if raw is not None and ok is None]
        fields: dict[str, Any] = {"cost_usd": usd, "cost_units": units}
        if garbled:
            self.log.warning("job.cost_unreadable", job_id=job.job_id, fields=garbled)
            return fields  # the reservations stand: the task may have cost anything
        if status.phase is Phase.FAILED or usd is not None:
            fields["reserved_usd"] = fields["reserved_units"] = 0
        elif units is not None:
            # Kling reports units, never dollars: the dollars stay an estimate, the table's
            # scaled by the units the task really took.
            fields["reserved_usd"] = self.book.usd_for_units(job.spec, units)
            fields["reserved_units"] = 0
        if not learn or (usd is None and units is None):
            return fields
        group = job.price_group or self.book.group(job.spec)
        self.book.observe(group, usd=usd, units=units, now=self.clock.wall())
        # What this engine last recorded for the group: the tasks of one batch usually all
        # report the same price, which needs one raise and one write, not one each.
        before_usd, before_units = self._priced.get(group, (None, None))
        self._priced[group] = (usd, units)
        raise_usd = usd if usd is not None and self.book.surprise(
            group, reserved=job.reserved_usd, charged=usd, currency="usd") and (
            before_usd is None or usd > before_usd) else None
        raise_units = units if units is not None and self.book.surprise(
            group, reserved=job.reserved_units, charged=units, currency="units") and (
            before_units is None or units > before_units) else None
        if raise_usd is not None or raise_units is not None:
            raised = await self.store.raise_reservations(group, usd=raise_usd, units=raise_units)
            # Said once per group and price; the tasks of the same batch only confirm it.
            log = self.log.warning if raised else self.log.info
            log("budget.price_above_reservation", job_id=job.job_id, group=group,
                reserved_usd=job.reserved_usd, cost_usd=usd, reserved_units=job.reserved_units,
                cost_units=units, raised_in_flight=raised)
        if (usd, units) != (before_usd, before_units):
            await self.store.record_price(group, usd=usd, units=units, now=self.clock.wall())
        return fields

    # ---- download ------------------------------------------------------------------------

    async def _fetch(self, job: JobRow, url: str | None) -> None:
        """Download a finished video (and store it, with an object store); never resubmits the
        render."""
        dest = self.videos / f"{job.job_id}.mp4"
        stored_before = False
        if self.uploads is not None:
            # The row as committed: an earlier process may have staged this attempt's video.
            job = await self.store.get_job(self.run_id, job.job_id) or job
            staged = await self.uploads.staged(job)
            if staged is not None:
                await self._upload(job, staged, staged=True)
                return
            stored_before = job.video_sha256 is not None
        refreshed = False
        tries = 0
        async with self.downloads:
            while True:
                tries += 1
                try:
                    if url is None:
                        raise ExpiredURL("the provider gave no result URL")
                    result = await download(self.http, url, dest, self.policy)
                except UnsafeURL as exc:
                    await self._set(job, JobState.FAILED, "job.failed", error_code="unsafe_url",
                                    error_message=str(exc), retryable=0)
                    self.log.warning("job.download_refused", job_id=job.job_id, error=str(exc))
                    return
                except (TooLarge, TooSlow) as exc:
                    # Every try would stream up to the limit again (or trickle again); raising
                    # output.max_video_mb, or running again later, fetches it (the render is
                    # kept).
                    await self._download_failed(job, str(exc))
                    return
                except ExpiredURL as exc:
                    if refreshed:
                        await self._download_failed(job, str(exc))
                        return
                    refreshed = True
                    url = await self._fresh_url(job, url)
                    continue
                except DownloadError as exc:
                    if _disk_full(exc):
                        # Every other download would fail the same way, and every new task
                        # would render a video with nowhere to go: stop creating.
                        self.stop_creating(f"the disk holding {self.videos} is full: free some "
                                           f"space, then `batchkling resume {self.run_id}` "
                                           "downloads the finished videos (no new renders)",
                                           "disk")
                        await self._download_failed(job, str(exc))
                        return
                    if tries >= _DOWNLOAD_TRIES:
                        await self._download_failed(job, str(exc))
                        return
                    self.log.info("job.download_retry", job_id=job.job_id, error=str(exc))
                    await self.clock.sleep(self._backoff(tries, low=0.2))
                    continue
                break
        if self.uploads is not None:
            await self._upload(job, result, check=stored_before)
            return
        await self._set(job, JobState.DOWNLOADED, "job.downloaded", video_path=str(result.path),
                        video_size=result.size, video_sha256=result.sha256, error_code=None,
                        error_message=None)
        self.log.info("job.downloaded", job_id=job.job_id, bytes=result.size)

    async def _upload(self, job: JobRow, video: Downloaded, *, staged: bool = False,
                      check: bool = False) -> None:
        """Put a verified video in the object store; ``downloaded`` only once it is confirmed.

        The local copy is committed first (``job.fetched``), so a crash during the upload
        resumes from it, and the resumed upload first checks whether the object already holds
        it (``staged``/``check``). A failed upload leaves the job ``succeeded`` (the render is
        never repeated) for ``resume`` to upload.
        """
        assert self.uploads is not None
        if not staged:
            await self._set(job, JobState.SUCCEEDED, "job.fetched", video_path=str(video.path),
                            video_size=video.size, video_sha256=video.sha256)
        try:
            stored = await self.uploads.put(
                job.job_id, video, check_existing=staged or check, clock=self.clock,
                backoff=lambda tries: self._backoff(tries, low=0.5))
        except ObjectStoreError as exc:
            await self._set(job, JobState.SUCCEEDED, "job.upload_failed", let_go=True,
                            error_code="upload_failed",
                            error_message=f"{exc}; the video is kept in {video.path} and "
                            f"`batchkling resume {self.run_id}` uploads it (no new render)")
            self.log.warning("job.upload_failed", job_id=job.job_id, error=str(exc))
            if not exc.retryable:
                self.stop_creating(f"the object store refused an upload: {exc}", "object_store")
            return
        crashpoints.reached("after_upload")
        keep = self.uploads.keep_local
        await self._set(job, JobState.DOWNLOADED, "job.downloaded",
                        video_path=str(video.path) if keep else None, video_size=stored.size,
                        video_sha256=stored.sha256, video_uri=stored.uri, video_etag=stored.etag,
                        error_code=None, error_message=None)
        self.log.info("job.downloaded", job_id=job.job_id, bytes=stored.size, uri=stored.uri)
        if not keep:
            await self.uploads.discard(video.path)

    async def _fresh_url(self, job: JobRow, old: str | None) -> str | None:
        current = await self.store.get_job(self.run_id, job.job_id)
        task_id = current.task_id if current else job.task_id
        if task_id is None:
            return old
        try:
            status = await self._provider_status(self._account(job).provider, task_id,
                                                 job.spec)
        except ProviderError:
            return old
        if status.video_url and status.video_url != old:
            await self._set(job, JobState.SUCCEEDED, "job.url_refreshed",
                            video_url=status.video_url)
            return status.video_url
        return old

    async def _download_failed(self, job: JobRow, message: str) -> None:
        # The render is paid for and may still be fetched: stay `succeeded`, resumable.
        await self._set(job, JobState.SUCCEEDED, "job.download_failed", let_go=True,
                        error_code="download_failed", error_message=message)
        self.log.warning("job.download_failed", job_id=job.job_id, error=message)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by a full disk (ENOSPC, or a quota: EDQUOT)."""
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


def select_states(spec: Mapping[str, bool]) -> list[JobState]:
    """Map retry flags (``failed``, ``unknown``, ``timed_out``) to states."""
    names = {"failed": JobState.FAILED, "unknown": JobState.UNKNOWN,
             "timed_out": JobState.TIMED_OUT}
    return [state for flag, state in names.items() if spec.get(flag)]
