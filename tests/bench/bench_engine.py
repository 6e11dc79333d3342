"""Orchestrator throughput against the simulator, beside the naive loop.

    python tests/bench/bench_engine.py                 # 300 jobs, 10 slots, + 10,000-job scale run
    python tests/bench/bench_engine.py --no-scale      # skip the 10,000-job run

What it measures, with the simulator in its own process (so its CPU is not counted):

1. batchkling on 300 jobs with log-normal render times and an account of 10 slots
   (``max_in_flight: 10``): the makespan in simulated seconds against the lower bound
   ``max(ΣT/C, max T)``, where T is each task's slot time (create to end) as the simulator drew
   it; polls per task; orchestrator CPU per job (this process: engine, httpx, SQLite).
2. The naive baseline, the seed's own loop: one task at a time, a poll every 3 s (simulated),
   on the same render times (same seed, same task order).
3. A bare loop: the least any asyncio orchestrator does for the same jobs on this machine. Ten
   workers on aiohttp send the same requests as batchkling — a create, a first poll at half the
   median render time, a second at the end the progress predicts, the download written and
   fsynced — and keep nothing else: no state database, no log, no checks, no results. Its CPU
   per job is the floor that a goal for batchkling's CPU can be read against.
4. Scale: 10,000 jobs through the orchestrator in a subprocess; its peak RSS.

Simulated time: the simulator runs ``--speed`` times faster than real renders and batchkling's
poll floor and deadlines shrink by the same factor, so figures are reported in simulated
(provider) seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-bench-key-000000"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Simulator:
    """``batchkling simulate`` in a child process."""

    def __init__(self, speed: float, seed: int, **settings: Any) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, self._faults = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(settings, fh)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchkling", "simulate", "--port", str(self.port),
             "--speed", str(speed), "--seed", str(seed), "--faults", self._faults],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/_sim/stats", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("simulator did not start")

    def get(self, path: str) -> Any:
        return httpx.get(f"{self.url}{path}", timeout=30).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        os.unlink(self._faults)


def _lower_bound(tasks: list[dict[str, Any]], slots: int) -> tuple[float, float]:
    held = [t["ends_at"] - t["created_at"] for t in tasks]
    return max(sum(held) / slots, max(held)), sum(held)


def _manifest(folder: Path, base_url: str, n: int, *, slots: int, name: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from batchkling.testing import write_manifest

    jobs = [{"id": f"job-{i:05d}", "prompt": f"benchmark scene {i}"} for i in range(n)]
    return write_manifest(folder, jobs, name=name, base_url=base_url,
                          limits={"max_in_flight": slots, "submit_rate": 1000,
                                  "task_timeout": "3h"})


async def _orchestrate(path: Path, workdir: Path, speed: float) -> Any:
    from batchkling.manifest.document import load_manifest
    from batchkling.run.orchestrator import Orchestrator

    async with Orchestrator(load_manifest(path), workdir=workdir, time_scale=speed,
                            env={"BATCHKLING_TEST_KEY": KEY}) as orch:
        return await orch.run()


def bench_batchkling(n: int, slots: int, speed: float, seed: int) -> dict[str, Any]:
    """Run n jobs through the orchestrator; makespan vs lower bound, polls, CPU."""
    from batchkling.logs import configure_logging

    configure_logging(console="off")
    # One-time costs (imports, TLS context) are not per-job costs: pay them before timing.
    with tempfile.TemporaryDirectory() as warm:
        warm_sim = Simulator(speed, seed)
        try:
            asyncio.run(_orchestrate(_manifest(Path(warm), warm_sim.url, 2, slots=2,
                                               name="warm"), Path(warm) / "jobs", speed))
        finally:
            warm_sim.close()
    sim = Simulator(speed, seed, slot_limit=slots)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = _manifest(Path(tmp), sim.url, n, slots=slots, name="bench")
            cpu0, t0 = time.process_time(), time.monotonic()
            summary = asyncio.run(_orchestrate(path, Path(tmp) / "jobs", speed))
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        stats, tasks = sim.get("/_sim/stats"), sim.get("/_sim/tasks")
    finally:
        sim.close()
    bound, total = _lower_bound(tasks, slots)
    makespan = wall * speed
    return {
        "jobs": n, "succeeded": summary.counts.get("succeeded", 0), "slots": slots,
        "makespan_s": makespan, "lower_bound_s": bound, "ratio": makespan / bound,
        "polls_per_task": stats["polls"] / n, "cpu_ms_per_job": cpu * 1000 / n,
        "creates": stats["creates"], "duplicates": len(stats["duplicate_keys"]),
        "peak_slots": stats["peak_slots"], "rejected": stats["rejected"],
        "sum_T_s": total, "wall_s": wall,
    }


def bench_naive(n: int, speed: float, seed: int, poll_every: float = 3.0) -> dict[str, Any]:
    """The seed's loop: create, poll every 3 s until done, download, next."""
    sim = Simulator(speed, seed)
    headers = {"Authorization": f"Bearer {KEY}"}
    polls = 0
    try:
        with httpx.Client(base_url=sim.url, headers=headers, timeout=30) as client:
            t0, cpu0 = time.monotonic(), time.process_time()
            for i in range(n):
                body = {"model": "kling-v2-6", "prompt": f"benchmark scene {i}", "duration": 5,
                        "size": "16:9"}
                task = client.post("/v1/videos", json=body).json()
                task_id = task.get("task_id") or task["id"]
                while True:
                    time.sleep(poll_every / speed)
                    polls += 1
                    status = client.get(f"/v1/videos/{task_id}").json()
                    if status["status"] in ("completed", "failed"):
                        break
                url = (status.get("metadata") or {}).get("url")
                if url:
                    client.get(url)
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        tasks = sim.get("/_sim/tasks")
    finally:
        sim.close()
    bound, _ = _lower_bound(tasks, 1)
    return {"jobs": n, "makespan_s": wall * speed, "polls_per_task": polls / n,
            "serial_sum_T_s": bound, "cpu_ms_per_job": cpu * 1000 / n}


