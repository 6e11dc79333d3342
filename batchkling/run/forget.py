"""``batchkling forget``: remove a run's records (and, if asked, its folder) — never a live one.

The lease decides: forgetting takes the run's lease first, exactly as a runner would, so a run
that a live process is driving is refused (:class:`~batchkling.errors.RunLocked`) and no
runner can start on it while its records are being deleted.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import anyio.to_thread

from batchkling.errors import ConfigError, RunLocked
from batchkling.logs import get_logger
from batchkling.models import IN_FLIGHT, LEASE_STALE_AFTER
from batchkling.store import Store, default_location, store_from


async def forget_run(workdir: Path, run_id: str, *, files: bool,
                     store: str | os.PathLike[str] | None = None) -> tuple[int, Path | None]:
    """Delete the run's records (in ``store``, default the workdir's); with ``files`` also
    ``workdir/run_id``. Returns how many jobs it had and the folder deleted (None if none)."""
    from batchkling.run.orchestrator import resolve_run_id

    if resolve_run_id(run_id) != run_id:  # '{date}' or an unsafe name: not a stored id
        raise ConfigError(f"{run_id!r} is not a run id")
    async with store_from(default_location(workdir) if store is None else store) as db:
        return await forget_in(db, run_id, workdir / run_id if files else None)


async def forget_in(store: Store, run_id: str, folder: Path | None) -> tuple[int, Path | None]:
    """:func:`forget_run` on an open store; ``folder``, if given, is deleted too."""
    run = await store.require_run(run_id)
    from batchkling.outputs.views import run_is_live

    if await run_is_live(store, run):  # its lease holder, or a worker serving it, is alive
        raise RunLocked(f"run {run_id!r} is being run (`batchkling status {run_id}` shows by "
                        "whom); stop it first, or wait for it to finish")
    owner = f"forget-{uuid.uuid4().hex}"
    await store.acquire_lease(run_id, owner, now=time.time(), stale_after=LEASE_STALE_AFTER)
    counts = await store.counts(run_id)
    jobs = await store.forget_run(run_id)
    in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT)
    deleted: Path | None = None
    if folder is not None and await anyio.Path(folder).is_dir():
        await anyio.to_thread.run_sync(shutil.rmtree, folder)
        deleted = folder
    if in_flight:
        get_logger(run_id=run_id).warning("run.forgotten_in_flight", tasks=in_flight)
    return jobs, deleted
