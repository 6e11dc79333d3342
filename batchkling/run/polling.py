"""When to poll a task next.

Every time here is seconds since the task was created (on the engine's clock). Three sources
say when a task will end:

- **What tasks of the group took** (model, duration and mode): a :class:`RenderModel` fits a
  log-normal distribution to this run's finished tasks, and before there are enough, to those
  of earlier runs in the store. The first poll goes where a small share of such tasks would
  already be done, so almost none is found finished late.
- **Progress readings**: a provider that reports integer progress, started at an unknown time
  ``s`` and rendering for an unknown time ``R``, pins the pair to a small polygon with each
  reading (``p ≤ 100·(t − s)/R < p + 1``). One reading leaves ``s`` open (within the group's
  queue times), two fix both: the next poll then lands just after the end. A task read once
  and then found ended still teaches its start, from that reading and the provider's own end
  time, so the group's queue times include the late starters.
- **A reported start** (Kling's ``updated_at`` when a task turns ``processing``): then only the
  render time is unknown, and its distribution is conditioned on what has already elapsed.

A gateway that answers from its last look upstream (ImaRouter's, every 15 s or so) adds a
fourth: its loop, learned from the ends it dates (:class:`Looks`). Then a poll goes just after a
look, at the first one likely to show the end, and a reading counts as of its look.

Floors: a poll aimed at a predicted end may come as soon as the prediction says (or as late:
no ceiling), but never sooner than ``hard_floor`` after the task's previous poll. Only *blind*
polling — no distribution for the group yet and no progress to go by — keeps the
``min_interval`` floor and the ``max_interval`` ceiling, and grows geometrically (×1.5), so an
unknown render time costs a logarithmic number of polls; a list serving every task in flight
may look blind at half that floor (:meth:`PollPlanner.list_at`). A fallback — news expected
from a list or a callback — with nothing to aim at waits the ceiling after the last sight, or
twice the task's age when that is longer. A provider's ``Retry-After`` or
``openai-poll-after-ms`` is always honoured (the engine passes it as ``hint``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

#: Where the first poll of a task goes: the time by which this share of the group is done.
FIRST_SHARE = 0.1
#: What one more poll is worth, as a share of the group's median time (and at least
#: :data:`FLOORS_PER_POLL` hard floors): when the end lies in a range, the next poll goes this
#: far past its start, at most to its end. Minimising the expected wait plus the price of a
#: further poll over an end spread evenly in the range gives exactly that. A wide range then
#: gets a reading near its start, which pins the end for the poll after; a narrow one is
#: polled at its end.
POLL_PRICE = 0.04
FLOORS_PER_POLL = 1.5
#: Without progress (Kling): each later poll goes where this share of what is left is done.
BLIND_SHARE = 0.45
#: Where a fallback poll goes (news expected from a list or a callback): nearly all are done.
LATE_SHARE = 0.995
#: A blind list (one request for every task in flight) may come at this share of the blind
#: floor of one task's own polls.
LIST_BLIND_SHARE = 0.5
#: Finished tasks of this run before the store's earlier runs stop counting.
OWN_SAMPLES = 5
#: Assumed spread (sigma of log render time) while a group has fewer than FEW_SAMPLES.
DEFAULT_SIGMA = 0.35
FEW_SAMPLES = 10
#: Tasks still running that a fit counts as "longer than their age" (the oldest ones).
CENSORED_MAX = 32

_STD = NormalDist()
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


@dataclass(frozen=True, slots=True)
class LogNormal:
    """A log-normal distribution of durations: ``log(T) ~ N(mu, sigma)``."""

    mu: float
    sigma: float

    @classmethod
    def fit(cls, samples: Iterable[float], censored: Iterable[float] = ()) -> LogNormal | None:
        """The maximum-likelihood fit, or None without a positive sample.

        ``censored``: durations known only to be longer than the value (tasks still running,
        at their age). Early in a run the tasks that have finished are the short ones; fitted
        alone they predict ends too soon (lists and polls too early, each finding fewer ends
        than it expected). A few rounds of expectation-maximisation count the running ones.
        """
        logs = [math.log(x) for x in samples if x > 0]
        if not logs:
            return None
        mu = math.fsum(logs) / len(logs)
        sigma = DEFAULT_SIGMA
        if len(logs) > 1:
            sigma = math.sqrt(math.fsum((x - mu) ** 2 for x in logs) / (len(logs) - 1))
            if len(logs) < FEW_SAMPLES:
                # A handful of samples understates the spread: keep the assumed one until more.
                sigma = max(sigma, DEFAULT_SIGMA)
        cuts = [math.log(x) for x in censored if x > 0]
        if cuts:
            mu, fitted = _censored_fit(logs, cuts, mu, max(sigma, 0.02))
            sigma = fitted if len(logs) >= FEW_SAMPLES else max(fitted, DEFAULT_SIGMA)
        return cls(mu, max(sigma, 0.02))

    @property
    def median(self) -> float:
        """The median duration."""
        return math.exp(self.mu)

    def cdf(self, x: float) -> float:
        """P(T ≤ x)."""
        if x <= 0:
            return 0.0
        return _STD.cdf((math.log(x) - self.mu) / self.sigma)

    def quantile(self, share: float) -> float:
        """The duration by which ``share`` of tasks are done."""
        share = min(max(share, 1e-9), 1 - 1e-9)
        return math.exp(self.mu + self.sigma * _STD.inv_cdf(share))

    def done_by(self, x: float, *, after: float) -> float:
        """P(T ≤ x | T > after). Past nearly every task seen, the distribution says nothing:
        then the chance grows over ``sigma · after`` more seconds, so looks get rarer the
        longer a task overruns (as :meth:`quantile_after` does)."""
        low = self.cdf(after)
        if low >= 0.999:
            return min(1.0, max(0.0, x - after) / (self.sigma * after))
        return max(0.0, (self.cdf(x) - low) / (1 - low))

    def quantile_after(self, share: float, *, after: float) -> float:
        """The duration by which ``share`` of the tasks still running at ``after`` are done."""
        low = self.cdf(after)
        if low >= 1 - 1e-6:
            # Past every task seen: the distribution says nothing more; grow from here.
            return after * (1 + self.sigma)
        return max(after, self.quantile(low + share * (1 - low)))


def _censored_fit(logs: list[float], cuts: list[float], mu: float, sigma: float,
                  rounds: int = 4) -> tuple[float, float]:
    """Normal ``(mu, sigma)`` of ``logs`` and of values known only to exceed ``cuts``, by
    expectation-maximisation from ``(mu, sigma)``: each cut counts as the mean (and mean
    square) of the current normal beyond it."""
    n = len(logs) + len(cuts)
    s1 = math.fsum(logs)
    s2 = math.fsum(x * x for x in logs)
    for _ in range(rounds):
        e1 = e2 = 0.0
        for c in cuts:
            a = (c - mu) / sigma
            tail = 0.5 * math.erfc(a / _SQRT2)
            if tail < 1e-12:
                e1 += c
                e2 += c * c
                continue
            lam = math.exp(-0.5 * a * a) / _SQRT2PI / tail
            e1 += mu + sigma * lam
            e2 += mu * mu + sigma * sigma + sigma * (c + mu) * lam
        mean = (s1 + e1) / n
        sigma = math.sqrt(max((s2 + e2) / n - mean * mean, 1e-6))
        mu = mean
    return mu, sigma


class RenderModel:
    """What tasks of one group took: slot times (create to end) and, when known, render starts.

    Bounded: the last ``window`` of each, and up to ``window`` times from earlier runs (the
    *prior*, used until this run has finished :data:`OWN_SAMPLES` tasks of the group). Until
    the run has finished ``window`` tasks of the group, the fits also count the oldest of its
    tasks still running as longer than their age (:meth:`LogNormal.fit`); past that, the
    tasks that finish lately are a fair sample and the running ones are left out.
    """

    def __init__(self, window: int = 64, prior: Iterable[float] = ()) -> None:
        self._times: deque[float] = deque(maxlen=window)
        self._renders: deque[float] = deque(maxlen=window)
        self._starts: deque[float] = deque(maxlen=window)
        self._late: deque[float] = deque(maxlen=window)  # starts known to be at least this
        self._prior = [t for t in itertools.islice(prior, window) if t > 0]
        self._live: weakref.WeakSet[TaskPlan] = weakref.WeakSet()  # its tasks in flight
        self._fit: LogNormal | None = None
        self._render_fit: LogNormal | None = None
        self._stale = True

    def set_prior(self, times: Iterable[float]) -> None:
        """Durations of the group's tasks in earlier runs (most recent first)."""
        self._prior = [t for t in itertools.islice(times, self._times.maxlen) if t > 0]
        self._stale = True

    def track(self, plan: TaskPlan) -> None:
        """A task of the group is in flight (until :meth:`untrack`, or its plan is gone)."""
        self._live.add(plan)

    def untrack(self, plan: TaskPlan) -> None:
        """The task is no longer in flight."""
        self._live.discard(plan)

    def observe(self, seconds: float, *, start: float | None = None,
                started_after: float | None = None) -> None:
        """A task of the group ended ``seconds`` after its create; its render began at
        ``start``, or (less known) no earlier than ``started_after``."""
        if seconds <= 0:
            return
        self._times.append(seconds)
        if start is not None and 0 <= start < seconds:
            self._starts.append(start)
            self._renders.append(seconds - start)
        elif started_after is not None and 0 < started_after < seconds:
            self._late.append(started_after)
        self._stale = True

    def forget_starts(self) -> None:
        """Drop the render starts learned so far (and the render times measured from them)."""
        self._starts.clear()
        self._late.clear()
        self._renders.clear()
        self._stale = True

    def _refit(self) -> None:
        own = list(self._times)
        times: list[float] = []
        renders: list[float] = []
        if len(self._times) < (self._times.maxlen or 0):  # fewer than `window` finished
            for plan in self._live:
                u = plan.not_done_at
                times.append(u)
                if plan.start is not None and u > plan.start:
                    renders.append(u - plan.start)
            times = sorted(times)[-CENSORED_MAX:]
            renders = sorted(renders)[-CENSORED_MAX:]
        self._fit = LogNormal.fit(own if len(own) >= OWN_SAMPLES else own + self._prior,
                                  times)
        own_renders = list(self._renders)
        self._render_fit = (LogNormal.fit(own_renders, renders)
                            if len(own_renders) >= OWN_SAMPLES else None)
        self._stale = False

    @property
    def times(self) -> LogNormal | None:
        """The slot-time distribution, or None before anything is known."""
        if self._stale:
            self._refit()
        return self._fit

    @property
    def renders(self) -> LogNormal | None:
        """The render-time distribution (after the start), once enough starts are known."""
        if self._stale:
            self._refit()
        return self._render_fit

    def typical(self) -> float | None:
        """The median slot time, None before anything is known."""
        fit = self.times
        return fit.median if fit else None

    def start_range(self) -> tuple[float, float] | None:
        """Where render starts fall (the middle 90 %, a little widened), once five tasks have
        said something about theirs."""
        starts = sorted(self._starts)
        if len(starts) + len(self._late) < OWN_SAMPLES:
            return None
        cut = len(starts) // 20
        low = starts[cut] if starts else 0.0
        high = starts[-1 - cut] if starts else 0.0
        # Starts are measured only on tasks read twice; every task read once still proves how
        # late its own start was at least, so the range cannot shrink below that.
        high = max(high, max(self._late, default=0.0))
        margin = 0.1 * (high - low) + 0.02 * high
        return max(0.0, low - margin), high + margin


