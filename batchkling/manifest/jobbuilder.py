"""One expanded job: render its templates, check it, and make its :class:`JobSpec`.

:mod:`~batchkling.manifest.expand` decides which combinations of values become jobs;
:class:`JobBuilder` turns each one into a job. It fills in ``{var}`` templates, checks the
result against Kling's rules (allowed values, prompt length, images, job ids, what each model
supports) and appends the spec, or reports why it cannot. Checks here are plain Python, not
pydantic: a 100,000-job matrix validates each job in microseconds. Every value remembers where
it was written, so a problem points at the line that caused it, and a problem repeated by many
jobs is reported a few times, then counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchkling.catalog import BUILTIN_CATALOG, MAX_PROMPT, MODES, SIZES, SOUNDS, Catalog
from batchkling.errors import Problem
from batchkling.manifest.images import ImageCache, resolve_image
from batchkling.manifest.jobs import spoken, unknown_model
from batchkling.manifest.templates import Template, TemplateError, compile_template
from batchkling.manifest.yamlsource import DataPath, SourceMap, suggest
from batchkling.models import JobSpec

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CAP = 3  # a problem repeated by many jobs is shown this many times, then counted

Prov = DataPath | None  # where a value was written; None for a built-in default
Fields = dict[str, tuple[Any, Prov]]


@dataclass(frozen=True, slots=True)
class Origin:
    """Which entry (and which CSV line and variables) produced a job; formatted only on error."""

    label: str
    csv: str | None = None
    csv_line: int | None = None
    variables: Mapping[str, str] | None = None

    def describe(self) -> str:
        """The label, with the CSV line and variables: ``matrices[0] (a.csv line 3; p=x)``."""
        bits = [f"{self.csv} line {self.csv_line}"] if self.csv and self.csv_line else []
        if self.variables:
            shown = ", ".join(f"{k}={v}" for k, v in self.variables.items())
            bits.append(shown if len(shown) <= 100 else shown[:97] + "...")
        return f"{self.label} ({'; '.join(bits)})" if bits else self.label


class ProblemSink:
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


class JobBuilder:
    """Renders and checks one job at a time into ``specs``, reporting into ``errors``/``warnings``.

    Holds the caches that make large matrices cheap and the job ids claimed so far.
    """

    def __init__(self, provider: str, source: SourceMap, base_dir: Path,
                 sink: Callable[[JobSpec], None] | None = None,
                 catalog: Catalog = BUILTIN_CATALOG) -> None:
        self.provider, self.source, self.base_dir = provider, source, base_dir
        self.catalog = catalog
        self.errors, self.warnings = ProblemSink(source), ProblemSink(source)
        self.images = ImageCache()
        self.specs: list[JobSpec] = []
        #: With a sink, jobs go to it as they are built and are not kept: a million-job plan
        #: holds one job at a time, and the ids table keeps shared, variable-free origins.
        self.sink = sink
        self.count = 0
        # Claimed ids by their lowercase form (two ids differing in case are one file on macOS
        # and Windows), and the id as written for those that are not lowercase.
        self._ids: dict[str, tuple[Prov, Origin]] = {}
        self._cased: dict[str, str] = {}
        self._shared: dict[tuple[Any, ...], tuple[Prov, Origin]] = {}
        self._templates: dict[str, Template | TemplateError] = {}
        self._image_refs: dict[str, tuple[str | None, str | None, str | None]] = {}
        self._nested_static: dict[int, bool] = {}

    # -- rendering -----------------------------------------------------------------------------

    def render(
        self, raw: str, variables: Mapping[str, str], prov: Prov, origin: Origin
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
        self, name: str, variables: Mapping[str, str], prov: Prov, origin: Origin
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
        self, value: Any, variables: Mapping[str, str], prov: Prov, origin: Origin
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
        origin: Origin,
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
        if job_id is None:
            return
        # The id is checked and claimed whatever else is wrong with the job, so an unsafe or
        # duplicate id is reported with the other problems, not after they are fixed.
        rendered = ok
        id_ok = self._check_id(job_id, id_raw, id_prov, origin)
        if not (id_ok and self._claim_id(job_id, id_prov, origin)):
            ok = False
        if not rendered:
            return  # the checks below would report fields that could not be rendered
        for name, allowed in (
            ("model", self.catalog.models),
            ("size", SIZES),
            ("mode", MODES),
            ("sound", SOUNDS),
        ):
            value = out.get(name)
            if value is not None and value not in allowed:
                prov = fields[name][1]
                message = (f"{name} {value!r} (job '{job_id}') must be one of "
                           f"{', '.join(allowed)}{suggest(value, allowed)}")
                if name == "model":
                    message = f"{unknown_model(value, allowed)} (job '{job_id}')"
                self.errors.add(("choice", prov, value), prov, message)
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
        ok = ok and self._model_rules(out, fields, job_id)
        ok = self._provider_rules(out, fields, job_id) and ok
        if not ok:
            return
        image, image_sha = images.get("image", (None, None))
        tail, tail_sha = images.get("image_tail", (None, None))
        self.count += 1
        (self.specs.append if self.sink is None else self.sink)(
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

    def claim_only(self, job_id: str, prov: Prov, origin: Origin) -> None:
        """Check and claim the id of an entry that cannot be built (its other problems are
        reported already), so its id problems come in the same report."""
        if self._check_id(job_id, job_id, prov, origin):
            self._claim_id(job_id, prov, origin)

    def _check_id(self, job_id: str, id_raw: str, prov: Prov, origin: Origin) -> bool:
        if _ID_RE.fullmatch(job_id) and ".." not in job_id:
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

    def _claim_id(self, job_id: str, prov: Prov, origin: Origin) -> bool:
        folded = job_id.lower()
        if folded == job_id:
            folded = job_id  # the id's own string: a million ids cost no second copy
        first = self._ids.get(folded)
        if first is None:
            if folded != job_id:
                self._cased[folded] = job_id
            if self.sink is None:
                self._ids[folded] = (prov, origin)
            else:  # one entry per (id field, CSV line), not a job's variables per job
                key = (prov, origin.label, origin.csv, origin.csv_line)
                entry = self._shared.get(key)
                if entry is None:
                    entry = self._shared[key] = (
                        prov, Origin(origin.label, origin.csv, origin.csv_line))
                self._ids[folded] = entry
            return True
        first_prov, first_origin = first
        twin = self._cased.get(folded, folded)
        line, column = self.source.locate(first_prov or ())
        at = f"{self.source.file}:{line}:{column}" if line else self.source.file
        if twin != job_id:
            message = (
                f"job id '{job_id}' from {origin.describe()} differs from '{twin}' (produced by "
                f"{first_origin.describe()} at {at}) only in case: on a case-insensitive disk "
                "(macOS, Windows) both videos would be one file; make the ids differ in more "
                "than case"
            )
        else:
            message = (
                f"duplicate job id '{job_id}' from {origin.describe()}; first produced by "
                f"{first_origin.describe()} at {at}"
            )
        self.errors.add(("dup", prov), prov, message)
        return False

    def _image(
        self, raw: str, prov: Prov, name: str, job_id: str, origin: Origin
    ) -> tuple[str, str | None] | None:
        ref = self._image_refs.get(raw)
        if ref is None:
            ref = resolve_image(raw, self.base_dir, self.images)
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

    def _model_rules(self, out: dict[str, Any], fields: Fields, job_id: str) -> bool:
        """What the job's model offers: its durations and modes, a last frame (built-in models
        take all of these; a declared one says in ``models:``)."""
        model = out["model"]
        rules = self.catalog.rules(model)
        if rules is None:
            return False
        broken = []
        if out["duration"] not in rules.durations:
            broken.append(("duration", f"duration {out['duration']} (job '{job_id}') is not "
                           f"offered by {model}: {spoken(rules.durations)} seconds"))
        mode = out.get("mode")
        if mode is not None and mode not in rules.modes and fields["mode"][1] is None:
            # The built-in default mode was meant for the built-in models: take the model's.
            out["mode"] = mode = rules.modes[0]
        if mode is not None and mode not in rules.modes:
            broken.append(("mode", f"mode {mode!r} (job '{job_id}') is not offered by {model}: "
                           f"{spoken(rules.modes)}"))
        if out.get("image_tail") and not rules.image_tail:
            broken.append(("image_tail", f"{model} takes no image_tail (job '{job_id}'); its "
                           "declaration in models: says image_tail: false"))
        for name, message in broken:
            prov = fields[name][1]
            self.errors.add(("model", prov, name, model, out.get(name)), prov, message)
        return not broken

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
        rules = self.catalog.rules(model)
        if out.get("sound") is not None and not (rules and rules.sound):
            able = [m for m in self.catalog.models if (r := self.catalog.rules(m)) and r.sound]
            broken.append(("sound", f"sound needs {' or '.join(able)}; {model} has none"))
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
