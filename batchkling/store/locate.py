"""From a store location (what ``--store`` and ``BATCHKLING_STORE`` give) to a store backend."""

from __future__ import annotations

import os
from pathlib import Path

from batchkling.errors import ConfigError
from batchkling.store.interface import Store

#: The SQLite file of a workdir when no store is named.
DEFAULT_FILE = "batchkling.db"


def default_location(workdir: str | os.PathLike[str]) -> Path:
    """The embedded store of a workdir: ``<workdir>/batchkling.db``."""
    return Path(workdir) / DEFAULT_FILE


def store_from(location: str | os.PathLike[str]) -> Store:
    """A (not yet opened) store for ``location``: a file path, or ``sqlite:///path``."""
    text = os.fspath(location)
    if text.startswith("sqlite://"):
        text = text.removeprefix("sqlite://")
        if not text.startswith("/"):
            raise ConfigError(f"store URL {location!r}: write sqlite:///relative/path or "
                              "sqlite:////absolute/path, or just the file's path")
        text = text[1:]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(f"store URL scheme {scheme!r} is not supported: give a file path or "
                          "sqlite:///path")
    from batchkling.store.sqlite import SqliteStore

    return SqliteStore(text)
