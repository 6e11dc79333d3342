"""Helpers for testing code that uses batchkling — and for batchkling's own tests.

- :class:`StepClock`: a clock whose ``sleep`` advances virtual time at once, for testing logic
  that waits (rate gates, backoff) without waiting.
- :class:`VirtualClock`: virtual time for a whole run: sleepers wake in deadline order, and time
  jumps to the next deadline only once the event loop has gone quiet.
- :class:`VirtualSim`: the simulator app in-process on a :class:`VirtualClock`, with runs of
  manifests against it and a :class:`RequestLog` of every request it answered.
- :func:`write_manifest`: a manifest file from Python values, with sensible defaults.
- The simulator: :class:`SimConfig`, :class:`SimulatorServer`, :func:`create_app`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import yaml
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchkling.simulator import SimConfig, SimulatorServer, create_app
from batchkling.store import Store, is_postgres
from batchkling.store.locate import sqlite_path

if TYPE_CHECKING:
    import aiosqlite
    import psycopg

    from batchkling.models import RunSummary
    from batchkling.run.orchestrator import Orchestrator
    from batchkling.simulator.state import SimState

__all__ = [
    "RequestLog",
    "SimConfig",
    "SimulatorServer",
    "StepClock",
    "VirtualClock",
    "VirtualSim",
    "create_app",
    "write_manifest",
]


class StepClock:
    """Virtual time: ``sleep`` moves the clock forward by the amount asked, then yields."""

    def __init__(self, start: float = 1_000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall_offset
        self.slept: list[float] = []

    def monotonic(self) -> float:
        """Virtual seconds."""
        return self.now

    def wall(self) -> float:
        """Virtual unix time."""
        return self.now + self.wall_offset

    async def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` (recorded in ``slept``) and let other tasks run."""
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


