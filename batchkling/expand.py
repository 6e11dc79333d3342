"""Expansion: explicit jobs and matrices → a deterministic tuple of :class:`JobSpec`.

Order: explicit jobs in file order, then each matrix in file order. Within a matrix the
combinations are ``vars_from`` rows (file order) × ``vars`` lists × ``axes`` (each in the order
written), nested in that order like ``itertools.product``; combinations matching every key of an
``exclude`` entry are dropped; then each ``include`` entry is appended. An include is completed
from the first combination (before exclusion) that agrees with every ``vars``/``vars_from``
variable it names, so ``{product: watch, size: "1:1", duration: 10}`` still knows the watch row's
other CSV columns; axis values it names are its own (they need not be among the axes).

Field values are layered: built-in defaults < ``defaults`` < the job or matrix < an axis value <
an include entry. Each value remembers where it was written, so a problem found after expansion
(an image that does not exist, a prompt that grew past 2,500 characters) points at the line that
caused it. Checks here are plain Python, not pydantic: a 100,000-job matrix validates each job in
microseconds, and a repeated problem is reported a few times, then counted.
"""

from __future__ import annotations

import csv
import functools
import itertools
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from batchkling.errors import Problem
from batchkling.images import ImageCache
from batchkling.manifest import (
    BUILTIN_DEFAULTS,
    MAX_PROMPT,
    MODELS,
    MODES,
    SIZES,
    SOUNDS,
    JobEntry,
    JobFields,
    MatrixEntry,
)
from batchkling.models import JobSpec
from batchkling.yamlsource import (
    DataPath,
    SourceMap,
    format_path,
    problems_from_validation,
    suggest,
)

FIELDS = tuple(JobFields.model_fields)
SOUND_MODELS = ("kling-v2-6", "kling-video-o1")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_CAP = 3  # a problem repeated by many jobs is shown this many times, then counted

Prov = DataPath | None  # where a value was written; None for a built-in default
Fields = dict[str, tuple[Any, Prov]]


# -- templates ---------------------------------------------------------------------------------


class TemplateError(ValueError):
    """A template string that cannot be read (unclosed brace, bad placeholder)."""


@functools.lru_cache(maxsize=4096)  # a matrix slugs the same few axis values over and over
def _slug(value: str) -> str:
    # ':' → 'x' so an aspect ratio reads naturally in a file name: 16:9 → 16x9.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value.replace(":", "x")).strip("-").lower()


_FILTERS: dict[str, Callable[[str], str]] = {"slug": _slug, "lower": str.lower, "upper": str.upper}
_PLACEHOLDER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*([a-z]+)\s*)?")


