"""Read-only views of the store for ``status`` and ``export``: safe while a run is going."""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from batchkling.models import IN_FLIGHT, TERMINAL, JobState, describe_cost
from batchkling.outputs.results import write_results
from batchkling.store import RunRow, Store, default_location, store_from

#: Where a view reads: a store location (path or URL), or None for the workdir's own file.
Location = str | os.PathLike[str] | None


def _db(workdir: Path, store: Location) -> Store:
    return store_from(default_location(workdir) if store is None else store)


async def _summary(store: Store, run: RunRow) -> dict[str, Any]:
    counts = await store.counts(run.run_id)
    spent, committed = await store.money(run.run_id)
    return {
        "run_id": run.run_id,
        "manifest": run.manifest_path,
        "provider": run.provider,
        "simulated": run.simulated,
        "state": "running" if run.lease_owner else run.state,
        "stop_reason": run.stop_reason,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "jobs": sum(counts.values()),
        "counts": {state.value: n for state, n in sorted(counts.items())},
        "in_flight": sum(counts.get(s, 0) for s in IN_FLIGHT),
        "cost_usd": round(spent, 4),
        "committed_usd": round(committed, 4),
        "cost_units": round(await store.units(run.run_id), 4),
    }


async def workers_table(db: Store, run_id: str | None = None) -> list[dict[str, Any]]:
    """The live workers (those serving ``run_id``, or all), each with the jobs it drives."""
    held = await db.held_by_workers()
    found = []
    for worker in await db.list_workers(alive_only=True):
        if run_id is not None and worker.runs is not None and run_id not in worker.runs:
            continue
        found.append({
            "worker_id": worker.worker_id, "host": worker.host, "pid": worker.pid,
            "runs": worker.runs, "started_at": worker.started_at,
            "silent_for": round(worker.silent_for, 1),
            "holds": held.get(worker.worker_id, {}),
        })
    return found


def print_workers(workers: list[dict[str, Any]]) -> None:
    """``status``'s lines for the live workers."""
    from rich.console import Console

    console = Console()
    if not workers:
        return
    console.print(f"[bold]live workers[/] ({len(workers)})")
    for worker in workers:
        holds = ", ".join(f"{n} {state}" for state, n in sorted(worker["holds"].items()))
        serves = "every open run" if worker["runs"] is None else ", ".join(worker["runs"])
        console.print(f"  {worker['worker_id']}  pid {worker['pid']} on {worker['host']} · "
                      f"serves {serves} · heard from {worker['silent_for']:.0f}s ago · "
                      f"drives {holds or 'nothing'}")


async def runs_table(workdir: Path, store: Location = None) -> list[dict[str, Any]]:
    """One summary per run in the store (default: the workdir's), newest first."""
    async with _db(workdir, store) as db:
        return [await _summary(db, run) for run in await db.list_runs()]


def eta_seconds(remaining: int, ends: list[float], now: float) -> float | None:
    """Seconds until ``remaining`` more jobs end, at the pace of the recent ``ends`` (epoch
    seconds, newest first); None without two ends to measure a pace by."""
    if remaining <= 0:
        return 0.0
    if len(ends) < 2 or ends[0] <= ends[-1]:
        return None
    per_job = (ends[0] - ends[-1]) / (len(ends) - 1)
    # Time already spent since the newest end counts toward the next one.
    return max(0.0, remaining * per_job - (now - ends[0]))


async def run_status(workdir: Path, run_id: str, *, now: float | None = None,
                     store: Location = None) -> dict[str, Any]:
    """Counts by state, in flight, cost, ETA and failures by reason for one run.

    The ETA is given while the run is going: the jobs left at the pace of its last 20 to end
    (so a resumed run is not measured across the time it was stopped).
    """
    async with _db(workdir, store) as db:
        run = await db.require_run(run_id)
        data = await _summary(db, run)
        eta = None
        if data["state"] == "running":
            ended = sum(data["counts"].get(s.value, 0) for s in TERMINAL)
            eta = eta_seconds(data["jobs"] - ended, await db.recent_ends(run_id),
                              time.time() if now is None else now)
        data["eta_seconds"] = None if eta is None else round(eta)
        reasons: dict[str, int] = {}
        states = [JobState.FAILED, JobState.UNKNOWN, JobState.TIMED_OUT]
        async for row in db.iter_jobs(run_id, states):
            key = f"{row.state.value}: {row.error_code or '-'}"
            reasons[key] = reasons.get(key, 0) + 1
        data["problems"] = reasons
        data["workers"] = await workers_table(db, run_id)
        return data


async def live_workers(workdir: Path, store: Location = None) -> list[dict[str, Any]]:
    """Every live worker in the store, with what it drives."""
    async with _db(workdir, store) as db:
        return await workers_table(db)


async def export_csv(workdir: Path, run_id: str, output: Path | None,
                     store: Location = None) -> Path:
    """Write the run's CSV to ``output`` (default: the run folder's results.csv)."""
    async with _db(workdir, store) as db:
        run = await db.require_run(run_id)
        dest = output or workdir / run_id / "results.csv"
        return await write_results(db, run_id, dest, download=run.downloads)


def print_status(data: Any, *, single: bool) -> None:
    """Render ``status`` output for a person."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if single:
        console.print(f"[bold]{data['run_id']}[/]  {data['state']}  provider {data['provider']}"
                      f"{' (simulated)' if data['simulated'] else ''}")
        table = Table("state", "jobs")
        for state, n in data["counts"].items():
            table.add_row(state, str(n))
        console.print(table)
        eta = data.get("eta_seconds")
        units = data.get("cost_units", 0.0)
        cost = (describe_cost(data["cost_usd"], units, data["committed_usd"]) if units else
                f"${data['cost_usd']:.2f} (committed ${data['committed_usd']:.2f})")
        console.print(f"in flight {data['in_flight']} · cost {cost}"
                      + (f" · ETA {format_duration(eta)}" if eta is not None else ""))
        if data.get("stop_reason"):
            console.print(f"last stop: {data['stop_reason']}")
        for reason, n in data.get("problems", {}).items():
            console.print(f"  {n} × {reason}")
        print_workers(data.get("workers", []))
        return
    if not data:
        console.print("no runs yet")
        return
    rows = []
    for run in data:
        counts = run["counts"]
        started = datetime.fromtimestamp(run["created_at"]).strftime("%b %d %H:%M")
        rows.append((run["run_id"], started, run["state"], str(run["jobs"]),
                     str(counts.get("downloaded", 0)), str(counts.get("failed", 0)),
                     str(run["in_flight"]), f"{run['cost_usd']:.2f}",
                     Path(run["manifest"]).name if run["manifest"] else ""))
    # The columns a person scans keep their width; only the manifest (its file name; --json
    # has the path) gives way on a narrow terminal.
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold underline")
    headers = ("run", "started", "state", "jobs", "done", "failed", "in flight", "cost $")
    for i, name in enumerate(headers):
        width = max(len(name), *(len(row[i]) for row in rows))
        table.add_column(name, no_wrap=True, min_width=min(width, 40),
                         justify="left" if i < 3 else "right")
    table.add_column("manifest", no_wrap=True, overflow="ellipsis", ratio=1, min_width=8)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def format_duration(seconds: float) -> str:
    """``4m05s``, or ``2h07m`` from an hour on."""
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
