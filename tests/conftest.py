"""Shared fixtures: a simulator on loopback, a test API key, manifest helpers."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchkling.logs import configure_logging
from batchkling.simulator import SimConfig, SimulatorServer, load_faults

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


def wait_until_running(proc: subprocess.Popen[bytes], db: Path, run_id: str,
                       timeout: float = 60.0) -> None:
    """Block until the CLI process holds its run's lease (or has exited).

    Kill loops draw their random moment from here, so a kill lands in the run itself rather
    than in interpreter start-up, however loaded the machine is.
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if db.exists():
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                try:
                    row = con.execute("SELECT lease_pid FROM runs WHERE run_id = ?",
                                      (run_id,)).fetchone()
                finally:
                    con.close()
            except sqlite3.Error:
                row = None
            if row is not None and row[0] == proc.pid:
                return
        time.sleep(0.01)
