"""`mixtral-offloading`: LRU cache with speculative next-layer prefetch (Eliseev & Mazur, 2023).

While layer l computes, layer l+1's router is applied to layer l's router input and layer l+1's
top-k experts are loaded speculatively (prefetch distance 1); eviction is LRU.
"""

from __future__ import annotations

from expertmap.predictor.policies.base import Policy
from expertmap.predictor.policies.fate import gate_prediction


class MixtralOffloading(Policy):
    name = "mixtral-offloading"
    predictive = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self._plan = []

    def on_router(self, event):
        if self.ctx.prefetch:
            self._plan = gate_prediction(event, self.ctx.top_k)

    def prefetch_plan(self):
        return self._plan

    def admit(self, prefetch, victim):
        return True  # speculative loads evict the LRU expert, as the original does
