"""The virtual clock the fault tests run on: time moves only when nothing real is under way."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from conftest import TEST_KEY

from batchkling.run.orchestrator import Orchestrator
from batchkling.store.sqlite import SqliteStore
from batchkling.testing import VirtualClock, VirtualSim

pytestmark = pytest.mark.timeout(60)
REAL_WORK = 0.2  # real seconds: forty times the clock's quiet check (4 rounds of 5 ms)


async def _alongside_a_sleeper(clock: VirtualClock, work: Any) -> tuple[float, float]:
    """Virtual time before and after ``work`` while another task sleeps 10 virtual s."""
    async with clock.running(), anyio.create_task_group() as tg:
        tg.start_soon(clock.sleep, 10.0)
        await anyio.lowlevel.checkpoint()  # the sleeper parks; no real time passes
        before = clock.monotonic()
        await work()
        after = clock.monotonic()
        await clock.sleep(20.0)  # afterwards time moves again
    return before, after


async def test_time_stands_still_while_a_worker_thread_runs() -> None:
    """A blocking call in ``anyio.to_thread`` (a download's fsync) does not let time jump
    to the sleeper's deadline under it."""
    clock = VirtualClock()
    before, after = await _alongside_a_sleeper(
        clock, lambda: anyio.to_thread.run_sync(time.sleep, REAL_WORK))
    assert after == before
    assert clock.monotonic() >= before + 20.0


async def test_time_stands_still_inside_hold() -> None:
    clock = VirtualClock()

    async def held() -> None:
        with clock.hold():
            await anyio.sleep(REAL_WORK)

    before, after = await _alongside_a_sleeper(clock, held)
    assert after == before


async def test_time_jumps_when_nothing_holds_it() -> None:
    """The control: the same real wait without a hold is quiet, and time jumps."""
    clock = VirtualClock()
    before, after = await _alongside_a_sleeper(clock, lambda: anyio.sleep(REAL_WORK))
    assert after >= before + 10.0


async def test_a_slow_state_database_does_not_let_time_run_past_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite write taking 30 real ms (a slow disk) does not make virtual time jump
    to a helper's deadline before the run has sent its first create."""
    write = SqliteStore._write

    async def slow_write(self: SqliteStore, statements: Any) -> None:
        await anyio.sleep(0.03)
        await write(self, statements)

    monkeypatch.setattr(SqliteStore, "_write", slow_write)
    vs = VirtualSim({"BATCHKLING_TEST_KEY": TEST_KEY})
    start = vs.clock.monotonic()

    async def late_helper(_orch: Orchestrator) -> None:
        await vs.clock.sleep(600)

    summary = await vs.run(vs.manifest(tmp_path, 2), tmp_path / "jobs", during=late_helper)
    assert summary.exit_code == 0
    first_create = vs.requests.creates()[0][0]
    assert first_create - start < 60, first_create - start