def _progress_floor(p: float) -> float:
    """The least true progress a reading of ``p`` % allows: providers floor or round, and
    report 1 % for anything under it."""
    return 0.0 if p <= 1 else p - 0.5


# A half-plane a·s + b·R ≤ c in the (render start, render time) plane.
_Line = tuple[float, float, float]


def end_range(readings: Iterable[tuple[float, float]], *, start_low: float,
              start_high: float, running_at: float, longest: float) -> tuple[float, float] | None:
    """Earliest and latest end ``s + R`` consistent with integer progress ``readings``.

    Each reading ``(t, p)`` says ``p − ½ ≤ 100·(t − s)/R < p + 1`` (rounded or floored; a
    reading of 1 % allows anything from 0); ``s`` lies in
    ``[start_low, start_high]``, the task is still running at ``running_at`` and ``R`` is at
    most ``longest``. None when nothing fits (the provider's progress is not linear in time).
    """
    readings = list(readings)
    if len(readings) == 1:
        return _one_reading(*readings[0], start_low=start_low, start_high=start_high,
                            running_at=running_at, longest=longest)
    lines: list[_Line] = [(-1.0, 0.0, -start_low), (1.0, 0.0, start_high),
                          (0.0, 1.0, longest), (0.0, -1.0, -1e-6),
                          (-1.0, -1.0, -running_at)]
    for t, p in readings:
        low = _progress_floor(p)
        lines.append((1.0, low / 100.0, t))  # s + R·low/100 ≤ t
        lines.append((-1.0, -(p + 1) / 100.0, -t))  # s + R·(p+1)/100 ≥ t
    ends = []
    for (a1, b1, c1), (a2, b2, c2) in itertools.combinations(lines, 2):
        det = a1 * b2 - a2 * b1
        if abs(det) < 1e-12:
            continue
        s = (c1 * b2 - c2 * b1) / det
        r = (a1 * c2 - a2 * c1) / det
        if all(a * s + b * r <= c + 1e-9 * (1 + abs(c)) for a, b, c in lines):
            ends.append(s + r)
    if not ends:
        return None
    return min(ends), max(ends)


