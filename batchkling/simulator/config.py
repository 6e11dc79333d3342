"""Simulator settings: every knob in one frozen value, named fault profiles, and loading them.

Times in ``SimConfig`` are *simulated* seconds unless a field says "real": the simulator divides
them by ``speed``. Request pacing (``rate_limit_per_s``, ``retry_after_s``) is the exception: a
client measures it with its own clock, so it is in real seconds whatever the speed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from batchkling.errors import BatchklingError

DEFAULT_ACCESS_KEY = "sim-access-key"
DEFAULT_SECRET_KEY = "sim-secret-key"

#: The task-failure kinds a ``fail_reasons`` entry may name.
FAIL_KINDS = ("content_policy", "internal")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Every simulator knob, with defaults that make a well-behaved, fault-free provider."""

    seed: int = 0
    speed: float = 1.0  # render-time divisor: 60 turns a one-minute render into one real second

    # Render-time model: log-normal around the median, ×1.6 for 10 s clips, ×1.3 for pro mode.
    render_median_s: float = 90.0
    render_sigma: float = 0.35
    queue_s: float = 2.0  # time spent `queued` before `in_progress` (jittered ±50 %)

    # The account: one pool shared by both API shapes.
    slot_limit: int | None = None
    # Separate accounts on the ImaRouter shape, each with its own slots: "KEY=N" per bearer key
    # (a key not listed shares `slot_limit`). Stats name them acct-<first 8 hex of sha256(key)>.
    account_slots: tuple[str, ...] = ()
    rate_limit_per_s: float | None = None  # creates per real second (token bucket)
    retry_after_s: float = 1.0  # real seconds, sent as Retry-After on rate-limit answers
    credits_after_creates: int | None = None  # out of credit once this many tasks exist

    # Faults on create. Each is a fraction 0..1 drawn from the seeded create stream.
    create_5xx_rate: float = 0.0  # 500/503 and no task
    create_5xx_after_create_rate: float = 0.0  # the task IS created, the answer is a 5xx
    create_hang_after_create_rate: float = 0.0  # the task is created, the answer waits hang_s
    hang_s: float = 30.0  # real seconds

    # Faults on status polls and downloads.
    poll_5xx_rate: float = 0.0
    poll_drop_rate: float = 0.0  # headers and half a body, then the connection is closed
    slow_response_s: float = 0.0  # real seconds added to every API answer
    download_truncate_rate: float = 0.0  # Content-Length promises more than is sent
    url_ttl_s: float | None = None  # result URLs answer 403 this long after the poll that gave them

    # Task outcomes, drawn per task from a stream seeded by (seed, task number).
    fail_rate: float = 0.0
    fail_reasons: tuple[str, ...] = FAIL_KINDS
    never_finish_rate: float = 0.0  # the task stays in_progress forever and keeps its slot

    # Quirks real gateways show (ImaRouter shape only; Kling native is always strict).
    quirk_status_synonyms: bool = False
    quirk_wrapped: bool = False
    quirk_progress_string: bool = False
    quirk_ms_timestamps: bool = False
    quirk_completed_without_url: bool = False
    quirk_fail_reason_fields: bool = False  # reason in `fail_reason`/`task_status_msg`, no `error`
    quirk_404_after_create_s: float = 0.0
    poll_after_s: float | None = None  # send `openai-poll-after-ms` on unfinished tasks
    # The gateway's own refresh: ImaRouter polls the upstream about every 15 s (API.md), so a
    # status poll shows the task as it was at the gateway's last look — one loop for all tasks,
    # a look every this many seconds — and an end is dated by the look that saw it. 0: always
    # as of now. ImaRouter shape only.
    status_refresh_s: float = 0.0
    # Each of those loops takes up to this much longer, at random (the gateway sleeps, then
    # spends a while looking at every unfinished task of every user): looks drift apart.
    status_refresh_jitter_s: float = 0.0

    # Identity and behaviour switches.
    honor_idempotency_key: bool = True
    api_key: str | None = None  # None: any non-empty bearer is accepted on the ImaRouter shape
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = DEFAULT_SECRET_KEY
    validate_images: bool = True  # decode images and enforce jpg/png, ≥300 px, aspect 1:2.5..2.5:1
    callbacks: bool = True

    # Money. Charges are the price table's (batchkling.pricing) times this factor: 1.6 bills
    # 60 % above the table, so tests can prove a budget holds when the table is wrong.
    price_factor: float = 1.0
    # Models beyond the built-in ones, each "id" or "id=STD/PRO" (USD per second of video).
    extra_models: tuple[str, ...] = ()

    @property
    def model_prices(self) -> dict[str, tuple[float, float] | None]:
        """The extra models and the price each was declared with (None: the fallback)."""
        return dict(parse_model_entry(entry) for entry in self.extra_models)

    def replace(self, **changes: Any) -> SimConfig:
        """A copy with ``changes`` applied, each coerced and range-checked like a loaded file."""
        return config_from_mapping(changes, base=self)

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["fail_reasons"] = list(self.fail_reasons)
        return out


