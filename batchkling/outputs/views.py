"""Read-only views of the store for ``status``, ``show`` and ``export``: safe while a run goes.

Two rules every screen shares live here: whether a run is alive (:func:`run_is_live`, from its
lease, never from the word stored when it started) and the words for jobs by state
(:data:`STATE_ORDER`, :func:`describe_states`), so ``status``, the live display, the end-of-run
summary and the report say the same thing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from batchkling.models import IN_FLIGHT, LEASE_STALE_AFTER, TERMINAL, JobState, describe_cost
from batchkling.outputs.nextstep import Outcome, job_next_step, next_steps, outcome_of
from batchkling.outputs.results import write_results
from batchkling.store import RunRow, Store, default_location, store_from
from batchkling.store.lease import lease_is_stale

#: Job states in the order of a job's life: every screen lists counts in this order.
STATE_ORDER = ("pending", "submitting", "submitted", "running", "succeeded", "downloaded",
               "failed", "timed_out", "unknown", "skipped")
#: The event the orchestrator records when an invocation ends (exit code, stop kind).
ENDED_EVENT = "run.ended"


#: Where a view reads: a store location (path or URL), or None for the workdir's own file.
Location = str | os.PathLike[str] | None


def _db(workdir: Path, store: Location = None) -> Store:
    return store_from(default_location(workdir) if store is None else store)


async def run_is_live(store: Store, run: RunRow, now: float | None = None) -> bool:
    """Whether a process is driving the run now: the lease holder's heartbeat is fresh (and on
    this host its process exists), or the run is open and a live worker serves it. The one
    liveness rule of every screen; never the word stored when the run started."""
    now = time.time() if now is None else now
    if run.lease_owner is not None:
        age = None if run.lease_heartbeat is None else now - run.lease_heartbeat
        if not lease_is_stale(run.lease_pid, run.lease_host, age,
                              stale_after=LEASE_STALE_AFTER):
            return True
    if run.state != "running":
        return False
    return any((w.runs is None or run.run_id in w.runs) and w.silent_for <= LEASE_STALE_AFTER
               for w in await store.list_workers(alive_only=True))


async def display_state(store: Store, run: RunRow, now: float | None = None) -> str:
    """``running`` only while :func:`run_is_live`; a run whose process died, or that stopped
    before it could record how it ended, is ``interrupted``; otherwise how it ended."""
    if await run_is_live(store, run, now):
        return "running"
    if run.lease_owner is not None or run.state == "running":
        return "interrupted"
    return run.state


def describe_states(states: Mapping[str, int]) -> str:
    """``3 downloaded, 2 running``: non-empty states in :data:`STATE_ORDER`."""
    return ", ".join(f"{states[s]:,} {s}" for s in STATE_ORDER if states.get(s))


def budget_text(data: Mapping[str, Any]) -> str:
    """`` · committed $7.50 of budget.max_usd $8.00`` (and the units cap) for a run summary
    that has caps; empty without."""
    text = ""
    if data.get("max_usd") is not None:
        text += (f" · committed ${data['committed_usd']:.2f} of budget.max_usd "
                 f"${data['max_usd']:.2f}")
    if data.get("max_units") is not None:
        text += (f" · committed {data.get('committed_units', 0):g} units of budget.max_units "
                 f"{data['max_units']:g}")
    return text


def money_text(spent: float, committed: float, units: float = 0.0) -> str:
    """The cost so far, with what is reserved for tasks not yet priced said as such."""
    if units:
        return describe_cost(spent, units, committed)
    reserved = committed - spent
    if reserved >= 0.005:
        return f"${spent:.2f} + ${reserved:.2f} reserved for tasks not yet priced"
    return f"${spent:.2f}"


async def last_end(store: Store, run_id: str) -> dict[str, Any]:
    """What the last invocation that ended normally recorded (exit code, stop kind), or {}."""
    events = await store.events(run_id, None, last=1)
    if events and events[-1]["event"] == ENDED_EVENT:
        return dict(events[-1]["data"] or {})
    return {}


async def run_outcome(
    store: Store, run: RunRow, *, workdir: Path | None, now: float | None = None,
    state: str | None = None, exit_code: int | None = None, stop_kind: str | None = None,
    states: Mapping[str, int] | None = None,
) -> tuple[str, Outcome]:
    """The run's state as screens show it and its :class:`Outcome` (what the next steps are
    keyed by). ``state``/``exit_code``/``stop_kind`` come from the process ending the run;
    otherwise they are read from the lease and the last ``run.ended`` event."""
    if state is None:
        state = await display_state(store, run, now)
        # The end record belongs to an earlier invocation once a newer one took the lease.
        end = {} if run.lease_owner is not None else await last_end(store, run.run_id)
        exit_code, stop_kind = end.get("exit_code"), end.get("stop_kind")
    if states is None:
        states = {s.value: n for s, n in (await store.counts(run.run_id)).items()}
    return state, outcome_of(run.run_id, exit_code=exit_code, stop_kind=stop_kind,
                             states=states, manifest=run.manifest_path,
                             simulated=run.simulated, live=state == "running", workdir=workdir,
                             stop_reason=run.stop_reason)


async def _summary(store: Store, run: RunRow, now: float, workdir: Path | None
                   ) -> dict[str, Any]:
    counts = await store.counts(run.run_id)
    spent, committed = await store.money(run.run_id)
    units = await store.units(run.run_id)
    states = {s.value: n for s, n in counts.items()}
    state, outcome = await run_outcome(store, run, workdir=workdir, now=now, states=states)
    return {
        "run_id": run.run_id,
        "manifest": run.manifest_path,
        "provider": run.provider,
        "simulated": run.simulated,
        "state": state,
        "stop_reason": run.stop_reason,
        "exit_code": outcome.exit_code,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "heartbeat_at": run.lease_heartbeat,
        "process": (f"{run.lease_pid} on {run.lease_host}" if run.lease_pid is not None
                    else None),
        "jobs": sum(counts.values()),
        "counts": {s: states[s] for s in STATE_ORDER if states.get(s)},
        "in_flight": sum(counts.get(s, 0) for s in IN_FLIGHT),
        "cost_usd": round(spent, 4),
        "committed_usd": round(committed, 4),
        "cost_units": round(units, 4),
        "next_steps": next_steps(outcome),
        **await _budget(store, run),
    }


async def _budget(store: Store, run: RunRow) -> dict[str, Any]:
    """The run's caps from its manifest snapshot, and the units it has committed."""
    try:
        budget = json.loads(run.config_json).get("budget") or {}
    except (ValueError, AttributeError):
        budget = {}
    found: dict[str, Any] = {"max_usd": budget.get("max_usd"),
                             "max_units": budget.get("max_units")}
    if found["max_units"] is not None:
        found["committed_units"] = round((await store.money_units(run.run_id))[1], 4)
    return found


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


