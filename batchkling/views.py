"""Read-only views of the store for ``status`` and ``export``: safe while a run is going."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchkling.models import IN_FLIGHT, JobState
from batchkling.results import write_results
from batchkling.store import RunRow, Store


def _db(workdir: Path) -> Store:
    return Store(workdir / "batchkling.db")


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
    }


async def runs_table(workdir: Path) -> list[dict[str, Any]]:
    """One summary per run in the workdir, newest first."""
    async with _db(workdir) as store:
        return [await _summary(store, run) for run in await store.list_runs()]


async def run_status(workdir: Path, run_id: str) -> dict[str, Any]:
    """Counts by state, in flight, cost, and failures by reason for one run."""
    async with _db(workdir) as store:
        run = await store.require_run(run_id)
        data = await _summary(store, run)
        reasons: dict[str, int] = {}
        states = [JobState.FAILED, JobState.UNKNOWN, JobState.TIMED_OUT]
        async for row in store.iter_jobs(run_id, states):
            key = f"{row.state.value}: {row.error_code or '-'}"
            reasons[key] = reasons.get(key, 0) + 1
        data["problems"] = reasons
        return data


async def export_csv(workdir: Path, run_id: str, output: Path | None) -> Path:
    """Write the run's CSV to ``output`` (default: the run folder's results.csv)."""
    async with _db(workdir) as store:
        run = await store.require_run(run_id)
        dest = output or workdir / run_id / "results.csv"
        return await write_results(store, run_id, dest, download=run.downloads)


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
        console.print(f"in flight {data['in_flight']} · cost ${data['cost_usd']:.2f}"
                      f" (committed ${data['committed_usd']:.2f})")
        if data.get("stop_reason"):
            console.print(f"last stop: {data['stop_reason']}")
        for reason, n in data.get("problems", {}).items():
            console.print(f"  {n} × {reason}")
        return
    if not data:
        console.print("no runs yet")
        return
    table = Table("run", "state", "jobs", "done", "failed", "in flight", "cost $", "manifest")
    for run in data:
        counts = run["counts"]
        table.add_row(run["run_id"], run["state"], str(run["jobs"]),
                      str(counts.get("downloaded", 0)), str(counts.get("failed", 0)),
                      str(run["in_flight"]), f"{run['cost_usd']:.2f}", run["manifest"] or "")
    console.print(table)
