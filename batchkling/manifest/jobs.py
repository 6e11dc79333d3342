"""The jobs part of a manifest: the fields a job may set, explicit jobs, matrices and their axes.

Also the values Kling accepts (models, sizes, modes, durations, sound) and the pydantic types
that check them as written. A field that may hold a ``{var}`` template accepts a template string
here; the rendered value is checked again, cheaply and without pydantic, for every expanded job
(see :mod:`~batchkling.manifest.jobbuilder`). Every model forbids unknown keys: a typo is an
error with a suggestion, never silently ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from batchkling.catalog import (
    BUILTIN_CATALOG,
    DURATIONS,
    MAX_PROMPT,
    MODEL_ID,
    MODELS,
    MODES,
    SIZES,
    SOUNDS,
    Catalog,
)
from batchkling.manifest.templates import VARIABLE_NAME, as_text, is_template
from batchkling.manifest.yamlsource import show, suggest

#: What a job gets when neither ``defaults`` nor the job says otherwise.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "model": "kling-v2-6",
    "duration": 5,
    "size": "16:9",
    "mode": "std",
}
_VAR_RE = re.compile(rf"^{VARIABLE_NAME.pattern}$")
_TEMPLATE_SCHEMA = {"type": "string", "pattern": r"\{[A-Za-z_]"}


def _choice(allowed: tuple[str, ...], what: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, str) and (value in allowed or is_template(value)):
            return value
        hint = suggest(value, allowed) if isinstance(value, str) else ""
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; found {show(value)}{hint}")

    return check


def _enum_schema(allowed: tuple[str, ...]) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"enum": list(allowed)}, _TEMPLATE_SCHEMA]})


def catalog_of(info: ValidationInfo) -> Catalog:
    """The models a manifest may use: the built-in ones and those its ``models:`` declares
    (``load_manifest`` validates with ``context={"catalog": ...}``)."""
    context = info.context if isinstance(info.context, dict) else {}
    found = context.get("catalog")
    return found if isinstance(found, Catalog) else BUILTIN_CATALOG


def unknown_model(value: Any, allowed: tuple[str, ...]) -> str:
    """What to say about a model id that is neither built in nor declared."""
    hint = suggest(value, allowed) if isinstance(value, str) else ""
    declare = ""
    if isinstance(value, str) and MODEL_ID.match(value):
        declare = (f"; to use a model this version does not know, declare it in the manifest's "
                   f"`models:` section, e.g. models: {{{value}: {{durations: [5, 10], modes: "
                   "[std, pro], usd_per_second: {std: 0.07, pro: 0.112}}} (see docs/money.md)")
    return f"model must be one of {', '.join(allowed)}; found {show(value)}{hint}{declare}"


def _model(value: Any, info: ValidationInfo) -> str:
    allowed = catalog_of(info).models
    if isinstance(value, str) and (value in allowed or is_template(value)):
        return value
    raise ValueError(unknown_model(value, allowed))


def spoken(values: tuple[Any, ...] | list[Any]) -> str:
    """``5 or 10``; ``5, 8 or 10``."""
    text = [str(v) for v in values]
    return " or ".join(text) if len(text) <= 2 else f"{', '.join(text[:-1])} or {text[-1]}"


def _duration(value: Any, info: ValidationInfo) -> int:
    allowed = catalog_of(info).durations
    if isinstance(value, str) and value.strip().isdigit() and int(value) in allowed:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in allowed:
        return value
    raise ValueError(f"duration must be {spoken(allowed)} (seconds); found {show(value)}")


def _sound(value: Any) -> str:
    if isinstance(value, bool):  # `sound: true` means on; YAML 1.1 habits die hard
        return "on" if value else "off"
    return _choice(SOUNDS, "sound")(value)


def _text(value: Any) -> str:
    """A variable value: any scalar, kept as text (``5`` → ``"5"``, ``true`` → ``"true"``)."""
    if isinstance(value, bool | str | int | float):
        return as_text(value)
    raise ValueError(f"expected a single value (text or number); found {show(value)}")


def _var_name(value: Any) -> str:
    if isinstance(value, str) and _VAR_RE.fullmatch(value):
        return value
    raise ValueError(f"variable names are letters, digits and '_' (not first); found {show(value)}")


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


ModelName = Annotated[
    str, PlainValidator(_model),
    WithJsonSchema({"anyOf": [{"enum": list(MODELS)}, _TEMPLATE_SCHEMA,
                              {"type": "string", "pattern": MODEL_ID.pattern}]}),
]
Size = Annotated[str, PlainValidator(_choice(SIZES, "size")), _enum_schema(SIZES)]
Mode = Annotated[str, PlainValidator(_choice(MODES, "mode")), _enum_schema(MODES)]
Sound = Annotated[str, PlainValidator(_sound), _enum_schema(SOUNDS)]
Duration = Annotated[
    int, PlainValidator(_duration),
    WithJsonSchema({"anyOf": [{"enum": list(DURATIONS)}, {"type": "integer", "minimum": 1}]}),
]
Text = Annotated[
    str, PlainValidator(_text), WithJsonSchema({"type": ["string", "number", "boolean"]})
]
VarName = Annotated[
    str, PlainValidator(_var_name), WithJsonSchema({"type": "string", "pattern": _VAR_RE.pattern})
]


#: How deep ``metadata`` and ``camera_control`` may nest: Kling's deepest object is two levels.
MAX_NESTING = 32


def _passthrough(value: Any) -> Any:
    """A ``metadata``/``camera_control`` object: plain JSON, finite numbers, not too deep.

    It is sent to the provider as JSON and fingerprinted: NaN or infinity cannot be sent, and
    an object hundreds of levels deep would break the readers that walk it. Checked without
    recursion, so no depth breaks the check itself.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{item} is not a number JSON can carry: use a finite number")
        if isinstance(item, dict | list):
            if depth > MAX_NESTING:
                raise ValueError(f"nested more than {MAX_NESTING} levels deep; provider fields "
                                 "are never that deep")
            stack.extend((child, depth + 1) for child in
                         (item.values() if isinstance(item, dict) else item))
    return value


class StrictModel(BaseModel):
    """A manifest section: unknown keys are errors, a validated value never changes, and a
    number is finite (what a run stores must read back: JSON has no infinity)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class JobFields(StrictModel):
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
    camera_control: Annotated[dict[str, Any], AfterValidator(_passthrough)] | None = Field(
        default=None, description="Kling camera_control object, passed through as given."
    )
    sound: Sound | None = Field(
        default=None, description="on/off: generate audio (kling-v2-6, kling-video-o1)."
    )
    metadata: Annotated[dict[str, Any], AfterValidator(_passthrough)] | None = Field(
        default=None, description="Extra provider fields, passed through."
    )


class JobEntry(JobFields):
    """One explicit job."""

    id: str = Field(description="Job id: letters, digits, '.', '_', '-' (a file name).")


class Axes(StrictModel):
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
    camera_control: list[Annotated[dict[str, Any], AfterValidator(_passthrough)]] | None = \
        Field(default=None, min_length=1)
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
