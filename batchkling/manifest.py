"""The manifest language: pydantic models of a manifest, and ``load_manifest``.

Two layers. :class:`RunConfig` is everything the engine needs once jobs are expanded; it is what
a run snapshots (``manifest.run_config().model_dump_json()``) and rehydrates on resume with
``RunConfig.model_validate_json``. :class:`Manifest` adds what a person writes to describe jobs
(``defaults``, ``jobs``, ``matrices``) and carries the expanded :class:`JobSpec` tuple.

Every model forbids unknown keys: a typo is an error with a suggestion, never silently ignored.
Fields that may hold ``{var}`` templates accept a template string here and are checked again,
cheaply and without pydantic, after expansion (see :mod:`batchkling.expand`).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from batchkling.errors import ManifestError, Problem
from batchkling.models import JobSpec
from batchkling.yamlsource import (
    DataPath,
    LoadedYAML,
    data_path,
    decode_source,
    load_yaml,
    problems_from_validation,
    show,
    suggest,
)

MODELS = (
    "kling-v1",
    "kling-v1-6",
    "kling-v2-master",
    "kling-v2-1-master",
    "kling-v2-5-turbo",
    "kling-v2-6",
    "kling-video-o1",
)
SIZES = ("1:1", "16:9", "9:16")
MODES = ("std", "pro")
DURATIONS = (5, 10)
SOUNDS = ("on", "off")
MAX_PROMPT = 2500
#: What a job gets when neither ``defaults`` nor the job says otherwise.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "model": "kling-v2-6",
    "duration": 5,
    "size": "16:9",
    "mode": "std",
}
DEFAULT_BASE_URL = {
    "imarouter": "https://api.imarouter.com",
    "kling": "https://api-singapore.klingai.com",
}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
_M = TypeVar("_M", bound=BaseModel)
_TEMPLATE_SCHEMA = {"type": "string", "pattern": r"\{[A-Za-z_]"}


def is_template(value: str) -> bool:
    """True when ``value`` holds a ``{var}`` placeholder (``{{`` is an escaped brace)."""
    return "{" in value.replace("{{", "")


def _choice(allowed: tuple[str, ...], what: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, str) and (value in allowed or is_template(value)):
            return value
        hint = suggest(value, allowed) if isinstance(value, str) else ""
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; found {show(value)}{hint}")

    return check


def _enum_schema(allowed: tuple[str, ...]) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"enum": list(allowed)}, _TEMPLATE_SCHEMA]})


def _duration(value: Any) -> int:
    if isinstance(value, str) and value.strip() in ("5", "10"):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in DURATIONS:
        return value
    raise ValueError(f"duration must be 5 or 10 (seconds); found {show(value)}")


def _sound(value: Any) -> str:
    if isinstance(value, bool):  # `sound: true` means on; YAML 1.1 habits die hard
        return "on" if value else "off"
    return _choice(SOUNDS, "sound")(value)


def _text(value: Any) -> str:
    """A variable value: any scalar, kept as text (``5`` → ``"5"``, ``true`` → ``"true"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError(f"expected a single value (text or number); found {show(value)}")


def _var_name(value: Any) -> str:
    if isinstance(value, str) and _VAR_RE.match(value):
        return value
    raise ValueError(f"variable names are letters, digits and '_' (not first); found {show(value)}")


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _seconds(value: Any) -> Any:
    """``45m``, ``90s``, ``2h``, ``1h30m`` or a number of seconds → seconds."""
    if isinstance(value, str):
        text = value.strip().lower()
        match = _DURATION_RE.match(text)
        if text and match and any(match.groups()):
            h, m, s = (float(g) if g else 0.0 for g in match.groups())
            return h * 3600 + m * 60 + s
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"expected seconds or a duration like 45m, 90s, 2h, 1h30m; found {show(value)}"
            ) from None
    return value


ModelName = Annotated[str, PlainValidator(_choice(MODELS, "model")), _enum_schema(MODELS)]
Size = Annotated[str, PlainValidator(_choice(SIZES, "size")), _enum_schema(SIZES)]
Mode = Annotated[str, PlainValidator(_choice(MODES, "mode")), _enum_schema(MODES)]
Sound = Annotated[str, PlainValidator(_sound), _enum_schema(SOUNDS)]
Duration = Annotated[int, PlainValidator(_duration), WithJsonSchema({"enum": [5, 10]})]
Text = Annotated[
    str, PlainValidator(_text), WithJsonSchema({"type": ["string", "number", "boolean"]})
]
VarName = Annotated[
    str, PlainValidator(_var_name), WithJsonSchema({"type": "string", "pattern": _VAR_RE.pattern})
]
Seconds = Annotated[
    float,
    BeforeValidator(_seconds),
    Field(gt=0, le=7 * 86400),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": _DURATION_RE.pattern},
            ]
        }
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobFields(_Strict):
    """Request fields of a job. Any string may use {var} templates inside a matrix."""

    model: ModelName | None = Field(default=None, description="Kling model. Default kling-v2-6.")
    prompt: str | None = Field(
        default=None,
        description="What to render; at most 2,500 characters.",
        json_schema_extra={"maxLength": MAX_PROMPT},
    )
    negative_prompt: str | None = Field(
        default=None,
        description="What to avoid; at most 2,500 characters.",
        json_schema_extra={"maxLength": MAX_PROMPT},
    )
    duration: Duration | None = Field(
        default=None, description="Video length in seconds: 5 or 10. Default 5."
    )
    size: Size | None = Field(
        default=None, description="Aspect ratio: 1:1, 16:9 or 9:16. Default 16:9."
    )
    mode: Mode | None = Field(
        default=None, description="std or pro (ignored by *-master models). Default std."
    )
    image: str | None = Field(
        default=None,
        description="First frame: a path relative to the manifest, or an "
        "http(s) URL. Local files: jpg/png, ≤10 MB, ≥300 px, aspect 1:2.5..2.5:1.",
    )
    image_tail: str | None = Field(
        default=None, description="Last frame (first-last-frame video); needs image."
    )
    cfg_scale: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Prompt adherence 0..1 (Kling API: not on kling-v2* models).",
    )
    camera_control: dict[str, Any] | None = Field(
        default=None, description="Kling camera_control object, passed through as given."
    )
    sound: Sound | None = Field(
        default=None, description="on/off: generate audio (kling-v2-6, kling-video-o1)."
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="Extra provider fields, passed through."
    )


