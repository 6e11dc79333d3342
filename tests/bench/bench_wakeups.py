"""What a wake-up of the event loop costs, and what the engine costs without them.

    python tests/bench/bench_wakeups.py

Three figures, CPU of this process (user + system):

1. One wake-up after idling: ``time.sleep`` and ``asyncio.sleep`` in a loop, back to back and
   with gaps of 1 and 10 ms. On a VM a wake-up after an idle gap costs far more than the same
   call made back to back: the run engine at the benchmark's pace is mostly idle between events.
2. One provider poll (``ImaRouterProvider.status`` against the simulator in a child process),
   back to back and 10 ms apart.
3. The engine and the checkpoint store on their own: an in-process run of 1,000 jobs with a
   provider that answers at once (running, then succeeded) and no download, so the event loop
   never idles — the engine's own work per job, without wake-ups, HTTP or video files.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import KEY, Simulator

from batchkling.models import JobSpec

SPEC = JobSpec(job_id="bench", model="kling-v2-6", prompt="bench", duration=5, size="16:9")
GAPS = (0.0, 0.001, 0.01)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per_call(n: int, start: float) -> float:
    return (_cpu() - start) * 1e6 / n


def wakeups(n: int = 300) -> None:
    print("1. one wake-up, CPU per call (µs):")
    for gap in GAPS:
        start = _cpu()
        for _ in range(n):
            time.sleep(gap)
        blocking = _per_call(n, start)

        async def slept(gap: float = gap) -> float:
            start = _cpu()
            for _ in range(n):
                await asyncio.sleep(gap)
            return _per_call(n, start)

        print(f"   gap {gap * 1000:4.0f} ms   time.sleep {blocking:6.0f}   "
              f"asyncio.sleep {asyncio.run(slept()):6.0f}")


def polls(n: int = 300) -> None:
    from batchkling.providers.imarouter import ImaRouterProvider

    async def main(url: str) -> None:
        provider = ImaRouterProvider(url, KEY)
        try:
            task_id = await provider.create(SPEC, "bench-wakeups-1")
            await asyncio.sleep(1.0)  # finished: the larger answer
            for gap in (0.0, 0.01):
                start = _cpu()
                for _ in range(n):
                    await provider.status(task_id, SPEC)
                    if gap:
                        await asyncio.sleep(gap)
                spent = _per_call(n, start)
                if gap:
                    start = _cpu()
                    for _ in range(n):
                        await asyncio.sleep(gap)
                    spent -= _per_call(n, start)
                print(f"   {gap * 1000:4.0f} ms apart: {spent:6.0f} µs per poll"
                      + (" (the sleep's own wake-up taken off)" if gap else ""))
        finally:
            await provider.aclose()

    print("2. one provider poll against the simulator:")
    sim = Simulator(1000.0, 1)
    try:
        asyncio.run(main(sim.url))
    finally:
        sim.close()


class _InstantProvider:
    """Answers at once: a create, then ``running``, then ``succeeded``."""

    name = "imarouter"
    can_lookup = False
    may_lag = False

    def __init__(self) -> None:
        self.polls: dict[str, int] = {}

    async def create(self, spec: JobSpec, key: str) -> str:
        await anyio.lowlevel.checkpoint()
        return f"task-{key}"

    async def status(self, task_id: str, spec: JobSpec) -> Any:
        from batchkling.providers.base import Phase, TaskStatus

        await anyio.lowlevel.checkpoint()
        self.polls[task_id] = self.polls.get(task_id, 0) + 1
        if self.polls[task_id] < 2:
            return TaskStatus(task_id, Phase.RUNNING, progress=50.0)
        now = time.time()
        return TaskStatus(task_id, Phase.SUCCEEDED, video_url="http://127.0.0.1:9/v.mp4",
                          cost_usd=0.1, created_at=now - 1, completed_at=now)

    async def lookup(self, key: str, spec: JobSpec) -> None:
        return None

    async def aclose(self) -> None:
        return None


def engine_alone(n: int = 1000) -> None:
    from batchkling.logs import configure_logging
    from batchkling.manifest.document import load_manifest
    from batchkling.run.orchestrator import Orchestrator
    from batchkling.testing import write_manifest

    configure_logging(console="off")

    async def run(folder: Path, jobs: int) -> dict[str, int]:
        path = write_manifest(folder, [{"id": f"job-{i:05d}", "prompt": f"scene {i}"}
                                       for i in range(jobs)],
                              base_url="http://127.0.0.1:9", output={"download": False},
                              limits={"max_in_flight": 10, "submit_rate": 1000,
                                      "task_timeout": "3h"})
        async with Orchestrator(load_manifest(path), workdir=folder / "jobs",
                                provider=_InstantProvider(), min_poll_interval=1e-4,
                                time_scale=1e4, env={"BATCHKLING_TEST_KEY": KEY}) as orch:
            return (await orch.run()).counts

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "warm").mkdir()
        asyncio.run(run(Path(tmp) / "warm", 5))
        start, wall = _cpu(), time.monotonic()
        counts = asyncio.run(run(Path(tmp), n))
        print(f"3. the engine and store alone, {n} jobs, no idle time: "
              f"{_per_call(n, start) / 1000:.2f} ms CPU per job "
              f"({(time.monotonic() - wall) * 1000 / n:.2f} ms wall), {counts}")


def main() -> None:
    wakeups()
    polls()
    engine_alone()


if __name__ == "__main__":
    main()