_QUIRKS: dict[str, Any] = {
    "quirk_status_synonyms": True,
    "quirk_wrapped": True,
    "quirk_progress_string": True,
    "quirk_ms_timestamps": True,
    "quirk_completed_without_url": True,
    "quirk_fail_reason_fields": True,
    "quirk_404_after_create_s": 3.0,
}

_FLAKY: dict[str, Any] = {
    "create_5xx_rate": 0.05,
    "create_5xx_after_create_rate": 0.03,
    "poll_5xx_rate": 0.05,
    "poll_drop_rate": 0.03,
    "rate_limit_per_s": 5.0,
    "fail_rate": 0.1,
    "download_truncate_rate": 0.1,
    "url_ttl_s": 60.0,
}

#: Named fault profiles: SimConfig field overrides. ``chaos`` still lets most tasks finish.
PROFILES: dict[str, dict[str, Any]] = {
    "none": {},
    "quirks": dict(_QUIRKS),
    "flaky": dict(_FLAKY),
    "slots": {"slot_limit": 3},
    # The provider bills 60 % above the price table (budgets must hold anyway).
    "overpriced": {"price_factor": 1.6},
    "chaos": {
        **_QUIRKS,
        **_FLAKY,
        "slot_limit": 8,
        "create_hang_after_create_rate": 0.02,
        "hang_s": 12.0,
        "never_finish_rate": 0.02,
        "slow_response_s": 0.02,
    },
}

_FIELDS = {f.name: f for f in dataclasses.fields(SimConfig)}
_MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")


def parse_model_entry(entry: str) -> tuple[str, tuple[float, float] | None]:
    """``"kling-v2-7"`` or ``"kling-v2-7=0.07/0.112"`` → the id and its (std, pro) USD per
    second; ValueError saying what is expected."""
    model, _, price = entry.strip().partition("=")
    if not _MODEL_ID.match(model):
        raise ValueError(f"extra model {entry!r}: expected an id like kling-v2-7 (lowercase "
                         "letters, digits, '.', '_', '-'), optionally =STD/PRO USD per second")
    if not price:
        return model, None
    std, _, pro = price.partition("/")
    try:
        pair = (float(std), float(pro or std))
    except ValueError:
        raise ValueError(f"extra model {entry!r}: the price is STD/PRO USD per second, "
                         "e.g. kling-v2-7=0.07/0.112") from None
    if not all(math.isfinite(p) and p >= 0 for p in pair):
        raise ValueError(f"extra model {entry!r}: prices must be finite and ≥ 0")
    return model, pair
_RATE_FIELDS = frozenset(n for n in _FIELDS if n.endswith("_rate"))


def _type_name(annotation: str) -> str:
    return annotation.replace("tuple[str, ...]", "list of strings")


