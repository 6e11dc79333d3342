"""The manifest language: the :class:`Manifest` and :class:`RunConfig` models, ``load_manifest``.

Two layers. :class:`RunConfig` is everything the engine needs once jobs are expanded; it is what
a run snapshots (``manifest.run_config().model_dump_json()``) and rehydrates on resume with
``RunConfig.model_validate_json``. :class:`Manifest` adds what a person writes to describe jobs
(``defaults``, ``jobs``, ``matrices``) and carries the expanded :class:`JobSpec` tuple.

The sections live next door: job fields, jobs and matrices in :mod:`batchkling.manifest.jobs`,
provider, limits, budget and output in :mod:`batchkling.manifest.settings`. Loading validates
what is written, keeps going with the valid parts so that one run reports every problem, and
expands the jobs (:mod:`batchkling.manifest.expand`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from batchkling.catalog import MODEL_ID, Catalog
from batchkling.errors import ConfigError, ManifestError, Problem
from batchkling.manifest.jobs import Axes, JobEntry, JobFields, MatrixEntry, StrictModel
from batchkling.manifest.settings import (
    Budget,
    Inputs,
    Limits,
    ModelDeclaration,
    ModelId,
    Output,
    PriceKey,
    ProviderConfig,
    Slug,
)
from batchkling.manifest.spool import JobSpool
from batchkling.manifest.yamlsource import (
    DataPath,
    LoadedYAML,
    data_path,
    decode_source,
    load_yaml,
    problems_from_validation,
    show,
)
from batchkling.models import JobSpec

_M = TypeVar("_M", bound=BaseModel)


class RunConfig(StrictModel):
    """Everything a run needs after expansion; snapshotted so resume needs no manifest file."""

    version: Literal[1] = Field(description="Manifest format version: 1.")
    name: Slug = Field(description="Slug naming the run (the default run id).")
    provider: ProviderConfig = Field(default_factory=ProviderConfig)
    limits: Limits = Field(default_factory=Limits)
    budget: Budget = Field(default_factory=Budget)
    output: Output = Field(default_factory=Output)
    inputs: Inputs = Field(default_factory=Inputs)
    on_unknown: Literal["wait", "resubmit"] = Field(
        default="wait",
        description="A create whose outcome is unknown: wait for a person, or resubmit.",
    )
    pricing: dict[PriceKey, Annotated[float, Field(ge=0)]] | None = Field(
        None,
        description="USD per video second overriding the built-in estimate: keys "
        "'<model>' or '<model>:<mode>'.",
    )
    models: dict[ModelId, ModelDeclaration] | None = Field(
        None,
        description="Models this version does not know (or new rules for one it does): "
        "id → durations, modes, image_tail, sound and usd_per_second. Merged over the "
        "built-in catalog.",
    )
    reuse: Literal["off", "earlier-runs"] = Field(
        default="off",
        description="earlier-runs: a job whose request already produced a downloaded, "
        "verified video in another run of the same store takes that video (cost 0, no "
        "render). Off by default: a re-render is sometimes wanted for a fresh take.",
    )

    @model_validator(mode="after")
    def _units_need_kling(self) -> Self:
        if self.budget.max_units is not None and self.provider.name != "kling":
            raise ValueError("budget.max_units is for provider kling, which bills in units; "
                             f"{self.provider.name} reports dollars: use budget.max_usd")
        return self

    def catalog(self) -> Catalog:
        """The built-in models with this manifest's declared ones merged over them."""
        return catalog_of_models(self.models)

    def price_overrides(self) -> dict[str, float]:
        """USD per second by ``model`` / ``model:mode``: declared models' prices, with
        ``pricing:`` over them (a model-wide ``pricing`` entry beats a declared mode's)."""
        found: dict[str, float] = {}
        for model, declared in (self.models or {}).items():
            if not (self.pricing and model in self.pricing):
                found.update(declared.prices(model, "usd"))
        found.update(self.pricing or {})
        return found

    def unit_overrides(self) -> dict[str, float]:
        """Kling units per 5 s of the declared models that say (``units_per_5s``)."""
        found: dict[str, float] = {}
        for model, declared in (self.models or {}).items():
            found.update(declared.prices(model, "units"))
        return found


    def with_output_store(self, url: str) -> Self:
        """A copy whose ``output.store`` is ``url`` (``--output-store``); ConfigError if bad."""
        try:
            output = Output.model_validate({**self.output.model_dump(), "store": url})
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"--output-store: {reason}") from None
        return self.model_copy(update={"output": output})


