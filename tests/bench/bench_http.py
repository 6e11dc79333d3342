"""CPU per provider request: batchkling's HTTP layer against plain httpx.AsyncClient.

    python tests/bench/bench_http.py                 # 2,000 polls, 10 at a time
    python tests/bench/bench_http.py --concurrency 1

Each round polls one finished task of the simulator (``batchkling simulate`` in a child
process, so its CPU is not counted) ``--requests`` times, ``--concurrency`` at a time, and
reports this process's CPU (user and system) per request:

- ``httpx.AsyncClient``: the client batchkling used before, on httpx's default transport
  (httpcore, h11) — the baseline;
- ``ImaRouterProvider.status``: what the engine runs per poll now (HttpClient straight to
  AiohttpTransport, plus parsing the task);
- ``aiohttp.ClientSession``: aiohttp alone, the floor under both.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import KEY, Simulator

from batchkling.models import JobSpec
from batchkling.providers.imarouter import ImaRouterProvider

SPEC = JobSpec(job_id="bench", model="kling-v2-6", prompt="bench", duration=5, size="16:9")


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def _measure(label: str, one: Callable[[], Awaitable[None]], n: int,
                   concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def limited() -> None:
        async with gate:
            await one()

    await asyncio.gather(*(limited() for _ in range(min(n, 200))))  # warm up
    user0, sys0 = _cpu()
    started = time.monotonic()
    await asyncio.gather(*(limited() for _ in range(n)))
    user1, sys1 = _cpu()
    wall = time.monotonic() - started
    print(f"  {label:34s} user {(user1 - user0) * 1e6 / n:6.0f} µs  "
          f"sys {(sys1 - sys0) * 1e6 / n:5.0f} µs  per request   ({n / wall:6.0f} req/s)")


async def _main(url: str, n: int, concurrency: int) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "kling-v2-6", "prompt": "bench", "duration": 5, "size": "16:9"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        task = (await client.post("/v1/videos", json=body)).json()
        path = f"/v1/videos/{task['id']}"
        await asyncio.sleep(1.0)  # let it finish: a completed task is the larger answer

        async def plain_httpx() -> None:
            (await client.get(path)).json()

        await _measure("httpx.AsyncClient (before)", plain_httpx, n, concurrency)

    provider = ImaRouterProvider(url, KEY)
    try:
        async def ours() -> None:
            await provider.status(task["id"], SPEC)

        await _measure("ImaRouterProvider.status (now)", ours, n, concurrency)
    finally:
        await provider.aclose()

    async with aiohttp.ClientSession(url, headers=headers) as session:
        async def floor() -> None:
            async with session.get(path) as response:
                await response.json()

        await _measure("aiohttp.ClientSession (floor)", floor, n, concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    sim = Simulator(1000.0, 1)
    try:
        print(f"{args.requests} polls of one completed task, {args.concurrency} at a time:")
        asyncio.run(_main(sim.url, args.requests, args.concurrency))
    finally:
        sim.close()


if __name__ == "__main__":
    main()