def bench_bare(n: int, slots: int, speed: float, seed: int) -> dict[str, Any]:
    """The floor: the same requests from a bare aiohttp loop that keeps no state."""
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}"}

    async def job(session: aiohttp.ClientSession, url: str, i: int, folder: Path) -> int:
        body = {"model": "kling-v2-6", "prompt": f"benchmark scene {i}", "duration": 5,
                "size": "16:9"}
        async with session.post(f"{url}/v1/videos", json=body, headers=headers) as answer:
            created = await answer.json()
        task_id = created.get("task_id") or created["id"]
        started = time.monotonic()
        await asyncio.sleep(45 / speed)  # half the median render, as batchkling's first poll
        polls = 0
        while True:
            async with session.get(f"{url}/v1/videos/{task_id}", headers=headers) as answer:
                status = await answer.json()
            polls += 1
            if status["status"] in ("completed", "failed"):
                break
            done = float(str(status.get("progress") or 1).rstrip("%")) or 1.0
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(elapsed * 100 / done - elapsed, 0.5 / speed) + 0.2 / speed)
        async with session.get((status.get("metadata") or {})["url"]) as answer:
            data = await answer.read()
        part, dest = folder / f"{i}.mp4.part", folder / f"{i}.mp4"
        with open(part, "wb") as out:  # blocking, as in a script
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, dest)
        return polls

    async def main(url: str, folder: Path) -> int:
        queue = list(range(n))[::-1]
        polls: list[int] = []

        async def worker() -> None:
            while queue:
                polls.append(await job(session, url, queue.pop(), folder))

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(worker() for _ in range(slots)))
        return sum(polls)

    sim = Simulator(speed, seed, slot_limit=slots)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cpu0, t0 = time.process_time(), time.monotonic()
            polls = asyncio.run(main(sim.url, Path(tmp)))
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        tasks = sim.get("/_sim/tasks")
    finally:
        sim.close()
    bound, _ = _lower_bound(tasks, slots)
    return {"jobs": n, "makespan_s": wall * speed, "ratio": wall * speed / bound,
            "polls_per_task": polls / n, "cpu_ms_per_job": cpu * 1000 / n}


