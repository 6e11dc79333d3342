"""What every backend's liveness rules share: this host's identity, and a process gone from it.

A worker row records the host, boot and pid of its process. Beyond a silent heartbeat (judged on
each backend's own clock: SQLite's host-wide monotonic clock, PostgreSQL's server clock), a
worker is gone at once when it ran on this very host and boot and its process no longer exists
(a SIGKILLed worker: no need to wait out its heartbeat).
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

from batchkling.errors import RunLocked

#: Why a write of a worker presumed dead changed nothing (its :class:`WorkerFenced` message).
FENCED = (
    "this worker was presumed dead (silent for longer than its stale-after, e.g. paused or "
    "suspended) and another worker has taken over its jobs; it stopped without changing "
    "anything more"
)


def host_clock() -> float:
    """Seconds on a clock every process of this host shares, that no wall-clock step moves
    and that keeps counting while the machine sleeps (a laptop lid closed)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def _read_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        # No boot id to tell boots apart: a heartbeat from before a reboot looks fresh until
        # the wall-clock comparison a backend falls back on would say otherwise.
        return f"{socket.gethostname()}-{math.floor(time.time() - host_clock())}"


#: This machine's current boot (two boots, or two machines, never share one).
BOOT_ID = _read_boot_id()


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def gone_here(host: str, boot_id: str, pid: int) -> bool:
    """Whether a worker that ran as ``pid`` on ``host`` in boot ``boot_id`` is known to be
    gone: it ran on this host in this boot, and that process no longer exists."""
    return host == socket.gethostname() and boot_id == BOOT_ID and not process_alive(pid)


def run_locked(run_id: str, pid: int, host: str, silent: float) -> RunLocked:
    """The refusal a run's live driver earns another process (every backend's words)."""
    return RunLocked(f"run {run_id!r} is being run by process {pid} on {host} (last heartbeat "
                     f"{max(0.0, silent):.0f}s ago); wait for it to finish, or stop it first")


def lease_is_stale(pid: int | None, host: str | None, age: float | None, *,
                   stale_after: float) -> bool:
    """Whether a run's lease looks abandoned to a reader (the screens' liveness rule).

    ``age`` is the seconds since its holder's last heartbeat (None: never beat). A lease is
    stale when that is over ``stale_after``, or when its holder was on this host and that
    process no longer exists (a SIGKILLed runner: no need to wait out its heartbeat).
    """
    if age is None or age > stale_after:
        return True
    return host == socket.gethostname() and pid is not None and not process_alive(pid)