def _longest(readings: list[tuple[float, float]]) -> float:
    """The longest render that progress ``readings`` allow (the render started at or after
    the create): a reading of p % at t had at least its floor done, so R ≤ 100·t / floor.
    A reading of 1 % bounds nothing, since providers report 1 % for anything under it; while
    every reading is 1 %, a guess that the next reading corrects: 100 times the latest one's
    time (a percent done by then)."""
    bounds = [100.0 * t / floor for t, p in readings if (floor := _progress_floor(p)) > 0]
    return (min(bounds) if bounds else 100.0 * readings[-1][0]) + 1.0


def _one_reading(t: float, p: float, *, start_low: float, start_high: float,
                 running_at: float, longest: float) -> tuple[float, float] | None:
    """:func:`end_range` for a single reading, in closed form (the common case, per poll).

    ``E = s + (t − s)/f`` falls as the start ``s`` or the fraction done ``f`` grows, so the
    earliest end has the latest start and the highest fraction, the latest end the reverse.
    """
    high = min(start_high, t)
    if start_low > high:
        return None
    f_low, f_high = _progress_floor(p) / 100.0, (p + 1) / 100.0
    earliest = high + (t - high) / f_high
    # The latest end: the earliest start, unless the render-time cap binds first (then the
    # start where it starts to bind, or the latest).
    best = high if f_low <= 0 else min(max(t - longest * f_low, start_low), high)
    latest = best + (longest if f_low <= 0 else min((t - best) / f_low, longest))
    earliest = max(earliest, running_at)
    if latest < earliest:
        return None
    return earliest, latest


