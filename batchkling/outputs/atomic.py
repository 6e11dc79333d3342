"""Files that appear whole or not at all: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def create_temp(folder: Path, stem: str, suffix: str) -> tuple[int, Path]:
    """A new, empty file in ``folder`` that only this call created, with the mode an ordinary
    file would get (0666 less the umask, like the videos and ``run.log``), open for writing.

    ``tempfile.mkstemp`` makes 0600 files: a report that teammates on a shared server could
    not open.
    """
    for _ in range(100):
        path = folder / f".{stem}-{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        return fd, path
    raise FileExistsError(f"no free temporary name in {folder}")


@contextlib.contextmanager
def atomic_text(dest: Path, *, newline: str | None = None) -> Iterator[TextIO]:
    """Write text to ``dest`` through a temporary file renamed over it when the block ends.

    Readers see the old file or the new one, never half of one; on an error the old file stays.
    The file gets the mode of any new file (the umask decides), not a temporary file's 0600.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(dest.parent, dest.stem, dest.suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
