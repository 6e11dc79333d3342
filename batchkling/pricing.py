"""Cost and render-time ESTIMATES for plan output and for budget reservations.

The price table is in USD per second of generated video, by model and mode. Neither ImaRouter
nor Kling publishes a stable per-second list price for API use (Kling sells prepaid resource
packs; gateways set their own margins), so these figures are **assumptions**, compiled in 2026 from
public third-party pay-as-you-go listings of the same models (fal.ai model pages and the muapi.ai
price comparison pages, which quote e.g. Kling 2.5 Turbo Pro at $0.07/s, Kling 2.6 Pro at
$0.07/s silent and $0.14/s with audio, Kling 2.x Master at $1.40 per 5 s, Kling O1 at about
$0.112/s). Where only one mode is listed the other is scaled by the usual std:pro ratio (≈ 0.6).
They are good enough to see that a matrix costs $30 rather than $3,000; they are not a quote.
This table is the one source of prices: ``plan`` estimates with it, a run reserves with it (until
the store has observed the provider's own price, see :mod:`batchkling.run.budget`), and the
simulator bills it (times its ``price_factor``, which tests turn up to prove the budget holds
when the table is wrong).

Override any price in the manifest::

    pricing:
      kling-v2-6: 0.06          # every mode of that model
      kling-v2-6:pro: 0.12      # one model and mode (wins over the model-wide entry)

A model declared in the manifest's ``models:`` section brings its own ``usd_per_second`` (and
``units_per_5s``); the manifest's ``pricing:`` still wins over it.

``*-master`` models have a single price whatever the mode. ``sound: on`` on kling-v2-6 doubles the
per-second price (audio generation is billed separately by every listing seen); an override is the
silent price and the doubling still applies.

Render times are likewise estimates (typical wall time of one task on an unloaded account:
about 90 s for a 5 s std clip, longer for 10 s and for pro) used only for plan's time estimate.
"""

from __future__ import annotations

import bisect
import heapq
from array import array
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

from batchkling.models import JobSpec

#: When and from what the table was compiled; plan output prints this next to every estimate.
PRICE_TABLE_DATE = "2026-01"
PRICE_TABLE_SOURCE = (
    "assumed list prices compiled from public third-party listings (fal.ai, muapi.ai); not a quote"
)

#: USD per second of video: model → (std, pro). Master models have one price.
PRICES: Mapping[str, tuple[float, float]] = {
    "kling-v1": (0.045, 0.095),
    "kling-v1-6": (0.045, 0.095),
    "kling-v2-master": (0.28, 0.28),
    "kling-v2-1-master": (0.28, 0.28),
    "kling-v2-5-turbo": (0.042, 0.07),
    "kling-v2-6": (0.05, 0.07),
    "kling-video-o1": (0.084, 0.112),
}
SOUND_MULTIPLIER = {"kling-v2-6": 2.0}
#: Kling resource-pack units per 5 s of video (std, pro): what Kling's native API deducts
#: (``final_unit_deduction``) instead of reporting dollars.
UNITS_PER_5S: Mapping[str, tuple[float, float]] = {
    "kling-v1": (1.0, 3.5),
    "kling-v1-6": (2.0, 3.5),
    "kling-v2-master": (10.0, 10.0),
    "kling-v2-1-master": (10.0, 10.0),
    "kling-v2-5-turbo": (1.5, 2.5),
    "kling-v2-6": (2.5, 4.0),
    "kling-video-o1": (4.0, 6.0),
}

#: Typical render seconds for a 5 s std clip, by model; scaled for duration and mode below.
RENDER_5S_STD: Mapping[str, float] = {
    "kling-v1": 120.0,
    "kling-v1-6": 110.0,
    "kling-v2-master": 240.0,
    "kling-v2-1-master": 210.0,
    "kling-v2-5-turbo": 60.0,
    "kling-v2-6": 90.0,
    "kling-video-o1": 120.0,
}
RENDER_PRO_FACTOR = 1.6
RENDER_10S_FACTOR = 1.8
#: A model with no price in the table nor the manifest (a simulator's extra model) is priced high.
FALLBACK_PRICE = (0.07, 0.14)
FALLBACK_UNITS = (4.0, 6.0)
_FALLBACK_RENDER = 120.0


def _lookup(model: str, mode: str | None, overrides: Mapping[str, float] | None,
            table: Mapping[str, tuple[float, float]], fallback: tuple[float, float]) -> float:
    if overrides:
        for key in (f"{model}:{mode or 'std'}", model):
            if key in overrides:
                return float(overrides[key])
    std, pro = table.get(model, fallback)
    return pro if mode == "pro" else std


def price_per_second(model: str, mode: str | None, overrides: Mapping[str, float] | None) -> float:
    """USD per video second for ``model``/``mode``, after manifest overrides."""
    return _lookup(model, mode, overrides, PRICES, FALLBACK_PRICE)


def task_usd(model: str, mode: str | None, duration: int, *, sound: str | None = None,
             overrides: Mapping[str, float] | None = None) -> float:
    """The table's price of one task in USD (what the simulator bills, times its factor)."""
    rate = price_per_second(model, mode, overrides)
    if sound == "on":
        rate *= SOUND_MULTIPLIER.get(model, 1.0)
    return round(rate * duration, 4)