def bench_scale(n: int, speed: float, seed: int) -> dict[str, Any]:
    """10,000 jobs in a child process: peak RSS and wall time."""
    sim = Simulator(speed, seed)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = _manifest(Path(tmp), sim.url, n, slots=200, name="scale")
            env = {**os.environ, "BATCHKLING_TEST_KEY": KEY}
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-c",
                 "import resource, subprocess, sys; from batchkling.cli import main; "
                 "sys.argv = sys.argv[1:]\n"
                 "try:\n    main()\nexcept SystemExit as e:\n"
                 "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, e.code, "
                 "file=sys.stderr)",
                 "batchkling", "run", str(path), "--workdir", str(Path(tmp) / "jobs"),
                 "--speed", str(speed), "--yes"],
                env=env, capture_output=True, text=True, timeout=1800,
            )
            wall = time.monotonic() - t0
        stats = sim.get("/_sim/stats")
    finally:
        sim.close()
    rss_kb, code = proc.stderr.strip().splitlines()[-1].split()
    return {"jobs": n, "exit_code": int(code), "peak_rss_mb": int(rss_kb) / 1024,
            "wall_s": wall, "creates": stats["creates"],
            "duplicates": len(stats["duplicate_keys"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--slots", type=int, default=10)
    parser.add_argument("--speed", type=float, default=100.0)
    parser.add_argument("--naive-speed", type=float, default=1000.0,
                        help="the naive loop is serial: run it faster to keep the bench short")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--scale", type=int, default=10_000)
    parser.add_argument("--no-scale", action="store_true")
    args = parser.parse_args()

    ours = bench_batchkling(args.jobs, args.slots, args.speed, args.seed)
    naive = bench_naive(args.jobs, args.naive_speed, args.seed)
    bare = bench_bare(args.jobs, args.slots, args.speed, args.seed)
    print(f"batchkling: {ours['jobs']} jobs, {ours['slots']} slots, speed x{args.speed:g}")
    print(f"  makespan         {ours['makespan_s']:9.0f} s (simulated)")
    print(f"  lower bound      {ours['lower_bound_s']:9.0f} s  max(sum T / C, max T)")
    print(f"  ratio            {ours['ratio']:9.3f}   (goal <= 1.10)")
    print(f"  polls per task   {ours['polls_per_task']:9.2f}   (goal <= 5)")
    print(f"  CPU per job      {ours['cpu_ms_per_job']:9.2f} ms (goal <= 3)")
    print(f"  succeeded {ours['succeeded']}, creates {ours['creates']}, duplicates "
          f"{ours['duplicates']}, peak slots {ours['peak_slots']}, rejected {ours['rejected']}")
    print(f"naive loop (one at a time, poll every 3 s), speed x{args.naive_speed:g}")
    print(f"  makespan         {naive['makespan_s']:9.0f} s (simulated)")
    print(f"  polls per task   {naive['polls_per_task']:9.2f}")
    print(f"  CPU per job      {naive['cpu_ms_per_job']:9.2f} ms (no checkpoints, no checks)")
    print(f"  speed-up         {naive['makespan_s'] / ours['makespan_s']:9.1f} x")
    print(f"bare loop (same requests; no state, log or checks), speed x{args.speed:g}")
    print(f"  makespan ratio   {bare['ratio']:9.3f}")
    print(f"  polls per task   {bare['polls_per_task']:9.2f}")
    print(f"  CPU per job      {bare['cpu_ms_per_job']:9.2f} ms (the floor on this machine)")
    if not args.no_scale:
        scale = bench_scale(args.scale, 1000.0, args.seed)
        print(f"scale: {scale['jobs']} jobs through the CLI (200 slots, speed x1000)")
        print(f"  peak RSS         {scale['peak_rss_mb']:9.1f} MB (goal < 300)")
        print(f"  wall             {scale['wall_s']:9.1f} s, exit {scale['exit_code']}, "
              f"creates {scale['creates']}, duplicates {scale['duplicates']}")


if __name__ == "__main__":
    main()
