"""Flow control: account task slots, create pacing, shared pauses, and backoff.

Slots follow additive-increase / multiplicative-decrease: a concurrency rejection drops the
effective limit to what is really in flight (the account holds fewer slots than configured, or
another client shares them), and a run of successful creates grows it back by one, up to the
configured ``max_in_flight``.
"""

from __future__ import annotations

import random

import anyio

from batchkling.clock import Clock


def full_jitter(attempt: int, *, base: float = 1.0, cap: float = 60.0,
                rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**attempt)]``."""
    ceiling = min(cap, base * (2 ** max(0, min(attempt, 30))))
    return (rng or random).uniform(0.0, ceiling)


class SlotPool:
    """At most ``limit`` provider tasks between create and terminal; the limit adapts."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_use = 0
        self.peak = 0
        self._streak = 0
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def acquire(self) -> None:
        """Wait for a free slot and take it."""
        while self.in_use >= self.limit:
            await self._changed.wait()
        self.take()

    def take(self) -> None:
        """Count a slot as held without waiting (a task adopted on resume already holds one)."""
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)

    def release(self) -> None:
        """Give a slot back."""
        self.in_use = max(0, self.in_use - 1)
        self._notify()

    def rejected(self) -> None:
        """The provider refused a create for lack of slots: shrink to what is in flight."""
        self._streak = 0
        # The rejected create still holds its local slot here; the account evidently has room
        # for the others only.
        self.limit = max(1, min(self.limit, self.in_use - 1))

    def created(self) -> None:
        """A create succeeded; after two rounds of the current limit, probe one more slot."""
        self._streak += 1
        if self.limit < self.maximum and self._streak >= 2 * self.limit:
            self.limit += 1
            self._streak = 0
            self._notify()


class RateGate:
    """Paces requests of one kind to ``rate`` per second; a pause holds back every caller."""

    def __init__(self, rate: float | None, clock: Clock) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.clock = clock
        self._next = 0.0
        self.paused_until = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every caller back for ``seconds`` (a 429's ``Retry-After``)."""
        until = self.clock.monotonic() + max(0.0, seconds)
        self.paused_until = max(self.paused_until, until)

    async def wait(self) -> None:
        """Return when this caller may send: after any pause, and in turn at the set rate."""
        while True:
            now = self.clock.monotonic()
            if self.paused_until > now:
                await self.clock.sleep(self.paused_until - now)
                continue
            slot = max(self._next, now)
            self._next = slot + self.interval
            if slot > now:
                await self.clock.sleep(slot - now)
            if self.paused_until <= self.clock.monotonic():
                return
            # A pause began while we waited our turn: honour it, then take a new turn.
