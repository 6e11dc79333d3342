"""The run settings of a manifest: provider, limits, budget, output, and their value types.

These sections, with ``name`` and ``pricing``, make up
:class:`~batchkling.manifest.document.RunConfig`, which a run snapshots so that resume needs no
manifest file. Credentials never appear here: a manifest names the environment variables that
hold them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BeforeValidator,
    Field,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from batchkling.catalog import DURATIONS, MAX_DURATION, MODEL_ID, MODES, ModelRules
from batchkling.manifest.jobs import StrictModel, catalog_of
from batchkling.manifest.yamlsource import show, suggest
from batchkling.models import StoreURL

DEFAULT_BASE_URL = {
    "imarouter": "https://api.imarouter.com",
    "kling": "https://api-singapore.klingai.com",
}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


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
    if not _ENV_RE.fullmatch(value):
        raise ValueError(f"expected the name of an environment variable; found {value!r}")
    return value


def _base_url(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"https?://[^/\s]+(?:/\S*)?", value):
        return value.rstrip("/")
    raise ValueError(f"base_url must be an http(s) URL; found {show(value)}")


EnvName = Annotated[
    str, PlainValidator(_env_name), WithJsonSchema({"type": "string", "pattern": _ENV_RE.pattern})
]
BaseURL = Annotated[
    str, PlainValidator(_base_url), WithJsonSchema({"type": "string", "pattern": "^https?://"})
]


class AccountConfig(StrictModel):
    """One provider key of a pool, by the name of its environment variable, and its slots."""

    api_key_env: EnvName | None = Field(
        default=None, description="Variable holding this account's bearer key.")
    access_key_env: EnvName | None = Field(
        default=None, description="kling: variable holding this account's access key.")
    secret_key_env: EnvName | None = Field(
        default=None, description="kling: variable holding this account's secret key.")
    max_in_flight: int | None = Field(
        default=None, ge=1, le=1000,
        description="Task slots of this account (default: limits.max_in_flight).")

    @model_validator(mode="after")
    def _check(self) -> Self:
        pair = (self.access_key_env is not None, self.secret_key_env is not None)
        if pair[0] != pair[1]:
            raise ValueError("an account needs both access_key_env and secret_key_env, "
                             "or api_key_env alone")
        if all(pair) == (self.api_key_env is not None):
            raise ValueError("an account names its key: api_key_env, or access_key_env and "
                             "secret_key_env (kling)")
        return self

    @property
    def key_env(self) -> str:
        """The variable that names the account (its key, or its access key)."""
        name = self.api_key_env or self.access_key_env
        assert name is not None
        return name


class ProviderConfig(StrictModel):
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
    accounts: list[AccountConfig] | None = Field(
        default=None, min_length=1,
        description="A pool of keys of this provider, each with its own slots: jobs go to any "
        "account with a free slot. Instead of api_key_env/access_key_env/secret_key_env.",
    )
    callback_url: BaseURL | None = Field(
        default=None,
        description="Public URL that reaches this run's callback receiver (started with "
        "--callback-listen HOST:PORT): the provider POSTs status changes there, so tasks are "
        "polled far less. Polling stays the fallback.",
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
        if data.get("accounts") is not None:
            return data
        keys = ("api_key_env", "access_key_env", "secret_key_env")
        if name == "imarouter":
            data.setdefault("api_key_env", "IMAROUTER_API_KEY")
        elif name == "kling" and all(data.get(k) is None for k in keys):
            data.update(access_key_env="KLING_ACCESS_KEY", secret_key_env="KLING_SECRET_KEY")
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.accounts is not None:
            return self._check_accounts()
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


    def _check_accounts(self) -> Self:
        assert self.accounts is not None
        if any(getattr(self, k) is not None
               for k in ("api_key_env", "access_key_env", "secret_key_env")):
            raise ValueError("give the keys either in accounts or as api_key_env/access_key_env/"
                             "secret_key_env, not both")
        names = [a.key_env for a in self.accounts]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"accounts name the same key variable more than once: "
                             f"{', '.join(twice)}")
        if self.name == "imarouter" and any(a.api_key_env is None for a in self.accounts):
            raise ValueError("imarouter accounts use api_key_env")
        return self

    def key_accounts(self, max_in_flight: int) -> list[AccountConfig]:
        """The accounts to create on: the pool, or the one key named at the top."""
        if self.accounts is not None:
            return [a if a.max_in_flight is not None
                    else a.model_copy(update={"max_in_flight": max_in_flight})
                    for a in self.accounts]
        return [AccountConfig(api_key_env=self.api_key_env, access_key_env=self.access_key_env,
                              secret_key_env=self.secret_key_env, max_in_flight=max_in_flight)]


class Limits(StrictModel):
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


class Budget(StrictModel):
    """Spending cap (docs/money.md)."""

    max_usd: float | None = Field(
        default=None,
        ge=0,
        description="Stop creating before this would be "
        "exceeded (estimates reserved, actual cost settled).",
    )
    max_units: float | None = Field(
        default=None,
        ge=0,
        description="provider kling: the same cap in Kling's resource-pack units, which is "
        "what Kling reports (final_unit_deduction) instead of dollars.",
    )
    margin: float = Field(
        default=1.5,
        ge=1,
        le=10,
        description="Until the store has observed a price for a job's model/mode/duration, "
        "reserve the price table's estimate times this (1 trusts the table).",
    )


class ModelPrice(StrictModel):
    """A price by mode."""

    std: float = Field(ge=0, description="For mode std.")
    pro: float | None = Field(default=None, ge=0, description="For mode pro (default: std's).")

    def pair(self) -> tuple[float, float]:
        """``(std, pro)``."""
        return self.std, self.pro if self.pro is not None else self.std


def _model_id(value: Any) -> str:
    if isinstance(value, str) and MODEL_ID.match(value):
        return value
    raise ValueError(f"a model id is lowercase letters, digits, '.', '_' and '-' (like "
                     f"kling-v2-7); found {show(value)}")


ModelId = Annotated[
    str, PlainValidator(_model_id), WithJsonSchema({"type": "string", "pattern": MODEL_ID.pattern})
]


def _clip_seconds(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_DURATION:
        return value
    raise ValueError(f"a duration is a whole number of seconds from 1 to {MAX_DURATION}; "
                     f"found {show(value)}")


ClipSeconds = Annotated[
    int, PlainValidator(_clip_seconds),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_DURATION}),
]


_BOTH_MODES: tuple[Literal["std", "pro"], ...] = ("std", "pro")


class ModelDeclaration(StrictModel):
    """A model this version of batchkling does not know (or new rules for one it does)."""

    durations: list[ClipSeconds] = Field(
        default_factory=lambda: list(DURATIONS), min_length=1,
        description="Video lengths it renders, in seconds. Default [5, 10].")
    modes: list[Literal["std", "pro"]] = Field(
        default_factory=lambda: list(_BOTH_MODES), min_length=1,
        description="Quality modes it offers. Default [std, pro].")
    image_tail: bool = Field(default=True, description="Whether it takes a last frame.")
    sound: bool = Field(default=False, description="Whether it generates sound (sound: on).")
    usd_per_second: Annotated[float, Field(ge=0)] | ModelPrice = Field(
        description="Its price in USD per second of video: a number, or {std: .., pro: ..}.")
    units_per_5s: Annotated[float, Field(ge=0)] | ModelPrice | None = Field(
        default=None,
        description="provider kling: Kling units a 5 s clip takes (for budget.max_units).")

    def rules(self) -> ModelRules:
        """What the model accepts, for validation and the catalog."""
        return ModelRules(durations=tuple(sorted(set(self.durations))),
                          modes=tuple(m for m in MODES if m in self.modes),
                          image_tail=self.image_tail, sound=self.sound)

    def prices(self, model: str, per: Literal["usd", "units"]) -> dict[str, float]:
        """Price entries keyed like ``pricing`` (``model:std``, ``model:pro``)."""
        value = self.usd_per_second if per == "usd" else self.units_per_5s
        if value is None:
            return {}
        std, pro = value.pair() if isinstance(value, ModelPrice) else (value, value)
        return {f"{model}:std": std, f"{model}:pro": pro}


def _store_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected s3://bucket/prefix/; found {show(value)}")
    return StoreURL.parse(value).uri()


def _endpoint_url(value: Any) -> str:
    if isinstance(value, str) and re.match(r"^https?://[^/\s@]+(/\S*)?$", value.strip()):
        return value.strip().rstrip("/")
    raise ValueError(
        f"endpoint_url must be an http(s) URL without credentials; found {show(value)}"
    )


StoreLocation = Annotated[
    str, PlainValidator(_store_url), WithJsonSchema({"type": "string", "pattern": "^s3://"})
]
EndpointURL = Annotated[
    str, PlainValidator(_endpoint_url), WithJsonSchema({"type": "string", "pattern": "^https?://"})
]


class Output(StrictModel):
    """What happens to finished videos."""

    download: bool = Field(default=True, description="Download each finished video.")
    allow_private_urls: bool = Field(
        default=False, description="Allow result URLs on private addresses."
    )
    max_video_mb: float = Field(default=500, gt=0, description="Refuse downloads larger than this.")
    store: StoreLocation | None = Field(
        default=None,
        description="s3://bucket/prefix/: each verified video goes to "
        "<prefix>/<run_id>/<job_id>.mp4 in this S3-compatible bucket (credentials from the "
        "AWS_* environment variables or AWS_PROFILE, never the manifest).",
    )
    endpoint_url: EndpointURL | None = Field(
        default=None,
        description="S3 endpoint for non-AWS stores (R2, MinIO, GCS); default AWS_ENDPOINT_URL "
        "or AWS itself.",
    )
    region: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="Bucket region; default AWS_REGION / AWS_DEFAULT_REGION, else us-east-1.",
    )
    allow_http: bool = Field(
        default=False,
        description="Allow a plain-http endpoint off loopback (a trusted network only).",
    )
    keep_local: bool = Field(
        default=False,
        description="With a store: also keep each video in the run's videos/ folder (by "
        "default the local copy is deleted once the store has confirmed the upload).",
    )
    link_expiry: Seconds = Field(
        default=86400.0,
        description="How long the report's pre-signed video links stay valid (at most 7 days).",
    )


class Inputs(StrictModel):
    """How local input images reach the provider."""

    upload: bool | None = Field(
        default=None,
        description="Upload local image/image_tail files to output.store (once, by content "
        "hash) and send pre-signed https URLs instead of base64; default on when output.store "
        "is set and the provider is imarouter.",
    )


def _price_key(value: Any, info: ValidationInfo) -> str:
    model, _, mode = str(value).partition(":")
    catalog = catalog_of(info)
    # Without a catalog (a run's snapshot read back), the key was checked when it was written.
    known = model in catalog if info.context else bool(MODEL_ID.match(model))
    if known and mode in ("", *MODES):
        return str(value)
    raise ValueError(
        f"price keys are '<model>' or '<model>:<mode>' (mode std|pro) of a built-in model or "
        f"one declared in `models:`; found {show(value)}{suggest(model, catalog.models)}"
    )


PriceKey = Annotated[str, PlainValidator(_price_key), WithJsonSchema({"type": "string"})]


def _run_name(value: Any) -> str:
    if isinstance(value, str) and _NAME_RE.fullmatch(value):
        return value
    text = str(value) if isinstance(value, str | int | float) else ""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64] or "my-run"
    raise ValueError(
        "name must be a slug (lowercase letters, digits, '.', '_', '-'; at most 64): "
        f"found {show(value)}; try {slug!r}"
    )


Slug = Annotated[
    str, PlainValidator(_run_name), WithJsonSchema({"type": "string", "pattern": _NAME_RE.pattern})
]
