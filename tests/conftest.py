"""Shared fixtures: a simulator on loopback, a test API key, manifest helpers, and the store
backends a test may run on (``backend`` / ``store_url``: SQLite in the workdir, or a fresh
database on the throwaway PostgreSQL cluster of ``pgcluster``)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from invariants import db_query
from pgcluster import pg_cluster as pg_cluster
from pgcluster import pg_url as pg_url

from batchkling.logs import configure_logging
from batchkling.simulator import SimConfig, SimulatorServer, load_faults
from batchkling.store import is_postgres

#: The S3 test server's fixtures (s3_server, s3_bucket, s3_env, s3_fault_proxy).
pytest_plugins = ["s3server"]

#: A distinctive key: the secret sweep greps every output for it.
TEST_KEY = "sk-test-SECRET-7f3a9c2e51d84b06"
#: Renders of ~90 s take ~0.2 s: fast tests, same shapes and timings in proportion.
SPEED = 400.0


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(console="off")


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("BATCHKLING_TEST_KEY", TEST_KEY)
    return TEST_KEY


@pytest.fixture
def simulator() -> Iterator[Callable[..., SimulatorServer]]:
    """Start simulators (real loopback servers): ``simulator(profile="flaky", slot_limit=3)``."""
    started: list[SimulatorServer] = []

    def start(profile: str = "none", **overrides: Any) -> SimulatorServer:
        settings: dict[str, Any] = {"speed": SPEED, "seed": 7, **overrides}
        config: SimConfig = load_faults(profile, **settings)
        server = SimulatorServer(config)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "jobs"
    path.mkdir()
    return path


#: The store backends a parametrised test runs on.
BACKENDS = ("sqlite", "postgres")
#: Set BATCHKLING_ALL_BACKENDS=1 to run the tests marked ``SQLITE_UNLESS_ALL`` on PostgreSQL too.
ALL_BACKENDS = os.environ.get("BATCHKLING_ALL_BACKENDS") == "1"
#: For heavy tests of logic the store does not take part in (flow control, polling, signals):
#: they are written for any backend (``store_url``) but run on SQLite only unless
#: ``ALL_BACKENDS``, which keeps the suite within a few minutes on two cores.
SQLITE_UNLESS_ALL = pytest.mark.parametrize("backend", BACKENDS if ALL_BACKENDS else ("sqlite",))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each store backend in turn: ``sqlite`` or ``postgres``."""
    return str(request.param)


@pytest.fixture
def store_url(backend: str, workdir: Path, request: pytest.FixtureRequest) -> str:
    """Where the test's store lives: the workdir's SQLite file, or a fresh PostgreSQL database
    (the ``--store`` of the CLI, the ``store=`` of an Orchestrator)."""
    if backend == "sqlite":
        return str(workdir / "batchkling.db")
    return str(request.getfixturevalue("pg_url"))


def cli_process(*args: str, speed: float | str | None = None, env: Mapping[str, str] | None = None,
                crash_at: str | None = None, stdout: bool = False,
                base_env: Mapping[str, str] | None = None,
                preexec_fn: Callable[[], None] | None = None,
                stderr: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m batchkling ARGS [--speed SPEED]`` in a child process.

    Its environment is ``base_env`` (default: this process's) with the test key and ``env``
    over it, and no crash point but ``crash_at``'s. Its stderr is piped, or written to the
    file ``stderr`` (a long-lived process logs more than a pipe holds: unread, it would block
    the process), and its stdout piped when ``stdout`` is set (else discarded);
    :func:`finish_process` collects them.
    """
    full = {**(os.environ if base_env is None else base_env), "BATCHKLING_TEST_KEY": TEST_KEY,
            **(env or {})}
    full.pop("BATCHKLING_CRASH_AT", None)
    if crash_at:
        full["BATCHKLING_CRASH_AT"] = crash_at
    speed_args = () if speed is None else ("--speed", str(speed))
    log = None if stderr is None else stderr.open("wb")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "batchkling", *args, *speed_args],
                                env=full, stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                                stderr=subprocess.PIPE if log is None else log,
                                preexec_fn=preexec_fn)
    finally:
        if log is not None:
            log.close()  # the child has its own descriptor
    proc.stderr_path = stderr  # type: ignore[attr-defined]  # for finish_process
    return proc


def finish_process(proc: subprocess.Popen[bytes], timeout: float = 90) -> tuple[int, str, str]:
    """Wait for a :func:`cli_process`: its exit code, stdout and stderr. A hang past
    ``timeout`` is the failure: the process is killed, none left behind, and it raises."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    path = getattr(proc, "stderr_path", None)
    if path is not None:
        err = path.read_bytes()
    return (proc.returncode, (out or b"").decode(errors="replace"),
            (err or b"").decode(errors="replace"))


def wait_until_running(proc: subprocess.Popen[bytes], db: Path | str, run_id: str,
                       timeout: float = 60.0) -> bool:
    """Block until the CLI process holds its run's lease (True), or has exited or timed out
    first (False); ``db`` is its store: a SQLite file or a PostgreSQL URL.

    Kill loops draw their random moment from here, so a kill lands in the run itself rather
    than in interpreter start-up, however loaded the machine is.
    """
    location = str(db)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if is_postgres(location) or Path(location).exists():
            try:
                rows = db_query(location, "SELECT w.pid FROM runs r JOIN workers w"
                                " ON w.worker_id = r.lease_owner WHERE r.run_id = ?", run_id)
            except (sqlite3.Error, psycopg.Error):  # being created: no table yet
                rows = []
            if rows and rows[0][0] == proc.pid:
                return True
        time.sleep(0.01)
    return False
