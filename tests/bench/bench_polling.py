"""Makespan and polls per task at four render scales, side by side with the seed's loop.

    python tests/bench/bench_polling.py                          # 5 s, 30 s, 2 min, 10 min medians
    python tests/bench/bench_polling.py --scales 30 --provider kling --repeat 3
    python tests/bench/bench_polling.py --scales 120 --callbacks  # Kling's callbacks on
    python tests/bench/bench_polling.py --overshoot              # max_in_flight 30 on 10 slots
    python tests/bench/bench_polling.py --scales 120 600 --refresh 15  # ImaRouter's 15 s lag
    python tests/bench/bench_polling.py --scales 120 --refresh 15 --refresh-jitter 3

For each median render time the same jobs run, one contender after another, each against a
fresh simulator with the same seed — so task n renders for the same time whoever created it:

- **batchkling** (the library, in this process, ``time_scale`` = the simulator's speed);
- **the seed's loop**: ten workers, each creating a task and polling it every 3 s (simulated)
  until it ends, then downloading it;
- **the bare loop**: ten aiohttp workers that know the true median render time, poll once at
  half of it and once where the progress reading says the task ends (the floor for CPU, and a
  loop that is told what batchkling must learn).

The yardstick is the **ideal list schedule**: the render times the simulator drew (create to
end, queue included), in creation order, each task started the instant one of the ten slots
frees, with zero detection lag. A contender's makespan runs from its first create to the moment
it first *read* the last task's end (the simulator notes, per task, when a client first saw it
finished), so start-up, downloads and end-of-run files are not counted for anyone.
Polls per task count every status request and every Kling list request.

``--refresh S`` makes the simulator's ImaRouter shape show each task as the gateway last saw it
upstream — one loop for all tasks, a look every S simulated seconds (API.md: about 15 s) —
and date each end by the look that saw it: an end cannot be read sooner, whoever polls, and
the ideal schedule still assumes it could. ``--refresh-jitter J`` makes each loop up to J
seconds longer, at random (the gateway's look itself takes time), so the looks drift.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be

#: median render (simulated s) -> simulator speed: long renders are compressed to a few seconds.
SCALES = {5: 1.0, 30: 5.0, 120: 20.0, 600: 100.0}
ACCESS, SECRET = "sim-access-key", "sim-secret-key"


def ideal_makespan(held: list[float], slots: int) -> float:
    """The list schedule: tasks in creation order, each on the first slot to free."""
    free = [0.0] * slots
    end = 0.0
    for t in held:
        start = heapq.heappop(free)
        end = max(end, start + t)
        heapq.heappush(free, start + t)
    return end


def measure(sim: be.Simulator, n: int, slots: int,
            before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Makespan against the ideal, polls per task and detection lag, from the simulator;
    with ``before`` (its stats after a warm-up), only what came after."""
    stats, tasks = sim.get("/_sim/stats"), sim.get("/_sim/tasks")
    if before is not None:
        tasks = [t for t in tasks if t["created_at"] >= before["sim_time"]]
        for name in ("polls", "lists"):
            stats[name] -= before.get(name, 0)
        stats["rejected"] = {k: v - before["rejected"].get(k, 0)
                             for k, v in stats["rejected"].items()}
    tasks.sort(key=lambda t: t["created_at"])
    held = [t["ends_at"] - t["created_at"] for t in tasks]
    first = tasks[0]["created_at"]
    seen = [t["seen_done_at"] for t in tasks]
    if None in seen:
        raise RuntimeError(f"{seen.count(None)} tasks were never seen finished")
    makespan = max(seen) - first
    ideal = ideal_makespan(held, slots)
    lags = [t["seen_done_at"] - t["ends_at"] for t in tasks]
    return {"makespan": makespan, "ideal": ideal, "ratio": makespan / ideal,
            "polls": (stats["polls"] + stats.get("lists", 0)) / n,
            "lists": stats.get("lists", 0) / n,
            "lag": statistics.mean(lags) / statistics.mean(held), "creates": stats["creates"],
            "rejected": sum(stats["rejected"].values()), "peak": stats["peak_slots"],
            "duplicates": len(stats["duplicate_keys"]),
            "callbacks": stats.get("callbacks_sent", 0)}


#: The gateway's refresh interval for every simulator of the invocation (``--refresh``), and
#: how much longer each of its loops may take, at random (``--refresh-jitter``).
REFRESH = 0.0
REFRESH_JITTER = 0.0


def _settings(median: float, slots: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"render_median_s": median}
    if REFRESH > 0:
        # Timestamps to the millisecond: at --speed, whole real seconds would be coarser than
        # the gateway's look period (at x20, 20 simulated seconds), where at x1 they are 1/15
        # of it.
        out["status_refresh_s"] = REFRESH
        out["status_refresh_jitter_s"] = REFRESH_JITTER
        out["quirk_ms_timestamps"] = True
    if slots is not None:
        out["slot_limit"] = slots
    return out