class JobEntry(JobFields):
    """One explicit job."""

    id: str = Field(description="Job id: letters, digits, '.', '_', '-' (a file name).")


class Axes(_Strict):
    """Job fields to vary; every value becomes a job (cartesian product, in the order written)."""

    model: list[ModelName] | None = Field(default=None, min_length=1)
    prompt: list[str] | None = Field(default=None, min_length=1)
    negative_prompt: list[str] | None = Field(default=None, min_length=1)
    duration: list[Duration] | None = Field(default=None, min_length=1)
    size: list[Size] | None = Field(default=None, min_length=1)
    mode: list[Mode] | None = Field(default=None, min_length=1)
    image: list[str] | None = Field(default=None, min_length=1)
    image_tail: list[str] | None = Field(default=None, min_length=1)
    cfg_scale: list[Annotated[float, Field(ge=0, le=1)]] | None = Field(default=None, min_length=1)
    camera_control: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    sound: list[Sound] | None = Field(default=None, min_length=1)
    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_written_order(cls, data: Any, handler: Callable[[Any], Self]) -> Self:
        # Field order is the class's; expansion order must be the order the user wrote.
        axes = handler(data)
        if isinstance(data, dict):
            axes._order = tuple(k for k in data if k in cls.model_fields)
        return axes

    def items(self) -> list[tuple[str, list[Any]]]:
        """(field, values) pairs in the order they were written."""
        order = self._order or tuple(k for k in type(self).model_fields if getattr(self, k))
        return [(name, list(getattr(self, name))) for name in order]


class MatrixEntry(JobFields):
    """A family of jobs: vars_from rows × vars × axes, minus exclude, plus include."""

    id: str = Field(
        description="Job id template, e.g. '{product}-{size:slug}-{mode}'; must give a "
        "unique safe file name for every job."
    )
    vars: dict[VarName, Annotated[list[Text], BeforeValidator(_as_list)]] = Field(
        default_factory=dict, description="Template variables: name → list of values."
    )
    vars_from: str | None = Field(
        default=None,
        description="CSV file (relative to the manifest): the "
        "header names variables, each row is one set of values.",
    )
    axes: Axes | None = Field(
        default=None, description="Job fields to vary; values are also variables."
    )
    exclude: list[Annotated[dict[VarName, Text], Field(min_length=1)]] = Field(
        default_factory=list, description="Drop combinations matching all keys of an entry."
    )
    include: list[Annotated[dict[str, Any], Field(min_length=1)]] = Field(
        default_factory=list,
        description="Extra combinations appended after the product. An entry may set job "
        "fields (e.g. duration: 10) and its own id; variables it does not name are taken from "
        "the first combination with the same vars/vars_from values.",
    )


