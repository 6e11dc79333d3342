"""What the providers accept and charge: models, sizes, prices, and the shared request rules.

Prices are the price table's (:mod:`batchkling.pricing`, the one source of prices), times the
simulator's ``price_factor``; models are the built-in ones plus the ``extra_models`` it was
started with (``batchkling simulate --models``, or a manifest's ``models:`` section under
``run --simulate``).

Validation functions raise ``Invalid`` with a message that names the field and the allowed values;
each API shape turns it into its own error body.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Re-exported (``X as X``) for the API-shape modules.
from batchkling.catalog import DURATIONS as DURATIONS
from batchkling.catalog import MAX_PROMPT, SOUND_MODELS
from batchkling.catalog import MODELS as MODELS
from batchkling.catalog import MODES as MODES
from batchkling.catalog import SIZES as SIZES
from batchkling.pricing import FALLBACK_PRICE, task_units, task_usd

PROMPT_MAX = MAX_PROMPT
IMAGE_MAX_BYTES = 10 * 1024 * 1024

#: A prompt containing this word is refused at create as a content-policy violation.
FORBIDDEN_WORD = re.compile(r"\bforbidden\b", re.IGNORECASE)
#: Test hooks in a prompt: ``[sim:fail=internal]``, ``[sim:fail=content_policy]``, ``[sim:never]``,
#: ``[sim:render=30]`` force that task's outcome or render seconds, whatever the fault rates.
SIM_TAG = re.compile(r"\[sim:(fail|never|render)(?:=([a-z_0-9.]+))?\]")

_DIMS = {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960)}


class Invalid(Exception):
    """A request field broke a rule; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Spec:
    """The normalised render request both shapes reduce to."""

    kind: str  # "text2video" | "image2video"
    model: str
    duration: int
    size: str
    mode: str
    prompt: str
    has_tail: bool = False
    sound: str | None = None


def known_models(extra: Mapping[str, tuple[float, float] | None]) -> tuple[str, ...]:
    """The model ids this simulator accepts: the built-in ones and its extra ones."""
    return (*MODELS, *(m for m in extra if m not in MODELS))


def price_usd(spec: Spec, *, factor: float = 1.0,
              extra: Mapping[str, tuple[float, float] | None] | None = None) -> float:
    """The simulated charge for one finished task: the price table's, times ``factor``.

    An extra model is billed at the price it was declared with (a built-in one too: the
    manifest that declared it made that its table), or the table's fallback.
    """
    overrides = None
    declared = (extra or {}).get(spec.model, ())
    if declared or (declared is None and spec.model not in MODELS):
        std, pro = declared or FALLBACK_PRICE
        overrides = {f"{spec.model}:std": std, f"{spec.model}:pro": pro}
    base = task_usd(spec.model, spec.mode, spec.duration, sound=spec.sound, overrides=overrides)
    return round(base * factor, 4)


def units(spec: Spec, *, factor: float = 1.0) -> str:
    """Kling's ``final_unit_deduction`` for one finished task, as the string Kling sends."""
    return f"{task_units(spec.model, spec.mode, spec.duration) * factor:g}"


def dimensions(size: str, mode: str) -> tuple[int, int]:
    """Nominal output width and height: 720p for std, 1080p for pro."""
    w, h = _DIMS.get(size, _DIMS["16:9"])
    return (w * 3 // 2, h * 3 // 2) if mode == "pro" else (w, h)


def is_master(model: str) -> bool:
    """``*-master`` models have one quality level and ignore ``mode``."""
    return model.endswith("-master")


def check_text(field: str, value: Any, *, required: bool) -> str:
    """A prompt-like string of at most 2,500 characters (empty allowed unless ``required``)."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise Invalid(field, f"{field} must be a string")
    if len(value) > PROMPT_MAX:
        raise Invalid(field, f"{field} must be at most {PROMPT_MAX} characters (got {len(value)})")
    if required and not value.strip():
        raise Invalid(field, f"{field} is required and may not be empty")
    return value


def check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    """One of ``allowed``."""
    if value not in allowed:
        raise Invalid(field, f"{field} must be one of {', '.join(allowed)} (got {value!r})")
    return str(value)


def check_cfg_scale(value: Any, model: str) -> None:
    """``cfg_scale`` is a number in 0..1 and is refused by kling-v2.x models."""
    if value is None:
        return
    if model.startswith("kling-v2"):
        raise Invalid("cfg_scale", f"cfg_scale is not supported by {model} (kling-v2.x models)")
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        raise Invalid("cfg_scale", f"cfg_scale must be a number between 0 and 1 (got {value!r})")


def check_sound(value: Any, model: str) -> None:
    """``sound`` is on|off and only kling-v2-6 and later (and extra models) produce it."""
    if value is None:
        return
    check_choice("sound", value, ("on", "off"))
    if value == "on" and model in MODELS and model not in SOUND_MODELS:
        raise Invalid("sound", f"sound is only supported from kling-v2-6 on (got model {model})")


def check_image(field: str, value: Any, *, data_uri_ok: bool, decode: bool) -> None:
    """An http(s) URL, or base64 of a jpg/png ≤10 MB, ≥300 px, aspect within 1:2.5..2.5:1.

    Kling wants the raw base64 string; a ``data:`` prefix is only tolerated where ``data_uri_ok``.
    URLs are accepted unfetched: the simulator never leaves loopback.
    """
    if not isinstance(value, str) or not value:
        raise Invalid(field, f"{field} must be an image URL or base64 string")
    if value.startswith(("http://", "https://")):
        return
    if value.startswith("data:"):
        if not data_uri_ok:
            raise Invalid(field, f"{field} must be raw base64 without a 'data:' prefix, or a URL")
        _, _, value = value.partition(",")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Invalid(field, f"{field} is neither a URL nor valid base64") from exc
    if len(raw) > IMAGE_MAX_BYTES:
        raise Invalid(field, f"{field} must be at most 10 MB (got {len(raw)} bytes)")
    if decode:
        _check_pixels(field, raw)


def _check_pixels(field: str, raw: bytes) -> None:
    from PIL import Image, UnidentifiedImageError  # deferred: only image requests pay for PIL

    try:
        with Image.open(io.BytesIO(raw)) as img:
            fmt, (w, h) = img.format, img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise Invalid(field, f"{field} is not a readable jpg/png image") from exc
    if fmt not in ("JPEG", "PNG"):
        raise Invalid(field, f"{field} must be jpg or png (got {fmt})")
    if min(w, h) < 300:
        raise Invalid(field, f"{field} must be at least 300 px on each side (got {w}x{h})")
    if not 1 / 2.5 <= w / h <= 2.5:
        raise Invalid(field, f"{field} aspect ratio must be within 1:2.5..2.5:1 (got {w}x{h})")


def sim_tags(prompt: str) -> dict[str, str]:
    """The ``[sim:…]`` test hooks in a prompt, as {name: value}."""
    return {m.group(1): m.group(2) or "" for m in SIM_TAG.finditer(prompt)}