class TaskPlan:
    """One task's observations and the time of its next poll (seconds since its create)."""

    __slots__ = ("__weakref__", "_first", "_last", "blind", "hard_floor", "last_poll", "model",
                 "not_done_at", "polls", "queued_until", "span", "start", "timing")

    def __init__(self, model: RenderModel, hard_floor: float = 0.0) -> None:
        self.model = model
        self.hard_floor = hard_floor
        self.polls = 0
        self.last_poll: float | None = None
        self.not_done_at = 0.0  # the latest time the task was seen unfinished
        self.queued_until = 0.0  # the latest time it was seen not yet rendering
        self.start: float | None = None  # render start, when the provider reported it
        self._first: tuple[float, float] | None = None  # earliest progress reading (t, p)
        self._last: tuple[float, float] | None = None  # latest progress reading
        self.blind = True
        #: When :meth:`next_at` aimed at an end that progress pins: its earliest and latest
        #: time and the price of a poll (the seconds one is worth), for :meth:`Looks.poll_at`.
        self.span: tuple[float, float, float] | None = None
        #: How its readings were timed (:attr:`Looks.epoch`; -1 if not all alike), None before.
        self.timing: int | None = None

    def observe(self, t: float, *, running: bool, progress: float | None,
                start: float | None = None) -> None:
        """The task was seen unfinished at ``t`` (rendering or still queued)."""
        self.not_done_at = max(self.not_done_at, t)
        if start is not None and 0 <= start <= t:
            self.start = start
        if not running or (progress is not None and progress <= 0):
            self.queued_until = max(self.queued_until, t)
            return
        if progress is not None and 1 <= progress < 100:
            reading = (t, float(math.floor(progress)))
            if self._first is None:
                self._first = reading
            self._last = reading

    def polled(self, t: float) -> None:
        """Count a poll sent at ``t``."""
        self.polls += 1
        self.last_poll = t

    def _readings(self) -> list[tuple[float, float]]:
        first, last = self._first, self._last
        if first is None or last is None:
            return []
        return [first] if first == last else [first, last]

    def next_at(self) -> float:
        """When the next poll should go, by the observations so far. Sets :attr:`blind` and
        :attr:`span`."""
        self.blind = False
        self.span = None
        u = self.not_done_at
        readings = self._readings()
        if readings:
            target = self._from_progress(readings, u)
            if target is not None:
                return target
        renders = self.model.renders
        if self.start is not None and renders is not None:
            share = FIRST_SHARE if self.polls == 0 else BLIND_SHARE
            return self.start + renders.quantile_after(share, after=u - self.start)
        times = self.model.times
        if times is not None:
            share = FIRST_SHARE if self.polls == 0 else BLIND_SHARE
            return times.quantile_after(share, after=u)
        self.blind = True
        return 1.5 * u

    def _from_progress(self, readings: list[tuple[float, float]], u: float) -> float | None:
        first_t = readings[0][0]
        longest = _longest(readings)
        low, high = self.queued_until, first_t
        if self.start is not None:
            low = high = self.start
        elif len(readings) == 1:
            # Two readings fix the start themselves; one leaves it to the group's queue times.
            known = self.model.start_range()
            if known is None:
                # None known yet: a second reading halfway through what is left (were the
                # queue empty) measures this task's start, and teaches the group its queue.
                t, p = readings[0]
                elapsed = t - self.queued_until
                return t + 0.5 * elapsed * (100.0 / max(p, 1.0) - 1.0)
            if known[0] <= first_t:
                low, high = max(low, known[0]), min(high, max(known[1], low))
        span = end_range(readings, start_low=low, start_high=high, running_at=u,
                         longest=longest)
        if span is None and (low, high) != (self.queued_until, first_t):
            # The assumed start does not fit this task's readings: drop the assumption.
            span = end_range(readings, start_low=self.queued_until, start_high=first_t,
                             running_at=u, longest=longest)
        if span is None and len(readings) == 2:
            # No steady render fits both readings. A gateway that shows its last look at the
            # task, not the task now, does that before its lag is learned: a reading at a low
            # percent, taken as of the poll, looks far too slow, and a "not started" one too
            # late. The latest reading alone, with the render started by the first.
            latest_reading = readings[-1:]
            span = end_range(latest_reading, start_low=0.0, start_high=first_t, running_at=u,
                             longest=_longest(latest_reading))
        if span is None:
            return None
        earliest, latest = span
        price = max(POLL_PRICE * (self.model.typical() or latest),
                    FLOORS_PER_POLL * self.hard_floor)
        self.span = (earliest, latest, price)
        return min(latest, earliest + price)

    def late_at(self) -> float:
        """When the task has almost surely ended: the fallback poll of a task whose end news
        is expected from elsewhere (a list, a callback). From the group's distribution (the
        few progress readings a callback carries predict too little to wait on)."""
        self.blind = False
        u = self.not_done_at
        renders = self.model.renders
        if self.start is not None and renders is not None:
            return self.start + renders.quantile_after(LATE_SHARE, after=u - self.start)
        times = self.model.times
        if times is not None:
            return times.quantile_after(LATE_SHARE, after=u)
        readings = self._readings()
        if readings:
            target = self._from_progress(readings, u)
            if target is not None:
                return u + 2.0 * (target - u)
        return self.next_at()

    def done_by(self, t: float) -> float:
        """Probability that the task has ended by ``t``, given it had not at the last sight."""
        u = self.not_done_at
        if t <= u:
            return 0.0
        readings = self._readings()
        if readings:
            target = self._from_progress(readings, u)
            if target is not None:
                return 1.0 if t >= target else 0.0
        renders = self.model.renders
        if self.start is not None and renders is not None:
            return renders.done_by(t - self.start, after=u - self.start)
        times = self.model.times
        if times is None:
            return 0.0
        return times.done_by(t, after=u)

    def ended_at(self, seen: float, reported: float | None) -> float:
        """Best estimate of when the task ended: it was unfinished at the last sight and
        finished at ``seen``; ``reported`` is the provider's own duration, when it gave one."""
        low = self.not_done_at
        if reported is not None and low <= reported <= seen:
            return reported
        readings = self._readings()
        if len(readings) == 2:
            (t1, p1), (t2, p2) = readings
            if p2 > p1:
                rate = (p2 - p1) / (t2 - t1)  # percent per second
                estimate = t2 + (100.0 - p2 - 0.5) / rate
                return min(max(estimate, low), seen)
        return 0.5 * (low + seen)

    def started_after(self, seen: float) -> float | None:
        """With one progress reading, the latest start consistent with ending by ``seen``."""
        readings = self._readings()
        if len(readings) != 1 or self.start is not None:
            return None
        t, p = readings[0]
        f = (p + 1) / 100.0
        if f >= 1:
            return None
        return max(0.0, (t - f * seen) / (1 - f))

    def start_given_end(self, low_end: float, high_end: float) -> float | None:
        """With one progress reading and the end known to lie in ``[low_end, high_end]`` (the
        provider's own time of it, to its timestamps' precision), the render start: the
        reading's fraction, between its floor and the next percent, of a render ending there
        pins it to a range; its middle, when that range is narrow (a fifth of the reading's
        time at most). Without it, the starts learned would come only from tasks read twice,
        which are rarely the late starters: those are first read at a low percent and are
        usually found ended at the next poll."""
        readings = self._readings()
        if len(readings) != 1 or self.start is not None:
            return None
        t, p = readings[0]
        f_low, f_high = _progress_floor(p) / 100.0, (p + 1) / 100.0
        if f_high >= 1 or low_end <= t or high_end < low_end:
            return None
        low = max((t - f_high * high_end) / (1 - f_high), self.queued_until)
        high = min((t - f_low * low_end) / (1 - f_low), t)
        if low > high or high - low > 0.2 * t:
            return None
        return 0.5 * (low + high)

    def render_start(self) -> float | None:
        """The render start: reported, or fitted from two progress readings far enough apart
        (a fifth of the render) to pin it."""
        if self.start is not None:
            return self.start
        readings = self._readings()
        if len(readings) == 2:
            (t1, p1), (t2, p2) = readings
            if p2 - p1 >= 20:
                rate = (p2 - p1) / (t2 - t1)
                return max(0.0, t1 - (p1 + 0.5) / rate)
        return None