class Manifest(RunConfig):
    """A validated manifest and the jobs it expands to (``specs``, deterministic order)."""

    defaults: JobFields = Field(
        default_factory=JobFields,
        description="Fields applied to every job unless it overrides them.",
    )
    jobs: list[JobEntry] = Field(default_factory=list, description="Explicit jobs.")
    matrices: list[MatrixEntry] = Field(default_factory=list, description="Job matrices.")
    _source_path: Path = PrivateAttr(default=Path())
    _base_dir: Path = PrivateAttr(default=Path())
    _warnings: list[Problem] = PrivateAttr(default_factory=list)
    _specs: tuple[JobSpec, ...] = PrivateAttr(default=())
    _spool: JobSpool | None = PrivateAttr(default=None)
    _job_count: int = PrivateAttr(default=0)

    @property
    def source_path(self) -> Path:
        """Absolute path of the manifest file."""
        return self._source_path

    @property
    def base_dir(self) -> Path:
        """Absolute folder that relative paths in the manifest are resolved against."""
        return self._base_dir

    @property
    def warnings(self) -> list[Problem]:
        """Things that will not stop a run but that the author should know (e.g. ignored mode)."""
        return self._warnings

    @property
    def specs(self) -> tuple[JobSpec, ...]:
        """The expanded jobs: explicit jobs in file order, then each matrix in file order
        (empty when they were spooled or handed to ``on_job``: see :meth:`expand`)."""
        return self._specs

    @property
    def job_count(self) -> int:
        """How many jobs the manifest expands to (also when they went to ``on_job``)."""
        return self._job_count

    def expand(self) -> Iterable[JobSpec]:
        """The expanded jobs in manifest order, as often as needed: :attr:`specs`, or read
        back from the scratch file of ``load_manifest(..., spool=True)``."""
        return self._specs if self._spool is None else self._spool

    def run_config(self) -> RunConfig:
        """The engine's part of the manifest, suitable for snapshotting as JSON."""
        return RunConfig.model_validate(self.model_dump(include=set(RunConfig.model_fields)))


def catalog_of_models(models: dict[str, ModelDeclaration] | None) -> Catalog:
    """The catalog with ``models`` (a manifest's declarations) merged over the built-in one."""
    return Catalog({model: d.rules() for model, d in (models or {}).items()})


_MODELS_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): Manifest,
    ("models", "*"): ModelDeclaration,
    ("provider",): ProviderConfig,
    ("limits",): Limits,
    ("budget",): Budget,
    ("output",): Output,
    ("inputs",): Inputs,
    ("defaults",): JobFields,
    ("jobs", "*"): JobEntry,
    ("matrices", "*"): MatrixEntry,
    ("matrices", "*", "axes"): Axes,
}
_SECRET_KEYS = {"api_key", "key", "token", "access_key", "secret_key", "secret", "password"}


