"""From a store location (what ``--store`` and ``BATCHKLING_STORE`` give) to a store backend.

A location is a file path or ``sqlite:///path`` (SQLite, the default: ``<workdir>/batchkling.db``),
or a ``postgresql://`` / ``postgres://`` URL (PostgreSQL, for stores many machines share).
"""

from __future__ import annotations

import os
from pathlib import Path

from batchkling.clock import Clock
from batchkling.errors import ConfigError
from batchkling.store.interface import Store

#: The SQLite file of a workdir when no store is named.
DEFAULT_FILE = "batchkling.db"
#: URL schemes of the PostgreSQL backend (libpq accepts both).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def default_location(workdir: str | os.PathLike[str]) -> Path:
    """The embedded store of a workdir: ``<workdir>/batchkling.db``."""
    return Path(workdir) / DEFAULT_FILE


def is_postgres(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a PostgreSQL store."""
    return os.fspath(location).lower().startswith(POSTGRES_SCHEMES)


def sqlite_path(location: str | os.PathLike[str]) -> Path:
    """The file a SQLite location names; :class:`ConfigError` for anything else."""
    text = os.fspath(location)
    if text.startswith("sqlite://"):
        text = text.removeprefix("sqlite://")
        if not text.startswith("/"):
            raise ConfigError(f"store URL {os.fspath(location)!r}: write sqlite:///relative/path"
                              " or sqlite:////absolute/path, or just the file's path")
        return Path(text[1:])
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(f"store URL scheme {scheme!r} is not supported: give a file path, "
                          "sqlite:///path or postgresql://user@host/dbname")
    return Path(text)


def store_from(location: str | os.PathLike[str], *, clock: Clock | None = None) -> Store:
    """A (not yet opened) store for ``location``; :class:`ConfigError` if it names none.

    ``clock``: a clock for heartbeats, staleness and pauses instead of the backend's own (a
    test's virtual clock).
    """
    if is_postgres(location):
        from batchkling.store.postgres import PostgresStore

        return PostgresStore(os.fspath(location), clock=clock)
    path = sqlite_path(location)
    from batchkling.store.sqlite import SqliteStore

    return SqliteStore(path, clock=clock)


async def store_exists(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` already holds a store, checked without creating one.

    Reading commands (``status``, ``export``, ``report``, ``resume``) ask first, so a mistyped
    folder or database gets "no runs" instead of a new, empty store.
    """
    if is_postgres(location):
        from batchkling.store.postgres import PostgresStore

        return await PostgresStore(os.fspath(location)).exists()
    return sqlite_path(location).exists()
