"""`oracle`: knows the run's future accesses; the limit for a given budget and link.

Given the access trace of the same run (iterations x MoE layers x selected experts, recorded by a
first pass; lossless execution makes the second pass route identically), it
- evicts the resident expert whose next use lies furthest in the future (Belady), and
- prefetches the next needed experts in order of need, as early as the link allows, admitting a
  prefetch only if the expert it displaces is needed later than the one it brings (so a prefetch
  never makes the cache worse).
"""

from __future__ import annotations

import bisect
import math

from expertmap.predictor.policies.base import Key, Policy, Prefetch

AccessTrace = list[list[list[int]]]  # [iteration][moe layer] -> selected experts


class Oracle(Policy):
    name = "oracle"
    predictive = True
    needs_trace = True

    def __init__(self, ctx):
        super().__init__(ctx)
        trace = ctx.trace
        if trace is None:
            raise ValueError("the oracle policy needs the run's access trace (record it with a first pass)")
        L = ctx.num_layers
        self._uses: dict[Key, list[int]] = {}
        self._order: list[tuple[int, Key]] = []  # (time, key) in time order
        for it, layers in enumerate(trace):
            for layer, experts in enumerate(layers):
                t = it * L + layer
                for e in experts:
                    self._uses.setdefault((layer, e), []).append(t)
                    self._order.append((t, (layer, e)))
        self._times = [t for t, _ in self._order]
        self.contains = lambda key: False  # set by the cache: resident or in flight

    def _now(self) -> int:
        return max(self.pos.iteration, 0) * self.ctx.num_layers + max(self.pos.layer, 0)

    def next_use(self, key: Key, after: int | None = None) -> float:
        uses = self._uses.get(key)
        now = self._now() if after is None else after
        if not uses:
            return math.inf
        i = bisect.bisect_right(uses, now)
        return uses[i] if i < len(uses) else math.inf

    def choose_victim(self, candidates, incoming=None):
        return max(candidates, key=self.next_use)

    def prefetch_plan(self):
        if not self.ctx.prefetch:
            return []
        start = bisect.bisect_right(self._times, self._now())
        plan, seen = [], set()
        for t, key in self._order[start:]:
            if key in seen or self.contains(key):
                continue
            seen.add(key)
            plan.append(Prefetch(key, priority=-float(t)))
            if len(plan) >= self.ctx.num_slots:
                break
        return plan

    def admit(self, prefetch, victim):
        if victim is None:
            return True
        return self.next_use(victim) > self.next_use(prefetch.key)