class _Filtered(dict[str, str]):
    """The variables plus ``"name|filter"`` keys, computed on first use (see Template.fmt)."""

    def __missing__(self, key: str) -> str:
        name, _, flt = key.partition("|")
        if not flt:
            raise KeyError(key)  # the caller reports the missing variable
        value = _FILTERS[flt](self[name])
        self[key] = value
        return value


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template.

    ``fmt`` is a ``str.format_map`` string (rendering runs in C, which matters at 100,000 jobs):
    literal braces are doubled and ``{name:slug}`` becomes the key ``{name|slug}``.
    """

    fmt: str
    filtered: bool
    constant: str | None  # the rendered text when there is no placeholder

    def render(self, variables: Mapping[str, str]) -> str:
        """Fill in the placeholders; a missing variable raises KeyError naming it."""
        if self.constant is not None:
            return self.constant
        return self.fmt.format_map(_Filtered(variables) if self.filtered else variables)


def compile_template(text: str) -> Template:
    """Parse ``{name}`` / ``{name:slug}`` placeholders; ``{{`` and ``}}`` are literal braces."""
    if "{" not in text and "}" not in text:
        return Template(text, False, text)
    out: list[str] = []
    literal: list[str] = []
    placeholders = filtered = 0
    i = 0
    while i < len(text):
        char = text[i]
        if text.startswith(("{{", "}}"), i):
            out.append(char * 2)
            literal.append(char)
            i += 2
        elif char == "{":
            end = text.find("}", i)
            match = _PLACEHOLDER.fullmatch(text, i + 1, end) if end > 0 else None
            if match is None or (match.group(2) and match.group(2) not in _FILTERS):
                shown = text[i : end + 1] if end > 0 else text[i : i + 20]
                raise TemplateError(
                    f"bad placeholder {shown!r}: write {{name}} or {{name:slug}} "
                    "(filters: slug, lower, upper), or '{{' for a literal brace"
                )
            name, flt = match.group(1), match.group(2)
            out.append(f"{{{name}|{flt}}}" if flt else f"{{{name}}}")
            placeholders += 1
            filtered += bool(flt)
            i = end + 1
        elif char == "}":
            raise TemplateError(
                f"single '}}' at character {i + 1}: write '}}}}' for a literal brace"
            )
        else:
            out.append(char)
            literal.append(char)
            i += 1
    return Template("".join(out), bool(filtered), None if placeholders else "".join(literal))


# -- vars_from CSV ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VarsTable:
    """A ``vars_from`` CSV: column names, rows with their line numbers, and what is wrong."""

    columns: tuple[str, ...]
    rows: tuple[tuple[int, dict[str, str]], ...]
    errors: tuple[tuple[int | None, str], ...] = ()


def read_vars_csv(path: Path, shown: str) -> VarsTable:
    """Read a variables CSV. Cells are plain text: ``=SUM(...)`` is never evaluated."""
    errors: list[tuple[int | None, str]] = []
    rows: list[tuple[int, dict[str, str]]] = []
    columns: list[str] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            try:
                columns = [c.strip() for c in next(reader, [])]
                if not columns:
                    return VarsTable((), (), ((None, f"{shown} is empty: expected a header row"),))
                for name in columns:
                    if not _PLACEHOLDER.fullmatch(name) or ":" in name:
                        errors.append(
                            (
                                1,
                                f"{shown}: column name {name!r} is not a variable name "
                                "(letters, digits, '_')",
                            )
                        )
                    elif columns.count(name) > 1:
                        errors.append((1, f"{shown}: column '{name}' appears twice"))
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
                    rows.append(
                        (reader.line_num, {c: v.strip() for c, v in zip(columns, row, strict=True)})
                    )
            except csv.Error as exc:
                errors.append((reader.line_num, f"{shown} line {reader.line_num}: {exc}"))
    except FileNotFoundError:
        errors.append((None, f"vars_from file not found: {shown}"))
    except UnicodeDecodeError:
        errors.append((None, f"{shown} is not valid UTF-8; save it as UTF-8"))
    except OSError as exc:
        errors.append((None, f"cannot read {shown}: {exc.strerror or exc}"))
    if not errors and not rows:
        errors.append((None, f"{shown} has a header but no rows"))
    return VarsTable(tuple(columns), tuple(rows), tuple(dict.fromkeys(errors)))


# -- expansion ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expansion:
    """What expansion produced: the jobs, the problems (errors) and the warnings."""

    specs: tuple[JobSpec, ...]
    problems: list[Problem]
    warnings: list[Problem]
    images_checked: int


@dataclass(frozen=True, slots=True)
class _Origin:
    """Which entry (and which CSV line and variables) produced a job; formatted only on error."""

    label: str
    csv: str | None = None
    csv_line: int | None = None
    variables: Mapping[str, str] | None = None

    def describe(self) -> str:
        bits = [f"{self.csv} line {self.csv_line}"] if self.csv and self.csv_line else []
        if self.variables:
            shown = ", ".join(f"{k}={v}" for k, v in self.variables.items())
            bits.append(shown if len(shown) <= 100 else shown[:97] + "...")
        return f"{self.label} ({'; '.join(bits)})" if bits else self.label


class _Sink:
    """Collects problems, showing a problem repeated by many jobs only ``_CAP`` times."""

    def __init__(self, source: SourceMap) -> None:
        self.source = source
        self.items: list[Problem] = []
        self._counts: dict[Any, int] = {}
        self._first: dict[Any, Problem] = {}

    def add(self, key: Any, prov: Prov, message: str, *, once: bool = False) -> None:
        """Record a problem; ``once`` for one that does not depend on the job (shown once)."""
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        if count == 1 or (count <= _CAP and not once):
            problem = self.source.problem(prov or (), message)
            self.items.append(problem)
            if not once:
                self._first.setdefault(key, problem)

    def finish(self) -> list[Problem]:
        """The problems, with a "... and N more" line for each one repeated past the cap."""
        out = list(self.items)
        for key, count in self._counts.items():
            first = self._first.get(key)
            if first is not None and count > _CAP:
                more = f"... and {count - _CAP:,} more jobs with the same problem"
                out.append(Problem(first.file, first.line, first.column, first.path, more))
        return out


def expand_manifest(
    *,
    defaults: JobFields,
    jobs: Sequence[tuple[int, JobEntry]],
    matrices: Sequence[tuple[int, MatrixEntry]],
    provider: str,
    source: SourceMap,
    base_dir: Path,
) -> Expansion:
    """Expand validated entries (with their index in the file) into job specs, checking each."""
    expander = _Expander(provider, source, base_dir)
    base: Fields = {name: (value, None) for name, value in BUILTIN_DEFAULTS.items()}
    base.update(_layer(defaults, ("defaults",)))
    for index, job in jobs:
        fields = {**base, **_layer(job, ("jobs", index))}
        expander.build(fields, {}, job.id, ("jobs", index, "id"), _Origin(f"jobs[{index}]"), None)
    for index, matrix in matrices:
        _MatrixExpansion(expander, index, matrix, base).run()
    return Expansion(
        tuple(expander.specs),
        expander.errors.finish(),
        expander.warnings.finish(),
        expander.images.checked,
    )


def _layer(entry: JobFields, prefix: DataPath) -> Fields:
    return {n: (v, (*prefix, n)) for n in FIELDS if (v := getattr(entry, n)) is not None}


def as_text(value: Any) -> str:
    """A field value as a template variable: ``5`` → ``"5"``, ``0.5`` → ``"0.5"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


