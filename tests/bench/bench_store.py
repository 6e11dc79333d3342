"""The checkpoint store on SQLite and on PostgreSQL: transitions per second, database round trips
per job.

    python tests/bench/bench_store.py                 # 2,000 jobs of transitions, 300-job runs
    python tests/bench/bench_store.py --jobs 500 --run-jobs 100

Two parts, each on both backends. PostgreSQL is a private server started for the run (initdb in
a temporary folder, as the test suite does, via ``tests/pgcluster.py``) but with durability on —
``fsync``, ``synchronous_commit`` and ``full_page_writes`` as a production server has them — so
a durable commit pays its WAL flush as it would there. SQLite is a file in a temporary folder.

1. Transitions. A job's five transitions as the engine makes them — the create intent
   (``submitting``, a new attempt) and the task id (``submitted``) durable, then ``running``,
   ``succeeded`` and ``downloaded`` quick — for every job of a run, ``--concurrency`` jobs at a
   time (the engine has ``max_in_flight`` jobs moving at once). Reported: transitions per
   second, mean latency of a durable and of a quick transition, this process's CPU per
   transition and, for PostgreSQL, the server's own CPU per transition (its processes'
   user + system time from ``/proc``).
2. Round trips per job. A whole run of ``--run-jobs`` jobs through the Orchestrator against
   the simulator in a child process (10 slots, ``--speed`` times real time), from the manifest
   sync to the results CSV and the report. PostgreSQL: network round trips (every statement,
   BEGIN and COMMIT; counted on psycopg's connections, see ``pgcluster.count_round_trips``).
   SQLite: trips to aiosqlite's database thread, and quick commits (made on the event loop's
   thread, no trip). Also the store calls and events per job, and the orchestrator's CPU per
   job (this process, engine and store; the simulator is in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_engine import KEY, Simulator, _manifest  # noqa: E402
from pgcluster import PgCluster, count_round_trips, find_bindir  # noqa: E402

from batchkling.models import JobSpec, JobState  # noqa: E402
from batchkling.store import Store, store_from  # noqa: E402

#: A production server's durability (the test cluster turns all three off).
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_cpu(cluster: PgCluster | None) -> float:
    """User + system seconds of the PostgreSQL server's processes, from /proc: the postmaster,
    its live children, and the children it has reaped (a backend whose client disconnected);
    0 without a cluster."""
    if cluster is None or cluster._proc is None:
        return 0.0
    root = cluster._proc.pid
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == root:
            total += sum(int(f) for f in fields[11:15]) / tick  # its own, and reaped children
        elif ppid == root:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def _transitions(store: Store, n: int, concurrency: int,
                       cluster: PgCluster | None) -> dict[str, float]:
    await store.open()
    await store.save_run("bench", manifest_path=None, manifest_text=None, config_json="{}",
                         provider="imarouter", base_url="http://x", simulated=False,
                         now=time.time())
    specs = [JobSpec(job_id=f"job-{i:05d}", model="kling-v2-6", prompt=f"scene {i}",
                     duration=5, size="16:9") for i in range(n)]
    await store.sync_jobs("bench", added=list(enumerate(specs)), changed=[], reordered=[],
                          removed=[], now=time.time())
    todo = [s.job_id for s in specs]
    latency = {"durable": [0.0, 0], "quick": [0.0, 0]}

    async def timed(kind: str, call: Awaitable[None]) -> None:
        started = time.perf_counter()
        await call
        latency[kind][0] += time.perf_counter() - started
        latency[kind][1] += 1

    async def worker() -> None:
        while todo:
            job = todo.pop()
            now = time.time()
            step: Callable[..., Awaitable[None]] = store.transition
            await timed("durable", step("bench", job, JobState.SUBMITTING, now=now,
                                        event="job.submitting", new_attempt=(1, f"k-{job}")))
            await timed("durable", step("bench", job, JobState.SUBMITTED, now=now,
                                        event="job.submitted", task_id=f"t-{job}",
                                        submitted_at=now))
            await timed("quick", step("bench", job, JobState.RUNNING, now=now,
                                      event="job.running", progress=0.5, quick=True))
            await timed("quick", step("bench", job, JobState.SUCCEEDED, now=now,
                                      event="job.succeeded", video_url="https://x/v.mp4",
                                      completed_at=now, render_seconds=90.0, cost_usd=0.35,
                                      quick=True))
            await timed("quick", step("bench", job, JobState.DOWNLOADED, now=now,
                                      event="job.downloaded", video_path=f"/v/{job}.mp4",
                                      video_size=123456, video_sha256="0" * 64, quick=True))

    cpu0, server0, t0 = _cpu(), _server_cpu(cluster), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu, server = _cpu() - cpu0, _server_cpu(cluster) - server0
    assert await store.integrity_check() == "ok"
    await store.aclose()
    count = 5 * n
    return {
        "transitions_per_s": count / wall,
        "durable_ms": latency["durable"][0] * 1000 / latency["durable"][1],
        "quick_ms": latency["quick"][0] * 1000 / latency["quick"][1],
        "client_cpu_us": cpu * 1e6 / count,
        "server_cpu_us": server * 1e6 / count,
    }


async def _orchestrate(path: Path, workdir: Path, location: str, speed: float) -> Any:
    from batchkling.manifest.document import load_manifest
    from batchkling.run.orchestrator import Orchestrator

    async with Orchestrator(load_manifest(path), workdir=workdir, store=location,
                            time_scale=speed, env={"BATCHKLING_TEST_KEY": KEY}) as orch:
        return await orch.run()


class _Calls:
    """Counts calls of every public Store method while installed."""

    def __init__(self) -> None:
        self.count = 0
        self._saved: list[tuple[type, str, Any]] = []

    def install(self, cls: type) -> None:
        for name in dir(Store):
            if name.startswith("_") or name in ("iter_jobs", "iter_pages", "require_run",
                                                "location"):
                continue  # helpers made of other calls
            original = getattr(cls, name)
            if not callable(original):
                continue
            self._saved.append((cls, name, original))

            def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.count += 1
                return _original(*args, **kwargs)

            setattr(cls, name, counted)

    def remove(self) -> None:
        for cls, name, original in self._saved:
            setattr(cls, name, original)


def _sqlite_trips() -> tuple[dict[str, int], Callable[[], None]]:
    """Count aiosqlite's trips to its thread and the quick commits (no trip)."""
    import aiosqlite

    from batchkling.store.sqlite import SqliteStore

    counts = {"thread": 0, "quick": 0}
    execute, quick = aiosqlite.Connection._execute, SqliteStore._write_quick

    async def counted_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["thread"] += 1
        return await execute(self, *args, **kwargs)

    async def counted_quick(self: Any, *args: Any, **kwargs: Any) -> bool:
        done = await quick(self, *args, **kwargs)
        counts["quick"] += done
        return done

    aiosqlite.Connection._execute = counted_execute  # type: ignore[method-assign]
    SqliteStore._write_quick = counted_quick  # type: ignore[method-assign]

    def restore() -> None:
        aiosqlite.Connection._execute = execute  # type: ignore[method-assign]
        SqliteStore._write_quick = quick  # type: ignore[method-assign]

    return counts, restore


