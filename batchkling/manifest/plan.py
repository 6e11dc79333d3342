"""``batchkling plan``: the jobs a manifest would run, their cost and time — submitting nothing.

This is CLI-facing output code: it prints through rich (tables) or writes one JSON document.
All figures come from :mod:`batchkling.pricing` and are labelled as estimates.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from batchkling.manifest.document import Manifest, load_manifest
from batchkling.models import JobSpec
from batchkling.pricing import (
    PRICE_TABLE_DATE,
    PRICE_TABLE_SOURCE,
    estimate_render_seconds,
    estimate_usd,
    estimate_wall_seconds,
)

#: Above this many jobs the table shows only the first and last rows.
MAX_TABLE_ROWS = 200
_EDGE_ROWS = 20


@dataclass(frozen=True, slots=True)
class Plan:
    """Estimates for one manifest: per-job costs (plan order) and the totals derived from them."""

    manifest: Manifest
    costs: tuple[float, ...]
    total_usd: float
    wall_seconds: float
    wall_bound: str
    slots: int
    jobs_within_budget: int | None  # None when there is no budget

    @property
    def over_budget(self) -> bool:
        """True when the estimated total exceeds ``budget.max_usd``."""
        cap = self.manifest.budget.max_usd
        return cap is not None and self.total_usd > cap + 1e-9


def make_plan(manifest: Manifest, *, max_in_flight: int | None = None) -> Plan:
    """Estimate cost and wall time of a loaded manifest (``max_in_flight`` overrides limits)."""
    specs = manifest.specs
    overrides = manifest.pricing
    costs = tuple(estimate_usd(spec, overrides) for spec in specs)
    slots = max_in_flight or manifest.limits.max_in_flight
    wall = estimate_wall_seconds(
        (estimate_render_seconds(spec) for spec in specs),
        slots=slots,
        submit_rate=manifest.limits.submit_rate,
    )
    within: int | None = None
    cap = manifest.budget.max_usd
    if cap is not None:
        spent, within = 0.0, 0
        for cost in costs:  # the engine reserves in plan order and stops at the cap
            if spent + cost > cap + 1e-9:
                break
            spent += cost
            within += 1
    return Plan(
        manifest, costs, round(math.fsum(costs), 2), wall.seconds, wall.bound, slots, within
    )


def totals(specs: Sequence[JobSpec], costs: Sequence[float]) -> dict[str, Any]:
    """Job counts and estimated cost by model, by mode and by kind."""
    out: dict[str, Any] = {}
    for key, attr in (("by_model", "model"), ("by_mode", "mode"), ("by_kind", "kind")):
        jobs: Counter[str] = Counter()
        usd: defaultdict[str, float] = defaultdict(float)
        for spec, cost in zip(specs, costs, strict=True):
            value = str(getattr(spec, attr) or "-")
            jobs[value] += 1
            usd[value] += cost
        out[key] = {k: {"jobs": jobs[k], "estimate_usd": round(usd[k], 2)} for k in jobs}
    out["jobs"] = len(specs)
    out["video_seconds"] = sum(spec.duration for spec in specs)
    return out


def plan_document(plan: Plan) -> dict[str, Any]:
    """The ``plan --json`` document."""
    m = plan.manifest
    jobs = [
        {
            "id": spec.job_id,
            "kind": spec.kind.value,
            "model": spec.model,
            "duration": spec.duration,
            "size": spec.size,
            "mode": spec.mode,
            "fingerprint": spec.fingerprint,
            "estimate_usd": cost,
            "variables": spec.variables,
        }
        for spec, cost in zip(m.specs, plan.costs, strict=True)
    ]
    return {
        "name": m.name,
        "jobs": jobs,
        "totals": totals(m.specs, plan.costs),
        "estimate_usd": plan.total_usd,
        "estimate_seconds": round(plan.wall_seconds, 1),
        "estimate_basis": {
            "price_table_date": PRICE_TABLE_DATE,
            "price_table_source": PRICE_TABLE_SOURCE,
            "pricing_overrides": m.pricing or {},
            "max_in_flight": plan.slots,
            "submit_rate": m.limits.submit_rate,
            "bound_by": plan.wall_bound,
        },
        "budget": {
            "max_usd": m.budget.max_usd,
            "exceeded": plan.over_budget,
            "jobs_within_budget": plan.jobs_within_budget,
        },
        "warnings": [str(w) for w in m.warnings],
    }


def print_plan(path: Path, *, as_json: bool, max_in_flight: int | None) -> None:
    """Load ``path`` and print its plan; ManifestError propagates (the CLI reports it, exit 2)."""
    manifest = load_manifest(path)
    err = Console(stderr=True, highlight=False)
    for warning in manifest.warnings:
        err.print(f"warning: {warning}", markup=False, soft_wrap=True)
    plan = make_plan(manifest, max_in_flight=max_in_flight)
    if as_json:
        # Written directly: one machine-readable document, no wrapping or highlighting.
        sys.stdout.write(json.dumps(plan_document(plan), ensure_ascii=False) + "\n")
        return
    # A terminal gets its own width; a file or pipe gets room for long ids on one line.
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=160)
    _print_human(plan, out)


def _rows(
    specs: Sequence[JobSpec], costs: Sequence[float]
) -> Iterable[tuple[int, JobSpec, float] | int]:
    n = len(specs)
    if n <= MAX_TABLE_ROWS:
        yield from ((i, specs[i], costs[i]) for i in range(n))
        return
    yield from ((i, specs[i], costs[i]) for i in range(_EDGE_ROWS))
    yield n - 2 * _EDGE_ROWS  # the number of rows left out
    yield from ((i, specs[i], costs[i]) for i in range(n - _EDGE_ROWS, n))


def _print_human(plan: Plan, out: Console) -> None:
    m = plan.manifest
    specs = m.specs
    table = Table(title=f"{m.name}: {len(specs):,} job{'s' if len(specs) != 1 else ''}")
    for column in ("#", "id", "kind", "model", "dur", "size", "mode"):
        if column == "id":
            table.add_column(column, overflow="fold", min_width=12)  # ids are shown whole
        else:
            table.add_column(column, no_wrap=True)
    table.add_column("est. USD", justify="right")
    for row in _rows(specs, plan.costs):
        if isinstance(row, int):
            table.add_row("…", f"{row:,} more jobs not shown (use --json for all)", *[""] * 6)
            continue
        i, spec, cost = row
        table.add_row(
            str(i + 1),
            spec.job_id,
            spec.kind.value,
            spec.model,
            f"{spec.duration}s",
            spec.size,
            spec.mode or "-",
            f"{cost:.2f}",
        )
    out.print(table)

    summary = Table(title="Totals (estimates)")
    for column in ("model", "mode", "jobs", "video s", "est. USD"):
        summary.add_column(column, justify="left" if column in ("model", "mode") else "right")
    groups: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for spec, cost in zip(specs, plan.costs, strict=True):
        g = groups[(spec.model, spec.mode or "-")]
        g[0], g[1], g[2] = g[0] + 1, g[1] + spec.duration, g[2] + cost
    for (model, mode), (jobs, seconds, usd) in sorted(groups.items()):
        summary.add_row(model, mode, f"{int(jobs):,}", f"{int(seconds):,}", f"{usd:,.2f}")
    out.print(summary)

    out.print(
        f"Estimated cost: [bold]${plan.total_usd:,.2f}[/bold] — an ESTIMATE from the price "
        f"table of {PRICE_TABLE_DATE} ({PRICE_TABLE_SOURCE})"
        + ("; manifest pricing overrides applied" if m.pricing else "")
    )
    out.print(
        f"Estimated wall time: [bold]{_duration(plan.wall_seconds)}[/bold] with "
        f"{plan.slots} task slot{'s' if plan.slots != 1 else ''} at "
        f"{m.limits.submit_rate:g} creates/s (typical render times; bound by "
        f"{plan.wall_bound})"
    )
    cap = m.budget.max_usd
    if cap is None:
        out.print("Budget: none set (budget.max_usd).")
    elif plan.over_budget:
        out.print(
            f"[bold red]Budget: the estimate exceeds budget.max_usd ${cap:,.2f}[/bold red]; "
            f"a run would stop creating after about {plan.jobs_within_budget:,} of "
            f"{len(specs):,} jobs."
        )
    else:
        out.print(f"Budget: within budget.max_usd ${cap:,.2f}.")
    out.print("Nothing was submitted.")


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
