"""What to do next: one answer, keyed by how a run ended, for every screen that gives one.

The command line's end-of-run lines, ``status``, the CSV's ``next_step`` column and the report
all ask here, so they never disagree and none of them names a command that cannot help: a run
stopped by its budget is not told to ``resume`` (which would stop again at once), a run with
``unknown`` jobs is told to ``retry --unknown`` (``resume`` leaves them alone), and every hint
names the real run id and the options that find its store.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Jobs whose provider task exists (or is being created) and may still render or download.
_UNDER_WAY = ("submitting", "submitted", "running", "succeeded")


def location_args(workdir: str | os.PathLike[str] | None) -> tuple[str, ...]:
    """The options a hinted command needs to find this workdir's store (none for the default)."""
    if workdir is None:
        return ()
    default = os.environ.get("BATCHKLING_HOME") or "jobs"
    if os.path.abspath(workdir) == os.path.abspath(default):
        return ()
    return ("--workdir", os.fspath(workdir))


def command(*words: str) -> str:
    """A ``batchkling`` command line, quoted for a POSIX shell, in backticks."""
    return "`" + shlex.join(("batchkling", *words)) + "`"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run stands or ended, as far as the next step depends on it."""

    run_id: str
    #: The exit code of the invocation that ended it; None while it runs, or when its process
    #: died without saying (killed, or stopped before it began: bad key).
    exit_code: int | None
    #: Why creates stopped (``budget``, ``account``, ``unreachable``, ``store``, ``interrupted``).
    stop_kind: str | None
    #: Jobs by store state.
    states: Mapping[str, int]
    manifest: str | None = None
    simulated: bool = False
    live: bool = False
    #: Options that locate the store (``--workdir DIR``), added to every hinted command.
    where: Sequence[str] = field(default_factory=tuple)
    #: The budget setting that stopped creates, when the budget did.
    cap: str = "budget.max_usd"


def _n(states: Mapping[str, int], *names: str) -> int:
    return sum(states.get(name, 0) for name in names)


def _jobs(n: int) -> str:
    return f"{n:,} job{'s' if n != 1 else ''}"


def run_command(o: Outcome) -> str:
    """``batchkling run MANIFEST --run-id ID`` for this run (with ``--simulate`` if it was)."""
    manifest = o.manifest or "MANIFEST.yaml"
    return command("run", manifest, "--run-id", o.run_id,
                   *(("--simulate",) if o.simulated else ()), *o.where)


def next_steps(o: Outcome) -> list[str]:
    """What to do now, most important first; empty when there is nothing left to do.

    Each hint is a command that makes progress on this run as it stands (a test runs every one
    of them), or says what a person must fix first.
    """
    if o.live:
        return [f"it is running: {command('status', o.run_id, *o.where)} shows how far it got"]
    states = o.states
    under_way = _n(states, *_UNDER_WAY)
    pending, timed_out = _n(states, "pending"), _n(states, "timed_out")
    unknown, failed = _n(states, "unknown"), _n(states, "failed")
    resume = command("resume", o.run_id, *o.where)
    steps: list[str] = []
    left = []
    if under_way:
        left.append(f"picks up the {_jobs(under_way)} whose task is under way")
    if timed_out:
        left.append(f"polls the {_jobs(timed_out)} that timed out again")
    if pending:
        left.append(f"creates the {_jobs(pending)} not started")
    if o.stop_kind == "account" or o.exit_code == 4:
        steps.append("the provider refused the account: fix its key or credits, then "
                     f"{resume} ({'; '.join(left) or 'continues the run'})")
    elif o.stop_kind == "budget" and pending:
        steps.append(f"the budget stopped creates: raise {o.cap} in "
                     f"{o.manifest or 'the manifest'}, then {run_command(o)} (it creates the "
                     f"{_jobs(pending)} not started; finished jobs are never paid twice)")
        if under_way or timed_out:
            steps.append(f"or, without raising it, {resume} finishes the tasks already paid for")
    elif left:
        steps.append(f"{resume} {', '.join(left)}")
    if unknown:
        steps.append(f"{command('retry', o.run_id, '--unknown', *o.where)} resubmits the "
                     f"{_jobs(unknown)} whose create got no clear answer, with the same "
                     "idempotency key (a provider that honours it does not bill twice)")
    if failed:
        steps.append(f"{command('retry', o.run_id, *o.where)} gives the {_jobs(failed)} that "
                     "failed a new task (read why first in report.html: a refused prompt fails "
                     f"again until you change it and {run_command(o)})")
    return steps


def job_next_step(run_id: str, job_id: str, state: str, *, error_code: str | None = None,
                  retryable: bool | None = None, where: Sequence[str] = ()) -> str:
    """What to do about one job in ``state`` (empty when nothing: it is done or under way)."""
    if state in ("downloaded", "skipped") or (state not in ("unknown", "timed_out", "failed")
                                               and not error_code):
        return ""  # the common case, asked once per job of a 100,000-job report
    resume = command("resume", run_id, *where)
    if state == "unknown":
        return (f"{command('retry', run_id, '--unknown', *where)} resubmits it with the same "
                "idempotency key")
    if state == "timed_out":
        return f"{resume} polls its task again"
    if state == "failed":
        if retryable is False:
            return ("a new task would fail the same way: change the job (or the manifest's "
                    "output settings) and run the manifest again")
        return f"{command('retry', run_id, '--job', job_id, *where)} gives it a new task"
    if state == "succeeded" and error_code:
        return f"{resume} downloads it again (the render is kept)"
    if state in ("submitted", "running") and error_code:
        return f"{resume} polls its task again once the account works"
    if state == "pending" and error_code:
        return f"{resume} creates it"
    return ""


def outcome_of(run_id: str, *, exit_code: int | None, stop_kind: str | None,
               states: Mapping[str, int], manifest: str | None, simulated: bool, live: bool,
               workdir: str | os.PathLike[str] | Path | None,
               stop_reason: str | None = None) -> Outcome:
    """An :class:`Outcome` with the store's location turned into command options; a budget's
    ``stop_reason`` names the cap it reached (``budget.max_usd`` or ``budget.max_units``)."""
    cap = "budget.max_units" if "budget.max_units" in (stop_reason or "") else "budget.max_usd"
    return Outcome(run_id, exit_code, stop_kind, dict(states), manifest, simulated, live,
                   location_args(workdir), cap)


__all__ = ["Outcome", "command", "job_next_step", "location_args", "next_steps", "outcome_of",
           "run_command"]