class _Expander:
    """Renders and checks one job at a time; holds the caches that make large matrices cheap."""

    def __init__(self, provider: str, source: SourceMap, base_dir: Path) -> None:
        self.provider, self.source, self.base_dir = provider, source, base_dir
        self.errors, self.warnings = _Sink(source), _Sink(source)
        self.images = ImageCache()
        self.specs: list[JobSpec] = []
        self._ids: dict[str, tuple[Prov, _Origin]] = {}
        self._templates: dict[str, Template | TemplateError] = {}
        self._image_refs: dict[str, tuple[str | None, str | None, str | None]] = {}
        self._nested_static: dict[int, bool] = {}

    # -- rendering -----------------------------------------------------------------------------

    def render(
        self, raw: str, variables: Mapping[str, str], prov: Prov, origin: _Origin
    ) -> str | None:
        """``raw`` with ``{var}`` filled in, or None after reporting why it cannot be."""
        tpl = self._templates.get(raw)
        if tpl is None:
            try:
                tpl = compile_template(raw)
            except TemplateError as exc:
                tpl = exc
            self._templates[raw] = tpl
        if isinstance(tpl, TemplateError):
            self.errors.add(("syntax", prov, raw), prov, f"template error: {tpl}", once=True)
            return None
        if tpl.constant is not None:
            return tpl.constant
        try:
            return tpl.render(variables)
        except KeyError as exc:
            self._missing_variable(str(exc.args[0]), variables, prov, origin)
            return None

    def _missing_variable(
        self, name: str, variables: Mapping[str, str], prov: Prov, origin: _Origin
    ) -> None:
        if not variables and origin.label.startswith("jobs["):
            message = (
                f"unknown template variable '{{{name}}}': explicit jobs have no variables "
                f"(used by {origin.label}; write '{{{{' and '}}}}' for literal braces)"
            )
        else:
            where = (
                f": not a column of {origin.csv} nor a variable of this matrix"
                if origin.csv
                else ""
            )
            available = ", ".join(variables) or "none"
            message = (
                f"unknown template variable '{{{name}}}'{suggest(name, list(variables))}{where}; "
                f"available: {available}"
            )
        self.errors.add(("var", prov, name), prov, message, once=True)

    def render_nested(
        self, value: Any, variables: Mapping[str, str], prov: Prov, origin: _Origin
    ) -> Any:
        """Render every string inside a metadata/camera_control structure (shared if static)."""
        static = self._nested_static.get(id(value))
        if static is None:
            static = not _has_braces(value)
            self._nested_static[id(value)] = static
        if static:
            return value
        if isinstance(value, str):
            return self.render(value, variables, prov, origin)
        if isinstance(value, dict):
            return {k: self.render_nested(v, variables, prov, origin) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render_nested(v, variables, prov, origin) for v in value]
        return value

    # -- one job -------------------------------------------------------------------------------

    def build(
        self,
        fields: Fields,
        variables: dict[str, str],
        id_raw: str,
        id_prov: Prov,
        origin: _Origin,
        group: str | None,
    ) -> None:
        """Render, check and append one job; report problems instead when it is not valid."""
        out: dict[str, Any] = {}
        ok = True
        templates = self._templates
        for name, (value, prov) in fields.items():
            if type(value) is str:
                tpl = templates.get(value)
                # Fast path: most fields of most jobs are constants or already compiled.
                if type(tpl) is Template and tpl.constant is None:
                    try:
                        value = tpl.render(variables)
                    except KeyError:
                        value = self.render(value, variables, prov, origin)  # reports it
                elif type(tpl) is Template:
                    value = tpl.constant
                else:
                    value = self.render(value, variables, prov, origin)
                ok = ok and value is not None
            elif name in ("metadata", "camera_control"):
                value = self.render_nested(value, variables, prov, origin)
            out[name] = value
        job_id = self.render(id_raw, variables, id_prov, origin)
        if not ok or job_id is None:
            return
        if not self._check_id(job_id, id_raw, id_prov, origin):
            ok = False
        for name, allowed in (
            ("model", MODELS),
            ("size", SIZES),
            ("mode", MODES),
            ("sound", SOUNDS),
        ):
            value = out.get(name)
            if value is not None and value not in allowed:
                prov = fields[name][1]
                self.errors.add(
                    ("choice", prov, value),
                    prov,
                    f"{name} {value!r} (job '{job_id}') must be one of "
                    f"{', '.join(allowed)}{suggest(value, allowed)}",
                )
                ok = False
        for name in ("prompt", "negative_prompt"):
            text = out.get(name)
            if text is not None and len(text) > MAX_PROMPT:
                self.errors.add(
                    ("long", fields[name][1]),
                    fields[name][1],
                    f"{name} is {len(text):,} characters (job '{job_id}'); "
                    f"Kling accepts at most {MAX_PROMPT:,}",
                )
                ok = False
        if not out.get("prompt") and not out.get("image"):
            self.errors.add(
                ("empty", id_prov),
                id_prov,
                f"job '{job_id}' needs a prompt or an image ({origin.describe()})",
            )
            ok = False
        if out.get("image_tail") and not out.get("image"):
            prov = fields["image_tail"][1]
            self.errors.add(
                ("tail", prov),
                prov,
                f"image_tail needs image (job '{job_id}'): "
                "a last frame is only used with a first frame",
            )
            ok = False
        images: dict[str, tuple[str, str | None]] = {}
        for name in ("image", "image_tail"):
            if out.get(name):
                ref = self._image(out[name], fields[name][1], name, job_id, origin)
                if ref is None:
                    ok = False
                else:
                    images[name] = ref
        model = out["model"]
        if model.endswith("-master") and out.get("mode") is not None:
            prov = fields["mode"][1]
            # Only a mode written on the job itself is worth a warning: a built-in or `defaults`
            # mode was meant for the other models and is dropped silently.
            if prov is not None and prov[0] != "defaults":
                self.warnings.add(
                    ("master", prov, model),
                    prov,
                    f"mode '{out['mode']}' is ignored by {model} (the *-master models "
                    f"have one mode); dropped for job '{job_id}'",
                    once=True,
                )
            out["mode"] = None
        ok = self._provider_rules(out, fields, job_id) and ok
        if not ok or not self._claim_id(job_id, id_prov, origin):
            return
        image, image_sha = images.get("image", (None, None))
        tail, tail_sha = images.get("image_tail", (None, None))
        self.specs.append(
            JobSpec(
                job_id=job_id,
                model=model,
                prompt=out.get("prompt") or "",
                duration=out["duration"],
                size=out["size"],
                mode=out.get("mode"),
                negative_prompt=out.get("negative_prompt"),
                image=image,
                image_tail=tail,
                image_sha256=image_sha,
                image_tail_sha256=tail_sha,
                cfg_scale=out.get("cfg_scale"),
                camera_control=out.get("camera_control"),
                sound=out.get("sound"),
                metadata=out.get("metadata") or {},
                variables=variables,
                group=group,
            )
        )

    def _check_id(self, job_id: str, id_raw: str, prov: Prov, origin: _Origin) -> bool:
        if _ID_RE.match(job_id) and ".." not in job_id:
            return True
        hint = ""
        if ":" in job_id and "{" in id_raw:
            hint = "; use {name:slug} to make a value like 16:9 safe (16x9)"
        self.errors.add(
            ("id", prov),
            prov,
            f"job id {job_id!r} from {origin.describe()} is not a safe file name: use "
            "letters, digits, '.', '_', '-' (start with a letter or digit, at most 128, "
            f"no '..'){hint}",
        )
        return False

    def _claim_id(self, job_id: str, prov: Prov, origin: _Origin) -> bool:
        first = self._ids.get(job_id)
        if first is None:
            self._ids[job_id] = (prov, origin)
            return True
        first_prov, first_origin = first
        line, column = self.source.locate(first_prov or ())
        at = f"{self.source.file}:{line}:{column}" if line else self.source.file
        self.errors.add(
            ("dup", prov),
            prov,
            f"duplicate job id '{job_id}' from {origin.describe()}; first produced by "
            f"{first_origin.describe()} at {at}",
        )
        return False

    def _image(
        self, raw: str, prov: Prov, name: str, job_id: str, origin: _Origin
    ) -> tuple[str, str | None] | None:
        ref = self._image_refs.get(raw)
        if ref is None:
            ref = self._resolve_image(raw)
            self._image_refs[raw] = ref
        value, sha, problem = ref
        if problem is not None or value is None:
            self.errors.add(
                ("image", prov, raw),
                prov,
                f"{problem} (job '{job_id}' from {origin.label})",
                once=True,
            )
            return None
        return value, sha

    def _resolve_image(self, raw: str) -> tuple[str | None, str | None, str | None]:
        scheme = _SCHEME_RE.match(raw)
        if scheme:
            if scheme.group(1).lower() in ("http", "https") and re.match(
                r"(?i)^https?://[^/\s]+", raw
            ):
                return raw, None, None  # a URL is sent as is, never fetched here
            return (
                None,
                None,
                (
                    f"unsupported image location {raw!r}: use a path relative to the "
                    "manifest or an http(s) URL"
                ),
            )
        path = Path(raw)
        absolute = Path(os.path.abspath(path if path.is_absolute() else self.base_dir / path))
        check = self.images.check(absolute)
        return (
            (str(absolute), check.sha256, None)
            if check.problem is None
            else (None, None, check.problem)
        )

    def _provider_rules(self, out: dict[str, Any], fields: Fields, job_id: str) -> bool:
        """Kling API rules: errors for provider kling; warnings for imarouter (passed through)."""
        model, broken = out["model"], []
        if out.get("cfg_scale") is not None and model.startswith("kling-v2"):
            broken.append(
                (
                    "cfg_scale",
                    f"cfg_scale is not supported by {model} (no kling-v2* model takes it)",
                )
            )
        if out.get("image_tail") and out.get("camera_control"):
            broken.append(("image_tail", "image_tail cannot be combined with camera_control"))
        if out.get("sound") is not None and model not in SOUND_MODELS:
            broken.append(("sound", f"sound needs {' or '.join(SOUND_MODELS)}; {model} has none"))
        for name, message in broken:
            prov = fields[name][1]
            if self.provider == "kling":
                self.errors.add(("rule", prov, message), prov, f"{message} (job '{job_id}')")
            else:
                self.warnings.add(
                    ("rule", prov, message),
                    prov,
                    f"{message}: ImaRouter passes it to Kling, which may reject "
                    f"the task (job '{job_id}')",
                    once=True,
                )
        return not broken or self.provider != "kling"