def _run(location: str, n: int, speed: float, folder: Path) -> dict[str, Any]:
    from invariants import db_query

    sim = Simulator(speed, seed=5, slot_limit=10)
    try:
        path = _manifest(folder, sim.url, n, slots=10, name="roundtrips")
        calls = _Calls()
        calls.install(type(store_from(location)))
        try:
            if location.startswith("postgresql://"):
                cpu0 = _cpu()
                with count_round_trips() as trips:
                    summary = asyncio.run(_orchestrate(path, folder / "jobs", location, speed))
                cpu = _cpu() - cpu0
                figures = {"round_trips_per_job": trips.count / n}
            else:
                counts, restore = _sqlite_trips()
                cpu0 = _cpu()
                try:
                    summary = asyncio.run(_orchestrate(path, folder / "jobs", location, speed))
                finally:
                    restore()
                cpu = _cpu() - cpu0
                figures = {"thread_trips_per_job": counts["thread"] / n,
                           "quick_commits_per_job": counts["quick"] / n}
        finally:
            calls.remove()
    finally:
        sim.close()
    events = db_query(location, "SELECT count(*) FROM events")[0][0]
    return {"succeeded": summary.counts.get("succeeded", 0), "store_calls_per_job":
            calls.count / n, "events_per_job": events / n, "cpu_ms_per_job": cpu * 1000 / n,
            **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs in part 1")
    parser.add_argument("--concurrency", type=int, default=10, help="jobs at once in part 1")
    parser.add_argument("--run-jobs", type=int, default=300, help="jobs in part 2's run")
    parser.add_argument("--speed", type=float, default=300.0, help="simulator speed, part 2")
    args = parser.parse_args()
    from batchkling.logs import configure_logging

    configure_logging(console="off")
    bindir = find_bindir()
    if bindir is None:
        sys.exit("no PostgreSQL server binaries (initdb): install the OS package postgresql")
    with PgCluster(bindir, settings=DURABLE) as cluster, \
            tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sqlite_db = str(folder / "transitions.db")
        pg_db = cluster.create_database("transitions")
        print(f"1. transitions: {args.jobs} jobs x 5, {args.concurrency} at a time")
        print(f"   {'backend':<11}{'trans/s':>9}{'durable ms':>12}{'quick ms':>10}"
              f"{'CPU µs/tr':>11}{'server µs/tr':>14}")
        for name, location, server in (("sqlite", sqlite_db, None),
                                       ("postgresql", pg_db, cluster)):
            row = asyncio.run(_transitions(store_from(location), args.jobs, args.concurrency,
                                           server))
            print(f"   {name:<11}{row['transitions_per_s']:>9,.0f}{row['durable_ms']:>12.2f}"
                  f"{row['quick_ms']:>10.2f}{row['client_cpu_us']:>11.0f}"
                  + (f"{row['server_cpu_us']:>14.0f}" if server else f"{'—':>14}"))
        print(f"2. a {args.run_jobs}-job run against the simulator (10 slots, "
              f"speed x{args.speed:g}), per job:")
        for name, location in (("sqlite", str(folder / "run-sqlite" / "batchkling.db")),
                               ("postgresql", cluster.create_database("run"))):
            sub = folder / f"run-{name}"
            sub.mkdir(exist_ok=True)
            row = _run(location, args.run_jobs, args.speed, sub)
            trips = (f"{row['round_trips_per_job']:.1f} round trips" if "round_trips_per_job"
                     in row else f"{row['thread_trips_per_job']:.1f} trips to the database "
                     f"thread + {row['quick_commits_per_job']:.1f} quick commits")
            print(f"   {name:<11}{trips}; {row['store_calls_per_job']:.1f} store calls, "
                  f"{row['events_per_job']:.1f} events, {row['cpu_ms_per_job']:.1f} ms CPU "
                  f"({row['succeeded']}/{args.run_jobs} succeeded)")


if __name__ == "__main__":
    main()
