"""How much money a create reserves, and what a reported cost means for the budget.

Pure policy, no I/O: the engine asks :class:`PriceBook` what to reserve inside the store's claim
(which checks it against ``budget.max_usd`` / ``budget.max_units`` in the same transaction as
the create intent) and tells it what the provider charged. The rules (docs/money.md):

- A job reserves the larger of the price table's price and the price the store has observed for
  its price group (provider, model, mode, duration, kind), kept across runs.
- Until a group's price has been observed, the table's price is reserved times ``margin`` (1.5
  by default): the budget never commits more than the margin covers.
- A finished task settles at its reported cost. A reported cost above the task's reservation
  raises the reservation of every task of that group still in flight, at once, and every later
  reservation: only tasks created before their group's first price arrived can cost more than
  they reserved, and the run says by how much (:class:`Surprise`).
- A cost that is not a finite, non-negative number is not a cost: it is recorded as unknown and
  the task's reservation stands (:func:`reported`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchkling.models import JobSpec
from batchkling.pricing import ObservedPrice, price_group

#: Until a price group's price is observed, reservations are the table's price times this.
DEFAULT_MARGIN = 1.5


def reported(value: Any) -> float | None:
    """A reported cost that can be trusted: a finite number ≥ 0, else None (unknown).

    The provider adapters parse costs already; this guard is kept here too, because a NaN or a
    negative number that slipped through would silently open the budget (every comparison
    with NaN is false, a negative cost gives money back).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one create holds until its task reports a cost."""

    usd: float
    units: float
    group: str
    #: Whether the group's price has been observed (else the margin is in the figures).
    observed: bool


@dataclass(frozen=True, slots=True)
class Surprise:
    """A reported cost above what its task had reserved."""

    group: str
    reserved: float
    charged: float
    currency: str  # "usd" or "units"

    @property
    def overshoot(self) -> float:
        """How much more than reserved this task cost."""
        return max(0.0, self.charged - self.reserved)


@dataclass
class PriceBook:
    """The prices one engine reserves with: the table, and what was observed."""

    provider: str
    table_usd: Callable[[JobSpec], float]
    table_units: Callable[[JobSpec], float]
    observed: dict[str, ObservedPrice] = field(default_factory=dict)
    margin: float = DEFAULT_MARGIN
    #: Costs above their reservations, in the order they were reported.
    surprises: list[Surprise] = field(default_factory=list)

    def group(self, spec: JobSpec) -> str:
        """The job's price group."""
        return price_group(self.provider, spec)

    def reserve(self, spec: JobSpec) -> Reservation:
        """What a create of ``spec`` reserves: max(table, observed), or table × margin.

        A group observed in one currency only (Kling reports units, ImaRouter dollars) reserves
        the other at the table's price scaled by how far the observed one is above the table.
        """
        group = self.group(spec)
        seen = self.observed.get(group)
        table_usd, table_units = self.table_usd(spec), self.table_units(spec)
        seen_usd = seen.usd if seen is not None else None
        seen_units = seen.units if seen is not None else None
        if seen_usd is None and seen_units is None:
            return Reservation(round(table_usd * self.margin, 6),
                               round(table_units * self.margin, 6), group, observed=False)
        ratio = max(_ratio(seen_usd, table_usd), _ratio(seen_units, table_units))
        usd = max(table_usd, seen_usd) if seen_usd is not None else table_usd * ratio
        units = max(table_units, seen_units) if seen_units is not None else table_units * ratio
        return Reservation(round(usd, 6), round(units, 6), group, observed=True)

    def usd_for_units(self, spec: JobSpec, units: float) -> float:
        """The dollars a task that took ``units`` most likely cost: the table's price scaled
        by its units against the table's (Kling reports no dollars)."""
        return round(self.table_usd(spec) * max(1.0, _ratio(units, self.table_units(spec))), 6)

    def learn(self, observed: Mapping[str, ObservedPrice]) -> None:
        """Take the store's observed prices (other workers' and earlier runs' findings); a
        price this book observed since the store's stays (the store may not have it yet)."""
        for group, price in observed.items():
            mine = self.observed.get(group)
            if mine is None or price.updated_at >= mine.updated_at:
                self.observed[group] = price

    def observe(self, group: str, *, usd: float | None, units: float | None,
                now: float) -> None:
        """A finished task of ``group`` reported these (trusted) costs: later reservations of
        the group take them into account at once."""
        old = self.observed.get(group)
        self.observed[group] = ObservedPrice(
            usd=usd if usd is not None else (old.usd if old else None),
            units=units if units is not None else (old.units if old else None),
            samples=(old.samples if old else 0) + 1, updated_at=now)

    def surprise(self, group: str, *, reserved: float, charged: float,
                 currency: str) -> Surprise | None:
        """Record a cost above its reservation (beyond rounding); None when it was covered."""
        if charged <= reserved + 1e-6:
            return None
        found = Surprise(group, reserved, charged, currency)
        self.surprises.append(found)
        return found

    def overshoot(self, currency: str = "usd") -> float:
        """How much more than they reserved the surprising tasks cost, in total: the bound on
        how far spending can pass the cap."""
        return math.fsum(s.overshoot for s in self.surprises if s.currency == currency)


def describe_surprises(surprises: list[Surprise], *, limit: int = 3) -> list[str]:
    """One line per price group that cost more than reserved (the first surprise of each)."""
    first: dict[tuple[str, str], Surprise] = {}
    count: dict[tuple[str, str], int] = {}
    for s in surprises:
        key = (s.group, s.currency)
        first.setdefault(key, s)
        count[key] = count.get(key, 0) + 1
    lines = []
    for key, s in list(first.items())[:limit]:
        n = count[key]
        lines.append(f"{s.group} cost {_money(s.charged, s.currency)} a task, above the "
                     f"{_money(s.reserved, s.currency)} reserved before its price was known "
                     f"({n} task{'s' if n != 1 else ''} cost more than reserved); later creates "
                     "reserve the observed price")
    return lines


def _money(value: float, currency: str) -> str:
    return f"${value:.2f}" if currency == "usd" else f"{value:g} units"


def _ratio(seen: float | None, table: float) -> float:
    """How many times the table's price ``seen`` is (1 when unknown or the table says 0)."""
    if seen is None or table <= 0:
        return 1.0
    return max(1.0, seen / table)
