"""How many micro-batches the scheduler keeps in flight, and how large, from what the stages measure.

Two forces pull apart. Pipeline fill wants at least N micro-batches in flight (one per stage, so
no stage idles), and one more hides the scheduler's turnaround (a returned micro-batch is
re-launched while the others compute). Expert sharing wants few, large micro-batches: a
micro-batch's union of experts is copied once for all its requests, and every micro-batch pays
each stage's fixed cost per iteration (Python per layer, the router, the union's copies).

The sizer fits each stage's compute time per micro-batch as ``t_k(b) = a_k + c_k b`` (``b``
requests; least squares through the running mean time of each size seen) and measures the
turnaround ``o`` (a micro-batch's round trip minus its stages' compute, the smallest recently
seen). With ``m`` micro-batches of ``b = ceil(A / m)`` of ``A`` active requests, one round (every
request one token) takes

    R(m) = max(sum_k t_k(b) + o,  m * max_k t_k(b))

(a micro-batch's own trip, or the busiest stage serving all m), so the rate is ``min(A, m b) / R(m)``.
The sizer picks the ``m`` of highest rate, the smallest one within ``TIE`` of it (larger batches
share more experts). Until the fit has seen two sizes, it keeps N + 1 in flight, and halves one
micro-batch if every one so far had the same size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: weight of a new observation in the running mean of its size's time
SMOOTHING = 0.2
#: rates within this fraction of the best count as a tie, won by fewer, larger micro-batches
TIE = 0.03
#: how many recent round trips the turnaround is the smallest of
TURNAROUND_WINDOW = 32


@dataclass
class SizeTimes:
    """One stage's compute time per micro-batch, a running mean per size, and the line ``t = a + c b``
    through those means (each size counts once, so a size seen often does not drown the others and
    a size seen long ago still anchors the slope)."""

    means: dict[int, float] = field(default_factory=dict)

    def add(self, b: int, t: float) -> None:
        old = self.means.get(b)
        self.means[b] = t if old is None else old + SMOOTHING * (t - old)

    @property
    def ready(self) -> bool:
        """Two or more sizes seen (the slope is defined)."""
        return len(self.means) >= 2

    def coefficients(self) -> tuple[float, float]:
        """(a, c), both clipped at 0: a fixed cost and a per-request cost cannot be negative."""
        n = len(self.means)
        mb = sum(self.means) / n
        mt = sum(self.means.values()) / n
        var = sum((b - mb) ** 2 for b in self.means)
        c = max(0.0, sum((b - mb) * (t - mt) for b, t in self.means.items()) / var)
        return max(0.0, mt - c * mb), c


@dataclass
class MicroBatchSizer:
    stages: int
    max_batch: int
    fixed_depth: int | None = None  # micro-batches in flight, fixed (None: chosen from the fit)
    fits: list[SizeTimes] = field(default_factory=list)
    turnarounds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fixed_depth is not None and self.fixed_depth < 1:
            raise ValueError(f"micro-batches in flight = {self.fixed_depth}: must be at least 1")
        self.fits = [SizeTimes() for _ in range(self.stages)]

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

    def round_time(self, depth: int, size: int, costs: list[tuple[float, float]] | None = None) -> float:
        """Predicted seconds for one round of ``depth`` micro-batches of ``size`` requests
        (``costs``: each stage's fitted (a, c), when the caller has them already)."""
        times = [a + c * size for a, c in (costs or [f.coefficients() for f in self.fits])]
        return max(sum(times) + min(self.turnarounds), depth * max(times))

    def plan(self, active: int) -> tuple[int, int]:
        """(micro-batches in flight, requests per micro-batch) for ``active`` requests."""
        active = max(1, active)
        if self.fixed_depth is not None or not self.measured:
            depth = self.fixed_depth or self.stages + 1
            size = min(self.max_batch, math.ceil(active / depth))
            seen = self.fits[0].means
            if self.fixed_depth is None and list(seen) == [size] and size > 1:
                size //= 2  # a second size, so the slope can be fitted (a closed loop keeps one size)
            return depth, size
        best = None
        costs = [f.coefficients() for f in self.fits]
        for depth in range(1, min(active, 2 * self.stages + 1) + 1):
            size = min(self.max_batch, math.ceil(active / depth))
            depth = min(depth, math.ceil(active / size))  # no empty micro-batches
            rate = min(active, depth * size) / max(self.round_time(depth, size, costs), 1e-9)
            if best is None or rate > best[0] * (1 + TIE):
                best = (rate, depth, size)
        return best[1], best[2]
