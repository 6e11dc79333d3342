"""Cooperating workers on one PostgreSQL: throughput, CPU and round trips per job, and how well
workers sharing one account keep its slots busy.

    python tests/bench/bench_workers.py                    # both parts, defaults below
    python tests/bench/bench_workers.py --jobs 300 --workers 1 2

Everything runs on this machine: a private PostgreSQL server with a production server's
durability (``fsync``, ``synchronous_commit``, ``full_page_writes`` on; ``tests/pgcluster.py``),
the simulator in its own process, and each worker a ``batchkling worker --exit-when-idle``
process (the real CLI) after ``batchkling submit`` recorded the run.

1. Throughput. ``--jobs`` jobs (default 600) against the simulator at ``--speed`` (×1000:
   90-second renders take 0.09 s) with plenty of slots (``--slots``, 100), driven by 1, 2 and 4
   worker processes. Reported: jobs per second (first create intent to last download, from
   the store's events), the workers' CPU per job (their processes' CPU after start-up, summed;
   interpreter start and imports excluded, see below), database round trips per job — of them,
   the workers' looks for new runs (``list_runs``, one round trip every 5 s of provider time
   per worker: every 5 ms at x1000) — and claims per job (every worker's psycopg connections
   counted, ``pgcluster.count_round_trips``), the CPU per job of PostgreSQL's processes and of
   the simulator, which share the machine; the mean time a claim takes, how many claims were
   under way on average ("claiming": 1.0 = a worker's submitter claims all the time), and the
   cores the workers, the server and the simulator kept busy together.
2. Sharing one account. ``--share-jobs`` jobs (300) on one account of 10 slots at
   ``--share-speed`` (×100), driven by one worker, then by three: the makespan (first create to
   last download, in simulated seconds) over the ideal list schedule — the same tasks, each
   holding its slot for the time the simulator drew for it (queue + render; deterministic in
   creation order under the simulator's seed), started the instant a slot frees, with zero
   detection lag and zero download time. Also the span of the renders alone (first create to
   last task end) over the same ideal, the peak slots the simulator saw and its slot
   rejections.

A worker's start-up (the interpreter and every batchkling module with what it imports, about a
second of CPU) is paid once per process, not per job; each worker reports its CPU from just
after those imports to its exit, through a small wrapper around the CLI that also counts its
round trips and store calls. The "(+start)" column is the whole processes' CPU.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_engine import KEY, Simulator, _manifest  # noqa: E402
from bench_store import DURABLE, _server_cpu  # noqa: E402
from pgcluster import PgCluster, find_bindir  # noqa: E402

ROOT = HERE.parents[1]

#: Runs the CLI with its psycopg round trips and its store calls counted, and writes them with
#: its CPU (from after the imports to the exit) to the JSON file named by argv[1].
_WRAPPER = """
import functools, importlib, json, pkgutil, sys, time
from collections import Counter
sys.path.insert(0, {tests!r})
import batchkling
for module in pkgutil.walk_packages(batchkling.__path__, "batchkling."):
    if module.name != "batchkling.__main__":  # (that one runs the CLI)
        importlib.import_module(module.name)  # what a worker imports as it serves a run
