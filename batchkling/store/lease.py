"""The single-runner lease rule every backend applies: when a holder counts as gone.

Only the clock differs: SQLite compares the caller's ``now`` with the stored heartbeat (one
machine, one clock); PostgreSQL compares its own clock with a heartbeat it stamped itself, since
runners on different machines do not share a clock. Both hand the age here.
"""

from __future__ import annotations

import os
import socket


def lease_is_stale(pid: int | None, host: str | None, age: float | None, *,
                   stale_after: float) -> bool:
    """Whether a lease may be taken over.

    ``age`` is the seconds since its holder's last heartbeat (None: never beat). A lease is
    stale when that is over ``stale_after``, or when its holder was on this host and that
    process no longer exists (a SIGKILLed runner: no need to wait out its heartbeat).
    """
    if age is None or age > stale_after:
        return True
    if host == socket.gethostname() and pid is not None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by someone else
            return False
    return False
