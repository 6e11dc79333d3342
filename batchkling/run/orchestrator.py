"""The library entry point: one run of a manifest, from the store to a summary.

    async with Orchestrator(load_manifest("spring.yaml"), workdir="jobs") as orch:
        summary = await orch.run()

``store=`` names another store than the workdir's ``batchkling.db``: a path, or a
``postgresql://`` URL (the run folders — videos, CSV, report, run.log — stay in the workdir).

The orchestrator owns everything around the engine: the run record and its manifest snapshot,
the single-runner lease and its heartbeat, syncing an edited manifest into the jobs table,
building the provider from environment credentials, the results CSV, and the summary whose
``exit_code`` the CLI returns.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import random
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import httpx

from batchkling.clock import Clock, SystemClock
from batchkling.errors import (
    BatchklingError,
    ConfigError,
    StoreError,
    WorkerFenced,
    unwrapped_groups,
)
from batchkling.logs import get_logger, redactor, run_log, run_log_error
from batchkling.models import LEASE_STALE_AFTER, TERMINAL, JobSpec, JobState, RunSummary
from batchkling.outputs.nextstep import location_args
from batchkling.outputs.objectstore import ObjectStore
from batchkling.outputs.report import write_report
from batchkling.outputs.results import ResultsWriter, csv_status, write_results
from batchkling.outputs.views import ENDED_EVENT, eta_seconds
from batchkling.pricing import estimate_units, estimate_usd
from batchkling.providers.base import Provider
from batchkling.providers.http import HttpClient
from batchkling.run.budget import PriceBook, describe_surprises
from batchkling.run.callbacks import CallbackReceiver, callback_token, parse_listen, with_token
from batchkling.run.engine import Engine, EngineOptions
from batchkling.run.upload import (
    InputImages,
    VideoUploads,
    input_link_seconds,
    open_output_store,
    uploads_inputs,
)
from batchkling.store import RunRow, Store, default_location, store_from

if TYPE_CHECKING:
    from batchkling.manifest.document import Manifest, RunConfig
    from batchkling.manifest.settings import AccountConfig

EXIT_OK, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_ACCOUNT, EXIT_INTERRUPTED = 0, 1, 3, 4, 130
#: This process was presumed dead (paused past ``stale_after``) and another took its jobs over.
EXIT_FENCED = 5
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEARTBEAT = 5.0
#: Seconds without a heartbeat after which a worker is presumed dead (``--stale-after``);
#: the screens' liveness rule goes by the same figure.
STALE_AFTER = LEASE_STALE_AFTER


@dataclass(frozen=True, slots=True)
class Progress:
    """How a run stands right now (see :meth:`Orchestrator.progress`)."""

    run_id: str
    counts: Mapping[str, int]
    in_flight: int
    slot_limit: int
    spent_usd: float
    committed_usd: float
    stop_reason: str | None
    #: Seconds until the last job ends, at the pace of the last 20 to end (as ``status``).
    eta_seconds: float | None = None


def resolve_run_id(template: str, today: date | None = None) -> str:
    """Expand ``{date}`` (local date, YYYY-MM-DD) and check the id is a safe folder name."""
    run_id = template.replace("{date}", (today or date.today()).isoformat())
    if not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(
            f"run id {run_id!r} is not a safe folder name: use letters, digits, '.', '_', '-'"
        )
    return run_id


def default_workdir() -> Path:
    """``$BATCHKLING_HOME`` or ``./jobs``."""
    return Path(os.environ.get("BATCHKLING_HOME") or "jobs")


def _private_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        return False


class Orchestrator:
    """Runs (or resumes, or retries) one run id. Use as an async context manager, once.

    Options (all keyword): ``run_id`` (default: the manifest's name; ``{date}`` expands),
    ``workdir`` (default ``$BATCHKLING_HOME`` or ``./jobs``), ``env`` (where API keys are read,
    default ``os.environ``), ``base_url`` (overrides the manifest's provider URL),
    ``simulated`` (marks the run as one against a simulator — it starts none: start
    ``batchkling.simulator.SimulatorServer`` yourself and pass its ``base_url``, as
    ``--simulate`` does), ``max_in_flight``, ``min_poll_interval``, ``time_scale`` (> 1 when
    the provider renders faster than real time: deadlines and poll intervals shrink with it),
    ``transport`` (any httpx transport instead of the network), ``clock``, ``store`` (an
    open-able :class:`~batchkling.store.Store` instead of ``workdir/batchkling.db``),
    ``provider`` (an adapter instance) and ``seed`` (for jitter). Nothing is printed: events go
    to ``run.log``, and to the console only after :func:`batchkling.logs.configure_logging`.
    """

    def __init__(
        self,
        manifest: Manifest | None = None,
        *,
        run_id: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        base_url: str | None = None,
        simulated: bool = False,
        max_in_flight: int | None = None,
        min_poll_interval: float | None = None,
        time_scale: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
        store: Store | str | os.PathLike[str] | None = None,
        provider: Provider | None = None,
        seed: int | None = None,
        stale_after: float = STALE_AFTER,
        worker: str | None = None,
        output_store: str | None = None,
        overwrite_videos: bool = False,
        callback_listen: str | None = None,
        callbacks: CallbackReceiver | None = None,
    ) -> None:
        if manifest is None and run_id is None:
            raise ConfigError("give a manifest, or the run id of an existing run")
        self.manifest = manifest
        self.run_id = resolve_run_id(run_id or (manifest.name if manifest else ""))
        self.workdir = Path(workdir) if workdir is not None else default_workdir()
        self.run_dir = self.workdir / self.run_id
        self.env = os.environ if env is None else env
        self.base_url_override = base_url
        self.simulated = simulated
        self.max_in_flight = max_in_flight
        self.min_poll_interval = min_poll_interval
        # > 1 against a simulator that renders faster than real time: deadlines shrink with it.
        self.time_scale = time_scale
        self.transport = transport
        # Start a run whose folder holds videos the store knows nothing of (its database lost),
        # creating (and paying for) those jobs again.
        self.overwrite_videos = overwrite_videos
        self.clock = clock or SystemClock()
        # A Store is the caller's to open and close; a location (a path, a sqlite:/// or
        # postgresql:// URL) or none (the workdir's batchkling.db) is this orchestrator's.
        self._own_store = not isinstance(store, Store)
        self.store = store if isinstance(store, Store) else store_from(
            default_location(self.workdir) if store is None else store)
        self._provider = provider
        self._rng = random.Random(seed)
        # This process's worker id: readable in `status`, unique across machines and restarts.
        # A `batchkling worker` drives many runs under one id (and heartbeats for them).
        self._owner = worker or worker_id()
        self._member = worker is not None
        self.stale_after = stale_after
        # `--output-store`: replaces the manifest's output.store (and, on `run`, its snapshot).
        self.output_store = output_store
        self._objects: ObjectStore | None = None
        # HOST:PORT of the callback receiver to start (with provider.callback_url), or a
        # receiver already listening that this run joins (a worker's, shared by its runs).
        self.callback_listen = callback_listen
        self._shared_receiver = callbacks
        self._callback_url: str | None = None
        self._engine: Engine | None = None
        self._scope: anyio.CancelScope | None = None
        self._interrupted = False
        self._entered = False
        self._closed = False
        self.log = get_logger(run_id=self.run_id)

    async def __aenter__(self) -> Orchestrator:
        if self._entered or self._closed:
            raise BatchklingError("an Orchestrator runs once; make a new one")
        self._entered = True
        await self.store.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close what this orchestrator opened; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._own_store:
            await self.store.aclose()

    async def progress(self) -> Progress:
        """A snapshot for progress displays: counts by state, slots, money, ETA."""
        counts = await self.store.counts(self.run_id)
        engine = self._engine
        left = sum(n for state, n in counts.items() if state not in TERMINAL)
        # The store keeps the run's money as running totals: no scan per redraw.
        spent, committed = await self.store.money(self.run_id)
        if engine is not None:
            # The engine keeps these as jobs end: the query reads every ended job of the run.
            ends = list(engine.recent_ends)
        else:
            ends = await self.store.recent_ends(self.run_id) if left else []
        eta = None if left == 0 else eta_seconds(left, ends, self.clock.wall())
        return Progress(
            run_id=self.run_id,
            counts={state.value: n for state, n in counts.items()},
            in_flight=engine.slots_in_use if engine else 0,
            slot_limit=engine.slot_limit if engine else 0,
            spent_usd=spent,
            committed_usd=committed,
            stop_reason=engine.stop.reason if engine else None,
            eta_seconds=eta,
        )

    def interrupt(self) -> None:
        """Stop creating and wind down now (first Ctrl-C); remote tasks keep running."""
        self._interrupted = True
        if self._engine is not None:
            self._engine.stop_creating("interrupted", "interrupted")
        if self._scope is not None:
            self._scope.cancel()

    # ---- entry points --------------------------------------------------------------------

    async def run(self) -> RunSummary:
        """Start the run, or continue it with the manifest's current content."""
        manifest = self.manifest
        if manifest is None:
            return await self.resume()
        existing = await self.store.get_run(self.run_id)
        if existing is not None and existing.simulated and not self.simulated:
            await self._replace_rehearsal()
            existing = None
        elif existing is not None and existing.simulated != self.simulated:
            raise ConfigError(f"run {self.run_id!r} holds tasks of the real provider; a "
                              "simulation must not touch them: pick another --run-id")
        if self.output_store:
            manifest = manifest.with_output_store(self.output_store)
        config_json, source_text = _snapshot(manifest)
        base_url = self.base_url_override or manifest.provider.base_url

        async def save() -> None:
            await self.store.save_run(
                self.run_id, manifest_path=str(manifest.source_path),
                manifest_text=source_text, config_json=config_json,
                provider=manifest.provider.name, base_url=base_url, simulated=self.simulated,
                now=self.clock.wall(),
            )

        if existing is None:
            await self._check_new_run(manifest)
            await save()
            return await self._drive(sync=manifest)
        # An existing run's settings change only once this process holds its lease: a run
        # refused because another process drives it changes nothing.
        return await self._drive(sync=manifest, before=save)

    async def submit(self) -> dict[str, int]:
        """Record the run and its jobs for workers to drive (``batchkling submit``); no creates.

        Returns the run's jobs counted by state. Like ``run``, an existing run's settings
        change only while this process holds its lease, so a run being driven is refused.
        """
        manifest = self.manifest
        if manifest is None:
            raise ConfigError("submit needs a manifest")
        existing = await self.store.get_run(self.run_id)
        if existing is not None and existing.simulated:
            raise ConfigError(f"run {self.run_id!r} was started with --simulate; workers cannot "
                              "reach its simulator: pick another --run-id")
        config_json, source_text = _snapshot(manifest)

        async def save() -> None:
            await self.store.save_run(
                self.run_id, manifest_path=str(manifest.source_path),
                manifest_text=source_text, config_json=config_json,
                provider=manifest.provider.name,
                base_url=self.base_url_override or manifest.provider.base_url,
                simulated=False, now=self.clock.wall())

        if existing is None:
            await self._check_new_run(manifest)
            await save()
        with unwrapped_groups():
            await self._drive_locked(sync=manifest, before=save if existing else None,
                                     execute=False)
        counts = await self.store.counts(self.run_id)
        return {state.value: n for state, n in counts.items()}

    async def _replace_rehearsal(self) -> None:
        """A real run of an id last used with the simulator starts afresh.

        The rehearsal's records would make the real run skip every job it "finished" and keep
        its placeholder videos as results, so they go, with its folder (nothing real is lost:
        a simulated run pays for nothing). Refused while the rehearsal is still running.
        """
        from batchkling.run.forget import forget_in

        jobs, _folder = await forget_in(self.store, self.run_id, self.run_dir)
        self.log.warning("run.rehearsal_replaced", simulated_jobs=jobs,
                         note="this id was last run with --simulate; its simulated records and "
                              "videos were removed and this real run starts afresh")

    async def _check_new_run(self, manifest: Manifest) -> None:
        """Refuse a new run that would collide with what is already there: a run whose id
        differs only in case (one folder on macOS and Windows), or videos of its jobs that no
        store records (its database lost: running would pay for them again)."""
        await _refuse_case_twin(self.store, self.run_id)
        if not self.overwrite_videos:
            _refuse_unknown_videos(self.run_dir, manifest, self.store.location)

    async def resume(self) -> RunSummary:
        """Continue an existing run from its snapshot; no manifest file needed."""
        await self.store.require_run(self.run_id)
        return await self._drive(sync=None)

    async def retry(self, states: Sequence[JobState], job_ids: Sequence[str] = (), *,
                    force: bool = False) -> RunSummary:
        """Put the chosen finished jobs back to pending, then resume.

        Failed and timed-out jobs get a new attempt (a new task); ``unknown`` jobs are created
        again with their original idempotency key, so a provider that honours it returns the
        task it may already have made instead of billing a second one. A job named in
        ``job_ids`` that already succeeded is rendered (and paid for) again only with ``force``;
        otherwise :class:`ConfigError` says so and nothing changes.
        """
        await self.store.require_run(self.run_id)
        missing = [job_id for job_id in job_ids
                   if await self.store.get_job(self.run_id, job_id) is None]
        if missing:
            raise ConfigError(f"run {self.run_id!r} has no job {', '.join(map(repr, missing))}; "
                              f"`batchkling export {self.run_id}` lists its jobs")
        done = await succeeded_jobs(self.store, self.run_id, job_ids)
        if done and not force:
            raise ConfigError(
                f"{describe_done(done)} of run {self.run_id!r} already succeeded: retrying "
                "renders it again and pays for it again (the CSV's cost_usd will show both "
                "attempts). Add --force to do that anyway")

        async def reset() -> None:
            changed = await self.store.reset_for_retry(self.run_id, states=states,
                                                       job_ids=job_ids, now=self.clock.wall())
            self.log.info("run.retry", jobs=changed, states=[s.value for s in states],
                          job_ids=list(job_ids))

        return await self._drive(sync=None, before=reset)

    async def work(self) -> RunSummary:
        """Drive the run as one of its cooperating workers (``batchkling worker``).

        No lease: any number of workers share the run through claims. The worker takes over
        jobs of workers that died, but leaves what a person must decide on (timed out, refused,
        a failed download) to ``resume``. If nothing is left to do and no driver holds the run,
        this worker ends it and writes its results and report.
        """
        try:
            with unwrapped_groups():
                run = await self.store.require_run(self.run_id)
                config = self._config(run)
                with run_log(self.run_dir / "run.log", self.run_id):
                    return await self._execute(run, config)
        except WorkerFenced as exc:
            return RunSummary(run_id=self.run_id, counts={}, cost_usd=0.0,
                              stop_reason=str(exc), exit_code=EXIT_FENCED)

    # ---- the shared path -----------------------------------------------------------------

    async def _drive(self, *, sync: Manifest | None,
                     before: Callable[[], Awaitable[None]] | None = None) -> RunSummary:
        try:
            with _naming_run(self.run_id), unwrapped_groups():
                return await self._drive_locked(sync=sync, before=before)
        except WorkerFenced as exc:
            # Another process took this run over while this one was paused: whatever was in
            # progress is now its to finish. Nothing more is written here.
            self.log.error("run.fenced", error=str(exc))
            return RunSummary(run_id=self.run_id, counts={}, cost_usd=0.0,
                              stop_reason=str(exc), exit_code=EXIT_FENCED)

    async def _drive_locked(self, *, sync: Manifest | None,
                            before: Callable[[], Awaitable[None]] | None,
                            execute: bool = True) -> RunSummary:
        await self.store.require_run(self.run_id)
        # Refused before anything is written: a live driver that is paused while it holds the
        # SQLite file's write lock must not make this process wait for the lock to say so.
        await self.store.check_lease(self.run_id, self._owner, stale_after=self.stale_after,
                                     now=self.clock.wall())
        await self.store.register_worker(self._owner, runs=[self.run_id], now=self.clock.wall())
        try:
            await self.store.acquire_lease(self.run_id, self._owner,
                                           stale_after=self.stale_after, now=self.clock.wall())
            try:
                if before is not None:
                    await before()
                run = await self.store.require_run(self.run_id)
                config = self._config(run)
                with run_log(self.run_dir / "run.log", self.run_id):
                    if sync is not None:
                        await self._sync(sync)
                    # Open for creates (by this process, and by any worker that joins).
                    await self.store.set_run_state(self.run_id, "running", None,
                                                   self.clock.wall(), owner=self._owner)
                    if not execute:
                        return RunSummary(run_id=self.run_id, counts={}, cost_usd=0.0,
                                          stop_reason=None, exit_code=EXIT_OK)
                    return await self._execute(run, config)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.store.release_lease(self.run_id, self._owner)
        finally:
            with anyio.CancelScope(shield=True):
                # A no-op for a worker already presumed dead: its row says so.
                await self.store.retire_worker(self._owner, state="stopped", reason=None,
                                               now=self.clock.wall())

    async def _sync(self, manifest: Manifest) -> None:
        from batchkling.manifest.plan import against_run

        known = await self.store.job_index(self.run_id)
        changed, reordered = [], []
        seen: set[str] = set()
        new = 0
        for seq, spec in enumerate(manifest.expand()):
            if known:
                seen.add(spec.job_id)  # to find the jobs the manifest no longer has
            previous = known.get(spec.job_id)
            # The same rule as `plan` against a run, so the plan's counts are what happens.
            action = against_run(spec, None if previous is None else
                                 (previous[0], previous[1].value))
            if action == "new":
                new += 1
            elif action == "changed":
                changed.append((seq, spec))
            else:
                reordered.append((seq, spec.job_id))
        removed = [job_id for job_id in known if job_id not in seen]

        def added() -> Iterator[tuple[int, JobSpec]]:
            # A second pass: a big manifest's new jobs go to the store a batch at a time,
            # never all in memory at once.
            for seq, spec in enumerate(manifest.expand()):
                if spec.job_id not in known:
                    yield seq, spec

        await self.store.sync_jobs(self.run_id, added=added() if new else (), changed=changed,
                                   reordered=reordered, removed=removed, now=self.clock.wall())
        if new or changed or removed:
            self.log.info("run.synced", added=new, changed=len(changed), removed=len(removed))

    async def _execute(self, run: RunRow, config: RunConfig) -> RunSummary:
        self._callback_url = self._callback_url_for(run, config)
        options = self._options(run, config)
        # Before the provider and the first create: a store that cannot take the videos is a
        # bad configuration (exit 2), not something to find out after paying for renders.
        objects = self._objects = await open_output_store(config, self.env)
        accounts = await self._accounts(run, config, options)
        book = await self._price_book(run, config)
        parse = self._callback_parser(accounts[0][1]) if self._callback_url else None
        async with HttpClient(transport=self.transport, timeout=120.0) as http, \
                self._listening(parse is not None) as receiver:
            engine = Engine(store=self.store, accounts=accounts, run_id=self.run_id,
                            nonce=run.nonce, worker_id=self._owner, options=options,
                            run_dir=self.run_dir, clock=self.clock, http=http,
                            book=book, rng=self._rng,
                            **self._store_steps(objects, run, config, options))
            self._engine = engine
            token = callback_token(run.nonce)
            if receiver is not None and parse is not None:
                receiver.route(token, parse, engine.hint)
            # The store's location never holds a password (each backend strips it).
            self.log.info("run.started", provider=run.provider, simulated=run.simulated,
                          max_in_flight=options.max_in_flight, store=self.store.location,
                          callbacks=receiver is not None)
            try:
                async with anyio.create_task_group() as tg:
                    if not self._member:
                        tg.start_soon(self._heartbeat)
                    with anyio.CancelScope() as scope:
                        self._scope = scope
                        if self._interrupted:
                            scope.cancel()
                        await engine.run(driver=not self._member)
                    tg.cancel_scope.cancel()
            finally:
                self._scope = None
                if receiver is not None:
                    receiver.unroute(token)
                with anyio.CancelScope(shield=True):
                    if self._provider is None:
                        for _account_id, provider, _cap in accounts:
                            await provider.aclose()
        with anyio.CancelScope(shield=True):
            summary = await self._finish(engine, options)
        return summary

    async def _price_book(self, run: RunRow, config: RunConfig) -> PriceBook:
        """What the run reserves with: the price table (with the manifest's declared models and
        ``pricing:``), the prices the store has observed, and ``budget.margin``."""
        usd_overrides, unit_overrides = config.price_overrides(), config.unit_overrides()

        def table_usd(spec: JobSpec) -> float:
            return estimate_usd(spec, usd_overrides)

        def table_units(spec: JobSpec) -> float:
            # Only Kling's native API bills in units; other providers hold none.
            return estimate_units(spec, unit_overrides) if run.provider == "kling" else 0.0

        return PriceBook(provider=run.provider, table_usd=table_usd, table_units=table_units,
                         observed=await self.store.observed_prices(),
                         margin=config.budget.margin)

    def _callback_url_for(self, run: RunRow, config: RunConfig) -> str | None:
        """The URL the provider should POST this run's status changes to, with its token."""
        url = config.provider.callback_url
        if self.callback_listen is None and self._shared_receiver is None:
            if url:
                self.log.warning("run.callbacks_off", reason="provider.callback_url is set but "
                                 "--callback-listen is not: nothing receives them; polling")
            return None
        if not url and self.callback_listen is None:
            return None  # a worker's receiver: this run has no callbacks, so it polls
        if not url:
            raise ConfigError("--callback-listen needs provider.callback_url in the manifest: "
                              "the public URL through which the provider reaches this receiver")
        if self.callback_listen is not None:
            parse_listen(self.callback_listen)
        return with_token(url, callback_token(run.nonce))

    def _callback_parser(self, provider: Provider) -> Callable[[Any], Any] | None:
        """How ``provider``'s callbacks read, or None if it sends none."""
        parse: Callable[[Any], Any] | None = getattr(provider, "parse_callback", None)
        if parse is not None and self._provider is not None and hasattr(provider,
                                                                        "callback_url"):
            provider.callback_url = self._callback_url
        return parse

    @contextlib.asynccontextmanager
    async def _listening(self, wanted: bool) -> AsyncIterator[CallbackReceiver | None]:
        """The receiver this run's callbacks come to: the shared one, or its own, listening
        for as long as the run goes on; None when it has none."""
        if not wanted:
            yield None
            return
        if self._shared_receiver is not None:
            yield self._shared_receiver
            return
        assert self.callback_listen is not None
        receiver = CallbackReceiver(*parse_listen(self.callback_listen))
        await receiver.start()
        try:
            yield receiver
        finally:
            with anyio.CancelScope(shield=True):
                await receiver.stop()

    async def _heartbeat(self) -> None:
        """Say this worker is alive; presume silent ones dead and take their jobs of this run."""
        while True:
            await self.clock.sleep(heartbeat_interval(self.stale_after))
            now = self.clock.wall()
            try:
                await self.store.worker_heartbeat(self._owner, now)
                if await self.store.reap_workers(self.stale_after, now) and self._engine:
                    await self._engine.take_over()
                _stop_if_log_failed(self._engine, self.run_dir / "run.log", self.run_id)
            except WorkerFenced as exc:
                # Presumed dead while paused: every write from here on would change nothing.
                if self._engine is not None:
                    self._engine._fence(exc)
                raise

    async def _finish(self, engine: Engine, options: EngineOptions) -> RunSummary:
        counts = await self.store.counts(self.run_id)
        by_status: dict[str, int] = {}
        for job_state, n in counts.items():
            key = csv_status(job_state, download=options.download)
            by_status[key] = by_status.get(key, 0) + n
        stop = engine.stop
        if self._interrupted:
            code, state = EXIT_INTERRUPTED, "interrupted"
        elif stop.kind == "account":
            code, state = EXIT_ACCOUNT, "stopped"
        elif any(by_status.get(s) for s in ("pending", "unknown", "timed_out")):
            code, state = EXIT_INCOMPLETE, "incomplete"
        elif by_status.get("failed"):
            code, state = EXIT_FAILED, "finished"
        else:
            code, state = EXIT_OK, "finished"
        reason = "interrupted" if self._interrupted else stop.reason
        kind = "interrupted" if self._interrupted else stop.kind
        now = self.clock.wall()
        log_error = run_log_error(self.run_id)
        if log_error is not None and stop.kind != "disk":
            reason = _and(reason, _file_problem(
                self.run_dir / "run.log", log_error, f"the run went on without it; `batchkling "
                f"resume {self.run_id}` continues the run, paying for nothing twice"))
            code = EXIT_INCOMPLETE if code == EXIT_OK else code
        # The run's state first: the files below show it (the lease is still this process's
        # until it returns), and `status` names the next step from the end record.
        if self._member:
            # A cooperating worker ends the run only when nobody drives it and nothing is left.
            ended = not self._interrupted and await self.store.close_run(
                self.run_id, state, reason, now)
        else:
            # Only while this process still holds the lease: paused at the very end (no job
            # left to write, so no claim epoch to fence it) while another process took the run
            # over, it must not mark the run ended under that process, nor write its files.
            await self.store.set_run_state(self.run_id, state, reason, now, owner=self._owner)
            ended = True
        csv_path: Path | None = None
        report_path: Path | None = None
        if ended:
            await self.store.log_event(self.run_id, None, now, ENDED_EVENT,
                                       {"exit_code": code, "stop_kind": kind, "state": state})
            csv_dest, report_path = self.run_dir / "results.csv", self.run_dir / "report.html"
            where = location_args(self.workdir)
            # One pass over the run's jobs feeds both files (at 100,000 jobs a pass is seconds).
            with await ResultsWriter.start(self.store, self.run_id, csv_dest,
                                           download=options.download, where=where) as results:
                fed = False
                try:
                    await write_report(self.store, self.run_id, report_path, state=state,
                                       exit_code=code, stop_kind=kind, workdir=self.workdir,
                                       objects=self._objects, env=self.env, results=results)
                    fed = True
                except OSError as exc:
                    # The page is a convenience view; the CSV and the DB are the record.
                    self.log.warning("run.report_failed", error=str(exc))
                    report_path = None
                try:
                    csv_path = results.finish() if fed else await write_results(
                        self.store, self.run_id, csv_dest, download=options.download,
                        where=where)
                except OSError as exc:
                    # The store holds every result: `export` writes the file again once it can.
                    reason = _and(reason, _file_problem(
                        csv_dest, exc, f"`batchkling export {self.run_id}` writes it again "
                        f"(`batchkling resume {self.run_id}` continues the run, paying for "
                        "nothing twice)"))
        spent, committed = await self.store.money(self.run_id)
        units, committed_units = await self.store.money_units(self.run_id)
        self.log.info("run.finished", state=state, exit_code=code, counts=by_status,
                      cost_usd=round(spent, 4), polls=engine.polls + engine.confirm_polls,
                      lists=engine.lists, callbacks=engine.hints, stop_reason=reason,
                      peak_in_flight=engine.slot_peak, slot_limit=engine.slot_limit)
        return RunSummary(run_id=self.run_id, counts=by_status, cost_usd=spent,
                          stop_reason=reason, exit_code=code,
                          results_csv=str(csv_path) if csv_path else None,
                          cost_units=units, committed_usd=committed, stop_kind=kind,
                          states={s.value: n for s, n in counts.items()},
                          report_html=None if report_path is None else str(report_path),
                          max_usd=options.max_usd, max_units=options.max_units,
                          committed_units=committed_units,
                          notes=money_notes(engine.book, spent=spent, units=units,
                                            max_usd=options.max_usd,
                                            max_units=options.max_units),
                          reused=engine.reused)

    # ---- configuration -------------------------------------------------------------------

    def _options(self, run: RunRow, config: RunConfig) -> EngineOptions:
        host = urlsplit(self._base_url(run)).hostname or ""
        trusted: set[str] = set()
        if _private_host(host) or self.transport is not None:
            # The provider itself is local (the simulator, or an in-process test app): its own
            # result URLs are local too.
            trusted.add(host)
        limits = config.limits
        return EngineOptions(
            max_in_flight=self.max_in_flight or limits.max_in_flight,
            submit_rate=limits.submit_rate,
            task_timeout=limits.task_timeout / self.time_scale,
            max_attempts=limits.max_attempts,
            max_usd=config.budget.max_usd,
            max_units=config.budget.max_units,
            reuse=config.reuse == "earlier-runs",
            download=config.output.download,
            on_unknown=config.on_unknown,
            callbacks=self._callback_url is not None,
            min_poll_interval=self.min_poll_interval or 5.0 / self.time_scale,
            max_poll_interval=120.0 / self.time_scale,
            hard_poll_floor=0.5 / self.time_scale,
            slot_wait_cap=15.0 / self.time_scale,
            allow_private_urls=config.output.allow_private_urls,
            max_video_bytes=int(config.output.max_video_mb * 1024 * 1024),
            trusted_hosts=frozenset(trusted),
        )

    def _store_steps(self, objects: ObjectStore | None, run: RunRow, config: RunConfig,
                     options: EngineOptions) -> dict[str, Any]:
        """The engine's object-store steps: video uploads, and input images as URLs."""
        inputs = InputImages(
            objects if uploads_inputs(config, run.provider) else None,
            link_seconds=input_link_seconds(config.limits.task_timeout),
            # The warning is about the real upstream: --simulate's quickstart is spared it.
            warn=run.provider == "imarouter" and not run.simulated, log=self.log)
        if objects is None:
            return {"inputs": inputs}
        uploads = VideoUploads(objects, self.run_id, keep_local=config.output.keep_local,
                               concurrency=options.download_concurrency)
        return {"inputs": inputs, "uploads": uploads}

    def _config(self, run: RunRow) -> RunConfig:
        """The run's settings from its snapshot, with ``--output-store`` over them."""
        config = _config_from(run)
        if self.output_store:
            config = config.with_output_store(self.output_store)
        return config

    def _base_url(self, run: RunRow) -> str:
        # A simulated run gets a new simulator (and port) on every invocation.
        return self.base_url_override or run.base_url

    def _secret(self, variable: str | None, what: str) -> str:
        if not variable:
            raise ConfigError(f"the manifest names no environment variable for the {what}")
        value = self.env.get(variable, "").strip()
        if not value:
            raise ConfigError(f"environment variable {variable} is not set: export the {what} "
                              f"there (it is never read from the manifest)")
        redactor.register(value)
        return value

    async def _accounts(self, run: RunRow, config: RunConfig,
                        options: EngineOptions) -> list[tuple[str, Provider, int]]:
        """The run's provider accounts: ``(account id, adapter, max in flight)`` each, recorded
        in the store so every worker on the same key shares its slots."""
        keys = config.provider.key_accounts(options.max_in_flight)
        if self._provider is not None:
            keys = keys[:1]
        found = []
        for key in keys:
            account_id = account_id_for(run, key.key_env, simulated=self.simulated)
            cap = min(key.max_in_flight or options.max_in_flight, self.max_in_flight or 10**6)
            await self.store.ensure_account(account_id, provider=run.provider,
                                            max_in_flight=cap, now=self.clock.wall())
            provider = self._provider or self._build_provider(run, key)
            found.append((account_id, provider, cap))
        return found

    def _build_provider(self, run: RunRow, key: AccountConfig) -> Provider:
        if run.provider == "imarouter":
            from batchkling.providers.imarouter import ImaRouterProvider

            secret = self._secret(key.api_key_env, "ImaRouter API key")
            return ImaRouterProvider(self._base_url(run), secret, transport=self.transport,
                                     callback_url=self._callback_url)
        if run.provider == "kling":
            from batchkling.providers.kling import KlingProvider

            if key.api_key_env:
                return KlingProvider(self._base_url(run), api_key=self._secret(
                    key.api_key_env, "Kling API key"), transport=self.transport,
                    clock=self.clock, callback_url=self._callback_url)
            return KlingProvider(
                self._base_url(run),
                access_key=self._secret(key.access_key_env, "Kling access key"),
                secret_key=self._secret(key.secret_key_env, "Kling secret key"),
                transport=self.transport, clock=self.clock, callback_url=self._callback_url,
            )
        raise ConfigError(f"provider {run.provider!r} is not supported by this version")


def money_notes(book: PriceBook, *, spent: float, units: float, max_usd: float | None,
                max_units: float | None) -> tuple[str, ...]:
    """What the end of a run says about money: prices found above what was reserved, and a
    cap that spending passed, with the bound on how far (docs/money.md)."""
    notes = describe_surprises(book.surprises)
    for currency, total, cap in (("usd", spent, max_usd), ("units", units, max_units)):
        if cap is None or total <= cap + 1e-9:
            continue
        over = total - cap
        shown = (f"${over:.2f}", f"${cap:.2f}", "budget.max_usd") if currency == "usd" else \
            (f"{over:g} units", f"{cap:g} units", "budget.max_units")
        notes.append(
            f"spending passed {shown[2]} {shown[1]} by {shown[0]}: tasks created before their "
            f"price was known cost more than they reserved (by "
            f"{book.overshoot(currency):.2f} in all, which bounds the overshoot); raise "
            f"budget.margin to reserve more until prices are known")
    return tuple(notes)


async def succeeded_jobs(store: Store, run_id: str, job_ids: Sequence[str]) -> list[str]:
    """Those of ``job_ids`` whose render already succeeded (a retry would pay again)."""
    done = []
    for job_id in job_ids:
        job = await store.get_job(run_id, job_id)
        if job is not None and job.state in (JobState.SUCCEEDED, JobState.DOWNLOADED):
            done.append(job_id)
    return done


def describe_done(job_ids: Sequence[str]) -> str:
    """``job 'a'`` / ``jobs 'a', 'b'``."""
    return f"job{'s' if len(job_ids) != 1 else ''} {', '.join(map(repr, job_ids))}"


def heartbeat_interval(stale_after: float) -> float:
    """Heartbeats come every 5 s, and at least four times within ``stale_after``."""
    return min(_HEARTBEAT, stale_after / 4)


def worker_id() -> str:
    """A new worker id: host, process and a random part (unique across machines and restarts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def account_id_for(run: RunRow, key_env: str, *, simulated: bool) -> str:
    """The store's name of an account: provider, API host and key variable — never the key.

    Every run (and worker) that names the same variable for the same API shares the account's
    slots. A simulated run's simulator moves to a new port each time, so its host is fixed.
    """
    host = "simulator" if simulated else (urlsplit(run.base_url).netloc or run.base_url)
    return f"{run.provider}:{host}:{key_env}"


def _config_from(run: RunRow) -> RunConfig:
    from batchkling.manifest.document import RunConfig

    try:
        return RunConfig.model_validate_json(run.config_json)
    except ValueError as exc:
        raise BatchklingError(
            f"the stored manifest snapshot of run {run.run_id!r} cannot be read by this "
            f"version of batchkling: {exc}"
        ) from exc


def _snapshot(manifest: Manifest) -> tuple[str, str | None]:
    """The run settings as JSON (enough to resume without the file) and the file's text.

    The JSON is read back with the rules ``resume`` reads it with before it is stored: settings
    that pass a manifest's checks but not a snapshot's would make the run impossible to resume.
    """
    try:
        text: str | None = Path(manifest.source_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None
    config_json = manifest.run_config().model_dump_json()
    from batchkling.manifest.document import RunConfig

    try:
        RunConfig.model_validate_json(config_json)
    except ValueError as exc:
        raise ConfigError(f"the manifest's settings cannot be stored for resume ({exc}); "
                          "nothing was submitted") from exc
    return config_json, text


async def _refuse_case_twin(store: Store, run_id: str) -> None:
    """Refuse a new run id that differs from an existing run's only in case: on a
    case-insensitive disk (macOS, Windows) both runs would share one folder."""
    lowered = run_id.lower()
    for run in await store.list_runs():
        if run.run_id.lower() == lowered and run.run_id != run_id:
            raise ConfigError(f"run id {run_id!r} differs from the existing run {run.run_id!r} "
                              "only in case: both would share one folder on a case-insensitive "
                              "disk. Use that run's id, or another one")


def _refuse_unknown_videos(run_dir: Path, manifest: Manifest, store: str) -> None:
    """Refuse to start a run over videos of its jobs that no store records (the database was
    deleted or lost): running would pay for each of them again and overwrite the files.

    A file counts when it is a regular file named after one of the manifest's jobs that starts
    like an MP4 (an ``ftyp`` box). It cannot be adopted: a signature shows a video, not which
    prompt it renders, and the manifest may have changed since.
    """
    videos = run_dir / "videos"
    try:
        entries = {entry.name: entry for entry in os.scandir(videos)}
    except OSError:
        return
    if not entries:
        return
    # The folder's names are few next to a big manifest's jobs: look the jobs up in them.
    named = [entries[name] for name in (f"{spec.job_id}.mp4" for spec in manifest.expand())
             if name in entries]
    found = []
    for entry in named:
        if entry.is_file(follow_symlinks=False):
            try:
                with open(entry.path, "rb") as fh:
                    head = fh.read(12)
            except OSError:
                continue
            if head[4:8] == b"ftyp":
                found.append(entry.name)
    if found:
        raise ConfigError(
            f"{videos} already holds {len(found)} video{'s' if len(found) != 1 else ''} of this "
            f"manifest's jobs (e.g. {sorted(found)[0]}), but {store} has no run {run_dir.name!r}: "
            "its database was lost or is elsewhere. Running now would pay for those jobs again "
            "and overwrite the files; nothing was submitted. Restore the database (or point "
            "--workdir or --store at it), pick another --run-id, or pass --yes to start the "
            "run afresh and pay again")


@contextmanager
def _naming_run(run_id: str) -> Iterator[None]:
    """A store's hint names no run (`batchkling resume RUN_ID`): this one names it."""
    try:
        yield
    except StoreError as exc:
        if "RUN_ID" not in str(exc):
            raise
        raise StoreError(str(exc).replace("RUN_ID", run_id)) from exc


def _stop_if_log_failed(engine: Engine | None, path: Path, run_id: str) -> None:
    """Stop creating once the run log cannot be written: its disk is the videos' disk, and a
    task created now would render a video with nowhere to go."""
    error = run_log_error(run_id)
    if engine is not None and error is not None and engine.stop.reason is None:
        engine.stop_creating(_file_problem(path, error, f"`batchkling resume {run_id}` "
                                           "continues the run, paying for nothing twice"),
                             "disk")


def _file_problem(path: Path, exc: OSError, remedy: str) -> str:
    """What to tell a person when a file of the run cannot be written."""
    if exc.errno == errno.ENOSPC:
        return f"the disk holding {path} is full, so it was not written: free some space; {remedy}"
    return f"cannot write {path} ({exc.strerror or exc}); {remedy}"


def _and(reason: str | None, problem: str) -> str:
    return f"{reason}; {problem}" if reason else problem
