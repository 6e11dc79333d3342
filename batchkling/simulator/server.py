"""Serving the simulator over real HTTP: a thread helper for tests and ``batchkling simulate``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import uvicorn
import uvicorn.config
from starlette.applications import Starlette

from batchkling.errors import BatchklingError
from batchkling.simulator.app import create_app
from batchkling.simulator.config import SimConfig, load_faults, parse_model_entry
from batchkling.simulator.responses import install_drop_filter
from batchkling.simulator.state import SimState

_log = logging.getLogger("batchkling.simulator")
_T = TypeVar("_T")


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket; binding first is how we learn the port when ``port`` is 0."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)  # connect()s queue from now on, even before uvicorn accepts
    except OSError as exc:
        raise BatchklingError(f"simulator cannot listen on {host}:{port}: {exc.strerror or exc}"
                              ) from exc
    sock.set_inheritable(True)
    return sock


def _origin(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_config(app: Starlette, **extra: Any) -> uvicorn.Config:
    # "auto" means httptools and uvloop when installed, h11 and asyncio otherwise.
    return uvicorn.Config(app, http="auto", loop="auto", access_log=False, lifespan="on",
                          timeout_graceful_shutdown=2, **extra)


class SimulatorServer:
    """The simulator on a loopback port in a background thread, for ``with`` blocks in tests.

    It has its own event loop, so it works from sync tests and from inside async ones.
    """

    def __init__(self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 clock: Callable[[], float] | None = None, journal: Path | None = None) -> None:
        self.app = create_app(config or SimConfig(), clock=clock, journal=journal)
        self.sim: SimState = self.app.state.sim
        self._host, self._port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self.base_url = ""

    def __enter__(self) -> SimulatorServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Start serving and return once the port accepts connections."""
        sock = _bind(self._host, self._port)
        self.base_url = _origin(sock)
        config = _uvicorn_config(self.app, log_config=None, log_level="warning")
        self._server = uvicorn.Server(config)
        install_drop_filter()
        self._thread = threading.Thread(target=self._run, args=(config, sock),
                                        name="batchkling-simulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise BatchklingError(f"simulator did not start: {self._failure or 'timed out'}")
            time.sleep(0.005)

    def _run(self, config: uvicorn.Config, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
                self._loop = runner.get_loop()
                runner.run(self._server.serve(sockets=[sock]))
        except BaseException as exc:  # reported by start(); a thread has nobody else to tell
            self._failure = exc
        finally:
            sock.close()

    def stop(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._loop = None

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the server's loop (state is owned by it) and return its result."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or threading.current_thread() is thread:
            return fn()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=10)

    def stats(self) -> dict[str, Any]:
        """The same dict as ``GET /_sim/stats``, read without HTTP."""
        return self.call(self.sim.stats)

    def tasks(self) -> list[dict[str, Any]]:
        """The same list as ``GET /_sim/tasks``."""
        return self.call(self.sim.task_table)

    def update_config(self, **changes: Any) -> SimConfig:
        """Change settings while serving; raises ValueError for unknown fields or bad values."""
        return self.call(lambda: self.sim.update_config(**changes))


def serve_forever(*, host: str = "127.0.0.1", port: int = 8080, speed: float = 1.0, seed: int = 0,
                  faults: str = "none", api_key: str | None = None, access_key: str | None = None,
                  secret_key: str | None = None, journal: Path | None = None,
                  price_factor: float | None = None, models: tuple[str, ...] = ()) -> None:
    """Serve until interrupted (``batchkling simulate``); BatchklingError for bad faults or port.

    ``models`` are accepted beside the built-in ones (each ``id`` or ``id=STD/PRO``).
    """
    for entry in models:
        try:
            parse_model_entry(entry)
        except ValueError as exc:
            raise BatchklingError(f"--models: {exc}") from None
    config = load_faults(faults, speed=speed, seed=seed, api_key=api_key, access_key=access_key,
                         secret_key=secret_key, price_factor=price_factor,
                         extra_models=models or None)
    app = create_app(config, journal=journal)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["batchkling.simulator"] = {
        "handlers": ["default"], "level": "INFO", "propagate": False}
    sock = _bind(host, port)
    uv_config = _uvicorn_config(app, log_config=log_config)  # configures the loggers
    install_drop_filter()
    base = _origin(sock)
    key = f"bearer {config.api_key!r}" if config.api_key else "any non-empty bearer key"
    _log.info("batchkling simulator on %s (faults=%s, seed=%d, speed=%g, prices x%g the table)",
              base, faults, config.seed, config.speed, config.price_factor)
    if config.extra_models:
        _log.info("Extra models: %s", ", ".join(config.extra_models))
    _log.info("ImaRouter shape: POST %s/v1/videos, GET %s/v1/videos/{task_id} — %s",
              base, base, key)
    _log.info("Kling shape: POST/GET %s/v1/videos/text2video|image2video — JWT HS256 with "
              "access key %r, secret key %r", base, config.access_key, config.secret_key)
    if journal is not None:
        _log.info("Tasks journal: %s (%d tasks loaded)", journal, app.state.sim.restored)
    _log.info("Controls: %s/_sim/stats, %s/_sim/tasks, POST %s/_sim/config", base, base, base)
    try:
        uvicorn.Server(uv_config).run(sockets=[sock])
    finally:
        sock.close()