def known_keys(parent: DataPath) -> list[str] | None:
    """Valid keys of the mapping at ``parent`` (for "did you mean" suggestions)."""
    model = _MODELS_AT.get(tuple("*" if isinstance(p, int) else p for p in parent))
    return list(model.model_fields) if model else None


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema of a manifest, with descriptions so editors show help while typing."""
    schema = Manifest.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "batchkling manifest",
        **{k: v for k, v in schema.items() if k != "title"},
    }


#: The largest manifest batchkling reads. A 50 MB one works; more rows belong in a
#: ``vars_from`` CSV, and a multi-GB file must be a clear problem, not a MemoryError.
MAX_MANIFEST_BYTES = 128 * 1024 * 1024


def load_manifest(
    path: str | os.PathLike[str], *, on_job: Callable[[JobSpec], None] | None = None,
    on_settings: Callable[[Manifest], None] | None = None, spool: bool = False,
) -> Manifest:
    """Read, validate and expand a manifest; raise ManifestError listing every problem at once.

    With ``on_job``, each valid job is handed to it as it is expanded and none is kept
    (``specs`` stays empty, ``job_count`` counts them): a million-job plan in little memory.
    With ``spool``, the jobs go to a scratch file that :meth:`Manifest.expand` reads back: a
    run's memory does not grow with its manifest (``run`` and ``submit`` load this way).
    ``on_settings`` gets the validated manifest (settings, no jobs yet) before the first job;
    it is not called when the settings are invalid. The caller must discard what it made of
    the jobs if ManifestError is raised.
    """
    file = os.fspath(path)
    try:
        raw = _read_bounded(Path(file), MAX_MANIFEST_BYTES)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ManifestError(
            [Problem(file, None, None, "", f"cannot read manifest: {reason}")]
        ) from None
    if raw is None:
        raise ManifestError([Problem(
            file, None, None, "", f"the manifest is larger than {MAX_MANIFEST_BYTES // 2**20} MB; "
            "put the rows of a large matrix in a vars_from CSV file instead")])
    text, bad_encoding = decode_source(raw, file)
    if text is None:
        raise ManifestError([bad_encoding] if bad_encoding else [])
    loaded = load_yaml(text, file)
    if loaded.fatal or loaded.data is None:
        raise ManifestError(loaded.problems)
    if not isinstance(loaded.data, dict):
        found = show(loaded.data)
        raise ManifestError(
            [
                loaded.source.problem(
                    (), f"a manifest is a mapping of keys (version, name, jobs, ...); found {found}"
                )
            ]
        )
    if not spool:
        return _validate_and_expand(loaded, Path(os.path.abspath(file)), on_job, on_settings)
    if on_job is not None:
        raise ValueError("load_manifest takes on_job or spool, not both")
    jobs = JobSpool()
    try:
        manifest = _validate_and_expand(loaded, Path(os.path.abspath(file)), jobs.append,
                                        on_settings)
    except BaseException:
        jobs.close()
        raise
    manifest._spool = jobs
    return manifest


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it holds more than ``limit`` (a FIFO or a device too:
    the size is checked as it is read, not only by ``stat``)."""
    with path.open("rb") as fh:
        if path.is_file() and os.fstat(fh.fileno()).st_size > limit:
            return None
        data = fh.read(limit + 1)
    return None if len(data) > limit else data


def _validate_and_expand(loaded: LoadedYAML, source_path: Path,
                         on_job: Callable[[JobSpec], None] | None = None,
                         on_settings: Callable[[Manifest], None] | None = None) -> Manifest:
    # Imported here: expansion loads Pillow, which `schema` and resume (RunConfig) do not need.
    from batchkling.manifest.expand import expand_manifest

    data, source = loaded.data, loaded.source
    problems = list(loaded.problems)
    manifest: Manifest | None = None
    # The declared models first: every model field is checked against them. A declaration
    # with a mistake is left out here and reported by the validation below.
    catalog = catalog_of_models(_declared_models(data.get("models")))
    context = {"catalog": catalog}
    try:
        manifest = Manifest.model_validate(data, context=context)
        defaults, jobs = manifest.defaults, list(enumerate(manifest.jobs))
        matrices, provider = list(enumerate(manifest.matrices)), manifest.provider.name
        if on_settings is not None:
            manifest._source_path = source_path
            manifest._base_dir = source_path.parent
            on_settings(manifest)
    except ValidationError as exc:
        problems += [
            _secret_hint(p)
            for p in problems_from_validation(
                exc, data, source, known_keys=known_keys, skip=loaded.bad_paths
            )
        ]
        # Keep going with the parts that are valid, so one run reports every problem.
        salvaged = _salvage(
            JobFields, data.get("defaults") or {}, ("defaults",), loaded, prune_values=True,
            context=context,
        )
        defaults = salvaged or JobFields()
        jobs = _salvage_list(JobEntry, data.get("jobs"), "jobs", loaded, context)
        matrices = _salvage_list(MatrixEntry, data.get("matrices"), "matrices", loaded, context)
        name = (
            data.get("provider", {}).get("name") if isinstance(data.get("provider"), dict) else None
        )
        provider = "kling" if name == "kling" else "imarouter"
    if not data.get("jobs") and not data.get("matrices"):
        problems.append(
            source.problem((), "the manifest defines no jobs: add 'jobs:' or 'matrices:'")
        )
    built = {index for index, _job in jobs}
    raw_jobs = data.get("jobs")
    unbuilt = [(i, entry["id"]) for i, entry in enumerate(raw_jobs)
               if i not in built and isinstance(entry, dict) and isinstance(entry.get("id"), str)
               and "{" not in entry["id"]] if isinstance(raw_jobs, list) else []
    result = expand_manifest(
        defaults=defaults,
        jobs=jobs,
        matrices=matrices,
        provider=provider,
        source=source,
        base_dir=source_path.parent,
        unbuilt_ids=unbuilt,
        sink=on_job,
        catalog=catalog,
    )
    problems += result.problems
    if not problems and not result.count:
        problems.append(source.problem((), "the manifest expands to no jobs (all excluded?)"))
    if problems or manifest is None:
        raise ManifestError(sort_problems(problems, source.file))
    manifest._source_path = source_path
    manifest._base_dir = source_path.parent
    manifest._warnings = sort_problems([*loaded.warnings, *result.warnings], source.file)
    manifest._specs = result.specs
    manifest._job_count = result.count
    return manifest


