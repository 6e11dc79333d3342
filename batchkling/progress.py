"""The live progress display for a person at a terminal (cron gets JSON log lines instead).

Every figure in a frame comes from one snapshot of the store's counts, so the frame agrees with
itself and with ``status``: the slots in use are the tasks that exist (``submitted`` +
``running``), which after a Ctrl-C are still rendering and still paid for; the states are named
as ``status`` names them. Each line is cut to the terminal's width, and when the terminal gets
narrower the previous frame is erased as the terminal has re-wrapped it, so no stale line
stays behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from batchkling.errors import StoreError
from batchkling.models import JobState
from batchkling.outputs.views import STATE_ORDER, format_duration, money_text
from batchkling.run.orchestrator import Orchestrator, Progress

_STYLE = {"downloaded": "green", "failed": "red", "timed_out": "yellow", "unknown": "magenta",
          "running": "cyan", "submitted": "cyan", "succeeded": "green"}
#: The states whose task exists at the provider and holds an account slot.
_SLOT_STATES = ("submitted", "running")
_ENDED = ("downloaded", "failed", "skipped")


@dataclass(frozen=True, slots=True)
class Estimate:
    """A first ETA before any job has ended: typical render time per job and the slots."""

    render_seconds: float
    started: float

    def eta(self, left: int, slots: int, now: float) -> float:
        """The waves of renders left, less the time the first wave has been going."""
        waves = math.ceil(left / max(1, slots))
        return max(0.0, waves * self.render_seconds - (now - self.started))


def slots_in_use(p: Progress) -> int:
    """Account slots held: the tasks that exist, from the same counts as the rest of a frame."""
    return sum(p.counts.get(s, 0) for s in _SLOT_STATES)


def render(p: Progress, *, estimate: Estimate | None = None, now: float | None = None,
           final: bool = False, width: int = 100) -> Group:
    """One frame: a bar of finished jobs, counts by state, slots, money and ETA.

    ``final`` drops the stop reason: the end-of-run summary says it once.
    """
    total = max(1, sum(p.counts.values()))
    done = p.counts.get("downloaded", 0)
    left = total - sum(p.counts.get(s, 0) for s in _ENDED)
    if p.eta_seconds is not None or left == 0:
        eta = "—" if p.eta_seconds is None else format_duration(p.eta_seconds)
    elif estimate is not None:
        seconds = estimate.eta(left, p.slot_limit, time.time() if now is None else now)
        eta = f"~{format_duration(seconds)} (estimate)"
    else:
        eta = "—"
    # What a person looks for first comes first: a narrow terminal cuts the end of the line.
    header = _line(Text.assemble(
        (f"{p.run_id}  ", "bold"), f"{done:,}/{total:,} downloaded  ",
        f"slots {slots_in_use(p)}/{p.slot_limit}  ", f"ETA {eta}  ",
        f"cost {money_text(p.spent_usd, p.committed_usd)}"))
    counts = _line(Text("  ").join(
        Text(f"{state} {p.counts[state]:,}", style=_STYLE.get(state, ""))
        for state in STATE_ORDER if p.counts.get(state)))
    # ProgressBar renders inline: a grid row keeps the bar and the counts on one tidy line.
    line = Table.grid(padding=(0, 2))
    line.add_column(width=max(10, min(40, width // 3)))
    line.add_column(no_wrap=True, overflow="ellipsis")
    line.add_row(ProgressBar(total=total, completed=done), counts)
    parts: list[Text | Table] = [header, line]
    if p.stop_reason and not final:
        parts.append(_line(Text(f"creates stopped: {p.stop_reason}", style="yellow")))
    return Group(*parts)


def _line(text: Text) -> Text:
    # One row whatever the width: a wrapped line would be a row the next redraw must find.
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


async def first_estimate(orch: Orchestrator) -> Estimate | None:
    """Typical render time of the run's next jobs (the price table's figures, sped up with the
    run), for an ETA from the first frame; None if the store cannot say."""
    from batchkling.pricing import estimate_render_seconds

    try:
        jobs = await orch.store.jobs_in(orch.run_id, [JobState.PENDING, JobState.SUBMITTED,
                                                      JobState.RUNNING], limit=200)
    except StoreError:
        return None
    if not jobs:
        return None
    mean = sum(estimate_render_seconds(j.spec) for j in jobs) / len(jobs)
    return Estimate(mean / max(orch.time_scale, 1e-9), time.time())


async def show_progress(orch: Orchestrator, console: Console) -> None:
    """Redraw until cancelled; the last frame shows how the run ended."""
    display = _Display(console)
    estimate: Estimate | None = None
    with display.live:
        try:
            while True:
                if estimate is None:  # the jobs appear once the manifest is synced
                    estimate = await first_estimate(orch)
                await display.redraw(orch, estimate)
                await anyio.sleep(0.5)
        finally:
            with anyio.CancelScope(shield=True):
                await display.redraw(orch, estimate, final=True)


class _Display:
    """A rich ``Live`` that also erases what the terminal re-wrapped when it got narrower."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = Live(console=console, auto_refresh=False, transient=False)
        self._widths: list[int] = []  # cells of each line of the frame on screen
        self._width = console.width

    def _terminal_width(self) -> int:
        """The terminal's width now. While a terminal is being resized it may report 0 columns
        (rich then assumes 80, and a frame drawn 80 wide in a narrower terminal leaves a stale
        line): then the last width stands."""
        try:
            columns = os.get_terminal_size(self.console.file.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        return columns or self._width

    async def redraw(self, orch: Orchestrator, estimate: Estimate | None, *,
                     final: bool = False) -> None:
        # A busy database must never disturb the run for the sake of a redraw.
        with contextlib.suppress(StoreError):
            progress = await orch.progress()
            width = self._terminal_width()
            self.console.width = width  # this frame, and rich's own bookkeeping, at this width
            frame = render(progress, estimate=estimate, final=final, width=width)
            if width < self._width and self._widths:
                # The terminal has wrapped each old line over ceil(cells / width) rows: erase
                # them all, not just as many rows as the frame had (rich's own assumption).
                rows = sum(max(1, math.ceil(w / width)) for w in self._widths)
                self.live._live_render._shape = (width, rows)
            self._width = width
            self.live.update(frame, refresh=True)
            lines = self.console.render_lines(frame, self.console.options, pad=False)
            self._widths = [Segment.get_line_length(line) for line in lines]
