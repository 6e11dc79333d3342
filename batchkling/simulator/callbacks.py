"""Status-change callbacks (``callback_url``), delivered best effort by one background loop.

Status is computed lazily, so nothing "happens" when a task finishes. A loop started in the app's
lifespan wakes when the next status change of a task that asked for callbacks is due (at least
every ``CALLBACK_TICK_S`` real seconds) and POSTs the task object (Kling's ``data`` for
Kling-shape tasks, the video object for ImaRouter ones) for every status it has not reported
yet — promptly, as Kling does, even at high speeds. Failures are counted, never raised.
In-process use through ``httpx.ASGITransport`` runs no lifespan: call ``deliver_due`` yourself.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx

from batchkling.simulator import imarouter, kling
from batchkling.simulator.state import COMPLETED, FAILED, IN_PROGRESS, QUEUED, SimState, Task

CALLBACK_TICK_S = 0.1
_STEPS = [QUEUED, IN_PROGRESS]
_log = logging.getLogger("batchkling.simulator")


def _step_start(task: Task, step: str) -> float:
    return task.created_sim if step == QUEUED else task.started_sim


def _payload(sim: SimState, task: Task, now: float, base: str) -> Any:
    if task.shape == kling.SHAPE:
        return kling.task_data(sim, task, now, base)
    return imarouter.video_object(sim, task, now, base, observe=False)


async def _post(sim: SimState, client: httpx.AsyncClient, url: str, payload: Any) -> None:
    try:
        response = await client.post(url, json=payload)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        sim.counters.callbacks_failed += 1
        _log.debug("callback to %s failed: %s", url, exc)
    else:
        sim.counters.callbacks_sent += 1


async def deliver_due(sim: SimState, client: httpx.AsyncClient) -> int:
    """POST every status change not yet reported; returns how many callbacks were sent or tried."""
    if not sim.config.callbacks or not sim.callback_pending:
        return 0
    now = sim.sim_now()
    due: list[tuple[str, Any]] = []
    for task_id, (task, base) in list(sim.callback_pending.items()):
        state = sim.status(task, now)
        if state == task.last_callback:
            continue
        assert task.callback_url is not None  # only such tasks are registered
        # Report every change in order, even one shorter than a tick, as Kling would have.
        path = _STEPS[: _STEPS.index(state) + 1] if state in _STEPS else [*_STEPS, state]
        seen = path.index(task.last_callback) + 1 if task.last_callback in path else 0
        for step in path[seen:]:
            at = now if step == state else _step_start(task, step)
            if sim.status(task, at) == step:
                due.append((task.callback_url, _payload(sim, task, at, base)))
        task.last_callback = state
        if state in (COMPLETED, FAILED):
            del sim.callback_pending[task_id]
    limiter = anyio.CapacityLimiter(16)

    async def send(url: str, payload: Any) -> None:
        async with limiter:
            await _post(sim, client, url, payload)

    async with anyio.create_task_group() as tg:
        for url, payload in due:
            tg.start_soon(send, url, payload)
    return len(due)


def next_change(sim: SimState) -> float | None:
    """Real seconds until the next status change of a task awaiting callbacks, if any."""
    now = sim.sim_now()
    soonest = None
    for task, _base in sim.callback_pending.values():
        at = task.started_sim if now < task.started_sim else task.ends_sim
        if soonest is None or at < soonest:
            soonest = at
    if soonest is None or soonest == float("inf"):
        return None
    return max(0.0, (soonest - now) / sim.config.speed)


async def callback_loop(sim: SimState, client: httpx.AsyncClient | None = None) -> None:
    """Deliver callbacks forever (until cancelled with the app's lifespan)."""
    wake = anyio.Event()

    def poke() -> None:
        wake.set()

    sim.callback_poke = poke  # a new task asking for callbacks wakes the loop at once
    async with client or httpx.AsyncClient(timeout=2.0) as http:
        while True:
            wait = next_change(sim)
            with anyio.move_on_after(CALLBACK_TICK_S if wait is None
                                     else min(CALLBACK_TICK_S, wait + 0.0005)):
                await wake.wait()
            wake = anyio.Event()
            try:
                await deliver_due(sim, http)
            except Exception:  # a bug in delivery must not take the server down
                _log.exception("callback delivery failed")