def _has_braces(value: Any) -> bool:
    if isinstance(value, str):
        return "{" in value or "}" in value
    if isinstance(value, dict):
        return any(_has_braces(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_braces(v) for v in value)
    return False


class _MatrixExpansion:
    """One matrix: its combinations, excludes and includes, built through the shared expander."""

    def __init__(self, expander: _Expander, index: int, entry: MatrixEntry, base: Fields) -> None:
        self.x, self.entry, self.index = expander, entry, index
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
                self.x.warnings.add(("exclude", prov), prov, "this exclude entry matches no job")
        for j, include in enumerate(self.entry.include):
            self._include(j, include)

    def _load_rows(self) -> bool:
        if self.entry.vars_from is None:
            return True
        prov = (*self.prefix, "vars_from")
        shown = os.path.join(os.path.dirname(self.x.source.file), self.entry.vars_from)
        self.csv_name = self.entry.vars_from
        table = read_vars_csv(self.x.base_dir / self.entry.vars_from, shown)
        for line, message in table.errors:
            if line is None:
                self.x.errors.add(("csv", prov, message), prov, message)
            else:  # located in the CSV file itself
                self.x.errors.items.append(Problem(shown, line, None, format_path(prov), message))
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
                    self.x.errors.add(
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
                    self.x.errors.add(
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
        origin = _Origin(label, self.csv_name, line, variables)
        fields = {**self.base, **extra} if extra else self.base
        id_raw, id_prov = job_id or (self.entry.id, (*self.prefix, "id"))
        self.x.build(fields, variables, id_raw, id_prov, origin, self.entry.id)

    def _include(self, j: int, include: dict[str, Any]) -> None:
        prov: DataPath = (*self.prefix, "include", j)
        field_keys = [k for k in include if k in FIELDS]
        # An include may name its own id (a template too): it often differs from its siblings
        # in a field that is not in the id template, e.g. duration: 10.
        own_id = include.get("id")
        unknown = [k for k in include if k not in (*FIELDS, "id") and k not in self.names]
        if own_id is not None and not isinstance(own_id, str):
            self.x.errors.add(("incid", prov), (*prov, "id"), "include id must be a string")
            return
        bad_values = [k for k in include if k in self.names and isinstance(include[k], dict | list)]
        for key in bad_values:
            self.x.errors.add(
                ("incval", prov, key), (*prov, key), f"variable '{key}' needs a single value"
            )
        for key in unknown:
            self.x.errors.add(
                ("inckey", prov, key),
                (*prov, key),
                f"include key '{key}' is neither a variable of this matrix nor a job "
                f"field{suggest(key, [*self.names, *FIELDS])}",
            )
        try:
            typed = JobFields.model_validate({k: include[k] for k in field_keys})
        except ValidationError as exc:
            sub = {k: include[k] for k in field_keys}
            self.x.errors.items.extend(
                problems_from_validation(exc, sub, self.x.source, prefix=prov)
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