class PollPlanner:
    """Render-time models per group, and the delay before a task's next poll."""

    def __init__(self, *, min_interval: float, max_interval: float,
                 hard_floor: float | None = None, window: int = 64) -> None:
        #: The floor of blind polling (nothing known about the group, no progress).
        self.min_interval = min_interval
        self.max_interval = max(max_interval, min_interval)
        #: The floor between two polls of one task, whatever the prediction.
        self.hard_floor = min(hard_floor if hard_floor is not None else min_interval / 10,
                              min_interval)
        self._window = window
        self._models: dict[str, RenderModel] = {}

    def model(self, group: str) -> RenderModel:
        """The group's model (made empty on first use)."""
        found = self._models.get(group)
        if found is None:
            found = self._models[group] = RenderModel(self._window)
        return found

    def has(self, group: str) -> bool:
        """Whether the group's model exists already (its prior has been asked for)."""
        return group in self._models

    def observe(self, group: str, render_seconds: float, *, start: float | None = None,
                started_after: float | None = None) -> None:
        """Record how long a finished task of ``group`` took, from create to completion."""
        self.model(group).observe(render_seconds, start=start, started_after=started_after)

    def finished(self, group: str, plan: TaskPlan, seen: float,
                 reported: float | None = None, precision: float = 1.0, *,
                 starts: bool = True) -> None:
        """A task was seen finished at ``seen``: teach its group what its polls showed, and
        ``reported``, the provider's own duration (create to end) when it gave one, good to
        ``precision`` seconds (ImaRouter's timestamps are whole seconds). ``starts=False``:
        its readings were timed otherwise than today's, so they teach no render start."""
        end = plan.ended_at(seen, reported)
        start = plan.render_start() if starts else None
        if starts and start is None and reported is not None and end == reported:
            start = plan.start_given_end(max(plan.not_done_at, reported - precision),
                                         min(seen, reported + precision))
        self.model(group).untrack(plan)
        self.model(group).observe(end, start=start,
                                  started_after=None if start is not None or not starts
                                  else plan.started_after(seen))

    def forget_starts(self) -> None:
        """Drop every group's learned render starts: the readings they came from were timed
        wrongly (at the poll, where a lagging gateway showed an earlier look)."""
        for model in self._models.values():
            model.forget_starts()

    def typical(self, group: str) -> float | None:
        """Median slot time of ``group`` (this run's, else the prior's), None before any."""
        found = self._models.get(group)
        return found.typical() if found else None

    def plan(self, group: str) -> TaskPlan:
        """A new task's plan (in flight in its group's model until it ends)."""
        model = self.model(group)
        plan = TaskPlan(model, self.hard_floor)
        model.track(plan)
        return plan

    def _blind_late(self, plan: TaskPlan) -> float:
        """A blind fallback (nothing to aim at, news expected from elsewhere): the ceiling
        after the last sight, and later still as the task ages (twice its age), so a long
        render costs a few fallback looks, not one per ceiling."""
        u = plan.not_done_at
        return u + max(self.max_interval, 2 * u)

    def list_at(self, plan: TaskPlan) -> float | None:
        """When (seconds since the create) one list serving every task in flight should look
        at this one, if nothing predicts its end (a first run's first tasks; None otherwise).
        A list costs one request for all of them, so its blind floor is a share
        (:data:`LIST_BLIND_SHARE`) of a task's own."""
        plan.next_at()
        if not plan.blind:
            return None
        u = plan.not_done_at
        return u + min(max(0.5 * u, LIST_BLIND_SHARE * self.min_interval), self.max_interval)

    def fallback_at(self, plan: TaskPlan) -> float:
        """When (seconds since the create) a task whose news is expected from elsewhere has
        almost surely ended: :meth:`TaskPlan.late_at`, or the blind fallback."""
        target = plan.late_at()
        return self._blind_late(plan) if plan.blind else target

    def delay(self, plan: TaskPlan, elapsed: float, hint: float | None = None, *,
              late: bool = False) -> float:
        """Seconds from now (``elapsed`` since the create) until the task's next poll;
        ``late``: only a fallback, news being expected from elsewhere."""
        target = self.fallback_at(plan) if late else plan.next_at()
        delay = target - elapsed
        if plan.blind and not late:
            # Nothing to aim at: the blind floor, and the ceiling so that a long render is
            # not waited out far past its end.
            delay = min(max(delay, self.min_interval), self.max_interval)
        if plan.last_poll is not None:
            delay = max(delay, plan.last_poll + self.hard_floor - elapsed)
        if hint is not None:
            delay = max(delay, hint)
        return max(delay, 0.0)