async def runs_table(workdir: Path, store: Location = None, *, now: float | None = None
                     ) -> list[dict[str, Any]]:
    """One summary per run in the store (default: the workdir's), newest first."""
    now = time.time() if now is None else now
    async with _db(workdir, store) as db:
        return [await _summary(db, run, now, workdir) for run in await db.list_runs()]


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
    """Counts by state, in flight, cost, ETA, failures by reason and the next step for one run.

    The ETA is given only while the run is alive: the jobs left at the pace of its last 20 to
    end (so a resumed run is not measured across the time it was stopped).
    """
    now = time.time() if now is None else now
    async with _db(workdir, store) as db:
        run = await db.require_run(run_id)
        data = await _summary(db, run, now, workdir)
        eta = None
        if data["state"] == "running":
            ended = sum(data["counts"].get(s.value, 0) for s in TERMINAL)
            eta = eta_seconds(data["jobs"] - ended, await db.recent_ends(run_id), now)
        data["eta_seconds"] = None if eta is None else round(eta)
        reasons: dict[str, int] = {}
        states = [JobState.FAILED, JobState.UNKNOWN, JobState.TIMED_OUT]
        async for row in db.iter_jobs(run_id, states):
            key = f"{row.state.value}: {row.error_code or '-'}"
            reasons[key] = reasons.get(key, 0) + 1
        data["problems"] = reasons
        data["store"] = db.location
        data["workers"] = await workers_table(db, run_id)
        return data