def run_batchkling(median: float, speed: float, n: int, slots: int, *, provider: str,
                   seed: int, warm: int = 0, max_in_flight: int | None = None,
                   callbacks: bool = False) -> dict[str, Any]:
    """batchkling in this process; its CPU per job too. With ``warm``, a first run of that
    many jobs in the same store leaves render times for the measured run to start from."""
    from batchkling.logs import configure_logging
    from batchkling.testing import write_manifest

    configure_logging(console="off")
    sim = be.Simulator(speed, seed, **_settings(median, slots))
    listen = f"127.0.0.1:{be._free_port()}" if callbacks else None
    env = {"BATCHKLING_TEST_KEY": be.KEY, "KLING_ACCESS_KEY": ACCESS, "KLING_SECRET_KEY": SECRET}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            def manifest(name: str, count: int) -> Path:
                jobs = [{"id": f"{name}-{i:05d}", "prompt": f"{name} scene {i}"}
                        for i in range(count)]
                folder = Path(tmp) / name
                folder.mkdir()
                path = write_manifest(folder, jobs, name=name, base_url=sim.url,
                                      provider=provider,
                                      limits={"max_in_flight": max_in_flight or slots,
                                              "submit_rate": 1000, "task_timeout": "3h"})
                if listen:
                    data = yaml.safe_load(path.read_text())
                    data["provider"]["callback_url"] = f"http://{listen}/hook"
                    path.write_text(yaml.safe_dump(data, sort_keys=False))
                return path

            before = None
            if warm:
                asyncio.run(_orchestrate(manifest("warm", warm), Path(tmp) / "jobs", speed, env,
                                         listen))
                before = sim.get("/_sim/stats")
            path = manifest("bench", n)
            cpu0, t0 = time.process_time(), time.monotonic()
            summary = asyncio.run(_orchestrate(path, Path(tmp) / "jobs", speed, env, listen))
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        out = measure(sim, n, slots, before)
    finally:
        sim.close()
    out.update(cpu_ms=cpu * 1000 / n, wall=wall, ok=summary.counts.get("succeeded", 0))
    return out


async def _orchestrate(path: Path, workdir: Path, speed: float, env: dict[str, str],
                       listen: str | None) -> Any:
    from batchkling.manifest.document import load_manifest
    from batchkling.run.orchestrator import Orchestrator

    async with Orchestrator(load_manifest(path), workdir=workdir, time_scale=speed,
                            env=env, callback_listen=listen) as orch:
        return await orch.run()


def _kling_headers() -> dict[str, str]:
    import jwt

    now = int(time.time())
    token = jwt.encode({"iss": ACCESS, "exp": now + 1800, "nbf": now - 5}, SECRET,
                       algorithm="HS256", headers={"typ": "JWT"})
    return {"Authorization": f"Bearer {token}"}


async def _loop(url: str, n: int, slots: int, provider: str, first: float,
                then: str | float) -> None:
    """Workers that create, wait ``first``, then poll (every ``then`` s, or where the progress
    points), and download: the seed's loop and the bare loop."""
    import aiohttp

    headers = _kling_headers() if provider == "kling" else {"Authorization": f"Bearer {be.KEY}"}
    queue = list(range(n))[::-1]

    async def job(session: aiohttp.ClientSession, i: int) -> None:
        if provider == "kling":
            body: dict[str, Any] = {"model_name": "kling-v2-6", "prompt": f"benchmark scene {i}",
                                    "duration": "5", "aspect_ratio": "16:9"}
            async with session.post(f"{url}/v1/videos/text2video", json=body,
                                    headers=headers) as answer:
                task_id = (await answer.json())["data"]["task_id"]
            poll = f"{url}/v1/videos/text2video/{task_id}"
        else:
            body = {"model": "kling-v2-6", "prompt": f"benchmark scene {i}", "duration": 5,
                    "size": "16:9"}
            async with session.post(f"{url}/v1/videos", json=body, headers=headers) as answer:
                created = await answer.json()
            poll = f"{url}/v1/videos/{created.get('task_id') or created['id']}"
        started = time.monotonic()
        await asyncio.sleep(first)
        while True:
            async with session.get(poll, headers=headers) as answer:
                status = await answer.json()
            if provider == "kling":
                data = status["data"]
                if data["task_status"] in ("succeed", "failed"):
                    video = data["task_result"]["videos"][0]["url"]
                    break
                progress = None
            else:
                if status["status"] in ("completed", "failed"):
                    video = (status.get("metadata") or {})["url"]
                    break
                progress = float(str(status.get("progress") or 0).rstrip("%"))
            if isinstance(then, float) or not progress:
                wait = then if isinstance(then, float) else first / 4
            else:
                elapsed = time.monotonic() - started
                wait = elapsed * 100 / progress - elapsed + 0.01 * elapsed
                # Told the median, it never waits five of them: a low percent shown late
                # (--refresh) would otherwise send it away for a hundred renders.
                wait = min(wait, 10 * first)
            await asyncio.sleep(max(wait, 0.001))
        async with session.get(video) as answer:
            await answer.read()

    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            while queue:
                await job(session, queue.pop())

        await asyncio.gather(*(worker() for _ in range(slots)))