def sort_problems(problems: list[Problem], file: str) -> list[Problem]:
    """Problems of the manifest in file order, then those of other files (CSV), de-duplicated."""
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.file != file, p.file, p.line or 0, p.column or 0))


def _secret_hint(problem: Problem) -> Problem:
    key = problem.path.rpartition(".")[2]
    if problem.path.startswith("provider.") and key in _SECRET_KEYS:
        message = (
            f"unknown key '{key}': never put a key in a manifest; put it in the environment "
            "and name the variable with api_key_env (or access_key_env/secret_key_env)"
        )
        return Problem(problem.file, problem.line, problem.column, problem.path, message)
    return problem


def _declared_models(data: Any) -> dict[str, ModelDeclaration]:
    """The valid entries of a ``models:`` section (the invalid ones are reported elsewhere)."""
    if not isinstance(data, dict):
        return {}
    found = {}
    for model, entry in data.items():
        if not isinstance(model, str) or not MODEL_ID.match(model):
            continue
        try:
            found[model] = ModelDeclaration.model_validate(entry)
        except ValidationError:
            continue
    return found


def _salvage(
    model: type[_M], data: Any, path: DataPath, loaded: LoadedYAML, *, prune_values: bool = False,
    context: dict[str, Any] | None = None,
) -> _M | None:
    """Validate a part after removing what is already reported, so the rest can be expanded.

    Bad list items (an axis value, an exclude entry) and unknown keys in nested mappings (an
    axis name) are removed; a bad field value is removed only when ``prune_values`` (defaults
    fall back to the built-in values). Any other error drops the whole entry: expanding a guess
    would report problems that are not there.
    """
    if any(bad[: len(path)] == path for bad in loaded.bad_paths):
        return None
    current = copy.deepcopy(data)
    for _ in range(5):
        try:
            return model.model_validate(current, context=context)
        except ValidationError as exc:
            removable: list[DataPath] = []
            for error in exc.errors():
                where, _ = data_path(error["loc"], current, error["type"] == "missing")
                # An unknown key directly on a job may be a misspelt prompt or image: dropping
                # it would report "needs a prompt" for nothing, so only nested ones go.
                nested_extra = error["type"] == "extra_forbidden" and len(where) >= 2
                prunable = nested_extra or (where and (isinstance(where[-1], int) or prune_values))
                if error["type"] == "missing" or not prunable:
                    return None
                removable.append(where)
            _prune(current, removable)
    return None


def _prune(data: Any, paths: list[DataPath]) -> None:
    # Deepest and highest list index first, so earlier deletions do not shift later ones.
    def order(path: DataPath) -> list[str]:
        return [f"{p:012d}" if isinstance(p, int) else f"~{p}" for p in path]

    for path in sorted(set(paths), key=order, reverse=True):
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        del parent[path[-1]]


def _salvage_list(model: type[_M], data: Any, key: str, loaded: LoadedYAML,
                  context: dict[str, Any] | None = None) -> list[tuple[int, _M]]:
    if not isinstance(data, list):
        return []
    out = []
    for i, item in enumerate(data):
        entry = _salvage(model, item, (key, i), loaded, context=context)
        if entry is not None:
            out.append((i, entry))
    return out
