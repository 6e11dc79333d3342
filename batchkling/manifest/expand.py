"""Expansion: explicit jobs and matrices → a deterministic tuple of :class:`JobSpec`.

Order: explicit jobs in file order, then each matrix in file order. Within a matrix the
combinations are ``vars_from`` rows (file order) × ``vars`` lists × ``axes`` (each in the order
written), nested in that order like ``itertools.product``; combinations matching every key of an
``exclude`` entry are dropped; then each ``include`` entry is appended. An include is completed
from the first combination (before exclusion) that agrees with every ``vars``/``vars_from``
variable it names, so ``{product: watch, size: "1:1", duration: 10}`` still knows the watch row's
other CSV columns; axis values it names are its own (they need not be among the axes).

Field values are layered: built-in defaults < ``defaults`` < the job or matrix < an axis value <
an include entry. :mod:`~batchkling.manifest.jobbuilder` renders and checks each combination
as a job; templates are :mod:`~batchkling.manifest.templates`, ``vars_from`` CSV files
:mod:`~batchkling.manifest.varsource`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from batchkling.catalog import BUILTIN_CATALOG, Catalog
from batchkling.errors import Problem
from batchkling.manifest.jobbuilder import Fields, JobBuilder, Origin
from batchkling.manifest.jobs import BUILTIN_DEFAULTS, JobEntry, JobFields, MatrixEntry
from batchkling.manifest.templates import as_text
from batchkling.manifest.templates import (
    compile_template as compile_template,  # bench_expand imports it
)
from batchkling.manifest.varsource import read_vars_csv
from batchkling.manifest.yamlsource import (
    DataPath,
    SourceMap,
    format_path,
    problems_from_validation,
    suggest,
)
from batchkling.models import JobSpec

FIELDS = tuple(JobFields.model_fields)
#: The most jobs one manifest may plan: a million rows work; a matrix whose product runs to
#: billions must be a problem before it is expanded, not a MemoryError during.
MAX_JOBS = 2_000_000


@dataclass(frozen=True, slots=True)
class Expansion:
    """What expansion produced: the jobs, the problems (errors) and the warnings."""

    specs: tuple[JobSpec, ...]  # empty when the jobs went to a sink
    problems: list[Problem]
    warnings: list[Problem]
    images_checked: int
    count: int = 0  # jobs built


def expand_manifest(
    *,
    defaults: JobFields,
    jobs: Sequence[tuple[int, JobEntry]],
    matrices: Sequence[tuple[int, MatrixEntry]],
    provider: str,
    source: SourceMap,
    base_dir: Path,
    unbuilt_ids: Sequence[tuple[int, str]] = (),
    sink: Callable[[JobSpec], None] | None = None,
    catalog: Catalog = BUILTIN_CATALOG,
) -> Expansion:
    """Expand validated entries (with their index in the file) into job specs, checking each
    against ``catalog`` (the built-in models and the manifest's declared ones).

    ``unbuilt_ids`` are ``(index, id)`` of explicit jobs too broken to build: their ids are
    still checked (safe, unique) in file order, so every problem is reported at once. With a
    ``sink``, each job goes to it as it is built instead of into ``specs``.
    """
    builder = JobBuilder(provider, source, base_dir, sink, catalog)
    base: Fields = {name: (value, None) for name, value in BUILTIN_DEFAULTS.items()}
    base.update(_layer(defaults, ("defaults",)))
    entries: list[tuple[int, JobEntry | str]] = sorted([*jobs, *unbuilt_ids],
                                                       key=lambda item: item[0])
    for index, job in entries:
        origin = Origin(f"jobs[{index}]")
        if isinstance(job, str):
            builder.claim_only(job, ("jobs", index, "id"), origin)
            continue
        fields = {**base, **_layer(job, ("jobs", index))}
        builder.build(fields, {}, job.id, ("jobs", index, "id"), origin, None)
    for index, matrix in matrices:
        _MatrixExpansion(builder, index, matrix, base).run()
    return Expansion(
        tuple(builder.specs),
        builder.errors.finish(),
        builder.warnings.finish(),
        builder.images.checked,
        builder.count,
    )


def _layer(entry: JobFields, prefix: DataPath) -> Fields:
    return {n: (v, (*prefix, n)) for n in FIELDS if (v := getattr(entry, n)) is not None}


class _MatrixExpansion:
    """One matrix: its combinations, excludes and includes, built through the shared builder."""

    def __init__(self, builder: JobBuilder, index: int, entry: MatrixEntry, base: Fields) -> None:
        self.builder, self.entry, self.index = builder, entry, index
        self.prefix: DataPath = ("matrices", index)
        self.label = format_path(self.prefix)
        self.base: Fields = {**base, **_layer(entry, self.prefix)}
        self.axes = entry.axes.items() if entry.axes else []
        self.csv_name: str | None = None
        self.rows: list[tuple[int | None, dict[str, str]]] = [(None, {})]
        self.columns: list[str] = []
        self.names: list[str] = []

    def run(self) -> None:
        if not self._load_rows() or not self._check_names():
            return
        planned = len(self.rows)
        for _name, values in (*self.entry.vars.items(), *self.axes):
            planned *= len(values)
        if self.builder.count + planned > MAX_JOBS:
            prov = (*self.prefix, "id")
            self.builder.errors.add(
                ("jobs", prov), prov,
                f"{self.label} expands to {planned:,} combinations; a manifest plans at most "
                f"{MAX_JOBS:,} jobs: split it into several manifests")
            return
        excludes = self._excludes()
        hits = [0] * len(excludes)
        for line, variables, axis_fields in self._combinations():
            matched = [
                i for i, ex in enumerate(excludes) if all(variables.get(k) == v for k, v in ex)
            ]
            for i in matched:
                hits[i] += 1
            if not matched:
                self._build(line, variables, axis_fields, self.label)
        for i, count in enumerate(hits):
            if count == 0:
                prov = (*self.prefix, "exclude", i)
                self.builder.warnings.add(
                    ("exclude", prov), prov, "this exclude entry matches no job"
                )
        for j, include in enumerate(self.entry.include):
            self._include(j, include)

    def _load_rows(self) -> bool:
        if self.entry.vars_from is None:
            return True
        prov = (*self.prefix, "vars_from")
        shown = os.path.join(os.path.dirname(self.builder.source.file), self.entry.vars_from)
        self.csv_name = self.entry.vars_from
        table = read_vars_csv(self.builder.base_dir / self.entry.vars_from, shown)
        for line, message in table.errors:
            if line is None:
                self.builder.errors.add(("csv", prov, message), prov, message)
            else:  # located in the CSV file itself
                self.builder.errors.items.append(
                    Problem(shown, line, None, format_path(prov), message)
                )
        if table.errors:
            return False
        self.columns, self.rows = list(table.columns), [(ln, row) for ln, row in table.rows]
        return True

    def _check_names(self) -> bool:
        seen: dict[str, str] = {}
        ok = True
        for kind, names in (
            ("a column of " + (self.csv_name or ""), self.columns),
            ("vars", list(self.entry.vars)),
            ("axes", [n for n, _ in self.axes]),
        ):
            for name in names:
                if name in seen:
                    prov = (*self.prefix, "axes" if kind == "axes" else "vars", name)
                    self.builder.errors.add(
                        ("twice", prov),
                        prov,
                        f"variable '{name}' is defined twice ({seen[name]} and {kind})",
                    )
                    ok = False
                seen.setdefault(name, kind)
        self.names = list(seen)
        return ok

    def _excludes(self) -> list[tuple[tuple[str, str], ...]]:
        # An entry with an unknown key is reported and kept: it can match nothing, and the rest
        # of the matrix still expands so its other problems are found in the same run.
        out = []
        for i, entry in enumerate(self.entry.exclude):
            for key in entry:
                if key not in self.names:
                    prov = (*self.prefix, "exclude", i, key)
                    self.builder.errors.add(
                        ("exkey", prov),
                        prov,
                        f"exclude key '{key}' is not a variable of this matrix"
                        f"{suggest(key, self.names)}; variables: {', '.join(self.names)}",
                    )
            out.append(tuple(entry.items()))
        return out

    def _combinations(self) -> Iterator[tuple[int | None, dict[str, str], Fields]]:
        var_items = list(self.entry.vars.items())
        ranges = [range(len(values)) for _, values in (*var_items, *self.axes)]
        n_vars = len(var_items)
        for combo in itertools.product(range(len(self.rows)), *ranges):
            line, row = self.rows[combo[0]]
            variables = dict(row)
            for (name, values), k in zip(var_items, combo[1 : 1 + n_vars], strict=True):
                variables[name] = values[k]
            axis_fields: Fields = {}
            for (name, axis_values), k in zip(self.axes, combo[1 + n_vars :], strict=True):
                variables[name] = as_text(axis_values[k])
                axis_fields[name] = (axis_values[k], (*self.prefix, "axes", name, k))
            yield line, variables, axis_fields

    def _build(
        self,
        line: int | None,
        variables: dict[str, str],
        extra: Fields,
        label: str,
        job_id: tuple[str, DataPath] | None = None,
    ) -> None:
        origin = Origin(label, self.csv_name, line, variables)
        fields = {**self.base, **extra} if extra else self.base
        id_raw, id_prov = job_id or (self.entry.id, (*self.prefix, "id"))
        self.builder.build(fields, variables, id_raw, id_prov, origin, self.entry.id)

    def _include(self, j: int, include: dict[str, Any]) -> None:
        prov: DataPath = (*self.prefix, "include", j)
        field_keys = [k for k in include if k in FIELDS]
        # An include may name its own id (a template too): it often differs from its siblings
        # in a field that is not in the id template, e.g. duration: 10.
        own_id = include.get("id")
        unknown = [k for k in include if k not in (*FIELDS, "id") and k not in self.names]
        if own_id is not None and not isinstance(own_id, str):
            self.builder.errors.add(("incid", prov), (*prov, "id"), "include id must be a string")
            return
        bad_values = [k for k in include if k in self.names and isinstance(include[k], dict | list)]
        for key in bad_values:
            self.builder.errors.add(
                ("incval", prov, key), (*prov, key), f"variable '{key}' needs a single value"
            )
        for key in unknown:
            self.builder.errors.add(
                ("inckey", prov, key),
                (*prov, key),
                f"include key '{key}' is neither a variable of this matrix nor a job "
                f"field{suggest(key, [*self.names, *FIELDS])}",
            )
        try:
            typed = JobFields.model_validate({k: include[k] for k in field_keys},
                                             context={"catalog": self.builder.catalog})
        except ValidationError as exc:
            sub = {k: include[k] for k in field_keys}
            self.builder.errors.items.extend(
                problems_from_validation(exc, sub, self.builder.source, prefix=prov)
            )
            return
        if unknown or bad_values:
            return
        given = {k: as_text(v) for k, v in include.items() if k in self.names}
        # Complete from the first combination with the same row/vars values; axis values the
        # entry names are its own choice and need not exist among the axes.
        axis_names = {name for name, _ in self.axes}
        match_on = {k: v for k, v in given.items() if k not in axis_names}
        found = next(
            (
                (ln, v, a)
                for ln, v, a in self._combinations()
                if all(v.get(k) == val for k, val in match_on.items())
            ),
            None,
        )
        line, base_vars, axis_fields = found if found else (None, {}, {})
        variables = {
            n: given.get(n, base_vars.get(n, ""))
            for n in self.names
            if n in given or n in base_vars
        }
        overrides: Fields = {k: (getattr(typed, k), (*prov, k)) for k in field_keys}
        self._build(
            line,
            variables,
            {**axis_fields, **overrides},
            f"{self.label}.include[{j}]",
            (own_id, (*prov, "id")) if own_id is not None else None,
        )
