"""The simulator's ASGI app: both provider shapes, the file server and the ``/_sim`` controls."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from batchkling.simulator import imarouter, kling
from batchkling.simulator.callbacks import callback_loop
from batchkling.simulator.config import SimConfig
from batchkling.simulator.media import serve_file
from batchkling.simulator.responses import json_response, read_json
from batchkling.simulator.state import SimState

_INBOX_MAX = 10_000


class _SlowResponses:
    """Adds ``slow_response_s`` real seconds before every provider answer (not the controls)."""

    def __init__(self, app: ASGIApp, sim: SimState) -> None:
        self.app, self.sim = app, sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        delay = self.sim.config.slow_response_s
        if delay > 0 and scope["type"] == "http":
            path: str = scope["path"]
            if not path.startswith("/_sim/") or path.startswith("/_sim/files/"):
                await anyio.sleep(delay)
        await self.app(scope, receive, send)


async def _stats(request: Request) -> Response:
    """``GET /_sim/stats``: counters (see ``SimState.stats``)."""
    return json_response(request.app.state.sim.stats())


async def _tasks(request: Request) -> Response:
    """``GET /_sim/tasks``: every task with its drawn timings in sim seconds."""
    return json_response(request.app.state.sim.task_table())


async def _config(request: Request) -> Response:
    """``GET /_sim/config`` shows the settings; ``POST`` applies a JSON object of changes."""
    sim: SimState = request.app.state.sim
    if request.method == "POST":
        try:
            changes = await read_json(request)
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object of simulator settings")
            sim.update_config(**changes)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
    return json_response(sim.config.as_dict())


async def _callback_sink(request: Request) -> Response:
    """``/_sim/callback-sink``: POST stores a JSON body, GET lists them (a ready callback_url)."""
    sim: SimState = request.app.state.sim
    if request.method == "POST":
        try:
            sim.callback_inbox.append(await read_json(request))
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        del sim.callback_inbox[:-_INBOX_MAX]
        return json_response({"ok": True})
    return json_response(sim.callback_inbox)


async def _health(request: Request) -> Response:
    """``GET /_sim/health``: the server is up."""
    return json_response({"ok": True})


def create_app(config: SimConfig, *, clock: Callable[[], float] | None = None,
               journal: Path | None = None) -> Starlette:
    """The simulator as an ASGI app; its state is ``app.state.sim`` (a ``SimState``).

    ``clock`` (default ``time.monotonic``) drives every simulated time; pass a fake one to step
    renders, URL expiry and token lifetimes from a test. Callbacks are delivered only while the
    app's lifespan runs (under uvicorn or ``SimulatorServer``). With ``journal``, every task is
    appended to that file and the tasks already in it are loaded, so a simulator started again
    keeps the account's tasks (they go on rendering in wall time while it is down).
    """
    sim = SimState(config, clock, journal=journal)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(callback_loop, sim)
            yield
            tg.cancel_scope.cancel()

    routes: list[Any] = [
        # Kling's literal kinds go first: /v1/videos/text2video must not be read as a task id.
        *kling.routes,
        *imarouter.routes,
        Route("/_sim/stats", _stats, methods=["GET"]),
        Route("/_sim/tasks", _tasks, methods=["GET"]),
        Route("/_sim/config", _config, methods=["GET", "POST"]),
        Route("/_sim/health", _health, methods=["GET"]),
        Route("/_sim/callback-sink", _callback_sink, methods=["GET", "POST"]),
        Route("/_sim/files/{name}", serve_file, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(_SlowResponses, sim=sim)])
    app.state.sim = sim
    return app

