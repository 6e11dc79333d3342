"""The store stage: the checkpoint store, the single source of truth for runs and jobs.

Owns the store's interface (``interface.Store``, an abstract base that the engine, the
orchestrator and the views depend on), the row types every backend returns (``rows``), and the
backends with their schemas and migrations: SQLite (``sqlite``, ``sqlite_schema``), the embedded
default, and PostgreSQL (``postgres``, ``postgres_schema``), the store many machines share;
``lease`` (what both backends' liveness rules share) and ``locate`` (a ``--store`` location →
a backend).

May import: the foundation modules only (``errors``, ``models``, ``pricing``), and its drivers
(aiosqlite, psycopg). The store knows nothing of manifests, providers or runs in progress: it
keeps what it is told, atomically.
"""

from batchkling.store.interface import RECENT_ENDS, Store
from batchkling.store.locate import default_location, is_postgres, store_exists, store_from
from batchkling.store.rows import JobRow, RunRow

__all__ = [
    "RECENT_ENDS",
    "JobRow",
    "RunRow",
    "Store",
    "default_location",
    "is_postgres",
    "store_exists",
    "store_from",
]
