"""Simulator throughput: status polls per second with 10,000 live tasks, server on one core.

Run: ``python tests/bench/bench_simulator.py [--tasks 10000] [--seconds 10] [--connections 64]``

The server runs in a child process pinned to core 0 (``os.sched_setaffinity``); this process,
pinned to core 1, creates the tasks and then polls them round-robin over keep-alive connections
with a minimal HTTP/1.1 client (httpx itself would be the bottleneck), and prints req/s and
latency percentiles. Loopback only; bounded by ``--seconds`` plus set-up time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import jwt

HOST = "127.0.0.1"
KEY = "sk-bench"


def _pin(core: int) -> str:
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if len(cores) < 2:
        return "not pinned (fewer than 2 cores)"
    os.sched_setaffinity(0, {sorted(cores)[core]})
    return f"core {sorted(cores)[core]}"


def serve(port: int, speed: float) -> None:
    """Child-process entry: the simulator on ``port``, pinned to the first core."""
    where = _pin(0)
    from batchkling.simulator import serve_forever

    sys.stderr.write(f"server pinned to {where}\n")
    serve_forever(host=HOST, port=port, speed=speed, seed=1, faults="none", api_key=KEY)


class Conn:
    """One keep-alive HTTP/1.1 connection; just enough protocol for this benchmark."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, headers: dict[str, str],
                      body: bytes = b"") -> tuple[int, bytes]:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body or method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def wait_up(port: int, within: float = 20.0) -> None:
    """Until the server answers its health check."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            conn = await Conn.open(port)
            status, _ = await conn.request("GET", "/_sim/health", {})
            conn.close()
            if status == 200:
                return
        await asyncio.sleep(0.1)
    raise SystemExit("server did not start")


async def create_tasks(port: int, n: int, connections: int) -> list[tuple[str, dict[str, str]]]:
    """``n`` tasks, one in five on the Kling shape; returns (poll path, headers) per task."""
    now = int(time.time())
    with warnings.catch_warnings():  # the documented default secret is under 32 bytes
        warnings.simplefilter("ignore")
        token = jwt.encode({"iss": "sim-access-key", "exp": now + 3600, "nbf": now - 5},
                           "sim-secret-key", algorithm="HS256")
    ima = {"Authorization": f"Bearer {KEY}"}
    kling = {"Authorization": f"Bearer {token}"}
    out: list[tuple[str, dict[str, str]]] = []
    counter = iter(range(n))

    async def worker() -> None:
        conn = await Conn.open(port)
        for i in counter:
            if i % 5 == 4:
                body = {"model_name": "kling-v2-6", "prompt": f"bench {i}", "duration": "5"}
                status, raw = await conn.request("POST", "/v1/videos/text2video", kling,
                                                 json.dumps(body).encode())
                path = f"/v1/videos/text2video/{json.loads(raw)['data']['task_id']}"
                out.append((path, kling))
            else:
                body = {"model": "kling-v2-6", "prompt": f"bench {i}", "duration": 5,
                        "size": "16:9"}
                status, raw = await conn.request("POST", "/v1/videos", ima,
                                                 json.dumps(body).encode())
                out.append((f"/v1/videos/{json.loads(raw)['task_id']}", ima))
            assert status == 200, raw
        conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return out


async def hammer(port: int, targets: list[tuple[str, dict[str, str]]], seconds: float,
                 connections: int) -> tuple[int, list[float], int]:
    """Poll round-robin for ``seconds``; returns (requests, latencies, non-200 answers)."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal errors
        conn = await Conn.open(port)
        i = offset
        while (t0 := time.perf_counter()) < stop:
            path, headers = targets[i % len(targets)]
            status, _ = await conn.request("GET", path, headers)
            latencies.append(time.perf_counter() - t0)
            errors += status != 200
            i += connections
        conn.close()

    await asyncio.gather(*(worker(k) for k in range(connections)))
    return len(latencies), latencies, errors


def pct(values: list[float], q: float) -> float:
    """The q-quantile in milliseconds."""
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] * 1000


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark against a server started by ``main``."""
    port = args.port
    await wait_up(port)
    t0 = time.perf_counter()
    targets = await create_tasks(port, args.tasks, min(args.connections, 16))
    create_s = time.perf_counter() - t0
    count, latencies, errors = await hammer(port, targets, args.seconds, args.connections)
    conn = await Conn.open(port)
    _, raw = await conn.request("GET", "/_sim/stats", {})
    conn.close()
    stats = json.loads(raw)
    return {
        "tasks": args.tasks,
        "create_per_s": round(args.tasks / create_s),
        "polls": count,
        "poll_per_s": round(count / args.seconds),
        "p50_ms": round(pct(latencies, 0.5), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "non_200": errors,
        "connections": args.connections,
        "tasks_by_state": stats["tasks_by_state"],
        "server_polls": stats["polls"],
    }


def main() -> None:
    """Parse options, start the pinned server process, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--speed", type=float, default=10.0,
                        help="render speed: 10 lets some tasks finish during the run")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.speed)
        return
    with socket.socket() as probe:  # a free port for the child; loopback only
        probe.bind((HOST, 0))
        args.port = probe.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--port", str(args.port), "--speed", str(args.speed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        where = _pin(1)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        result = runner(run(args))
    finally:
        child.terminate()
        _, err = child.communicate(timeout=10)
    pinned = next((line for line in err.splitlines() if "pinned" in line), "server: unknown")
    print(f"{pinned}; client pinned to {where}")
    print(f"created {result['tasks']} tasks at {result['create_per_s']} creates/s")
    print(f"polls: {result['poll_per_s']} req/s over {args.seconds:g} s, "
          f"{result['connections']} keep-alive connections; "
          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms; non-200: {result['non_200']}")
    print(f"tasks by state at the end: {result['tasks_by_state']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
