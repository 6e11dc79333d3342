"""Kill-and-pause soak: one run, SIGKILLed and SIGSTOPped again and again, never pays twice.

Runner after runner is started on the same run id against one simulator (with its journal, so
the simulated account keeps its tasks). Each is either SIGKILLed at a random moment, or
SIGSTOPped past ``--stale-after`` while a second runner takes the run over — then continued,
when it must change nothing and exit 5. At the end a last ``resume`` finishes the run and the
invariants are checked: no idempotency key created twice, no job lost (every job downloaded or
honestly ``unknown``), and a healthy store.

    python tests/soak_kill_pause.py --kills 200 --pauses 20 --jobs 100     # about 6-10 minutes

``tests/test_workers.py`` runs a short version of it in the suite.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import wait_until_running
from invariants import db_query

from batchkling.simulator import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    SimConfig,
    SimulatorServer,
)
from batchkling.testing import write_manifest

RUN = "soak"
ENV = {"KLING_ACCESS_KEY": DEFAULT_ACCESS_KEY, "KLING_SECRET_KEY": DEFAULT_SECRET_KEY}


@dataclass
class SoakResult:
    """What the soak did and found."""

    kills: int = 0
    pauses: int = 0
    fenced: int = 0  # paused runners that found their run taken over and exited 5
    #: Per pause: whether the second runner took the run over, and the paused one's exit code.
    paused: list[tuple[bool, int]] = field(default_factory=list)
    exit_codes: dict[int, int] = field(default_factory=dict)
    creates: int = 0
    duplicate_keys: list[str] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    integrity: str = ""
    seconds: float = 0.0


def _runner(workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchkling", *args, "--workdir", str(workdir),
         "--stale-after", "1s", "--speed", "200"],
        # Its log is never read here: a pipe nobody reads would block a runner that logs more
        # than the pipe holds (100 jobs' events do).
        env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stopped(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> bool:
    """Whether ``proc`` is stopped (by SIGSTOP) rather than finished; waits for the signal to
    land, which on a loaded machine is not at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
        except OSError:
            return False
        state = stat.rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return True
        if state in ("Z", "X"):
            return False
        time.sleep(0.005)
    return False


def _driving(workdir: Path) -> bool:
    """Whether a process drives the run: holds its lease and has not recorded its end (read
    without waiting on any lock: WAL)."""
    rows = db_query(workdir, "SELECT lease_owner, state FROM runs WHERE run_id = ?", RUN)
    return bool(rows and rows[0][0] and rows[0][1] == "running")


def soak(folder: Path, *, kills: int, pauses: int, jobs: int, seed: int = 7) -> SoakResult:
    """Run the soak in ``folder``; return its figures (the caller checks them)."""
    started = time.monotonic()
    rng = random.Random(seed)
    result = SoakResult()
    workdir = folder / "jobs"
    db = workdir / "batchkling.db"
    config = SimConfig(speed=200, seed=seed, render_median_s=60)
    with SimulatorServer(config, journal=folder / "sim-journal.jsonl") as sim:
        specs = [{"id": f"clip-{i:03d}", "prompt": f"shot {i}"} for i in range(jobs)]
        manifest = write_manifest(folder, specs, name=RUN, provider="kling",
                                  base_url=sim.base_url,
                                  limits={"max_in_flight": 8, "submit_rate": 20,
                                          "task_timeout": "2h"})
        plan = ["pause"] * pauses + ["kill"] * kills
        rng.shuffle(plan)
        for action in plan:
            first = _runner(workdir, "run", str(manifest))
            if not wait_until_running(first, db, RUN):
                code = first.wait()
                result.exit_codes[code] = result.exit_codes.get(code, 0) + 1
                if code == 0:
                    break  # the run finished between two actions: nothing left to disturb
                continue
            time.sleep(rng.uniform(0.0, 0.6))
            if action == "kill" or first.poll() is not None:
                first.kill()
                first.wait()
                result.kills += 1
                continue
            first.send_signal(signal.SIGSTOP)
            if not _stopped(first):
                # It ended its run just before the signal: that is no pause to count.
                code = first.wait()
                result.exit_codes[code] = result.exit_codes.get(code, 0) + 1
                continue
            if not _driving(workdir):
                # Stopped after it recorded the run's end (writing its files, or on its way
                # out): it has nothing left to fence, so that is no pause to count either.
                first.send_signal(signal.SIGCONT)
                code = first.wait(timeout=120)
                result.exit_codes[code] = result.exit_codes.get(code, 0) + 1
                if code == 0:
                    break  # the run is finished: nothing left to disturb
                continue
            time.sleep(1.3)  # silent past --stale-after
            second = _runner(workdir, "resume", RUN)
            took_over = wait_until_running(second, db, RUN)
            first.send_signal(signal.SIGCONT)
            code = first.wait(timeout=120)
            result.pauses += 1
            result.fenced += took_over and code == 5
            result.paused.append((took_over, code))
            result.exit_codes[code] = result.exit_codes.get(code, 0) + 1
            if second.poll() is None:
                time.sleep(rng.uniform(0.0, 0.4))
                second.kill()
                result.kills += 1
            second.wait()
        last = _runner(workdir, "resume", RUN)
        last.wait(timeout=600)
        stats: dict[str, Any] = sim.stats()
    result.creates = stats["creates"]
    result.duplicate_keys = list(stats["duplicate_keys"])
    result.states = dict(db_query(workdir, "SELECT state, COUNT(*) FROM jobs GROUP BY state"))
    result.integrity = str(db_query(workdir, "PRAGMA integrity_check")[0][0])
    result.seconds = time.monotonic() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--pauses", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = soak(Path(folder), kills=args.kills, pauses=args.pauses, jobs=args.jobs,
                      seed=args.seed)
    print(f"kills {result.kills}, pauses {result.pauses} (fenced and exited 5: "
          f"{result.fenced}), runner exit codes {result.exit_codes}")
    print(f"creates {result.creates} for {args.jobs} jobs; keys created twice: "
          f"{len(result.duplicate_keys)}")
    print(f"jobs by state {result.states}; integrity_check {result.integrity}; "
          f"{result.seconds:.0f} s")
    lost = args.jobs - result.states.get("downloaded", 0) - result.states.get("unknown", 0)
    ok = not result.duplicate_keys and lost == 0 and result.integrity == "ok"
    print("OK" if ok else f"FAILED: {lost} jobs neither downloaded nor unknown")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
