"""The live display on a real terminal: ``batchkling run --simulate`` inside tmux, read frame by
frame with ``tmux capture-pane``.

Needs the ``tmux`` binary; CI installs it and sets ``BATCHKLING_REQUIRE_TMUX=1``, which turns the
skip into a failure. Each test runs its own tmux server on a private socket and kills it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from invariants import db_query

from batchkling.testing import write_manifest

TMUX = shutil.which("tmux")
if TMUX is None and os.environ.get("BATCHKLING_REQUIRE_TMUX"):
    pytest.fail("no tmux binary (apt-get install tmux)", pytrace=False)
pytestmark = pytest.mark.skipif(TMUX is None, reason="no tmux binary (CI installs it)")

_SLOTS = re.compile(r"slots (\d+)/(\d+)")

#: Runs the command in the pane (the terminal's foreground process group, so Ctrl-C reaches it)
#: and writes its exit status (128 + the signal's number if a signal ended it) to argv[1].
_WRAPPER = """
import signal, subprocess, sys
signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C is the command's; handlers reset on exec
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    fh.write(f"{code if code >= 0 else 128 - code}\\n")
sys.exit(code if code >= 0 else 128 - code)
"""


class Pane:
    """One command in a detached tmux window of a private server."""

    def __init__(self, command: list[str], *, width: int, height: int = 40,
                 status_file: Path) -> None:
        self.socket = f"bk-{uuid.uuid4().hex[:10]}"
        self.status_file = status_file
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHKLING")}
        env["TERM"] = "xterm-256color"
        # The command's exit status comes through a file its wrapper writes: tmux 3.3a now and
        # then leaves a finished pane's process unreaped (a zombie) and never reports the pane
        # dead, although the command ended.
        command = [sys.executable, "-c", _WRAPPER, str(status_file), *command]
        # The server starts with the session; the options then keep a finished pane readable.
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                   "sleep", "120", env=env)
        self._tmux("set-option", "-t", "t", "window-size", "manual")
        self._tmux("set-option", "-t", "t", "remain-on-exit", "on")
        self._tmux("set-option", "-t", "t", "history-limit", "5000")
        self._tmux("respawn-pane", "-k", "-t", "t", *command, env=env)

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        assert TMUX is not None
        return subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True,
                              check=True, env=env, timeout=30).stdout

    def screen(self) -> list[str]:
        """The visible rows now."""
        return self._tmux("capture-pane", "-p", "-t", "t").splitlines()

    def history(self) -> str:
        """Everything the pane shows and scrolled past."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")

    def exit_status(self) -> int | None:
        """The command's exit status once it has ended."""
        try:
            text = self.status_file.read_text()
        except FileNotFoundError:
            return None
        return int(text) if text.endswith("\n") else None  # written whole, then the newline

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def resize(self, width: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(width))

    def close(self) -> None:
        subprocess.run([str(TMUX), "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=30, check=False)


@pytest.fixture
def run_in_tmux(tmp_path: Path) -> Iterator[tuple[Pane, Path]]:
    """A 30-job simulated run of 8 slots, renders of about 9 s, in a 110-column terminal."""
    jobs = [{"id": f"shot-{i:02d}", "prompt": f"scene {i}"} for i in range(30)]
    path = write_manifest(tmp_path, jobs, name="live", limits={"max_in_flight": 8,
                                                              "submit_rate": 20})
    workdir = tmp_path / "jobs"
    pane = Pane([sys.executable, "-m", "batchkling", "run", str(path), "--simulate", "--speed",
                 "10", "--workdir", str(workdir), "--yes"], width=110,
                status_file=tmp_path / "exit-status")
    try:
        yield pane, workdir
    finally:
        pane.close()


def _frame(rows: list[str]) -> dict[str, int] | None:
    """Slots and counts of the one frame on screen, or None when no whole frame is there."""
    headers = [i for i, row in enumerate(rows) if row.startswith("live ") and "slots" in row]
    if len(headers) != 1 or headers[0] + 1 >= len(rows):
        return None
    match = _SLOTS.search(rows[headers[0]])
    if match is None:
        return None
    counts = {state: int(n) for state, n in re.findall(r"([a-z_]+) (\d+)", rows[headers[0] + 1])}
    return {"slots": int(match.group(1)), "limit": int(match.group(2)), **counts,
            "eta_known": int("ETA —" not in rows[headers[0]])}


def _wait_exit(pane: Pane, timeout: float = 150) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = pane.exit_status()
        if status is not None:
            return status, pane.history()
        time.sleep(0.1)
    raise AssertionError("the run did not end:\n" + pane.history())


@pytest.mark.timeout(300)
def test_slots_match_the_tasks_and_ctrl_c_counts_the_rendering(
    run_in_tmux: tuple[Pane, Path],
) -> None:
    """At every sampled frame the slots in use equal submitted + running; an ETA shows from
    the first frame; after Ctrl-C the last frame and the summary count the tasks still
    rendering (paid, adopted by resume), and "creates stopped: interrupted" is said once."""
    pane, workdir = run_in_tmux
    frames: list[dict[str, int]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        frame = _frame(pane.screen())
        if frame is not None:
            frames.append(frame)
            if frame["slots"] >= 2 and len(frames) >= 4:
                break
        time.sleep(0.05)
    assert frames, pane.history()
    for frame in frames:
        assert frame["slots"] == frame.get("submitted", 0) + frame.get("running", 0), frame
    first = next(f for f in frames if f.get("pending") or f["slots"])
    assert first["eta_known"], "no ETA before the first job ended"
    pane.keys("C-c")
    status, text = _wait_exit(pane)
    assert status == 130, text
    rendering = db_query(workdir, "SELECT COUNT(*) FROM jobs WHERE state IN "
                                  "('submitted', 'running')")[0][0]
    assert rendering > 0
    last = _frame(pane.screen())
    assert last is not None and last["slots"] == rendering, pane.history()
    summary = next(line for line in text.splitlines() if line.startswith("batchkling: run live"))
    said = dict((state, int(n)) for n, state in re.findall(r"(\d+) ([a-z_]+)", summary))
    assert said.get("submitted", 0) + said.get("running", 0) == rendering, summary
    assert text.count("creates stopped: interrupted") == 1, text
    assert f"batchkling resume live --workdir {workdir}" in text


@pytest.mark.timeout(300)
def test_a_narrowed_terminal_keeps_one_frame(run_in_tmux: tuple[Pane, Path]) -> None:
    """Narrowing the terminal mid-run leaves no stale line: the screen shows one frame."""
    pane, _workdir = run_in_tmux
    deadline = time.monotonic() + 60
    while _frame(pane.screen()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.6)
    pane.resize(60)
    time.sleep(1.5)  # a few redraws at the new width
    rows = pane.screen()
    # The header is the one row with an ETA: a stale piece of an old frame would be another.
    assert sum("ETA" in row for row in rows) == 1, "\n".join(rows)
    assert sum(row.startswith("live ") for row in rows) == 1, "\n".join(rows)
    assert all(len(row) <= 60 for row in rows)
    pane.keys("C-c")
    _wait_exit(pane)