def _env_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected the name of an environment variable; found {show(value)}")
    looks_like_key = value.startswith(("sk-", "eyJ")) or (
        len(value) >= 24 and any(c.isdigit() for c in value) and any(c.islower() for c in value)
    )
    if looks_like_key:
        raise ValueError(
            "this looks like a key itself: put the key in the environment and "
            "name the variable here (e.g. IMAROUTER_API_KEY)"
        )
    if not _ENV_RE.match(value):
        raise ValueError(f"expected the name of an environment variable; found {value!r}")
    return value


def _base_url(value: Any) -> str:
    if isinstance(value, str) and re.match(r"^https?://[^/\s]+", value):
        return value.rstrip("/")
    raise ValueError(f"base_url must be an http(s) URL; found {show(value)}")


EnvName = Annotated[
    str, PlainValidator(_env_name), WithJsonSchema({"type": "string", "pattern": _ENV_RE.pattern})
]
BaseURL = Annotated[
    str, PlainValidator(_base_url), WithJsonSchema({"type": "string", "pattern": "^https?://"})
]


class ProviderConfig(_Strict):
    """Which API to call and where the credentials live (names of environment variables only)."""

    name: Literal["imarouter", "kling"] = Field(
        default="imarouter", description="imarouter or kling."
    )
    base_url: BaseURL = Field(
        default=DEFAULT_BASE_URL["imarouter"],
        description="API root; default depends on name (kling: https://api-singapore.klingai.com).",
    )
    api_key_env: EnvName | None = Field(
        default=None,
        description="Environment variable holding the bearer "
        "key (default IMAROUTER_API_KEY for imarouter).",
    )
    access_key_env: EnvName | None = Field(
        default=None,
        description="kling: variable holding the access key (default KLING_ACCESS_KEY).",
    )
    secret_key_env: EnvName | None = Field(
        default=None,
        description="kling: variable holding the secret key (default KLING_SECRET_KEY).",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        name = data.get("name", "imarouter")
        if name in DEFAULT_BASE_URL:
            data.setdefault("base_url", DEFAULT_BASE_URL[name])
        keys = ("api_key_env", "access_key_env", "secret_key_env")
        if name == "imarouter":
            data.setdefault("api_key_env", "IMAROUTER_API_KEY")
        elif name == "kling" and all(data.get(k) is None for k in keys):
            data.update(access_key_env="KLING_ACCESS_KEY", secret_key_env="KLING_SECRET_KEY")
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        pair = (self.access_key_env is not None, self.secret_key_env is not None)
        if self.name == "imarouter" and any(pair):
            raise ValueError(
                "access_key_env/secret_key_env are for provider kling; imarouter uses api_key_env"
            )
        if self.name == "kling":
            if pair[0] != pair[1]:
                raise ValueError(
                    "kling needs both access_key_env and secret_key_env "
                    "(or api_key_env alone for a single-key account)"
                )
            if all(pair) and self.api_key_env is not None:
                raise ValueError(
                    "give either api_key_env or access_key_env+secret_key_env, not both"
                )
        return self


class Limits(_Strict):
    """How hard the run may push the provider."""

    max_in_flight: int = Field(
        default=5, ge=1, le=1000, description="Provider task slots this run may hold."
    )
    submit_rate: float = Field(default=2.0, gt=0, le=1000, description="Creates per second.")
    task_timeout: Seconds = Field(
        default=2700.0,
        description="Poll deadline per task: seconds or a duration like 45m, 90s, 2h, 1h30m.",
    )
    max_attempts: int = Field(default=2, ge=1, le=10, description="Provider-side failures retried.")


class Budget(_Strict):
    """Spending cap."""

    max_usd: float | None = Field(
        default=None,
        ge=0,
        description="Stop creating before this would be "
        "exceeded (estimates reserved, actual cost settled).",
    )


class Output(_Strict):
    """What happens to finished videos."""

    download: bool = Field(default=True, description="Download each finished video.")
    allow_private_urls: bool = Field(
        default=False, description="Allow result URLs on private addresses."
    )
    max_video_mb: float = Field(default=500, gt=0, description="Refuse downloads larger than this.")


def _price_key(value: Any) -> str:
    model, _, mode = str(value).partition(":")
    if model in MODELS and mode in ("", *MODES):
        return str(value)
    raise ValueError(
        f"price keys are '<model>' or '<model>:<mode>' (mode std|pro); "
        f"found {show(value)}{suggest(model, MODELS)}"
    )


PriceKey = Annotated[str, PlainValidator(_price_key), WithJsonSchema({"type": "string"})]


def _slug(value: Any) -> str:
    if isinstance(value, str) and _NAME_RE.match(value):
        return value
    text = str(value) if isinstance(value, str | int | float) else ""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64] or "my-run"
    raise ValueError(
        "name must be a slug (lowercase letters, digits, '.', '_', '-'; at most 64): "
        f"found {show(value)}; try {slug!r}"
    )


