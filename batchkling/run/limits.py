"""Flow control: account task slots, create pacing, shared pauses, and backoff.

Slots are discovered, not assumed. ``max_in_flight`` is a ceiling; the account may hold fewer
slots, or share them with other clients. Three rules, as small pure functions so that an
account-wide slot count kept in the store can apply them too:

- a create refused for lack of slots proves the account had no room beside what was in flight
  when the refusal came: the limit becomes that number (:func:`limit_after_rejection`), at once,
  not one step at a time;
- creates beyond the level the account has already accepted go one at a time
  (:func:`is_probe`): a limit set too high costs one refused create, not a burst of them;
- the limit grows back one slot at a time, after a run of successful creates that lengthens
  with every probe the account refused (:func:`probe_after`), so a full account is asked
  rarely and an account that freed slots is found again.
"""

from __future__ import annotations

import random

import anyio

from batchkling.clock import Clock

#: How many times longer the wait before a probe gets after each refused one (at most
#: ``_PROBE_BACKOFF ** _PROBE_BACKOFF_MAX``).
_PROBE_BACKOFF = 4
_PROBE_BACKOFF_MAX = 4


def full_jitter(attempt: int, *, base: float = 1.0, cap: float = 60.0,
                rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**attempt)]``."""
    ceiling = min(cap, base * (2 ** max(0, min(attempt, 30))))
    return (rng or random).uniform(0.0, ceiling)


def limit_after_rejection(in_flight: int, current: int) -> int:
    """The limit once a create was refused for lack of slots while ``in_flight`` other tasks
    (and creates already sent) were held: the account had room for those and no more."""
    return max(1, min(current, in_flight))


def is_probe(in_flight: int, proven: int) -> bool:
    """Whether one more create, with ``in_flight`` held, asks for more slots than the account
    has been seen to accept (``proven``): such creates go one at a time."""
    return in_flight >= proven


def probe_after(limit: int, refused_probes: int) -> int:
    """Successful creates at ``limit`` before asking for one more slot: one round of the limit
    while probes succeed, then twice that, times four for each probe refused in a row."""
    if refused_probes <= 0:
        return max(1, limit)
    growth: int = _PROBE_BACKOFF ** (min(refused_probes, _PROBE_BACKOFF_MAX) - 1)
    return max(1, limit) * 2 * growth


def limit_after_success(current: int, maximum: int, streak: int, refused_probes: int) -> int:
    """The limit after ``streak`` successful creates in a row at ``current``: one more slot once
    :func:`probe_after` is reached, never past ``maximum``."""
    if current < maximum and streak >= probe_after(current, refused_probes):
        return current + 1
    return current


class SlotPool:
    """At most ``limit`` provider tasks between create and end; the limit is discovered.

    ``in_use`` counts tasks that exist (``take``, ``created``) and creates under way
    (``acquire``). A slot taken by ``acquire`` ends in exactly one of ``created`` (the task
    exists; ``release`` when it ends), ``rejected`` (refused for lack of slots) or ``cancel``
    (no task was made for another reason).
    """

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_use = 0
        #: The most tasks known to exist at once (creates under way or refused not counted).
        self.peak = 0
        #: Creates refused for lack of slots in this run.
        self.rejections = 0
        #: The most tasks the account has been seen to hold for this run at once.
        self.proven = 0
        self._live = 0  # tasks known to exist
        self._creating = 0  # creates under way
        self._streak = 0  # successful creates since the last rejection or growth
        self._refused = 0  # refusals since the account last kept a grown limit for a round
        self._grown = False  # the limit grew and has not yet held for a round
        self._changed: anyio.Event | None = None  # made when someone waits

    @property
    def refusals(self) -> int:
        """Slot refusals since the account last kept a grown limit for a whole round."""
        return self._refused

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _may_start(self) -> bool:
        if self.in_use >= self.limit:
            return False
        # Beyond what the account has accepted, one create at a time: the answer to each tells
        # whether the next may go.
        return not (is_probe(self.in_use, self.proven) and self._creating > 0)

    async def acquire(self) -> None:
        """Wait for a free slot (and, past the proven level, for the creates under way to be
        answered), then take it for a create."""
        while not self._may_start():
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
        self._creating += 1
        self._count_in()

    def _count_in(self) -> None:
        self.in_use += 1

    def _count_out(self) -> None:
        self.in_use = max(0, self.in_use - 1)
        self._notify()

    def take(self) -> None:
        """Count a task that exists already (adopted on resume, or found by a lookup)."""
        self._live += 1
        self.proven = max(self.proven, self._live)
        self.peak = max(self.peak, self._live)
        self._count_in()

    def release(self) -> None:
        """A task ended (or stopped being tracked): give its slot back."""
        self._live = max(0, self._live - 1)
        self._count_out()

    def cancel(self) -> None:
        """A create taken by ``acquire`` made no task, for a reason other than slots."""
        self._creating = max(0, self._creating - 1)
        self._count_out()

    def created(self) -> None:
        """The create succeeded: the slot now holds a task; maybe try one more slot."""
        self._creating = max(0, self._creating - 1)
        self._live += 1
        self.proven = max(self.proven, self._live)
        self.peak = max(self.peak, self._live)
        self._streak += 1
        if self._grown and self._streak >= self.limit:
            # The grown limit held for a whole round: the account really has more room (a
            # probe can also pass because a task ended that this run has not seen end yet).
            self._grown = False
            self._refused = max(0, self._refused - 1)
        grown = limit_after_success(self.limit, self.maximum, self._streak, self._refused)
        if grown != self.limit:
            self.limit, self._streak, self._grown = grown, 0, True
        self._notify()

    def rejected(self) -> int:
        """The create was refused for lack of slots: give its slot back and set the limit from
        what the refusal proves. Returns how many tasks and creates were held besides it."""
        self._creating = max(0, self._creating - 1)
        in_flight = self.in_use - 1  # everything held besides the refused create
        self.rejections += 1
        self.limit = limit_after_rejection(in_flight, self.limit)
        self.proven = min(self.proven, self.limit)
        self._refused += 1
        self._streak, self._grown = 0, False
        self._count_out()
        return in_flight


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
