"""Slots, create pacing, pauses, backoff and the poll planner — logic only, on virtual time."""

from __future__ import annotations

import itertools
import math
import random

import anyio
import pytest

from batchkling.run.limits import RateGate, SlotPool, full_jitter
from batchkling.run.polling import PollPlanner
from batchkling.testing import StepClock


class TestSlotPool:
    def test_rejection_shrinks_to_what_is_in_flight(self) -> None:
        """A concurrency rejection drops the limit to the tasks really held."""
        pool = SlotPool(10)
        for _ in range(4):
            pool.take()
        pool.rejected()  # the fourth create was refused: three tasks exist
        assert pool.limit == 3
        pool.release()
        assert pool.in_use == 3

    def test_limit_never_drops_below_one(self) -> None:
        """Even with nothing in flight, one create may still be tried."""
        pool = SlotPool(5)
        pool.take()
        pool.rejected()
        assert pool.limit == 1

    def test_successes_grow_the_limit_back_slowly(self) -> None:
        """After two rounds of successful creates at the current limit, one more slot."""
        pool = SlotPool(5)
        pool.limit = 2
        for _ in range(3):
            pool.created()
        assert pool.limit == 2
        pool.created()
        assert pool.limit == 3
        for _ in range(100):
            pool.created()
        assert pool.limit == 5

    async def test_acquire_waits_for_a_release(self) -> None:
        """acquire() blocks at the limit and proceeds when a slot comes back."""
        pool = SlotPool(1)
        await pool.acquire()
        order: list[str] = []

        async def second() -> None:
            await pool.acquire()
            order.append("second")

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.sleep(0.01)
            order.append("release")
            pool.release()
        assert order == ["release", "second"]
        assert pool.peak == 1


class TestRateGate:
    async def test_paces_to_the_rate(self) -> None:
        """Five callers at 2/s are spread half a second apart."""
        clock = StepClock()
        gate = RateGate(2.0, clock)
        times = []
        for _ in range(5):
            await gate.wait()
            times.append(clock.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps == pytest.approx([0.5] * 4)

    async def test_no_caller_passes_during_a_pause(self) -> None:
        """A Retry-After pause holds back every later caller until it ends."""
        clock = StepClock()
        gate = RateGate(100.0, clock)
        await gate.wait()
        gate.pause(30.0)
        paused_until = gate.paused_until
        await gate.wait()
        assert clock.monotonic() >= paused_until

    def test_pause_only_extends(self) -> None:
        """A shorter pause never cuts a longer one short."""
        clock = StepClock()
        gate = RateGate(None, clock)
        gate.pause(10)
        gate.pause(1)
        assert gate.paused_until == pytest.approx(clock.monotonic() + 10)


def test_full_jitter_is_bounded() -> None:
    """Backoff stays within [0, min(cap, base * 2**n)]."""
    rng = random.Random(1)
    for attempt in range(40):
        value = full_jitter(attempt, base=0.5, cap=20, rng=rng)
        assert 0 <= value <= min(20, 0.5 * 2**attempt)


class TestPollPlanner:
    def _planner(self) -> PollPlanner:
        return PollPlanner(min_interval=0.1, max_interval=600, rng=random.Random(0))

    def test_unknown_render_time_grows_geometrically(self) -> None:
        """With nothing learnt, intervals grow with elapsed time (log polls for any length)."""
        planner = self._planner()
        elapsed, polls = 0.0, 0
        while elapsed < 300:
            elapsed += planner.next_delay("g", elapsed=elapsed, progress=None, polls=polls)
            polls += 1
        # Each delay is half the elapsed time: x1.5 per poll from a 0.2 s start.
        assert polls <= math.log(300 / 0.2, 1.5) + 2

    def test_first_poll_aims_at_half_the_typical_time(self) -> None:
        """Once tasks of a group have finished, the first poll comes at about half their time."""
        planner = self._planner()
        for seconds in (80, 90, 100):
            planner.observe("g", seconds)
        delay = planner.next_delay("g", elapsed=0, progress=None, polls=0)
        assert delay == pytest.approx(45, rel=0.06)

    def test_progress_predicts_the_finish(self) -> None:
        """At 50% after 45 s, the next poll lands just after the predicted 90 s finish."""
        planner = self._planner()
        delay = planner.next_delay("g", elapsed=45, progress=50, polls=1)
        assert 45 <= delay <= 48

    def test_provider_hint_is_a_floor(self) -> None:
        """openai-poll-after-ms is honoured."""
        planner = self._planner()
        assert planner.next_delay("g", elapsed=0, progress=None, polls=0, hint=7) >= 7

    def test_bounds(self) -> None:
        """Delays stay between the floor and the ceiling."""
        planner = PollPlanner(min_interval=5, max_interval=60, rng=random.Random(0))
        assert planner.next_delay("g", elapsed=0, progress=None, polls=0) >= 5
        planner.observe("g", 10_000)
        assert planner.next_delay("g", elapsed=0, progress=None, polls=0) <= 60