Slug = Annotated[
    str, PlainValidator(_slug), WithJsonSchema({"type": "string", "pattern": _NAME_RE.pattern})
]


class RunConfig(_Strict):
    """Everything a run needs after expansion; snapshotted so resume needs no manifest file."""

    version: Literal[1] = Field(description="Manifest format version: 1.")
    name: Slug = Field(description="Slug naming the run (the default run id).")
    provider: ProviderConfig = Field(default_factory=ProviderConfig)
    limits: Limits = Field(default_factory=Limits)
    budget: Budget = Field(default_factory=Budget)
    output: Output = Field(default_factory=Output)
    on_unknown: Literal["wait", "resubmit"] = Field(
        default="wait",
        description="A create whose outcome is unknown: wait for a person, or resubmit.",
    )
    pricing: dict[PriceKey, Annotated[float, Field(ge=0)]] | None = Field(
        None,
        description="USD per video second overriding the built-in estimate: keys "
        "'<model>' or '<model>:<mode>'.",
    )


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
        """The expanded jobs: explicit jobs in file order, then each matrix in file order."""
        return self._specs

    def expand(self) -> tuple[JobSpec, ...]:
        """The expanded jobs (same as :attr:`specs`; expansion happened in ``load_manifest``)."""
        return self._specs

    def run_config(self) -> RunConfig:
        """The engine's part of the manifest, suitable for snapshotting as JSON."""
        return RunConfig.model_validate(self.model_dump(include=set(RunConfig.model_fields)))


_MODELS_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): Manifest,
    ("provider",): ProviderConfig,
    ("limits",): Limits,
    ("budget",): Budget,
    ("output",): Output,
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


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read, validate and expand a manifest; raise ManifestError listing every problem at once."""
    file = os.fspath(path)
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ManifestError(
            [Problem(file, None, None, "", f"cannot read manifest: {reason}")]
        ) from None
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
    return _validate_and_expand(loaded, Path(os.path.abspath(file)))


def _validate_and_expand(loaded: LoadedYAML, source_path: Path) -> Manifest:
    # Imported here: expand builds on the models defined in this module.
    from batchkling.expand import expand_manifest

    data, source = loaded.data, loaded.source
    problems = list(loaded.problems)
    manifest: Manifest | None = None
    try:
        manifest = Manifest.model_validate(data)
        defaults, jobs = manifest.defaults, list(enumerate(manifest.jobs))
        matrices, provider = list(enumerate(manifest.matrices)), manifest.provider.name
    except ValidationError as exc:
        problems += [
            _secret_hint(p)
            for p in problems_from_validation(
                exc, data, source, known_keys=known_keys, skip=loaded.bad_paths
            )
        ]
        # Keep going with the parts that are valid, so one run reports every problem.
        salvaged = _salvage(
            JobFields, data.get("defaults") or {}, ("defaults",), loaded, prune_values=True
        )
        defaults = salvaged or JobFields()
        jobs = _salvage_list(JobEntry, data.get("jobs"), "jobs", loaded)
        matrices = _salvage_list(MatrixEntry, data.get("matrices"), "matrices", loaded)
        name = (
            data.get("provider", {}).get("name") if isinstance(data.get("provider"), dict) else None
        )
        provider = "kling" if name == "kling" else "imarouter"
    if not data.get("jobs") and not data.get("matrices"):
        problems.append(
            source.problem((), "the manifest defines no jobs: add 'jobs:' or 'matrices:'")
        )
    result = expand_manifest(
        defaults=defaults,
        jobs=jobs,
        matrices=matrices,
        provider=provider,
        source=source,
        base_dir=source_path.parent,
    )
    problems += result.problems
    if not problems and not result.specs:
        problems.append(source.problem((), "the manifest expands to no jobs (all excluded?)"))
    if problems or manifest is None:
        raise ManifestError(sort_problems(problems, source.file))
    manifest._source_path = source_path
    manifest._base_dir = source_path.parent
    manifest._warnings = sort_problems(result.warnings, source.file)
    manifest._specs = result.specs
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


def _salvage(
    model: type[_M], data: Any, path: DataPath, loaded: LoadedYAML, *, prune_values: bool = False
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
            return model.model_validate(current)
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


def _salvage_list(model: type[_M], data: Any, key: str, loaded: LoadedYAML) -> list[tuple[int, _M]]:
    if not isinstance(data, list):
        return []
    out = []
    for i, item in enumerate(data):
        entry = _salvage(model, item, (key, i), loaded)
        if entry is not None:
            out.append((i, entry))
    return out
