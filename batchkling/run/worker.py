"""A cooperating worker: ``batchkling worker`` — drive the jobs of every open run in the store.

Any number of workers, on any machines, share one store (PostgreSQL, or one SQLite file on one
machine). Each registers itself and heartbeats on the store's clock; it looks for open runs with
work (pending jobs, or jobs a dead worker left in flight) and drives each through an
:class:`~batchkling.run.orchestrator.Orchestrator` in worker mode: jobs are taken by claims
(the account's slots and the run's budget checked in the same transaction as the create
intent), never by a lease. A worker silent past ``stale_after`` is presumed dead by the others,
which take its jobs over; if it wakes up, its writes change nothing and it stops with
:data:`~batchkling.run.orchestrator.EXIT_FENCED`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

from batchkling.clock import Clock, SystemClock
from batchkling.errors import BatchklingError, ConfigError, WorkerFenced, unwrapped_groups
from batchkling.logs import get_logger
from batchkling.models import RunSummary
from batchkling.run.callbacks import CallbackReceiver, parse_listen
from batchkling.run.orchestrator import (
    EXIT_FENCED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    STALE_AFTER,
    Orchestrator,
    heartbeat_interval,
    worker_id,
)
from batchkling.store import Store

#: Seconds between looks for runs with work.
SCAN_INTERVAL = 5.0


@dataclass(slots=True)
class WorkerSummary:
    """What a worker did before it stopped."""

    worker_id: str
    exit_code: int
    runs: dict[str, RunSummary] = field(default_factory=dict)
    stop_reason: str | None = None


class Worker:
    """Serve open runs until stopped (or, with ``exit_when_idle``, until none has work)."""

    def __init__(
        self,
        *,
        store: Store,
        workdir: str | os.PathLike[str],
        runs: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        stale_after: float = STALE_AFTER,
        exit_when_idle: bool = False,
        scan_interval: float = SCAN_INTERVAL,
        max_in_flight: int | None = None,
        time_scale: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
        callback_listen: str | None = None,
    ) -> None:
        self.store = store
        self.workdir = Path(workdir)
        self.runs = list(runs) if runs is not None else None
        self.env = os.environ if env is None else env
        self.stale_after = stale_after
        self.exit_when_idle = exit_when_idle
        self.scan_interval = scan_interval
        self.max_in_flight = max_in_flight
        self.time_scale = time_scale
        self.transport = transport
        self.clock = clock or SystemClock()
        # One receiver for the callbacks of every run this worker drives (each run routes its
        # own token to its engine); validated now, listening once serve() starts.
        self.callbacks = (CallbackReceiver(*parse_listen(callback_listen))
                          if callback_listen is not None else None)
        self.worker_id = worker_id()
        self.log = get_logger(worker_id=self.worker_id)
        self._members: dict[str, Orchestrator] = {}
        self._refused: dict[str, str] = {}  # run id → why this worker cannot serve it
        self._summary = WorkerSummary(self.worker_id, EXIT_OK)
        self._interrupted = False
        self._scope: anyio.CancelScope | None = None

    def interrupt(self) -> None:
        """Stop claiming (first Ctrl-C): runs in progress stop creating and wind down."""
        self._interrupted = True
        for member in list(self._members.values()):
            member.interrupt()
        if self._scope is not None:
            self._scope.cancel()

    async def serve(self) -> WorkerSummary:
        """Register, serve runs, and retire; the summary's exit code is the CLI's."""
        with unwrapped_groups():
            await self.store.register_worker(self.worker_id, runs=self.runs,
                                             now=self.clock.wall())
            self.log.info("worker.started", runs=self.runs, stale_after=self.stale_after)
            try:
                if self.callbacks is not None:
                    await self.callbacks.start()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._heartbeat, tg)
                    with anyio.CancelScope() as scope:
                        self._scope = scope
                        await self._scan(tg)
                    tg.cancel_scope.cancel()
            except WorkerFenced as exc:
                self._fenced(exc)
            finally:
                with anyio.CancelScope(shield=True):
                    if self.callbacks is not None:
                        await self.callbacks.stop()
                    await self._retire()
        if self._interrupted and self._summary.exit_code == EXIT_OK:
            self._summary.exit_code = EXIT_INTERRUPTED
        self.log.info("worker.stopped", exit_code=self._summary.exit_code,
                      runs=sorted(self._summary.runs))
        return self._summary

    async def _retire(self) -> None:
        """Leave the store's list of live workers — or learn that the others already did it
        for us, because we were silent too long (then the exit code says so)."""
        if self._summary.exit_code != EXIT_FENCED:
            try:
                await self.store.worker_heartbeat(self.worker_id, self.clock.wall())
            except WorkerFenced as exc:
                self._fenced(exc)
                return
        await self.store.retire_worker(self.worker_id, state="stopped",
                                       reason=self._summary.stop_reason, now=self.clock.wall())

    def _fenced(self, exc: WorkerFenced) -> None:
        self._summary.exit_code = EXIT_FENCED
        self._summary.stop_reason = str(exc)
        self.log.error("worker.fenced", error=str(exc))

    async def _heartbeat(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            await self.clock.sleep(heartbeat_interval(self.stale_after))
            now = self.clock.wall()
            try:
                await self.store.worker_heartbeat(self.worker_id, now)
                reaped = await self.store.reap_workers(self.stale_after, now)
            except WorkerFenced as exc:
                self._fenced(exc)
                tg.cancel_scope.cancel()
                return
            if reaped:
                self.log.warning("worker.reaped", workers=reaped)
                for member in list(self._members.values()):
                    if member._engine is not None:
                        await member._engine.take_over()

    async def _scan(self, tg: anyio.abc.TaskGroup) -> None:
        """Start serving every open run with work; with ``exit_when_idle``, stop at none."""
        while not self._interrupted and self._summary.exit_code != EXIT_FENCED:
            found = False
            for run in await self.store.list_runs():
                if self.runs is not None and run.run_id not in self.runs:
                    continue
                if run.state != "running" or run.run_id in self._refused:
                    continue
                if run.run_id in self._members:
                    found = True
                    continue
                if run.simulated:
                    self._refuse(run.run_id, "it runs against `--simulate`'s in-process "
                                 "simulator, which only its own `run`/`resume` can reach")
                    continue
                pending, orphaned = await self.store.work_left(run.run_id)
                if not (pending or orphaned):
                    # Not idle while others still drive jobs of an open run: if one of them
                    # dies, its jobs need a live worker to take them over.
                    found = found or await self.store.held_elsewhere(
                        run.run_id, self.worker_id) > 0
                    continue
                if pending or orphaned:
                    found = True
                    member = Orchestrator(
                        run_id=run.run_id, workdir=self.workdir, env=self.env,
                        store=self.store, worker=self.worker_id, stale_after=self.stale_after,
                        max_in_flight=self.max_in_flight, time_scale=self.time_scale,
                        transport=self.transport, clock=self.clock, callbacks=self.callbacks)
                    self._members[run.run_id] = member
                    tg.start_soon(self._serve_run, member)
            if not found and not self._members and self.exit_when_idle:
                return
            await self.clock.sleep(self.scan_interval / self.time_scale)

    def _refuse(self, run_id: str, why: str) -> None:
        self._refused[run_id] = why
        self.log.warning("worker.run_skipped", run_id=run_id, reason=why)

    async def _serve_run(self, member: Orchestrator) -> None:
        run_id = member.run_id
        try:
            async with member:
                summary = await member.work()
            if summary.exit_code == EXIT_FENCED:
                self._summary.exit_code = EXIT_FENCED
                self._summary.stop_reason = summary.stop_reason
                if self._scope is not None:
                    self._scope.cancel()
            self._summary.runs[run_id] = summary
        except ConfigError as exc:
            # A key this worker lacks, say: other workers may have it.
            self._refuse(run_id, str(exc))
        except BatchklingError as exc:
            self._refuse(run_id, str(exc))
        finally:
            self._members.pop(run_id, None)


def describe(summary: WorkerSummary) -> list[str]:
    """Lines for the end of ``batchkling worker``: each run it served, and why it stopped."""
    lines = []
    for run_id, run in sorted(summary.runs.items()):
        if run.exit_code == EXIT_FENCED:
            continue
        counts = ", ".join(f"{n} {status}" for status, n in sorted(run.counts.items()) if n)
        lines.append(f"run {run_id}: {counts or 'nothing to do'}")
    if summary.stop_reason:
        lines.append(summary.stop_reason)
    return lines
