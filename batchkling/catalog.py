"""What the providers accept (API.md), in one place: the Kling models and their rules.

The manifest validates against these values and the simulator enforces them, so a model added
here is accepted by both at once. A manifest may declare more models in its ``models:`` section
(a model Kling released after this version); :class:`Catalog` is the built-in models with those
declarations merged over them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

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
#: Kling caps prompts (and negative prompts) at this many characters.
MAX_PROMPT = 2500
#: A model id a manifest may declare: lowercase letters, digits, '.', '_', '-'.
MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
#: The longest clip a declared model may offer, in seconds.
MAX_DURATION = 60


@dataclass(frozen=True, slots=True)
class ModelRules:
    """What one model accepts: its durations and modes, a last frame, generated sound."""

    durations: tuple[int, ...] = DURATIONS
    modes: tuple[str, ...] = MODES
    image_tail: bool = True
    sound: bool = False


#: Models that generate sound (``sound: on``).
SOUND_MODELS = ("kling-v2-6", "kling-video-o1")
#: The built-in models' rules. ``*-master`` models have one quality level and ignore ``mode``
#: (a rule of their name, which a declared ``*-master`` model follows too).
BUILTIN: Mapping[str, ModelRules] = {m: ModelRules(sound=m in SOUND_MODELS) for m in MODELS}


@dataclass(frozen=True, slots=True)
class Catalog:
    """The built-in models with a manifest's declared ones merged over them."""

    declared: Mapping[str, ModelRules] = field(default_factory=dict)

    @property
    def models(self) -> tuple[str, ...]:
        """Every model id accepted: the built-in ones, then the declared ones."""
        return (*MODELS, *(m for m in self.declared if m not in BUILTIN))

    @property
    def durations(self) -> tuple[int, ...]:
        """Every duration some model accepts, ascending."""
        found = set(DURATIONS)
        for rules in self.declared.values():
            found.update(rules.durations)
        return tuple(sorted(found))

    def rules(self, model: str) -> ModelRules | None:
        """The rules of ``model``, or None for a model neither built in nor declared."""
        return self.declared.get(model) or BUILTIN.get(model)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.rules(model) is not None


#: The catalog of a manifest that declares no models.
BUILTIN_CATALOG = Catalog()
