"""Helpers for testing code that uses batchkling — and for batchkling's own tests.

- :class:`StepClock`: a clock whose ``sleep`` advances virtual time at once, for testing logic
  that waits (rate gates, backoff) without waiting.
- :func:`write_manifest`: a manifest file from Python values, with sensible defaults.
- The simulator: :class:`SimConfig`, :class:`SimulatorServer`, :func:`create_app`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import yaml

from batchkling.simulator import SimConfig, SimulatorServer, create_app

__all__ = ["SimConfig", "SimulatorServer", "StepClock", "create_app", "write_manifest"]


class StepClock:
    """Virtual time: ``sleep`` moves the clock forward by the amount asked, then yields."""

    def __init__(self, start: float = 1_000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall_offset
        self.slept: list[float] = []

    def monotonic(self) -> float:
        """Virtual seconds."""
        return self.now

    def wall(self) -> float:
        """Virtual unix time."""
        return self.now + self.wall_offset

    async def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` (recorded in ``slept``) and let other tasks run."""
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def write_manifest(
    folder: Path,
    jobs: Sequence[Mapping[str, Any]] = (),
    *,
    name: str = "test-run",
    base_url: str | None = None,
    provider: str = "imarouter",
    api_key_env: str = "BATCHKLING_TEST_KEY",
    filename: str = "manifest.yaml",
    **sections: Any,
) -> Path:
    """Write a manifest to ``folder/filename`` and return its path.

    ``sections`` become top-level keys (``limits={...}``, ``matrices=[...]``, ...).
    """
    provider_block: dict[str, Any] = {"name": provider}
    if base_url:
        provider_block["base_url"] = base_url
    if provider == "imarouter":
        provider_block["api_key_env"] = api_key_env
    data: dict[str, Any] = {"version": 1, "name": name, "provider": provider_block}
    data.update(sections)
    if jobs:
        data["jobs"] = [dict(job) for job in jobs]
    path = folder / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