def run_loop(kind: str, median: float, speed: float, n: int, slots: int, *, provider: str,
             seed: int, warm: int = 0) -> dict[str, Any]:
    """The seed's loop (poll every 3 s) or the bare loop (told the median)."""
    sim = be.Simulator(speed, seed, **_settings(median, slots))
    if kind == "seed":
        first, then = 3.0 / speed, 3.0 / speed
    else:
        first, then = (median / 2 + 2) / speed, "progress"
    try:
        before = None
        if warm:
            asyncio.run(_loop(sim.url, warm, slots, provider, first, then))
            before = sim.get("/_sim/stats")
        cpu0 = time.process_time()
        asyncio.run(_loop(sim.url, n, slots, provider, first, then))
        cpu = time.process_time() - cpu0
        out = measure(sim, n, slots, before)
    finally:
        sim.close()
    out["cpu_ms"] = cpu * 1000 / n
    return out


def _row(name: str, r: dict[str, Any]) -> str:
    return (f"  {name:<11} ratio {r['ratio']:6.3f}  polls/task {r['polls']:5.2f}  "
            f"lag {100 * r['lag']:5.2f} %  makespan {r['makespan']:8.0f} s (ideal "
            f"{r['ideal']:.0f})  CPU {r['cpu_ms']:5.2f} ms/job  rejected {r['rejected']}"
            + (f"  callbacks {r['callbacks']}" if r["callbacks"] else "")
            + (f"  (lists {r['lists']:.2f}/task)" if r["lists"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="*", default=list(SCALES),
                        help="median render times in simulated seconds")
    parser.add_argument("--provider", choices=["imarouter", "kling"], default="imarouter")
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--slots", type=int, default=10)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--warm", type=int, default=0,
                        help="jobs run first (same store and account), not measured")
    parser.add_argument("--only", choices=["batchkling", "seed", "bare"], nargs="*",
                        default=["batchkling", "seed", "bare"])
    parser.add_argument("--callbacks", action="store_true")
    parser.add_argument("--overshoot", action="store_true",
                        help="max_in_flight 30 on a 10-slot account, beside max_in_flight 10")
    parser.add_argument("--refresh", type=float, default=0.0,
                        help="the gateway looks at its upstream this often, one loop for all "
                             "tasks (simulated s; ImaRouter shape; millisecond timestamps)")
    parser.add_argument("--refresh-jitter", type=float, default=0.0,
                        help="with --refresh: each of the gateway's loops takes up to this much "
                             "longer, at random (simulated s)")
    args = parser.parse_args()
    global REFRESH, REFRESH_JITTER
    REFRESH, REFRESH_JITTER = args.refresh, args.refresh_jitter
    for median in args.scales:
        speed = SCALES.get(median, max(1.0, median / 3))
        for rep in range(args.repeat):
            seed = args.seed + rep
            print(f"median {median} s, {args.provider}, {args.jobs} jobs, {args.slots} slots, "
                  f"speed x{speed:g}, seed {seed}", flush=True)
            if args.overshoot:
                ten = run_batchkling(median, speed, args.jobs, args.slots,
                                     provider=args.provider, seed=seed)
                thirty = run_batchkling(median, speed, args.jobs, args.slots,
                                        provider=args.provider, seed=seed, max_in_flight=30)
                print(_row("max 10", ten))
                print(_row("max 30", thirty))
                print(f"  makespan 30/10 {thirty['makespan'] / ten['makespan']:6.3f}, "
                      f"peak slots {thirty['peak']}, rejected creates {thirty['rejected']}",
                      flush=True)
                continue
            for name in args.only:
                if name == "batchkling":
                    r = run_batchkling(median, speed, args.jobs, args.slots,
                                       provider=args.provider, seed=seed, warm=args.warm,
                                       callbacks=args.callbacks)
                else:
                    r = run_loop(name, median, speed, args.jobs, args.slots,
                                 provider=args.provider, seed=seed, warm=args.warm)
                print(_row(name, r), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
