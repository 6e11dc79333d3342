"""Shared fixtures: a simulator on loopback, a test API key, manifest helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchkling.logs import configure_logging
from batchkling.simulator import SimConfig, SimulatorServer, load_faults

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
