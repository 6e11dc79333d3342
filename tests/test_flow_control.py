"""Slots, create pacing, pauses and backoff — logic only, on virtual time (polls:
test_polling.py)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from batchkling.run.limits import (
    RateGate,
    SlotPool,
    full_jitter,
    is_probe,
    limit_after_rejection,
    limit_after_success,
    probe_after,
)
from batchkling.testing import StepClock


class TestSlotDiscovery:
    """The pure rules SlotPool applies (and an account-wide slot count can reuse)."""

    def test_a_refusal_sets_the_limit_to_what_was_in_flight(self) -> None:
        """Refused with 10 held: the account has room for 10, whatever the limit was."""
        assert limit_after_rejection(10, 30) == 10
        assert limit_after_rejection(12, 8) == 8  # never raised by a refusal
        assert limit_after_rejection(0, 5) == 1  # one create may always be tried

    def test_creates_past_the_proven_level_are_probes(self) -> None:
        """Holding as many as the account has accepted, one more is a probe."""
        assert is_probe(10, 10)
        assert not is_probe(9, 10)

    def test_probes_come_rarer_after_each_refusal(self) -> None:
        """One round of the limit while probes pass; two rounds after a refusal, then x4."""
        assert probe_after(10, 0) == 10
        assert [probe_after(10, n) for n in (1, 2, 3)] == [20, 80, 320]
        assert probe_after(10, 50) == probe_after(10, 4)  # bounded

    def test_growth_is_one_slot_at_a_time_up_to_the_maximum(self) -> None:
        """The limit grows by one once the streak reaches probe_after, never past the max."""
        assert limit_after_success(10, 30, streak=19, refused_probes=1) == 10
        assert limit_after_success(10, 30, streak=20, refused_probes=1) == 11
        assert limit_after_success(30, 30, streak=10_000, refused_probes=0) == 30


class TestSlotPool:
    async def test_refusal_counts_the_refused_create_as_still_held(self) -> None:
        """Refused while four tasks exist: the limit is four, not three (the refused create's
        slot is given back after the count, not before)."""
        pool = SlotPool(10)
        for _ in range(4):
            pool.take()
        await pool.acquire()
        assert pool.rejected() == 4
        assert pool.limit == 4
        assert pool.in_use == 4

    async def test_limit_never_drops_below_one(self) -> None:
        """Even with nothing in flight, one create may still be tried."""
        pool = SlotPool(5)
        await pool.acquire()
        pool.rejected()
        assert pool.limit == 1

    async def test_three_times_the_slots_learns_the_limit_in_one_refusal(self) -> None:
        """max 30 on a 10-slot account: creates past what the account accepted go one at a
        time, so the first refusal comes with exactly 10 held and sets the limit to 10."""
        pool = SlotPool(30)
        account, refused = 10, 0
        for _ in range(40):
            await pool.acquire()
            assert pool._creating == 1 or pool.in_use <= pool.proven
            if pool.in_use - 1 >= account:
                refused += 1
                pool.rejected()
                break
            pool.created()
        assert refused == 1 and pool.limit == 10 and pool.in_use == 10

    async def test_a_probe_waits_for_the_creates_under_way(self) -> None:
        """Past the proven level, a second create waits until the first is answered."""
        pool = SlotPool(5)
        await pool.acquire()  # the first create, a probe: nothing proven yet
        assert await _second_acquire_after(pool, pool.created) == ["before", "second"]

    async def test_growth_after_refusals_is_additive_and_rarer(self) -> None:
        """After a refusal at 10, the limit tries 11 only after 20 successful creates; a
        refused probe puts it back to 10 and the next try waits 80."""
        pool = SlotPool(30)
        for _ in range(10):
            pool.take()
        await pool.acquire()
        pool.rejected()  # the first refusal: limit 10

        async def one_task_ends_another_starts() -> None:
            pool.release()
            await pool.acquire()
            pool.created()

        for _ in range(19):
            await one_task_ends_another_starts()
        assert pool.limit == 10
        await one_task_ends_another_starts()
        assert pool.limit == 11
        await pool.acquire()  # the probe for an 11th slot
        pool.rejected()
        assert pool.limit == 10
        for _ in range(79):
            await one_task_ends_another_starts()
        assert pool.limit == 10
        await one_task_ends_another_starts()
        assert pool.limit == 11

    async def test_acquire_waits_for_a_release(self) -> None:
        """acquire() blocks at the limit and proceeds when a slot comes back."""
        pool = SlotPool(1)
        await pool.acquire()
        pool.created()
        assert await _second_acquire_after(pool, pool.release) == ["before", "second"]
        assert pool.peak == 1

    async def test_the_peak_counts_tasks_not_creates_that_made_none(self) -> None:
        """A slot taken for a create that was refused or made no task is not a task in
        flight: the peak (the run's peak_in_flight) counts tasks that exist."""
        pool = SlotPool(5)
        await pool.acquire()
        pool.created()
        await pool.acquire()
        pool.cancel()
        await pool.acquire()
        pool.rejected()
        assert pool.peak == 1


async def _second_acquire_after(pool: SlotPool, event: Callable[[], Any]) -> list[str]:
    """Start an ``acquire`` that must wait, then call ``event``: the order things happened."""
    order: list[str] = []

    async def second() -> None:
        await pool.acquire()
        order.append("second")

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.01)
        order.append("before")
        event()
    return order


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
