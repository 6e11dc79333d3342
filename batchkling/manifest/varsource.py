"""``vars_from``: a matrix's variables read from a CSV file, one set of values per row.

The header row names the variables; each later row is one set of values, kept with its line
number so a problem found after expansion can point at the row that caused it. Cells are plain
text: a spreadsheet formula such as ``=SUM(A1:A3)`` is a value, never evaluated.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from batchkling.manifest.templates import VARIABLE_NAME

#: The largest ``vars_from`` file read, and its most rows: a million rows work; a 10 GB file
#: must be a clear problem before it is held in memory, not a MemoryError after.
MAX_CSV_BYTES = 1024 * 1024 * 1024
MAX_CSV_ROWS = 2_000_000
#: No legitimate row is longer; a file without line breaks must not be read whole as one.
_MAX_LINE = 1024 * 1024


class _TooBig(Exception):
    pass


def _lines(fh: TextIO, shown: str) -> Iterator[str]:
    """The file's lines, stopping with a problem past the size limits (checked while reading:
    a FIFO or a device has no size to check first)."""
    total = 0
    while line := fh.readline(_MAX_LINE + 1):
        if len(line) > _MAX_LINE:
            raise _TooBig(f"{shown} has a line longer than {_MAX_LINE // 1024} KB")
        total += len(line)
        if total > MAX_CSV_BYTES:
            raise _TooBig(f"{shown} is larger than {MAX_CSV_BYTES // 2**20:,} MB")
        yield line


@dataclass(frozen=True, slots=True)
class VarsTable:
    """A ``vars_from`` CSV: column names, rows with their line numbers, and what is wrong."""

    columns: tuple[str, ...]
    rows: tuple[tuple[int, dict[str, str]], ...]
    errors: tuple[tuple[int | None, str], ...] = ()


def read_vars_csv(path: Path, shown: str) -> VarsTable:
    """Read a variables CSV (``shown`` names it in messages); every problem is in ``errors``."""
    errors: list[tuple[int | None, str]] = []
    rows: list[tuple[int, dict[str, str]]] = []
    columns: list[str] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            size = os.fstat(fh.fileno()).st_size if path.is_file() else 0
            if size > MAX_CSV_BYTES:
                raise _TooBig(f"{shown} is {size / 2**30:.1f} GB; batchkling reads vars_from "
                              f"files up to {MAX_CSV_BYTES // 2**20:,} MB")
            reader = csv.reader(_lines(fh, shown))
            try:
                columns = [c.strip() for c in next(reader, [])]
                if not columns:
                    return VarsTable((), (), ((None, f"{shown} is empty: expected a header row"),))
                errors += _header_errors(columns, shown)
                for row in reader:
                    if not any(cell.strip() for cell in row):
                        continue
                    if len(row) != len(columns):
                        errors.append(
                            (
                                reader.line_num,
                                f"{shown} line {reader.line_num}: row has "
                                f"{len(row)} cells; the header has {len(columns)}",
                            )
                        )
                        continue
                    if len(rows) >= MAX_CSV_ROWS:
                        raise _TooBig(f"{shown} has more than {MAX_CSV_ROWS:,} rows")
                    rows.append(
                        (reader.line_num, {c: v.strip() for c, v in zip(columns, row, strict=True)})
                    )
            except csv.Error as exc:
                errors.append((reader.line_num, f"{shown} line {reader.line_num}: {exc}"))
    except _TooBig as exc:
        return VarsTable((), (), ((None, f"{exc}: split it, or plan fewer jobs per manifest"),))
    except FileNotFoundError:
        errors.append((None, f"vars_from file not found: {shown}"))
    except UnicodeDecodeError:
        errors.append((None, f"{shown} is not valid UTF-8; save it as UTF-8"))
    except OSError as exc:
        errors.append((None, f"cannot read {shown}: {exc.strerror or exc}"))
    if not errors and not rows:
        errors.append((None, f"{shown} has a header but no rows"))
    return VarsTable(tuple(columns), tuple(rows), tuple(dict.fromkeys(errors)))


def _header_errors(columns: list[str], shown: str) -> list[tuple[int | None, str]]:
    """Column names must be variable names, each used once (the header is line 1)."""
    errors: list[tuple[int | None, str]] = []
    for name in columns:
        if not VARIABLE_NAME.fullmatch(name):
            errors.append(
                (1, f"{shown}: column name {name!r} is not a variable name (letters, digits, '_')")
            )
        elif columns.count(name) > 1:
            errors.append((1, f"{shown}: column '{name}' appears twice"))
    return errors