async def live_workers(workdir: Path, store: Location = None) -> list[dict[str, Any]]:
    """Every live worker in the store, with what it drives."""
    async with _db(workdir, store) as db:
        return await workers_table(db)


async def job_detail(workdir: Path, run_id: str, job_id: str,
                     store: Location = None) -> dict[str, Any]:
    """Everything the store knows of one job: the request, each attempt, its events, its file."""
    from batchkling.errors import RunNotFound

    async with _db(workdir, store) as db:
        run = await db.require_run(run_id)
        row = await db.get_job(run_id, job_id)
        if row is None:
            import difflib

            ids = [r.job_id async for r in db.iter_jobs(run_id)]
            close = difflib.get_close_matches(job_id, ids, n=1, cutoff=0.6) or [
                i for i in ids if job_id in i][:1]
            hint = (f" (did you mean {close[0]!r}?)" if close else
                    f"; `batchkling export {run_id}` lists its jobs")
            raise RunNotFound(f"run {run_id!r} has no job {job_id!r}{hint}")
        spec = row.spec
        attempts = await db.attempts(run_id, job_id)
        events = await db.events(run_id, job_id)
        run_state = await display_state(db, run)
    video: dict[str, Any] | None = None
    if row.video_path:
        exists = await anyio.Path(row.video_path).is_file()
        video = {"path": row.video_path, "exists": exists, "bytes": row.video_size,
                 "sha256": row.video_sha256}
    return {
        "run_id": run_id,
        "job_id": job_id,
        "state": row.state.value,
        "kind": spec.kind.value,
        "request": spec.request(),
        "images": {"image": spec.image, "image_tail": spec.image_tail},
        "variables": dict(spec.variables),
        "group": spec.group,
        "fingerprint": row.fingerprint,
        "task_id": row.task_id,
        "progress": row.progress,
        "cost_usd": row.cost_usd,
        "cost_units": row.cost_units,
        "reserved_usd": row.reserved_usd,
        "error_code": row.error_code,
        "error_message": row.error_message,
        "submitted_at": row.submitted_at,
        "completed_at": row.completed_at,
        "render_seconds": row.render_seconds,
        "video_url": row.video_url,
        "video": video,
        "attempts": [
            {**a, "render_seconds": (a["completed_at"] - a["submitted_at"]
                                     if a["completed_at"] and a["submitted_at"] else None)}
            for a in attempts
        ],
        "events": events,
        "next_step": job_next_step(run_id, job_id, row.state.value, error_code=row.error_code,
                                   retryable=row.retryable, where=_where(workdir)) or None,
        "run_state": run_state,
    }


def _where(workdir: Path) -> tuple[str, ...]:
    from batchkling.outputs.nextstep import location_args

    return location_args(workdir)


async def export_csv(workdir: Path, run_id: str, output: Path | None,
                     store: Location = None) -> Path:
    """Write the run's CSV to ``output`` (default: the run folder's results.csv)."""
    async with _db(workdir, store) as db:
        run = await db.require_run(run_id)
        dest = output or workdir / run_id / "results.csv"
        return await write_results(db, run_id, dest, download=run.downloads,
                                   where=_where(workdir))


def _stamp(ts: float | None) -> str:
    if ts is None:
        return "—"
    try:
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):  # not a date (a store written before #14)
        return "—"