from pgcluster import count_round_trips
from batchkling import cli
from batchkling.store.interface import Store
from batchkling.store.postgres import PostgresStore
from batchkling.store.sqlite import SqliteStore
out, sys.argv = sys.argv[1], ["batchkling", *sys.argv[2:]]
calls, seconds = Counter(), Counter()
def counted(name, method):
    @functools.wraps(method)
    async def call(self, *args, **kwargs):
        calls[name] += 1
        started = time.perf_counter()
        try:
            return await method(self, *args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - started
    return call
for cls in (PostgresStore, SqliteStore):
    for name in Store.__abstractmethods__:
        setattr(cls, name, counted(name, getattr(cls, name)))
cpu0 = time.process_time()
code = 0
with count_round_trips() as trips:
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
with open(out, "w") as fh:
    json.dump({{"cpu": time.process_time() - cpu0, "round_trips": trips.count,
               "calls": calls, "seconds": seconds, "exit": code}}, fh)
sys.exit(code)
"""


def _proc_cpu(pid: int) -> float:
    """User + system seconds of one live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _env() -> dict[str, str]:
    env = {**os.environ, "BATCHKLING_TEST_KEY": KEY}
    env.pop("BATCHKLING_CRASH_AT", None)
    return env


def _submit(manifest: Path, store: str, workdir: Path) -> None:
    subprocess.run([sys.executable, "-m", "batchkling", "submit", str(manifest), "--store", store,
                    "--workdir", str(workdir)], env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _workers(k: int, store: str, workdir: Path, speed: float, folder: Path
             ) -> list[dict[str, Any]]:
    """Run ``k`` worker processes to the end; each one's figures from the wrapper."""
    wrapper = _WRAPPER.format(tests=str(HERE.parent))
    procs = []
    for i in range(k):
        out = folder / f"worker-{i}.json"
        log = (folder / f"worker-{i}.log").open("wb")
        procs.append((out, log, subprocess.Popen(
            [sys.executable, "-c", wrapper, str(out), "worker", "--exit-when-idle",
             "--store", store, "--workdir", str(workdir), "--speed", str(speed)],
            env=_env(), stdout=subprocess.DEVNULL, stderr=log)))
    results = []
    for out, log, proc in procs:
        code = proc.wait(timeout=1800)
        log.close()
        if code != 0:
            raise RuntimeError(f"a worker exited {code}; see {folder}")
        results.append(json.loads(out.read_text()))
    return results


def _query(store: str, sql: str) -> list[tuple[Any, ...]]:
    from invariants import db_query

    return db_query(store, sql)


def _span(store: str) -> tuple[float, float]:
    """Wall times of the run's first create intent and its last download (the store's
    events)."""
    ((first, last),) = _query(store, "SELECT min(CASE WHEN event = 'job.submitting' THEN at"
                                     " END), max(CASE WHEN event = 'job.downloaded' THEN at END)"
                                     " FROM events")
    return float(first), float(last)


def _check(store: str, sim: Simulator, n: int, slots: int) -> dict[str, Any]:
    stats = sim.get("/_sim/stats")
    states = dict(_query(store, "SELECT state, count(*) FROM jobs GROUP BY state"))
    assert states == {"downloaded": n}, states
    assert stats["creates"] == n and not stats["duplicate_keys"], stats
    assert stats["peak_slots"] <= slots, stats
    return stats


def bench_throughput(cluster: PgCluster | None, k: int, n: int, slots: int, speed: float
                     ) -> dict[str, Any]:
    """n jobs, k workers, plenty of slots: what does one job cost, and how fast do they go?
    Without a cluster: one SQLite file, for reference."""
    sim = Simulator(speed, seed=5, slot_limit=slots)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            store = (cluster.create_database(f"throughput_{k}") if cluster
                     else str(folder / "jobs" / "batchkling.db"))
            manifest = _manifest(folder, sim.url, n, slots=slots, name="throughput")
            _submit(manifest, store, folder / "jobs")
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            server0, sim0 = _server_cpu(cluster), _proc_cpu(sim.proc.pid)
            workers = _workers(k, store, folder / "jobs", speed, folder)
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            server, sim_cpu = _server_cpu(cluster) - server0, _proc_cpu(sim.proc.pid) - sim0
            _check(store, sim, n, slots)
            first, last = _span(store)
    finally:
        sim.close()
    whole = (children.ru_utime + children.ru_stime) - (children0.ru_utime + children0.ru_stime)
    calls = {name: sum(w["calls"].get(name, 0) for w in workers) / n
             for name in sorted({m for w in workers for m in w["calls"]})}
    trips = sum(w["round_trips"] for w in workers) / n
    claim_s = sum(w["seconds"].get("claim", 0.0) for w in workers)
    return {
        "claim_ms": claim_s * 1000 / max(1, sum(w["calls"].get("claim", 0) for w in workers)),
        "claiming": claim_s / (last - first),
        "workers": k, "jobs_per_s": n / (last - first),
        "cpu_ms_per_job": sum(w["cpu"] for w in workers) * 1000 / n,
        "cpu_ms_per_job_with_startup": whole * 1000 / n,
        # list_runs is the workers' look for new runs (one round trip each), every 5 s of
        # provider time: at x1000 that is every 5 ms, a cost per second, not per job.
        "round_trips_per_job": trips, "scan_trips_per_job": calls.get("list_runs", 0.0),
        "claims_per_job": calls.get("claim", 0.0), "calls_per_job": calls,
        "server_cpu_ms_per_job": server * 1000 / n, "sim_cpu_ms_per_job": sim_cpu * 1000 / n,
        # Cores the workers (after start-up), the server and the simulator kept busy together.
        "cores": (sum(w["cpu"] for w in workers) + server + sim_cpu) / (last - first),
    }


def ideal_list_schedule(held: list[float], slots: int) -> float:
    """Makespan of the tasks in this order, each started the instant one of ``slots`` frees
    and holding it for its time: no create latency, no detection lag, no download."""
    free = [0.0] * slots
    end = 0.0
    for duration in held:
        start = heapq.heappop(free)
        heapq.heappush(free, start + duration)
        end = max(end, start + duration)
    return end


def bench_sharing(cluster: PgCluster, k: int, n: int, speed: float) -> dict[str, Any]:
    """n jobs on one 10-slot account, k workers: makespan over the ideal list schedule."""
    slots = 10
    store = cluster.create_database(f"sharing_{k}")
    sim = Simulator(speed, seed=5, slot_limit=slots)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            manifest = _manifest(folder, sim.url, n, slots=slots, name="sharing")
            _submit(manifest, store, folder / "jobs")
            _workers(k, store, folder / "jobs", speed, folder)
            stats = _check(store, sim, n, slots)
            # The simulator's clock against the wall, read together: sim = sim_now - Δwall·speed.
            sim_now, wall_now = sim.get("/_sim/stats")["sim_time"], time.time()
            tasks = sim.get("/_sim/tasks")
            _first, last_download = _span(store)
    finally:
        sim.close()
    held = [t["ends_at"] - t["created_at"] for t in tasks]  # creation order
    ideal = ideal_list_schedule(held, slots)
    start = min(t["created_at"] for t in tasks)
    makespan = sim_now - (wall_now - last_download) * speed - start
    renders = max(t["ends_at"] for t in tasks) - start
    return {"workers": k, "makespan_s": makespan, "ideal_s": ideal,
            "ratio": makespan / ideal, "render_ratio": renders / ideal,
            "peak_slots": stats["peak_slots"],
            "slot_rejections": stats["rejected"].get("slots", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=600, help="jobs in part 1")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4],
                        help="worker processes in part 1")
    parser.add_argument("--slots", type=int, default=100, help="account slots in part 1")
    parser.add_argument("--speed", type=float, default=1000.0, help="simulator speed, part 1")
    parser.add_argument("--share-jobs", type=int, default=300, help="jobs in part 2")
    parser.add_argument("--share-speed", type=float, default=100.0,
                        help="simulator speed, part 2")
    parser.add_argument("--no-share", action="store_true", help="skip part 2")
    parser.add_argument("--verbose", action="store_true", help="store calls per job, part 1")
    args = parser.parse_args()
    bindir = find_bindir()
    if bindir is None:
        sys.exit("no PostgreSQL server binaries (initdb): install the OS package postgresql")
    with PgCluster(bindir, settings=DURABLE) as cluster:
        print(f"1. {args.jobs} jobs, {args.slots} slots, speed x{args.speed:g}, per job:")
        print(f"   {'store, workers':<16}{'jobs/s':>8}{'CPU ms':>8}{'(+start)':>10}"
              f"{'trips':>7}{'(scans)':>9}{'claims':>8}{'PG CPU ms':>11}{'sim CPU ms':>12}"
              f"{'claim ms':>10}{'claiming':>10}{'cores':>7}")
        rows = [("sqlite", 1, None)] + [("postgresql", k, cluster) for k in args.workers]
        for name, k, server in rows:
            row = bench_throughput(server, k, args.jobs, args.slots, args.speed)
            pg = server is not None
            print(f"   {f'{name}, {k}':<16}{row['jobs_per_s']:>8.1f}"
                  f"{row['cpu_ms_per_job']:>8.1f}{row['cpu_ms_per_job_with_startup']:>10.1f}"
                  + (f"{row['round_trips_per_job']:>7.1f}{row['scan_trips_per_job']:>9.1f}"
                     if pg else f"{'—':>7}{'—':>9}")
                  + f"{row['claims_per_job']:>8.2f}"
                  + (f"{row['server_cpu_ms_per_job']:>11.1f}" if pg else f"{'—':>11}")
                  + f"{row['sim_cpu_ms_per_job']:>12.1f}{row['claim_ms']:>10.1f}"
                  f"{row['claiming']:>10.2f}{row['cores']:>7.2f}")
            if args.verbose:
                print("      calls per job: " + ", ".join(
                    f"{m} {v:.2f}" for m, v in row["calls_per_job"].items() if v >= 0.005))
        if args.no_share:
            return
        print(f"2. {args.share_jobs} jobs on one 10-slot account, speed x{args.share_speed:g}"
              " (simulated seconds):")
        print(f"   {'workers':>7}{'makespan':>10}{'ideal':>8}{'ratio':>7}{'renders':>9}"
              f"{'peak':>6}{'rejected':>10}")
        for k in (1, 3):
            row = bench_sharing(cluster, k, args.share_jobs, args.share_speed)
            print(f"   {k:>7}{row['makespan_s']:>10.0f}{row['ideal_s']:>8.0f}"
                  f"{row['ratio']:>7.3f}{row['render_ratio']:>9.3f}{row['peak_slots']:>6}"
                  f"{row['slot_rejections']:>10}")


if __name__ == "__main__":
    main()
