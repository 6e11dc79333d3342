"""The live progress display for a person at a terminal (cron gets JSON log lines instead)."""

from __future__ import annotations

import contextlib

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from batchkling.errors import StoreError
from batchkling.outputs.views import format_duration
from batchkling.run.orchestrator import Orchestrator, Progress

_DONE = ("downloaded",)
_ORDER = ("pending", "submitting", "submitted", "running", "succeeded", "downloaded", "failed",
          "timed_out", "unknown", "skipped")
_STYLE = {"downloaded": "green", "failed": "red", "timed_out": "yellow", "unknown": "magenta",
          "running": "cyan", "submitted": "cyan", "succeeded": "green"}


def _eta(p: Progress) -> str:
    # The same pace as `status` (the last 20 jobs to end), so the two never disagree.
    return "—" if p.eta_seconds is None else format_duration(p.eta_seconds)


def render(p: Progress) -> Group:
    """One frame: a bar of finished jobs, counts by state, slots, money and ETA."""
    total = max(1, sum(p.counts.values()))
    done = sum(p.counts.get(s, 0) for s in _DONE)
    header = Text.assemble((f"{p.run_id}  ", "bold"), f"{done}/{total} downloaded  ",
                           f"slots {p.in_flight}/{p.slot_limit}  ",
                           f"cost ${p.spent_usd:.2f} (committed ${p.committed_usd:.2f})  ",
                           f"ETA {_eta(p)}")
    counts = Text("  ").join(Text(f"{state} {p.counts[state]}", style=_STYLE.get(state, ""))
                             for state in _ORDER if p.counts.get(state))
    # ProgressBar renders inline: a grid row keeps the bar and the counts on one tidy line.
    line = Table.grid(padding=(0, 2))
    line.add_column(width=40)
    line.add_column()
    line.add_row(ProgressBar(total=total, completed=done, width=40), counts)
    parts: list[Text | Table] = [header, line]
    if p.stop_reason:
        parts.append(Text(f"creates stopped: {p.stop_reason}", style="yellow"))
    return Group(*parts)


async def show_progress(orch: Orchestrator, console: Console) -> None:
    """Redraw until cancelled."""
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        try:
            while True:
                await _redraw(orch, live)
                await anyio.sleep(0.5)
        finally:
            with anyio.CancelScope(shield=True):
                await _redraw(orch, live)  # the final frame shows how the run ended


async def _redraw(orch: Orchestrator, live: Live) -> None:
    # A busy database must never disturb the run for the sake of a redraw.
    with contextlib.suppress(StoreError):
        live.update(render(await orch.progress()))