class VirtualClock:
    """Virtual time for a whole run: ten simulated minutes in a fraction of a real second.

    ``sleep`` parks the caller until the virtual deadline; nothing else moves time. While
    :meth:`running` is active, a driver task watches the event loop and, once it has stayed
    quiet — no task called ``sleep`` or was woken over ``idle_checks`` rounds of a few
    ``checkpoint()`` s plus ``idle_real`` real seconds each — jumps to the earliest pending
    deadline and wakes every sleeper due by then. The real pause in each round is what lets a
    SQLite round-trip in aiosqlite's worker thread (or any other thread) land before time moves.

    Pass ``clock.monotonic`` to :func:`create_app` and ``clock`` to the orchestrator, and use an
    in-process transport (``httpx.ASGITransport`` or ``httpx.MockTransport``), so every wait in
    the run is on this clock.

    Work in other threads holds time still: while anything runs in anyio's worker threads
    (``anyio.to_thread``: downloads' fsync, the report) or inside a :meth:`hold` block, no round
    counts as quiet. :class:`VirtualSim` holds the clock around every SQLite call of its runs, so
    a commit on a slow disk cannot let time jump past the run's next step.

    Limits: "quiet" is a heuristic. A round in which the driver's own short real sleep overslept
    does not count (an overloaded machine may have starved the other threads too), but other
    real work that takes longer than ``idle_checks * idle_real`` real seconds without sleeping
    or holding (a real socket, a thread started by hand) may still see time jump under it —
    virtual time then runs ahead, it never skips a sleeper's deadline. Real I/O (a loopback
    server, ``anyio.sleep``) does not advance this clock, and a coroutine that waits on it while
    others sleep here can stall the jump. Deterministic given the same order of sleeps; a
    thread's timing can reorder sleepers whose deadlines tie.
    """

    def __init__(self, start: float = 1_000.0, wall_offset: float = 1_700_000_000.0, *,
                 idle_checks: int = 4, idle_real: float = 0.005, spins: int = 10) -> None:
        self.now = start
        self.wall_offset = wall_offset
        self.idle_checks = idle_checks
        self.idle_real = idle_real
        self.spins = spins
        self.jumps = 0
        self._activity = 0
        self._held = 0
        self._seq = itertools.count()
        self._heap: list[tuple[float, int]] = []
        self._waiting: dict[int, anyio.Event] = {}

    def monotonic(self) -> float:
        """Virtual seconds."""
        return self.now

    def wall(self) -> float:
        """Virtual unix time."""
        return self.now + self.wall_offset

    @property
    def sleepers(self) -> int:
        """How many callers are parked in :meth:`sleep`."""
        return len(self._waiting)

    async def sleep(self, seconds: float) -> None:
        """Park until virtual time reaches ``now + seconds``."""
        self._activity += 1
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        seq = next(self._seq)
        event = anyio.Event()
        self._waiting[seq] = event
        heapq.heappush(self._heap, (self.now + seconds, seq))
        try:
            await event.wait()
        finally:
            self._waiting.pop(seq, None)
            self._activity += 1

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep time from jumping while the block runs (real work in another thread)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            self._activity += 1

    def _busy(self) -> bool:
        threads = anyio.to_thread.current_default_thread_limiter().borrowed_tokens
        return self._held > 0 or threads > 0

    def advance(self, seconds: float) -> None:
        """Move time on by hand, waking every sleeper due by then."""
        self._wake_until(self.now + max(0.0, seconds))

    def _wake_until(self, deadline: float) -> None:
        self.now = max(self.now, deadline)
        heap = self._heap
        while heap and heap[0][0] <= self.now:
            _, seq = heapq.heappop(heap)
            event = self._waiting.pop(seq, None)
            if event is not None:
                event.set()

    def _next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][1] not in self._waiting:
            heapq.heappop(heap)  # a cancelled sleeper
        return heap[0][0] if heap else None

    async def _drive(self) -> None:
        quiet = 0
        while True:
            seen = self._activity
            for _ in range(self.spins):
                await anyio.lowlevel.checkpoint()
            started = time.monotonic()
            await anyio.sleep(self.idle_real)  # real time: lets worker threads finish
            starved = time.monotonic() - started > 3 * self.idle_real
            if self._activity != seen or starved or self._busy():
                # Work is under way in a thread, or the driver overslept: the machine is
                # overloaded, so a worker thread (SQLite's) may not have run either — this
                # round proves nothing about quiet.
                quiet = 0
                continue
            quiet += 1
            deadline = self._next_deadline()
            if quiet >= self.idle_checks and deadline is not None:
                quiet = 0
                self.jumps += 1
                self._wake_until(deadline)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[VirtualClock]:
        """Drive virtual time while the block runs: ``async with clock.running(): ...``."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._drive)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()


def write_manifest(
    folder: Path,
    jobs: Sequence[Mapping[str, Any]] = (),
    *,
    name: str = "test-run",
    base_url: str | None = None,
    provider: str = "imarouter",
    api_key_env: str = "BATCHKLING_TEST_KEY",
    filename: str = "manifest.yaml",
    **sections: Any,
) -> Path:
    """Write a manifest to ``folder/filename`` and return its path.

    ``sections`` become top-level keys (``limits={...}``, ``matrices=[...]``, ...).
    """
    provider_block: dict[str, Any] = {"name": provider}
    if base_url:
        provider_block["base_url"] = base_url
    if provider == "imarouter":
        provider_block["api_key_env"] = api_key_env
    data: dict[str, Any] = {"version": 1, "name": name, "provider": provider_block}
    data.update(sections)
    if jobs:
        data["jobs"] = [dict(job) for job in jobs]
    path = folder / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


class RequestLog:
    """ASGI middleware recording each request's clock time, method, path and answer status."""

    def __init__(self, app: ASGIApp, clock: Callable[[], float]) -> None:
        self.app, self.clock = app, clock
        self.entries: list[tuple[float, str, str, int]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        at = self.clock()

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.entries.append((at, scope["method"], scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, record)

    def creates(self) -> list[tuple[float, int]]:
        """``(time, status)`` of every create request (either API shape), in arrival order."""
        return [(at, status) for at, method, path, status in self.entries
                if method == "POST" and path.startswith("/v1/videos")]


class VirtualSim:
    """The simulator app on a :class:`VirtualClock`, and whole runs against it.

    Everything a run waits on — create pacing, poll intervals, backoff, the lease heartbeat,
    task deadlines and the simulator's render times — reads the same clock, so hours of
    provider behaviour play out in seconds. Requests go through ``httpx.ASGITransport``; the
    simulator's ``slow_response_s`` and ``create_hang_after_create_rate`` wait in real time, so
    leave them off here. ``env`` supplies the credentials the manifests name.
    """

    base_url = "http://testserver"

    def __init__(self, env: Mapping[str, str] | None = None, **config: Any) -> None:
        # Wall clocks agree with the simulator's, so Kling JWTs are valid where it checks them.
        self.clock = VirtualClock(start=1_000.0, wall_offset=time.time() - 1_000.0)
        self.app = create_app(SimConfig(**{"seed": 7, **config}), clock=self.clock.monotonic)
        self.sim: SimState = self.app.state.sim
        self.requests = RequestLog(self.app, self.clock.monotonic)
        self.env = dict(env or {})

    def store(self, location: str | os.PathLike[str]) -> Store:
        """A store at ``location`` that holds this simulator's clock still while it works: the
        one :meth:`orchestrator` makes, for a test that wraps it."""
        return _held_store(location, self.clock)

    def stats(self) -> dict[str, Any]:
        """The simulator's counters (``GET /_sim/stats``)."""
        return self.sim.stats()

    def manifest(self, folder: Path, n: int, *, provider: str = "imarouter",
                 prompt: str = "scene number {i}", **sections: Any) -> Path:
        """A manifest of ``n`` jobs ``job-000``… against this simulator."""
        limits = {"max_in_flight": 5, "submit_rate": 50, "task_timeout": "2h",
                  **sections.pop("limits", {})}
        jobs = [{"id": f"job-{i:03d}", "prompt": prompt.format(i=i)} for i in range(n)]
        return write_manifest(folder, jobs, provider=provider, base_url=self.base_url,
                              limits=limits, **sections)

    def orchestrator(self, path: Path | None, workdir: Path, *, run_id: str | None = None,
                     **kwargs: Any) -> Orchestrator:
        """An orchestrator wired to this simulator and clock."""
        from batchkling.manifest.document import load_manifest
        from batchkling.run.orchestrator import Orchestrator

        kwargs.setdefault("env", self.env)
        kwargs.setdefault("seed", 3)
        # A location (the workdir's file by default, or a postgresql:// URL) gets a store that
        # holds the clock still while the database works; a Store given is used as it is.
        location = kwargs.get("store") or Path(workdir) / "batchkling.db"
        if not isinstance(location, Store):
            kwargs["store"] = _held_store(location, self.clock)
        return Orchestrator(load_manifest(path) if path else None, run_id=run_id,
                            workdir=workdir, transport=httpx.ASGITransport(app=self.requests),
                            clock=self.clock, **kwargs)

    async def run(self, path: Path, workdir: Path,
                  during: Callable[[Orchestrator], Coroutine[Any, Any, None]] | None = None,
                  **kwargs: Any) -> RunSummary:
        """``run`` the manifest on virtual time; ``during(orch)`` runs alongside it."""
        return await self._go(self.orchestrator(path, workdir, **kwargs), "run", during)

    async def resume(self, run_id: str, workdir: Path, **kwargs: Any) -> RunSummary:
        """``resume`` the run on virtual time."""
        return await self._go(self.orchestrator(None, workdir, run_id=run_id, **kwargs),
                              "resume", None)

    async def _go(self, orch: Orchestrator, action: str,
                  during: Callable[[Orchestrator], Coroutine[Any, Any, None]] | None) -> RunSummary:
        # The store is this helper's (it holds the clock), so it closes it after the run.
        async with self.clock.running(), orch.store, orch:
            if during is None:
                summary: RunSummary = await getattr(orch, action)()
                return summary
            async with anyio.create_task_group() as tg:
                tg.start_soon(during, orch)
                summary = await getattr(orch, action)()
                tg.cancel_scope.cancel()
            return summary


class _HeldOpenClose:
    """Mixed in before a store backend: ``open`` and ``aclose`` hold ``held_clock`` still."""

    held_clock: VirtualClock

    async def open(self) -> None:
        with self.held_clock.hold():
            await super().open()  # type: ignore[misc]  # a mixin: the backend is next in line

    async def aclose(self) -> None:
        with self.held_clock.hold():
            await super().aclose()  # type: ignore[misc]  # as above


def _held_store(location: str | os.PathLike[str], clock: VirtualClock) -> Store:
    """The store at ``location``, holding ``clock`` still while its database works.

    SQLite: every call reaches its thread through ``open``, ``aclose``, ``_write``,
    ``_write_returning``, ``_fetchall`` or ``_transaction`` (quick commits run on the event
    loop's own thread: virtual time cannot move during them). PostgreSQL: every statement after
    ``open`` runs on a connection borrowed through ``_connection``. A commit that waits on a
    slow disk or a busy server then keeps virtual time where it is instead of letting it jump
    past the run's next step.
    """
    from batchkling.store.postgres import PostgresStore
    from batchkling.store.sqlite import SqliteStore

    store: _HeldOpenClose
    if is_postgres(location):

        class HeldPostgres(_HeldOpenClose, PostgresStore):
            @contextlib.asynccontextmanager
            async def _connection(self, *, quick: bool = False
                                  ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
                with clock.hold():
                    async with super()._connection(quick=quick) as conn:
                        yield conn

        # Heartbeats, staleness and pauses on the virtual clock, not the server's.
        store = HeldPostgres(os.fspath(location), clock=clock)
    else:

        class HeldSqlite(_HeldOpenClose, SqliteStore):
            async def _write(self, statements: Iterable[tuple[str, Iterable[Any]]]) -> int:
                with clock.hold():
                    return await super()._write(statements)

            async def _write_returning(self, sql: str, params: Iterable[Any]
                                       ) -> list[sqlite3.Row]:
                with clock.hold():
                    return await super()._write_returning(sql, params)

            async def _fetchall(self, sql: str, params: Iterable[Any] = ()
                                ) -> list[sqlite3.Row]:
                with clock.hold():
                    return await super()._fetchall(sql, params)

            @contextlib.asynccontextmanager
            async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
                with clock.hold():
                    async with super()._transaction() as db:
                        yield db

        # Heartbeats and pauses on the same virtual clock as everything else.
        store = HeldSqlite(sqlite_path(location), clock=clock)
    store.held_clock = clock
    assert isinstance(store, Store)
    return store
