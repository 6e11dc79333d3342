"""Where a tracker learns how its task stands, besides its own polls.

Two cheaper sources than one poll per task and look:

- **The provider's list of recent tasks** (Kling: one request reports up to 500). A list loop
  per task kind asks it when the tasks it watches are, taken together, likely enough to have
  ended (the sum of each one's chance since it was last seen reaches a threshold): one request
  serves every task in flight. Tasks whose ends nothing predicts yet (a first run's first
  wave) are looked at blind, by one list on a task's blind schedule. With nothing left to
  create (``draining``), a seen end frees no slot that a task waits for: the list goes when
  the last of them has likely ended. The news it brings is the provider's own answer, as good
  as a poll.
- **Callbacks** (``provider.callback_url``): the provider POSTs a task when its status changes.
  A callback is a *hint*: it wakes the task's tracker, which frees the task's slot at once, here
  and (as the engine's credit) in the store's claims — the account's slot is free if the hint
  is true; a false one costs one refused create — and asks for confirmation: one poll, or,
  where the provider lists, a place in the next list, which waits for more hints so one
  request confirms several. Only the task's download waits for it.

Trackers still poll on their own: on the planner's schedule when neither source covers them,
and as a late fallback when one does (a callback that never comes, a task missing from a list);
a list's sighting of a task moves its fallback on.
Memory: one small entry per task in flight, dropped when its tracker ends.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from batchkling.clock import Clock, SystemClock
from batchkling.errors import ProviderError
from batchkling.logs import get_logger
from batchkling.models import JobSpec
from batchkling.providers.base import Phase, Provider, TaskStatus
from batchkling.run.polling import PollPlanner, TaskPlan

#: The list loop asks when this many of the watched tasks are expected to have ended since
#: they were last seen (at least; more when many are in flight, so that a list of n tasks is
#: not parsed for every one that ends).
LIST_THRESHOLD = 0.5
LIST_THRESHOLD_PER_TASK = 0.03
#: With nothing left to create (the run's last tasks), a seen end frees no slot for a new
#: task: only the last end counts, and the list goes when all of them have ended with this
#: probability — or when this share of them has likely ended, so that their downloads are not
#: all left to the very end.
TAIL_SHARE = 0.4
TAIL_BATCH = 0.25
#: Hints gathered before one list confirms them all (fewer when fewer tasks remain), and the
#: longest a hint waits for others, as a share of the typical render time. Waiting costs no
#: slot: a hinted task's slot is free here and in the claims (the engine's credit); only its
#: download waits.
CONFIRM_BATCH = 10
CONFIRM_WAIT = 1.0
#: Tasks above which listing costs more than it saves (each list reads every one of them).
LIST_MAX_TASKS = 200
#: Newer tasks (of other clients, or of this run) the list is asked for beyond this run's own.
LIST_MARGIN = 10


class Lister(Protocol):
    """A provider that reports many recent tasks in one request (``can_list = True``)."""

    def list_kind(self, spec: JobSpec) -> str:
        """Which list a job's task appears in."""
        ...

    async def list_recent(self, kind: str, size: int) -> dict[str, TaskStatus]:
        """The ``size`` newest tasks of ``kind``, by task id."""
        ...


@dataclass(eq=False, slots=True)
class Watched:
    """One task in flight, as the watch sees it."""

    task_id: str
    spec: JobSpec
    plan: TaskPlan
    mono_start: float
    kind: str | None  # the list it can be found in, None when the provider cannot list
    number: int  # its place among this run's creates of that kind
    news: TaskStatus | None = None
    trusted: bool = False
    hinted: bool = False  # a callback came for this task
    confirming: float | None = None  # when it asked for confirmation
    missing: int = 0  # lists it was not found in
    ended: bool = False  # seen ended (its tracker is finishing it: a download, say)
    woken: anyio.Event | None = None  # made when the tracker waits for news


