"""When to poll a task next.

Two facts make polling cheap and prompt:

- tasks of one model, duration and mode take similar times, so the first poll waits for about
  half of what such tasks have taken so far in this run;
- providers report progress roughly in proportion to elapsed time, so one reading mid-render
  predicts the finish: the next poll lands just after it.

Without either (the first tasks of a run, a provider whose progress says nothing) intervals
grow geometrically, so an unknown render time costs a logarithmic number of polls. The floor
``min_interval`` keeps the load reasonable (ImaRouter itself polls upstream every ~15 s).
"""

from __future__ import annotations

import random
import statistics
from collections import deque


class PollPlanner:
    """Per-group render-time statistics and the poll delays they suggest."""

    def __init__(self, *, min_interval: float, max_interval: float, window: int = 64,
                 rng: random.Random | None = None) -> None:
        self.min_interval = min_interval
        self.max_interval = max(max_interval, min_interval)
        self._window = window
        self._samples: dict[str, deque[float]] = {}
        self._rng = rng or random.Random()

    def observe(self, group: str, render_seconds: float) -> None:
        """Record how long a finished task of ``group`` took, from create to completion."""
        if render_seconds > 0:
            self._samples.setdefault(group, deque(maxlen=self._window)).append(render_seconds)

    def typical(self, group: str) -> float | None:
        """Median render time seen for ``group`` in this run, None before the first."""
        samples = self._samples.get(group)
        return statistics.median(samples) if samples else None

    def next_delay(self, group: str, *, elapsed: float, progress: float | None,
                   polls: int, hint: float | None = None) -> float:
        """Seconds to wait before the next poll of a task that has run ``elapsed`` seconds."""
        typical = self.typical(group)
        if progress is not None and 3.0 <= progress < 100.0 and elapsed > 0:
            # Integer progress p means elapsed/total is in [p, p+1)%: total <= elapsed*100/p.
            total = elapsed * 100.0 / progress
            delay = total - elapsed + 0.01 * total
        elif typical is not None and elapsed < typical:
            # Aim a little before the median: one progress reading then pins down the finish.
            target = 0.5 * typical if polls == 0 else typical
            delay = target - elapsed
        elif typical is not None:
            delay = 0.15 * typical
        else:
            delay = max(self.min_interval * 2, 0.5 * elapsed)
        delay *= self._rng.uniform(0.95, 1.05)
        if hint is not None:
            delay = max(delay, hint)
        return min(max(delay, self.min_interval), self.max_interval)