def task_units(model: str, mode: str | None, duration: int, *,
               overrides: Mapping[str, float] | None = None) -> float:
    """The table's Kling units for one task (``overrides``: units per 5 s, keyed like
    ``pricing``)."""
    return round(_lookup(model, mode, overrides, UNITS_PER_5S, FALLBACK_UNITS) * duration / 5, 4)


def estimate_usd(spec: JobSpec, overrides: Mapping[str, float] | None = None) -> float:
    """Estimated cost of one job in USD (an assumption-based estimate, see module docstring)."""
    return task_usd(spec.model, spec.mode, spec.duration, sound=spec.sound, overrides=overrides)


def estimate_units(spec: JobSpec, overrides: Mapping[str, float] | None = None) -> float:
    """Estimated Kling units of one job (the units table, or the manifest's declaration)."""
    return task_units(spec.model, spec.mode, spec.duration, overrides=overrides)


def price_group(provider: str, spec: JobSpec) -> str:
    """The jobs that cost the same: provider, model, mode, duration, kind (and sound on).

    Observed prices are kept per group, across runs (the store's ``prices``).
    """
    sound = ":sound" if spec.sound == "on" else ""
    return f"{provider}:{spec.model}:{spec.mode or '-'}:{spec.duration}s:{spec.kind.value}{sound}"


@dataclass(frozen=True, slots=True)
class ObservedPrice:
    """What the provider charged for the last finished task of a price group."""

    usd: float | None  #: the task's reported cost in USD (None: the provider reports units)
    units: float | None  #: its reported units (Kling), None where it reports USD
    samples: int  #: how many times it was recorded (each run's first price, and each change)
    updated_at: float


class Fingerprints:
    """A set of job fingerprints in 8 bytes each (a sorted array of their first 64 bits), so
    a plan can hold every fingerprint a large store has rendered: ``fp in fingerprints``."""

    def __init__(self, fingerprints: Iterable[str] = ()) -> None:
        self._keys = array("Q", sorted({_key(fp) for fp in fingerprints}))

    def extend_sorted(self, fingerprints: Iterable[str]) -> None:
        """Add fingerprints that come in ascending order after every one held (a store's
        pages): no sort, no set, 8 bytes each."""
        keys = self._keys
        for fp in fingerprints:
            key = _key(fp)
            if not keys or key > keys[-1]:
                keys.append(key)

    def __contains__(self, fingerprint: object) -> bool:
        if not isinstance(fingerprint, str):
            return False
        key = _key(fingerprint)
        i = bisect.bisect_left(self._keys, key)
        return i < len(self._keys) and self._keys[i] == key

    def __len__(self) -> int:
        return len(self._keys)


def _key(fingerprint: str) -> int:
    return int(fingerprint[:16], 16)


@dataclass(frozen=True, slots=True)
class History:
    """What a store remembers that changes a plan: observed prices, and the fingerprints of
    jobs that already produced a downloaded, verified video (for ``reuse: earlier-runs``)."""

    observed: Mapping[str, ObservedPrice] = field(default_factory=dict)
    reusable: Container[str] = frozenset()


def estimate_render_seconds(spec: JobSpec) -> float:
    """Typical wall time of one task from create to completed, in seconds (an estimate)."""
    seconds = RENDER_5S_STD.get(spec.model, _FALLBACK_RENDER)
    if spec.duration >= 10:
        seconds *= RENDER_10S_FACTOR
    if spec.mode == "pro":
        seconds *= RENDER_PRO_FACTOR
    return seconds


@dataclass(frozen=True, slots=True)
class WallTime:
    """Estimated wall time of a whole run and what bounds it."""

    seconds: float
    bound: str  # "slots" or "longest job"


def estimate_wall_seconds(
    render_seconds: Iterable[float], *, slots: int, submit_rate: float
) -> WallTime:
    """Simulate the run: jobs start in plan order when a slot is free and the rate allows.

    Better than ``ceil(n / slots) × typical`` when render times differ (pro next to std, 5 s next
    to 10 s) and when ``submit_rate`` rather than slots is the bottleneck.
    """
    run = WallSimulation(slots=slots, submit_rate=submit_rate)
    for seconds in render_seconds:
        run.add(seconds)
    return run.result()


class WallSimulation:
    """:func:`estimate_wall_seconds` one job at a time, in memory of the slots only (for plans
    of a million jobs, fed as they are expanded)."""

    def __init__(self, *, slots: int, submit_rate: float) -> None:
        self._free_at: list[float] = [0.0] * max(1, slots)  # min-heap: when each slot frees
        self._interval = 1.0 / submit_rate if submit_rate > 0 else 0.0
        self._finish = 0.0
        self._count = 0
        self._slot_wait = 0.0

    def add(self, seconds: float) -> None:
        """The next job in plan order, rendering for ``seconds``."""
        slot_free = heapq.heappop(self._free_at)
        ready = self._count * self._interval
        start = max(slot_free, ready)
        self._slot_wait += max(0.0, slot_free - ready)
        end = start + seconds
        heapq.heappush(self._free_at, end)
        self._finish = max(self._finish, end)
        self._count += 1

    def result(self) -> WallTime:
        """The run's wall time so far and what bounds it."""
        if self._count == 0:
            return WallTime(0.0, "slots")
        # If some job waited for a slot, more slots would shorten the run; otherwise every job
        # started as soon as the submit rate allowed and the longest render decides.
        return WallTime(self._finish, "slots" if self._slot_wait > 0 else "longest job")