def print_status(data: Any, *, single: bool, store: str | None = None) -> None:
    """Render ``status`` output for a person (``store``: where the runs were looked for)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    if single:
        process = ""
        if data["state"] == "running" and data.get("process"):
            process = f" (process {data['process']})"
        elif data["state"] == "interrupted" and data.get("process"):
            process = f" (its process {data['process']} is gone)"
        console.print(f"[bold]{escape(data['run_id'])}[/]  {data['state']}{process}  provider "
                      f"{data['provider']}{' (simulated)' if data['simulated'] else ''}")
        table = Table("state", "jobs")
        for state, n in data["counts"].items():
            table.add_row(state, f"{n:,}")
        console.print(table)
        eta = data.get("eta_seconds")
        cost = money_text(data["cost_usd"], data["committed_usd"], data.get("cost_units", 0.0))
        cost += budget_text(data)
        console.print(f"in flight {data['in_flight']} · cost {escape(cost)}"
                      + (f" · ETA {format_duration(eta)}" if eta is not None else ""))
        if data.get("stop_reason"):
            console.print(f"last stop: {escape(data['stop_reason'])}")
        for reason, n in data.get("problems", {}).items():
            console.print(f"  {n} × {escape(reason)}")
        for step in data.get("next_steps", []):
            console.print(f"next: {escape(step)}", soft_wrap=True)
        print_workers(data.get("workers", []))
        return
    if not data:
        where = f" in {store}" if store else ""
        console.print(f"no runs yet{escape(where)}: runs from another folder are in its "
                      "jobs/ (use --workdir DIR or BATCHKLING_HOME)", soft_wrap=True)
        return
    rows = []
    for run in data:
        counts = run["counts"]
        started = datetime.fromtimestamp(run["created_at"]).strftime("%b %d %H:%M")
        rows.append((run["run_id"], started, run["state"], f"{run['jobs']:,}",
                     f"{counts.get('downloaded', 0):,}", f"{counts.get('failed', 0):,}",
                     f"{run['in_flight']:,}", f"{run['cost_usd']:.2f}",
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
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    if store:
        console.print(f"store: {escape(store)}", soft_wrap=True)


def print_job(data: Mapping[str, Any]) -> None:
    """Render ``show`` output for a person."""
    from rich.console import Console
    from rich.markup import escape
    console = Console(highlight=False)
    console.print(f"[bold]{escape(data['job_id'])}[/] in run {escape(data['run_id'])} "
                  f"({data['run_state']}): {data['state']} · {data['kind']}")
    request = dict(data["request"])
    for key in ("image", "image_tail"):
        if data["images"].get(key):
            request[key] = data["images"][key]  # the path, not the content hash
    for key, value in request.items():
        console.print(f"  {key}: {escape(str(value))}", soft_wrap=True)
    if data["variables"]:
        console.print("  variables: " + escape(", ".join(
            f"{k}={v}" for k, v in data["variables"].items())), soft_wrap=True)
    console.print(f"attempts ({len(data['attempts'])}):")
    for a in data["attempts"]:
        render = a["render_seconds"]
        parts = [f"task {a['task_id'] or '—'}", a["state"],
                 f"submitted {_stamp(a['submitted_at'])}", f"ended {_stamp(a['completed_at'])}",
                 "render —" if render is None else f"render {render:.1f} s",
                 "cost —" if a["cost_usd"] is None else f"cost ${a['cost_usd']:.2f}"]
        error = " ".join(x for x in (a["error_code"], a["error_message"]) if x)
        if error:
            parts.append(f"error {error}")
        console.print(f"  #{a['number']}: " + escape(" · ".join(parts)), soft_wrap=True)
    console.print("events:")
    for event in data["events"]:
        extra = "" if not event["data"] else " " + escape(str(event["data"]))
        console.print(f"  {_stamp(event['at'])}  {escape(event['event'])}{extra}",
                      soft_wrap=True)
    video = data.get("video")
    if video:
        state = "" if video["exists"] else " (missing)"
        console.print(f"file: {escape(video['path'])}{state} · {video['bytes'] or 0:,} bytes"
                      f" · sha256 {video['sha256'] or '—'}", soft_wrap=True)
    else:
        console.print("file: none yet")
    if data.get("error_message"):
        console.print(f"error: {escape(data['error_code'] or '')} "
                      f"{escape(data['error_message'])}", soft_wrap=True)
    if data.get("next_step"):
        console.print(f"next: {escape(data['next_step'])}", soft_wrap=True)


def format_duration(seconds: float) -> str:
    """``4m05s``, or ``2h07m`` from an hour on."""
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
