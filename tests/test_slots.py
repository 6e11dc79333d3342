"""Slot discovery in whole runs: a limit set too high costs a refusal or two, not a storm, and
refused creates never leave freed slots idle (virtual time)."""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_KEY
from invariants import check_invariants

from batchkling.testing import VirtualSim

pytestmark = pytest.mark.timeout(120)
RUN = "test-run"


def _vsim(**config: Any) -> VirtualSim:
    return VirtualSim({"BATCHKLING_TEST_KEY": TEST_KEY}, **config)


def _ideal(vs: VirtualSim, slots: int) -> float:
    """The list schedule of the drawn slot times, in creation order, no detection lag."""
    tasks = sorted(vs.sim.task_table(), key=lambda t: t["created_at"])
    free = [tasks[0]["created_at"]] * slots
    end = 0.0
    for t in tasks:
        start = heapq.heappop(free)
        done = start + t["ends_at"] - t["created_at"]
        end = max(end, done)
        heapq.heappush(free, done)
    return end - tasks[0]["created_at"]


async def test_three_times_the_slots_costs_at_most_three_refusals(tmp_path: Path,
                                                                  workdir: Path) -> None:
    """max_in_flight 30 on a 10-slot account, 80 jobs: the first refusal sets the limit to
    10 (creates past what the account accepted go one at a time), later probes are rare, and
    the account never holds more than 10 tasks."""
    vs = _vsim(slot_limit=10)
    n = 80
    summary = await vs.run(vs.manifest(tmp_path, n, limits={"max_in_flight": 30,
                                                             "submit_rate": 1000}), workdir)
    assert summary.exit_code == 0, summary
    stats = vs.stats()
    assert stats["peak_slots"] == 10
    assert stats["rejected"].get("slots", 0) <= 3, stats["rejected"]
    check_invariants(workdir, RUN, stats, jobs=n)


async def test_refusals_leave_no_slot_idle(tmp_path: Path, workdir: Path) -> None:
    """A 2-slot account under max_in_flight 6: refused creates wait for a task of the run to
    end, not for a backoff timer, so the makespan stays within 10 % of the ideal schedule."""
    vs = _vsim(slot_limit=2, render_sigma=0.1, queue_s=0.0)
    n = 24
    summary = await vs.run(vs.manifest(tmp_path, n, limits={"max_in_flight": 6,
                                                             "submit_rate": 1000}), workdir)
    assert summary.exit_code == 0, summary
    tasks = vs.sim.task_table()
    makespan = max(t["seen_done_at"] for t in tasks) - min(t["created_at"] for t in tasks)
    assert makespan <= 1.10 * _ideal(vs, 2), (makespan, _ideal(vs, 2))
