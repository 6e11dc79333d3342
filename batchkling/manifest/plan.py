"""``batchkling plan``: the jobs a manifest would run, their cost and time — submitting nothing.

This is CLI-facing output code: it prints through rich (tables) or writes one JSON document.
Figures come from :mod:`batchkling.pricing`: the price table (labelled as estimates, ``table``),
or — given the store's :class:`~batchkling.pricing.History`, read by the caller — the price the
provider was last seen charging for the job's price group (``observed``); under ``reuse:
earlier-runs`` a job whose request an earlier run already rendered costs nothing (``earlier
run``).

A plan is made while the manifest expands: each job is priced, tallied and, for ``--json``,
written to a spool file as it comes, then dropped; the table keeps its first and last rows.
A million-job matrix is planned in the memory of its job ids, not of its jobs.

Against an existing run (``previous``: the run's ``{job_id: (fingerprint, state)}``, read from
the store by the caller — this module never reads the store) each job is classified as ``run``
would treat it: new, changed, unchanged (to submit), reused (already downloaded), in flight,
or left as it is (failed, unknown: ``retry`` decides) — and only what would be submitted is
priced into the total.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchkling.manifest.document import Manifest, load_manifest
from batchkling.models import JobSpec
from batchkling.pricing import (
    PRICE_TABLE_DATE,
    PRICE_TABLE_SOURCE,
    History,
    WallSimulation,
    estimate_render_seconds,
    estimate_usd,
    price_group,
)

#: Up to this many jobs the table shows every row; above, only the first and last rows.
MAX_TABLE_ROWS = 200
_EDGE_ROWS = 20
_PROMPT_CELL = 48
#: States of a previous job in which ``run`` leaves an unchanged job alone, and what to call it.
_KEPT = {"downloaded": "reused", "succeeded": "reused", "submitting": "in flight",
         "submitted": "in flight", "running": "in flight", "timed_out": "in flight",
         "failed": "kept: failed", "unknown": "kept: unknown", "skipped": "kept: skipped"}
_IN_FLIGHT = ("submitting", "submitted", "running")


def against_run(spec: JobSpec, previous: tuple[str, str] | None) -> str:
    """What ``run`` would do with ``spec`` given the run's stored ``(fingerprint, state)``:
    ``new``, ``changed`` or ``unchanged`` (all submitted), or why it is not submitted."""
    if previous is None:
        return "new"
    fingerprint, state = previous
    if fingerprint != spec.fingerprint:
        # A changed job whose task is in flight keeps it (the run's sync does not touch it).
        return "in flight" if state in _IN_FLIGHT else "changed"
    return _KEPT.get(state, "unchanged")


def submits(status: str | None) -> bool:
    """Whether a job so classified would be submitted (no comparison: every job is)."""
    return status in (None, "new", "changed", "unchanged")


@dataclass(slots=True)
class _Row:
    index: int
    spec: JobSpec
    cost: float
    status: str | None
    basis: str = "table"  # table | observed | earlier run


@dataclass(slots=True)
class Plan:
    """A plan being made, fed one job at a time by :meth:`add`; then its totals."""

    manifest_name: str
    pricing: Mapping[str, float] | None
    slots: int
    submit_rate: float
    max_usd: float | None
    previous: Mapping[str, tuple[str, str]] | None = None
    run_id: str | None = None
    committed_usd: float = 0.0  # already committed by the run compared against
    spool: TextIO | None = None
    #: What the store knows (observed prices, videos earlier runs rendered), the manifest's
    #: provider (prices are kept per provider) and whether it says ``reuse: earlier-runs``.
    history: History = field(default_factory=History)
    provider: str = "imarouter"
    reuse: bool = False
    count: int = 0
    total_usd: float = 0.0  # what would be submitted
    all_usd: float = 0.0  # every job, as if none were done
    video_seconds: int = 0
    jobs_within_budget: int | None = None
    head: list[_Row] = field(default_factory=list)
    tail: deque[_Row] = field(default_factory=lambda: deque(maxlen=_EDGE_ROWS))
    by: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    usd_by: dict[str, defaultdict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    groups: dict[tuple[str, str], list[float]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0, 0.0]))
    statuses: Counter[str] = field(default_factory=Counter)
    bases: Counter[str] = field(default_factory=Counter)
    observed_usd: float = 0.0
    #: Jobs to submit whose request an earlier run already rendered, and their price.
    rendered_before: int = 0
    rendered_before_usd: float = 0.0
    seen: set[str] | None = None
    wall: WallSimulation | None = None
    _budget_spent: float = 0.0
    _budget_open: bool = True

    def __post_init__(self) -> None:
        self.wall = WallSimulation(slots=self.slots, submit_rate=self.submit_rate)
        if self.previous is not None:
            self.seen = set()
            self._budget_spent = self.committed_usd
        self.jobs_within_budget = None if self.max_usd is None else 0

    def add(self, spec: JobSpec) -> None:
        """Price, classify and tally the next job in plan order."""
        cost, basis = estimate_usd(spec, self.pricing), "table"
        observed = self.history.observed.get(price_group(self.provider, spec))
        if observed is not None and observed.usd is not None:
            cost, basis = round(observed.usd, 4), "observed"
        status = None
        if self.previous is not None:
            status = against_run(spec, self.previous.get(spec.job_id))
            self.statuses[status] += 1
            assert self.seen is not None
            self.seen.add(spec.job_id)
        if submits(status) and spec.fingerprint in self.history.reusable:
            self.rendered_before += 1
            self.rendered_before_usd += cost
            if self.reuse:
                cost, basis = 0.0, "earlier run"
        self.bases[basis] += 1
        if basis == "observed":
            self.observed_usd += cost
        row = _Row(self.count, spec, cost, status, basis)
        self.count += 1
        self.all_usd += cost
        self.video_seconds += spec.duration
        if submits(status):
            self.total_usd += cost
            assert self.wall is not None
            self.wall.add(estimate_render_seconds(spec))
            if self.max_usd is not None and self._budget_open:
                # The engine reserves in plan order and stops at the cap.
                if self._budget_spent + cost > self.max_usd + 1e-9:
                    self._budget_open = False
                else:
                    self._budget_spent += cost
                    self.jobs_within_budget = (self.jobs_within_budget or 0) + 1
        for key, attr in (("by_model", spec.model), ("by_mode", spec.mode or "-"),
                          ("by_kind", spec.kind.value)):
            self.by[key][attr] += 1
            self.usd_by[key][attr] += cost
        group = self.groups[(spec.model, spec.mode or "-")]
        group[0], group[1], group[2] = group[0] + 1, group[1] + spec.duration, group[2] + cost
        if len(self.head) < MAX_TABLE_ROWS:
            self.head.append(row)
        self.tail.append(row)
        if self.spool is not None:
            self.spool.write(("," if self.count > 1 else "")
                             + json.dumps(_job_json(row), ensure_ascii=False) + "\n")

    @property
    def over_budget(self) -> bool:
        """True when what would be submitted exceeds ``budget.max_usd``."""
        return self.max_usd is not None and (self.committed_usd + self.total_usd
                                             > self.max_usd + 1e-9)

    @property
    def submitted(self) -> int:
        """How many jobs would be submitted."""
        if self.previous is None:
            return self.count
        return sum(n for status, n in self.statuses.items() if submits(status))

    def removed(self) -> list[str]:
        """Jobs of the run that the manifest no longer has (``run`` marks them skipped)."""
        if self.previous is None or self.seen is None:
            return []
        return [job_id for job_id in self.previous if job_id not in self.seen]

    def totals(self) -> dict[str, Any]:
        """Job counts and estimated cost by model, by mode and by kind."""
        out: dict[str, Any] = {
            key: {k: {"jobs": n, "estimate_usd": round(self.usd_by[key][k], 2)}
                  for k, n in counter.items()}
            for key, counter in self.by.items()
        }
        out["jobs"] = self.count
        out["video_seconds"] = self.video_seconds
        return out


def _job_json(row: _Row) -> dict[str, Any]:
    spec = row.spec
    job: dict[str, Any] = {
        "id": spec.job_id, "kind": spec.kind.value, "model": spec.model,
        "duration": spec.duration, "size": spec.size, "mode": spec.mode,
        "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "image": spec.image,
        "image_tail": spec.image_tail, "fingerprint": spec.fingerprint,
        "estimate_usd": row.cost, "price_basis": row.basis,
        "variables": dict(spec.variables),
    }
    if row.status is not None:
        job["against_run"] = row.status
    return job


#: Given the manifest's name, the run to compare against: ``(its jobs as {job_id:
#: (fingerprint, state)}, its id, the money it has committed)``, or None for none.
Against = Callable[[str], "tuple[Mapping[str, tuple[str, str]], str, float] | None"]


def print_plan(path: Path, *, as_json: bool, max_in_flight: int | None,
               against: Against | None = None,
               history: Callable[[Manifest], History | None] | None = None) -> None:
    """Load ``path`` and print its plan, against the run ``against`` finds for the manifest's
    name (if any), at the prices ``history`` says the store observed; ManifestError propagates
    (the CLI reports it, exit 2)."""
    spool_fd, spool_name = tempfile.mkstemp(prefix="batchkling-plan-", suffix=".json")
    try:
        with os.fdopen(spool_fd, "w+", encoding="utf-8") as spool:
            plans: list[Plan] = []

            def on_settings(m: Manifest) -> None:
                found = against(m.name) if against is not None else None
                previous, run_id, committed_usd = found if found else (None, None, 0.0)
                plans.append(Plan(m.name, m.price_overrides(),
                                  max_in_flight or m.limits.max_in_flight,
                                  m.limits.submit_rate, m.budget.max_usd, previous, run_id,
                                  committed_usd, spool if as_json else None,
                                  (history(m) if history is not None else None) or History(),
                                  m.provider.name, m.reuse == "earlier-runs"))

            def on_job(spec: JobSpec) -> None:
                if plans:  # without valid settings the load ends in ManifestError anyway
                    plans[0].add(spec)

            manifest = load_manifest(path, on_job=on_job, on_settings=on_settings)
            plan = plans[0]
            err = Console(stderr=True, highlight=False)
            for warning in manifest.warnings:
                err.print(f"warning: {warning}", markup=False, soft_wrap=True)
            if as_json:
                spool.seek(0)
                _write_json(plan, manifest, spool, sys.stdout)
                return
        # A terminal gets its own width; a file or pipe gets room for long ids on one line.
        out = Console(highlight=False)
        if not out.is_terminal:
            out = Console(highlight=False, width=160)
        _print_human(plan, manifest, out)
    finally:
        os.unlink(spool_name)


def _write_json(plan: Plan, manifest: Manifest, spool: TextIO, out: TextIO) -> None:
    """The ``plan --json`` document, the jobs copied from the spool."""
    m = manifest
    tail: dict[str, Any] = {
        "totals": plan.totals(),
        "estimate_usd": round(plan.total_usd, 2),
        "estimate_seconds": round(_wall(plan).seconds, 1),
        "estimate_basis": {
            "price_table_date": PRICE_TABLE_DATE,
            "price_table_source": PRICE_TABLE_SOURCE,
            "pricing_overrides": m.pricing or {},
            "declared_models": sorted(m.models or {}),
            "observed_jobs": plan.bases["observed"],
            "table_jobs": plan.bases["table"],
            "max_in_flight": plan.slots,
            "submit_rate": m.limits.submit_rate,
            "bound_by": _wall(plan).bound,
        },
        "budget": {
            "max_usd": m.budget.max_usd,
            "exceeded": plan.over_budget,
            "jobs_within_budget": plan.jobs_within_budget,
        },
        "reuse": {
            "enabled": plan.reuse,
            "rendered_before": plan.rendered_before,
            "saved_usd": round(plan.rendered_before_usd, 2) if plan.reuse else 0.0,
        },
        "warnings": [str(w) for w in m.warnings],
    }
    if plan.previous is not None:
        tail["against_run"] = {
            "run_id": plan.run_id,
            "counts": dict(sorted(plan.statuses.items())),
            "removed": len(plan.removed()),
            "submitted_jobs": plan.submitted,
            "estimate_usd_if_all_new": round(plan.all_usd, 2),
            "committed_usd": round(plan.committed_usd, 2),
        }
    out.write('{"name": ' + json.dumps(m.name) + ', "jobs": [')
    shutil.copyfileobj(spool, out, 1 << 20)
    out.write("], " + json.dumps(tail, ensure_ascii=False)[1:] + "\n")


def _wall(plan: Plan) -> Any:
    assert plan.wall is not None
    return plan.wall.result()


def _print_human(plan: Plan, manifest: Manifest, out: Console) -> None:
    m = manifest
    n = plan.count
    title = f"{m.name}: {n:,} job{'s' if n != 1 else ''}"
    if plan.previous is not None:
        title += f" against run {plan.run_id}"
    table = Table(title=escape(title))
    columns = ["#", "id", "kind", "model", "dur", "size", "mode", "prompt", "image"]
    if plan.previous is not None:
        columns.append("plan")
    for column in columns:
        if column == "id":
            table.add_column(column, overflow="fold", min_width=12)  # ids are shown whole
        elif column in ("prompt", "image"):
            table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=_PROMPT_CELL)
        else:
            table.add_column(column, no_wrap=True)
    table.add_column("est. USD", justify="right")
    table.add_column("price", no_wrap=True)  # table (an estimate), observed, earlier run
    rows: list[_Row | int] = list(plan.head)
    if n > MAX_TABLE_ROWS:
        rows = [*plan.head[:_EDGE_ROWS], n - 2 * _EDGE_ROWS, *plan.tail]
    for row in rows:
        if isinstance(row, int):
            table.add_row("…", f"{row:,} more jobs not shown (use --json for all)",
                          *[""] * len(columns))
            continue
        spec = row.spec
        cells = [str(row.index + 1), escape(spec.job_id), spec.kind.value, spec.model,
                 f"{spec.duration}s", spec.size, spec.mode or "-",
                 escape(_shorten(spec.prompt)), escape(_images(spec))]
        if plan.previous is not None:
            cells.append(row.status or "")
        table.add_row(*cells, f"{row.cost:.2f}", row.basis)
    out.print(table)

    summary = Table(title="Totals (estimates, every job of the manifest)")
    for column in ("model", "mode", "jobs", "video s", "est. USD"):
        summary.add_column(column, justify="left" if column in ("model", "mode") else "right")
    for (model, mode), (jobs, seconds, usd) in sorted(plan.groups.items()):
        summary.add_row(model, mode, f"{int(jobs):,}", f"{int(seconds):,}", f"{usd:,.2f}")
    out.print(summary)

    if plan.previous is not None:
        counts = ", ".join(f"{k} {v:,}" for k, v in sorted(plan.statuses.items()))
        removed = len(plan.removed())
        out.print(f"Against run {escape(plan.run_id or '')}: {counts}"
                  + (f"; {removed:,} no longer in the manifest (would be skipped)"
                     if removed else ""))
        out.print(f"Would submit [bold]{plan.submitted:,}[/bold] of {n:,} jobs.")
    out.print(
        f"Estimated cost: [bold]${plan.total_usd:,.2f}[/bold]"
        + (f" of ${plan.all_usd:,.2f} for every job" if plan.previous is not None else "")
        + f" — {_sources(plan)}an ESTIMATE from the price table of {PRICE_TABLE_DATE} "
        f"({PRICE_TABLE_SOURCE})"
        + ("; manifest pricing overrides applied" if m.pricing else "")
        + ("; declared models (models:) at their declared prices" if m.models else "")
    )
    _print_reuse(plan, out)
    wall = _wall(plan)
    out.print(
        f"Estimated wall time: [bold]{_duration(wall.seconds)}[/bold] with "
        f"{plan.slots} task slot{'s' if plan.slots != 1 else ''} at "
        f"{m.limits.submit_rate:g} creates/s (typical render times; bound by {wall.bound})"
    )
    cap = m.budget.max_usd
    if cap is None:
        out.print("Budget: none set (budget.max_usd).")
    elif plan.over_budget:
        out.print(
            f"[bold red]Budget: the estimate exceeds budget.max_usd ${cap:,.2f}[/bold red]; "
            f"a run would stop creating after about {plan.jobs_within_budget:,} of "
            f"{plan.submitted:,} jobs."
        )
    else:
        out.print(f"Budget: within budget.max_usd ${cap:,.2f}.")
    out.print("Nothing was submitted.")


def _sources(plan: Plan) -> str:
    """Which figures are observed prices (and reused videos), before the table's caveat."""
    observed, reused, table = (plan.bases[b] for b in ("observed", "earlier run", "table"))
    if not observed and not reused:
        return "every figure (price 'table') is "
    parts = []
    if observed:
        parts.append(f"{observed:,} job{'s' if observed != 1 else ''} at the price the provider "
                     f"was observed to charge (${plan.observed_usd:,.2f}, price 'observed')")
    if reused:
        parts.append(f"{reused:,} taking an earlier run's video at $0 (price 'earlier run')")
    return f"{'; '.join(parts)}; {table:,} job{'s' if table != 1 else ''} (price 'table') at "


def _print_reuse(plan: Plan, out: Console) -> None:
    """How many jobs earlier runs already rendered, and what reusing them saves."""
    n = plan.rendered_before
    if not n:
        return
    jobs = f"{n:,} job{'s' if n != 1 else ''}"
    if plan.reuse:
        out.print(f"Reuse: {jobs} would take the verified video of an earlier run (reuse: "
                  f"earlier-runs), saving about ${plan.rendered_before_usd:,.2f}.")
    else:
        out.print(f"Reuse: {jobs} were already rendered by earlier runs; `reuse: earlier-runs` "
                  f"in the manifest would take those videos and save about "
                  f"${plan.rendered_before_usd:,.2f}.")


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _PROMPT_CELL else text[: _PROMPT_CELL - 1] + "…"


def _images(spec: JobSpec) -> str:
    names = [Path(p).name if "://" not in p else p for p in (spec.image, spec.image_tail) if p]
    return " → ".join(names)


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


__all__ = ["MAX_TABLE_ROWS", "Plan", "against_run", "print_plan", "submits"]