def _coerce(name: str, value: Any) -> Any:
    """Convert a JSON/YAML value to the field's type, or raise ValueError saying what is wanted."""
    annotation = str(_FIELDS[name].type)
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} may not be null (expected {_type_name(annotation)})")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    kind = annotation.split(" ", 1)[0].split("[", 1)[0]
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and is_number and isinstance(value, int):
        return value
    if kind == "float" and is_number and math.isfinite(value):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "tuple" and isinstance(value, list | tuple) and all(
        isinstance(v, str) for v in value
    ):
        return tuple(value)
    raise ValueError(f"{name} must be {_type_name(annotation)}, got {value!r}")


def _check(cfg: SimConfig) -> None:
    """Range checks that types alone cannot express."""
    for name in _RATE_FIELDS:
        rate = getattr(cfg, name)
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be a fraction between 0 and 1, got {rate}")
    if cfg.speed <= 0:
        raise ValueError(f"speed must be > 0, got {cfg.speed}")
    if cfg.rate_limit_per_s is not None and cfg.rate_limit_per_s <= 0:
        raise ValueError(f"rate_limit_per_s must be > 0 or null, got {cfg.rate_limit_per_s}")
    if cfg.slot_limit is not None and cfg.slot_limit < 1:
        raise ValueError(f"slot_limit must be ≥ 1 or null, got {cfg.slot_limit}")
    for name in ("url_ttl_s", "poll_after_s", "credits_after_creates"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be ≥ 0 or null, got {value}")
    for name in ("render_median_s", "render_sigma", "queue_s", "hang_s", "slow_response_s",
                 "retry_after_s", "quirk_404_after_create_s", "status_refresh_s",
                 "status_refresh_jitter_s"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be ≥ 0, got {getattr(cfg, name)}")
    if cfg.status_refresh_jitter_s > 0 and cfg.status_refresh_s <= 0:
        raise ValueError("status_refresh_jitter_s needs status_refresh_s > 0 (the loop it "
                         "makes irregular)")
    bad = [r for r in cfg.fail_reasons if r not in FAIL_KINDS]
    if bad or not cfg.fail_reasons:
        raise ValueError(
            f"fail_reasons must be a non-empty list of {', '.join(FAIL_KINDS)}; got {bad or '[]'}"
        )
    for entry in cfg.account_slots:
        key, _, n = entry.rpartition("=")
        if not key or not n.isdigit() or int(n) < 1:
            raise ValueError(f"account_slots entries are KEY=N with N ≥ 1, got {entry!r}")
    if not (math.isfinite(cfg.price_factor) and cfg.price_factor >= 0):
        raise ValueError(f"price_factor must be ≥ 0, got {cfg.price_factor}")
    for entry in cfg.extra_models:
        parse_model_entry(entry)
    if not cfg.access_key or not cfg.secret_key:
        raise ValueError("access_key and secret_key may not be empty")


def config_from_mapping(data: Mapping[str, Any], *, base: SimConfig | None = None) -> SimConfig:
    """Apply ``data`` (SimConfig field names to JSON-ish values) over ``base``.

    Raises ValueError naming the first unknown field, wrong type or out-of-range value.
    """
    unknown = sorted(k for k in data if k not in _FIELDS)
    if unknown:
        raise ValueError(
            f"unknown simulator setting(s) {', '.join(unknown)}; valid: {', '.join(_FIELDS)}"
        )
    values = {k: _coerce(k, v) for k, v in data.items()}
    cfg = dataclasses.replace(base or SimConfig(), **values)
    _check(cfg)
    return cfg


def load_faults(name_or_path: str, **overrides: Any) -> SimConfig:
    """A SimConfig from a named profile or a YAML/JSON file of fields, then ``overrides``.

    Overrides whose value is None are skipped, so CLI options left unset keep the profile's value.
    Raises BatchklingError with a one-line message for an unknown name or a bad file.
    """
    where = f"--faults {name_or_path!r}"
    if name_or_path in PROFILES:
        data: Mapping[str, Any] = PROFILES[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise BatchklingError(
                f"{where}: no such fault profile or file; profiles: {', '.join(PROFILES)}"
            )
        try:
            text = path.read_text(encoding="utf-8")
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            detail = " ".join(str(exc).split())
            raise BatchklingError(f"{where}: cannot read the file: {detail}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise BatchklingError(f"{where}: expected a mapping of simulator settings")
        profile = loaded.pop("profile", None)
        if profile is not None:
            if profile not in PROFILES:
                raise BatchklingError(
                    f"{where}: unknown profile {profile!r}; profiles: {', '.join(PROFILES)}"
                )
            loaded = {**PROFILES[profile], **loaded}
        data = loaded
    try:
        cfg = config_from_mapping(data)
        return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise BatchklingError(f"{where}: {exc}") from exc
