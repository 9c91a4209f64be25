"""How many micro-batches the scheduler keeps in flight, and how large, from what the stages measure.

Two forces pull apart. Pipeline fill wants at least N micro-batches in flight (one per stage, so
no stage idles), and one more hides the scheduler's turnaround (a returned micro-batch is
re-launched while the others compute). Expert sharing wants few, large micro-batches: a
micro-batch's union of experts is copied once for all its requests, and every micro-batch pays
each stage's fixed cost per iteration (Python per layer, the router, the union's copies).

The sizer fits each stage's compute time per micro-batch as ``t_k(b) = a_k + c_k b`` (``b``
requests; least squares over recent micro-batches, older ones fading) and measures the
turnaround ``o`` (a micro-batch's round trip minus its stages' compute, the smallest recently
seen). With ``m`` micro-batches of ``b = ceil(A / m)`` of ``A`` active requests, one round (every
request one token) takes

    R(m) = max(sum_k t_k(b) + o,  m * max_k t_k(b))

(a micro-batch's own trip, or the busiest stage serving all m), so the rate is ``min(A, m b) / R(m)``.
The sizer picks the ``m`` of highest rate, the smallest one within ``TIE`` of it (larger batches
share more experts). Until the fit has seen two sizes, it keeps N + 1 in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: how fast older micro-batches fade from the fit (weight per later observation)
DECAY = 0.97
#: rates within this fraction of the best count as a tie, won by fewer, larger micro-batches
TIE = 0.03
#: how many recent round trips the turnaround is the smallest of
TURNAROUND_WINDOW = 32


@dataclass
class LinearFit:
    """Weighted least squares of ``t = a + c b`` with exponential forgetting."""

    w: float = 0.0
    sb: float = 0.0
    sbb: float = 0.0
    st: float = 0.0
    sbt: float = 0.0

    def add(self, b: float, t: float) -> None:
        self.w, self.sb, self.sbb = DECAY * self.w + 1, DECAY * self.sb + b, DECAY * self.sbb + b * b
        self.st, self.sbt = DECAY * self.st + t, DECAY * self.sbt + b * t

    @property
    def ready(self) -> bool:
        """Two or more distinct sizes seen (the slope is defined)."""
        return self.w > 0 and self.sbb * self.w - self.sb**2 > 1e-9 * max(1.0, self.w**2)

    def coefficients(self) -> tuple[float, float]:
        """(a, c), both clipped at 0: a fixed cost and a per-request cost cannot be negative."""
        det = self.sbb * self.w - self.sb**2
        c = max(0.0, (self.sbt * self.w - self.sb * self.st) / det)
        a = max(0.0, (self.st - c * self.sb) / self.w)
        return a, c


@dataclass
class MicroBatchSizer:
    stages: int
    max_batch: int
    fixed_depth: int | None = None  # micro-batches in flight, fixed (None: chosen from the fit)
    fits: list[LinearFit] = field(default_factory=list)
    turnarounds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fixed_depth is not None and self.fixed_depth < 1:
            raise ValueError(f"micro-batches in flight = {self.fixed_depth}: must be at least 1")
        self.fits = [LinearFit() for _ in range(self.stages)]

    def observe(self, requests: int, stage_seconds: list[float], round_trip_s: float) -> None:
        """One micro-batch came back: ``requests`` steps, each stage's compute time, launch-to-return."""
        if requests < 1 or len(stage_seconds) != self.stages:
            return  # a release-only batch, or one that did not pass every stage
        for fit, t in zip(self.fits, stage_seconds):
            fit.add(requests, t)
        self.turnarounds = [*self.turnarounds[-(TURNAROUND_WINDOW - 1) :], max(0.0, round_trip_s - sum(stage_seconds))]

    @property
    def measured(self) -> bool:
        return all(f.ready for f in self.fits) and bool(self.turnarounds)

    def round_time(self, depth: int, size: int) -> float:
        """Predicted seconds for one round of ``depth`` micro-batches of ``size`` requests."""
        times = [a + c * size for a, c in (f.coefficients() for f in self.fits)]
        return max(sum(times) + min(self.turnarounds), depth * max(times))

    def plan(self, active: int) -> tuple[int, int]:
        """(micro-batches in flight, requests per micro-batch) for ``active`` requests."""
        active = max(1, active)
        if self.fixed_depth is not None or not self.measured:
            depth = self.fixed_depth or self.stages + 1
            return depth, min(self.max_batch, math.ceil(active / depth))
        best = None
        for depth in range(1, min(active, 2 * self.stages + 1) + 1):
            size = min(self.max_batch, math.ceil(active / depth))
            depth = min(depth, math.ceil(active / size))  # no empty micro-batches
            rate = min(active, depth * size) / max(self.round_time(depth, size), 1e-9)
            if best is None or rate > best[0] * (1 + TIE):
                best = (rate, depth, size)
        return best[1], best[2]
