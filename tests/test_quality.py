"""The code stays lint-clean and strictly typed, and the public surface is curated."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import batchkling

ROOT = Path(__file__).resolve().parent.parent


def test_public_surface() -> None:
    """`__all__` is sorted, and every name in it resolves."""
    assert batchkling.__all__ == sorted(batchkling.__all__)
    for name in batchkling.__all__:
        assert getattr(batchkling, name) is not None
    for name in ("Orchestrator", "load_manifest", "Manifest", "JobSpec", "RunSummary",
                 "ManifestError", "ProviderError", "StoreError"):
        assert name in batchkling.__all__


@pytest.mark.timeout(300)
def test_ruff_is_clean() -> None:
    """`ruff check .` reports nothing."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    proc = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean() -> None:
    """`mypy` (strict, configured in pyproject.toml) reports nothing on the package."""
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
