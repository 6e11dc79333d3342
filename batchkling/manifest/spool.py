"""Expanded jobs kept in a scratch file rather than in memory.

``run`` and ``submit`` expand a manifest into this spool: a 100,000-job matrix is some 40 MB of
JSON on disk instead of 100,000 :class:`~batchkling.models.JobSpec` objects held for the whole
run, so a run's memory does not grow with its manifest. Each line is a job's fingerprint and its
``JobSpec.to_json()``; reading it back gives equal jobs, their fingerprints not computed again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO

from batchkling.models import JobSpec


class JobSpool:
    """Jobs appended in manifest order, read back as often as needed (one pass at a time)."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile("w+b")  # noqa: SIM115 (closed by close())
        self._count = 0
        self._reading = False

    def append(self, spec: JobSpec) -> None:
        """Add ``spec`` after the jobs already spooled."""
        # JSON text never holds a raw newline: one job per line.
        self._file.write(f"{spec.fingerprint}\t{spec.to_json()}\n".encode())
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[JobSpec]:
        if self._reading:
            raise RuntimeError("a JobSpool is read one pass at a time")
        self._reading = True
        try:
            self._file.flush()
            self._file.seek(0)
            for line in self._file:
                fingerprint, _, blob = line.decode().rstrip("\n").partition("\t")
                spec = JobSpec.from_json(blob)
                object.__setattr__(spec, "_fingerprint", fingerprint)  # a cache, as JobSpec's
                yield spec
        finally:
            self._file.seek(0, 2)  # appends go at the end
            self._reading = False

    def close(self) -> None:
        """Drop the scratch file; idempotent."""
        self._file.close()


__all__ = ["JobSpool"]