#: A gateway's look schedule is sought once this many of its looks are dated (ends dated
#: alike are one look), on the latest :data:`LOOK_WINDOW` of them, and adopted once the next
#: :data:`LOOK_PROBATION` looks dated fall on it too (a schedule found by searching many periods
#: can fit a few dates by chance; the next ones, not searched, rarely all do).
LOOK_NEED = 7
LOOK_WINDOW = 24
LOOK_PROBATION = 4
#: How tightly the gaps between dated looks must sit on whole numbers of one period: their
#: phases' mean cosine, the shorter gaps counting more (1: every gap a whole number of
#: periods; about 0 for times with no schedule).
LOOK_FIT = 0.85
#: Searches for a schedule before a run concludes its provider has none (each costs up to
#: some tens of milliseconds).
LOOK_TRIES = 6

#: A look schedule: the mean period, the slack after a look known exactly, the tolerance of a
#: date one period from a known look, and how far one period strays (one σ) (:class:`Looks`).
_Schedule = tuple[float, float, float, float]


class Looks:
    """When a gateway looks at its upstream, if it does so on one loop for all tasks.

    ImaRouter's gateway polls Kling itself, about every 15 s (API.md), and answers from what it
    saw last; the open-source gateway its answers match runs one loop for every task (sleep,
    then look at all unfinished ones) and dates an end by the look that saw it. So a status
    shows the task as of the gateway's last look, an end is readable only after the first look
    past it, and the ends it reports (``completed_at``) all sit on that loop's looks. From those
    dates this learns the loop; then a poll is worth sending only just after a look, and a
    reading is as of that look, not of the poll. A provider whose ends are not on one loop
    (Kling's own API, a gateway that asks upstream at each poll) never gets one, and nothing
    changes for it.

    The loop is not a clock: each pass takes as long as its looks upstream do, so its looks
    drift off any fixed grid. The period is learned from the gaps between dated looks (each a
    whole number of periods, give or take the drift), and the looks ahead are counted from the
    latest one dated, with a margin that grows with the number of periods counted.

    Times are on the engine's monotonic clock. ``low`` and ``high`` bound the periods sought;
    with ``sought=False`` (a provider that answers with the state now) none is.
    """

    __slots__ = ("_candidate", "_coarsest", "_drift", "_fresh", "_high", "_low", "_marks",
                 "_misses", "_passed", "_sought", "_tolerance", "_tries", "epoch", "period",
                 "phase", "slack")

    def __init__(self, low: float, high: float, *, sought: bool = True) -> None:
        self._low, self._high, self._sought = low, high, sought
        self._marks: list[float] = []  # the latest looks dated, ascending, one per look
        self._coarsest = 0.0  # the precision of the coarsest date seen
        self._fresh = 0  # looks dated since the last search or refit
        self._tries = 0
        self._candidate: _Schedule | None = None  # on probation
        self._passed = 0
        self._misses: deque[bool] = deque(maxlen=4)
        #: The loop's mean period; None while unknown.
        self.period: float | None = None
        #: The time of a look to count from while no look is dated (once one is, the latest).
        self.phase = 0.0
        #: How long after a look known exactly to poll: twice the dates' imprecision, and a
        #: twentieth of the period for the gateway's pass over its tasks. Looks counted ahead
        #: add twice the drift over the periods counted (:meth:`_slack`).
        self.slack = 0.0
        self._tolerance = 0.0  # how far off a date may be and still fit, one period ahead
        self._drift = 0.0  # how far one period strays from the mean (one σ)
        #: Counts the schedule's adoptions and losses: readings taken in another epoch were
        #: timed differently (:attr:`TaskPlan.timing`).
        self.epoch = 0

    def saw(self, at: float, precision: float) -> None:
        """A task's end was dated ``at`` (to ``precision`` seconds) by the provider."""
        if not self._sought or precision > self._low / 4:
            return  # dates this coarse cannot place looks a few seconds apart
        self._coarsest = max(self._coarsest, precision)
        marks = self._marks
        i = bisect.bisect_left(marks, at)
        same = 2 * self._coarsest + self._low / 10  # dates this close are of one look
        if (i and at - marks[i - 1] <= same) or (i < len(marks) and marks[i] - at <= same):
            return  # a look dated already: it places nothing new
        before = marks[i - 1] if i else None
        after = marks[i] if i < len(marks) else None
        marks.insert(i, at)
        if len(marks) > LOOK_WINDOW:
            del marks[0]
        self._fresh += 1
        if self._candidate is not None:
            if self._fits(at, before, after, self._candidate):
                self._passed += 1
                if self._passed >= LOOK_PROBATION:
                    self._adopt(self._candidate)
                    self._candidate = None
                    self.epoch += 1
                    self._misses.clear()
                    self._fresh = 0
                return
            self._candidate = None
        if self.period is not None:
            self._misses.append(not self._fits(at, before, after, self._schedule()))
            if sum(self._misses) >= 3:
                self.period = None  # the ends left the schedule: seek it again
                self._tries = 0
                self.epoch += 1
        if len(marks) < LOOK_NEED or self._fresh < (8 if self.period else 4):
            return
        if self.period is None and self._tries >= LOOK_TRIES:
            return
        self._fresh = 0
        found = self._search()
        if self.period is not None:
            if found is not None:
                self._adopt(found)  # a refit, kept on the loop's drift
        else:
            self._tries += 1
            self._candidate, self._passed = found, 0

    def _schedule(self) -> _Schedule:
        assert self.period is not None
        return self.period, self.slack, self._tolerance, self._drift

    def _adopt(self, schedule: _Schedule) -> None:
        self.period, self.slack, self._tolerance, self._drift = schedule

    @staticmethod
    def _fits(at: float, before: float | None, after: float | None,
              schedule: _Schedule) -> bool:
        """Whether ``at`` is a whole number of periods from the looks dated next to it."""
        period, _, tolerance, drift = schedule
        near = [abs(at - m) for m in (before, after) if m is not None]
        if not near:
            return True
        for gap in near:
            k = max(1, round(gap / period))
            if abs(gap - k * period) <= min(tolerance + 3 * drift * math.sqrt(k), 0.3 * period):
                return True
        return False

    def _search(self) -> _Schedule | None:
        """The mean period, slack, tolerance and drift that fit the gaps between the looks
        dated, None if none does: near the current period once there is one, across
        ``low``–``high`` before."""
        gaps = [b - a for a, b in itertools.pairwise(self._marks)]
        if len(gaps) < LOOK_NEED - 1:
            return None
        shortest, span = min(gaps), max(gaps)
        weights = [1 / g for g in gaps]
        total = sum(weights)
        if self.period is None:
            low, high = self._low, self._high
        else:
            low, high = 0.97 * self.period, 1.03 * self.period
        fits: list[tuple[float, float]] = []  # (period, fit)
        p = high
        while p >= low:
            # No two looks closer than most of a period, and every gap near a whole number.
            if shortest >= 0.7 * p:
                w = 2 * math.pi / p
                fit = sum(wt * math.cos(w * g) for wt, g in zip(weights, gaps, strict=True))
                if fit / total >= LOOK_FIT:
                    fits.append((p, fit / total))
            # Steps fine enough that the longest gap's phase moves a fortieth of a turn.
            p -= p * p / (40 * span)
        if not fits:
            return None
        # A schedule fits its halves and thirds as well: the longest period that fits is the
        # loop's, refined to the best fit near it.
        top = fits[0][0]
        guess = max((f for f in fits if f[0] >= 0.9 * top), key=lambda f: f[1])[0]
        # The gaps as whole numbers of periods: a walk whose steps stray, so the mean period
        # is their sum over the periods counted, and the stray per period from the residues.
        steps = [(g, max(1, round(g / guess))) for g in gaps]
        # A gap across a restart of the loop strays far more than the others: left out, by
        # its stray against the typical one (the median's, robust to a few such gaps).
        typical = statistics.median((g - k * guess) ** 2 / k for g, k in steps) / 0.45
        floor = (0.02 * guess + 1.5 * self._coarsest) ** 2
        walk = [(g, k) for g, k in steps if (g - k * guess) ** 2 <= 9 * k * typical + floor]
        counted = sum(k for _, k in walk)
        period = sum(g for g, _ in walk) / counted
        residues = sum((g - k * period) ** 2 for g, k in walk)
        # Each gap strays by the drift of the periods it spans, and by its two dates' own
        # imprecision (once per gap, however many periods it spans): only the first is
        # drift. The mean period, fitted to the same gaps, takes one gap's worth of stray.
        n = len(walk)
        stray = residues * n / max(n - 1, 1) - n * self._coarsest ** 2 / 3
        drift = math.sqrt(max(0.0, stray / counted))
        return (period, 0.05 * period + self._coarsest, 0.02 * period + 1.5 * self._coarsest,
                drift)

    def _anchor(self, t: float) -> float:
        """The latest look dated at or before ``t`` (the earliest after it, if none is)."""
        marks = self._marks
        if not marks:
            return self.phase
        i = bisect.bisect_right(marks, t)
        return marks[i - 1] if i else marks[0]

    def _slack(self, look: float, anchor: float, period: float) -> float:
        """How long after ``look`` to poll: the slack, and twice the drift over the periods
        counted from the look dated (``anchor``)."""
        return self.slack + 2 * self._drift * math.sqrt(abs(round((look - anchor) / period)))

    @staticmethod
    def _counted(anchor: float, t: float, period: float) -> float:
        """The latest look at or before ``t``, counting periods from the look at ``anchor``."""
        return anchor + period * math.floor((t - anchor) / period)

    def last(self, t: float) -> float | None:
        """The latest look at or before ``t``; None while no schedule is known."""
        if self.period is None:
            return None
        return self._counted(self._anchor(t), t, self.period)

    def poll_at(self, target: float, polled: float | None,
                span: tuple[float, float, float] | None = None) -> float:
        """When to send a poll the planner wants at ``target``, given the poll at ``polled``:
        just after a look, and one that poll has not shown already. ``target`` itself while no
        schedule is known.

        With ``span`` (the end's earliest and latest time and a poll's price, in seconds,
        from :attr:`TaskPlan.span`), the first look by which the end is likely enough: a poll
        that misses costs its price, one look too late costs the period, so the look where
        the chance of the end having come reaches ``price / (period + price)``, the end
        spread evenly over the span. Without it, the latest look by ``target``: the same
        answer as at ``target``, sooner.
        """
        period = self.period
        if period is None:
            return target
        anchor = self._anchor(target)
        if span is None:
            look = self._counted(anchor, target, period)
        else:
            earliest, latest, price = span
            enough = price / (period + price)
            width = max(latest - earliest, 1e-9)
            look = self._counted(anchor, earliest, period)
            while look < latest and (look - earliest) / width < enough:
                look += period
        if polled is not None:
            # The look that poll showed (it went a slack after it, or earlier): compared by
            # halves, so that rounding never makes a look seem new.
            slack = self._slack(self._counted(anchor, polled, period), anchor, period)
            shown = self._counted(anchor, polled - 0.5 * slack, period)
            if look < shown + 0.5 * period:
                look = shown + period
        return look + self._slack(look, anchor, period)