class Watch:
    """News for trackers from lists and callbacks; see the module docstring."""

    def __init__(self, provider: Provider, clock: Clock, planner: PollPlanner, *,
                 floor: float, callbacks: bool = False,
                 status: Callable[[str, JobSpec], Awaitable[TaskStatus]] | None = None) -> None:
        self.provider = provider
        self.planner = planner
        #: One poll of one task (the engine's: an unreadable answer is a failed poll).
        self._status = status or provider.status
        self.clock = clock
        self.floor = floor
        self.callbacks = callbacks
        self._lister: Lister | None = provider if _can_list(provider) else None  # type: ignore[assignment]
        self._entries: dict[str, Watched] = {}
        self._created: dict[str, int] = {}  # creates per kind in this run
        self._draining = False  # nothing left to create (see TAIL_SHARE)
        self._changed = anyio.Event()
        self._closed = False
        self._failures = 0  # list requests failed in a row
        self.lists = 0  # list requests sent
        self.polls = 0  # single polls sent to confirm a hint
        self.hints = 0  # callbacks for tasks being watched
        self.ignored = 0  # callbacks for other tasks
        self.misses = 0  # tasks found ended without their callback
        self.log = get_logger()

    # ---- trackers ------------------------------------------------------------------------

    def add(self, task_id: str, spec: JobSpec, plan: TaskPlan, mono_start: float) -> Watched:
        """Start watching a task (its tracker calls this once, ``remove`` when it ends)."""
        kind = self._lister.list_kind(spec) if self._lister is not None else None
        number = 0
        if kind is not None:
            number = self._created.get(kind, 0) + 1
            self._created[kind] = number
        entry = Watched(task_id, spec, plan, mono_start, kind, number)
        self._entries[task_id] = entry
        self._poke()
        return entry

    def ended(self, entry: Watched) -> None:
        """The task was seen ended: no list needs to look for it again, though its tracker
        keeps the entry until it has finished the job (its download, say)."""
        entry.ended = True
        self._poke()

    def remove(self, entry: Watched) -> None:
        """The tracker is done with its task."""
        if self._entries.get(entry.task_id) is entry:
            del self._entries[entry.task_id]
            self._poke()

    @property
    def draining(self) -> bool:
        """Whether the engine has nothing left to create on this account (for now)."""
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        if value != self._draining:
            self._draining = value
            self._poke()

    def close(self) -> None:
        """No new tasks will come: the list loop ends once the watched ones have."""
        self._closed = True
        self._poke()

    @property
    def healthy(self) -> bool:
        """Whether callbacks are taken to arrive: they are on, and few tasks were found ended
        without theirs (three in a row switch them off; a misconfigured URL costs the first
        tasks one late look each, then the run polls as it would without)."""
        return self.callbacks and self.misses <= 2 + self.hints // 5

    def covers(self, entry: Watched) -> bool:
        """Whether news is expected for the task, so its own polls are only a late fallback."""
        return self.healthy or self.listed(entry)

    def listed(self, entry: Watched) -> bool:
        """Whether the list loop looks at the task: when the group's render times predict
        its end, on the blind schedule while none are known (a first run), and for the late
        look while callbacks bring the news. Its tracker's own poll is then only a safety
        net, which each sighting by a list moves on."""
        return (entry.kind is not None and entry.missing < 2
                and len(self._entries) <= LIST_MAX_TASKS)

    async def wait(self, entry: Watched, delay: float) -> tuple[TaskStatus, bool] | None:
        """Sleep up to ``delay``; return ``(status, trusted)`` if news came first."""
        if entry.news is None and delay > 0:
            if self._lister is None and not self.callbacks:
                await self.clock.sleep(delay)  # nothing can come early
            else:
                await self._sleep_or(self._event(entry), delay)
        return self._take(entry)

    @staticmethod
    def _event(entry: Watched) -> anyio.Event:
        if entry.woken is None:
            entry.woken = anyio.Event()
        return entry.woken

    async def _sleep_or(self, event: anyio.Event, seconds: float) -> None:
        """Return when ``event`` is set or ``seconds`` of the watch's clock have passed."""
        if isinstance(self.clock, SystemClock):
            with anyio.move_on_after(seconds):
                await event.wait()
            return
        async with anyio.create_task_group() as tg:
            async def timer() -> None:
                await self.clock.sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(timer)
            await event.wait()
            tg.cancel_scope.cancel()

    def _take(self, entry: Watched) -> tuple[TaskStatus, bool] | None:
        news, trusted = entry.news, entry.trusted
        entry.news, entry.trusted = None, False
        if entry.woken is not None and entry.woken.is_set():
            entry.woken = None
        return None if news is None else (news, trusted)

    def _deliver(self, entry: Watched, status: TaskStatus, *, trusted: bool) -> None:
        if entry.news is not None and entry.trusted and not trusted:
            return  # the provider's answer beats a hint
        entry.news, entry.trusted = status, trusted
        self._event(entry).set()

    async def confirm(self, entry: Watched) -> TaskStatus:
        """The provider's word on a hinted task: a place in the next list, or one poll."""
        if entry.kind is None or entry.missing >= 2:
            self.polls += 1
            return await self._status(entry.task_id, entry.spec)
        entry.confirming = self.clock.monotonic()
        self._poke()
        while True:
            await self._event(entry).wait()
            news = self._take(entry)
            if news is None:
                continue
            if news[1]:
                return news[0]
            if entry.missing:
                entry.confirming = None
                self.polls += 1
                return await self._status(entry.task_id, entry.spec)

    # ---- callbacks -----------------------------------------------------------------------

    def watching(self, status: TaskStatus) -> bool:
        """Whether the status is about a task being watched here."""
        return status.task_id in self._entries

    def hint(self, status: TaskStatus) -> bool:
        """A callback said how a task stands; True if the task is one being watched."""
        entry = self._entries.get(status.task_id)
        if entry is None:
            self.ignored += 1
            return False
        self.hints += 1
        entry.hinted = True
        self._deliver(entry, status, trusted=False)
        return True

    def ended_unannounced(self, entry: Watched) -> None:
        """The task was found ended by a poll or list, and no callback had said so."""
        if self.callbacks and not entry.hinted:
            was = self.healthy
            self.misses += 1
            if was and not self.healthy:
                self.log.warning("watch.callbacks_missing", misses=self.misses,
                                 received=self.hints,
                                 hint="check that provider.callback_url reaches "
                                 "--callback-listen; polling instead")

    # ---- the list loop -------------------------------------------------------------------

    def _poke(self) -> None:
        if self._lister is not None:  # only the list loop listens
            self._changed.set()
            self._changed = anyio.Event()

    async def run(self) -> None:
        """List tasks of each kind as the watched tasks need it, until closed and idle."""
        if self._lister is None:
            return
        last = -math.inf
        while True:
            listed = [e for e in self._entries.values() if e.kind is not None and not e.ended]
            if not listed:
                if self._closed:
                    return
                await self._changed.wait()
                continue
            changed = self._changed
            now = self.clock.monotonic()
            # After failed lists, the next waits longer (up to a few minutes' worth).
            backoff = self.floor * 2 ** min(self._failures, 8)
            due = max(self._due(listed, now), last + backoff)
            if due == math.inf:
                await changed.wait()
                continue
            if due > now:
                await self._sleep_or(changed, due - now)
                continue
            last = now
            for kind in sorted({e.kind for e in listed if e.kind is not None}):
                await self._list(kind, [e for e in listed if e.kind == kind])

    def _due(self, listed: list[Watched], now: float) -> float:
        """When the next list should go."""
        confirming = [e for e in listed if e.confirming is not None]
        if confirming:
            # Enough hints to confirm together, or everyone left is waiting: list now. Else
            # within a typical render of the oldest: the hinted tasks' slots are already
            # free, only their downloads wait.
            if len(confirming) >= min(CONFIRM_BATCH, len(listed)):
                return now
            oldest = min(e.confirming for e in confirming if e.confirming is not None)
            typical = max((e.plan.model.typical() or 0.0) for e in confirming)
            return oldest + max(10 * self.floor, CONFIRM_WAIT * typical)
        if self.healthy:
            # Callbacks bring the news; one list looks in on the tasks overdue for theirs.
            return min(e.mono_start + self.planner.fallback_at(e.plan) for e in listed)
        # Tasks whose ends nothing predicts yet (a first run) are looked at blind: one list
        # for all of them, on the schedule of one task's blind polls.
        blind = math.inf
        for e in listed:
            at = self.planner.list_at(e.plan)
            if at is not None:
                blind = min(blind, e.mono_start + at)
        return min(blind, self._expected(listed, now))

    def _expected(self, listed: list[Watched], now: float) -> float:
        """When the tasks' chances of having ended since last seen add up to the threshold;
        while draining, when the chance that all of them have ended reaches
        :data:`TAIL_SHARE`, or a :data:`TAIL_BATCH` of them have likely ended (their downloads
        are not all left to the end). Tasks nothing predicts yet keep the blind schedule."""
        want = max(LIST_THRESHOLD, LIST_THRESHOLD_PER_TASK * len(listed))
        known = listed
        if self._draining:
            known = [e for e in listed if e.plan.model.times is not None]
            if not known:
                return math.inf
            want = max(want, TAIL_BATCH * len(known))

        def ready(at: float) -> bool:
            chances = [e.plan.done_by(at - e.mono_start) for e in known]
            return sum(chances) >= want or (self._draining
                                            and math.prod(chances) >= TAIL_SHARE)

        if ready(now):
            return now
        low, high = now, now + 1.0
        for _ in range(40):
            if ready(high):
                break
            low, high = high, now + 2 * (high - now)
        else:
            return high
        for _ in range(12):
            mid = 0.5 * (low + high)
            if ready(mid):
                high = mid
            else:
                low = mid
        return high

    async def _list(self, kind: str, entries: list[Watched]) -> None:
        assert self._lister is not None
        oldest = min(e.number for e in entries)
        size = self._created.get(kind, 0) - oldest + 1 + LIST_MARGIN
        self.lists += 1
        try:
            found = await self._lister.list_recent(kind, size)
        except Exception as exc:
            # A list that fails, or whose answer cannot be read, is a failed list.
            if not isinstance(exc, ProviderError):
                self.log.exception("watch.list_unreadable", kind=kind)
            message = exc.message if isinstance(exc, ProviderError) else repr(exc)[:300]
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 50 == 0:
                self.log.info("watch.list_failed", kind=kind, error=message,
                              consecutive=self._failures)
            for entry in entries:
                self._unseen(entry)
            return
        self._failures = 0
        seen = self.clock.monotonic()
        for entry in entries:
            status = found.get(entry.task_id)
            if status is None:
                self._unseen(entry)
                continue
            entry.missing = 0
            ended = status.phase in (Phase.SUCCEEDED, Phase.FAILED)
            if ended or entry.confirming is not None:
                entry.confirming = None
                entry.ended = ended
                self._deliver(entry, status, trusted=True)
            else:
                start = None
                if status.started_at is not None and status.created_at is not None:
                    start = status.started_at - status.created_at
                entry.plan.observe(seen - entry.mono_start,
                                   running=status.phase is Phase.RUNNING,
                                   progress=status.progress, start=start)

    def _unseen(self, entry: Watched) -> None:
        """A list did not show the task (or failed): count it; a hint waiting for confirmation
        is answered "still running", and :meth:`confirm` then polls the task itself."""
        entry.missing += 1
        if entry.confirming is not None:
            self._deliver(entry, TaskStatus(entry.task_id, Phase.RUNNING), trusted=False)
        elif entry.missing == 2:
            # No longer the list's to look at: wake its tracker (no news), which polls the
            # task itself now rather than at its late safety net.
            self._event(entry).set()


def _can_list(provider: Provider) -> bool:
    return bool(getattr(provider, "can_list", False))
