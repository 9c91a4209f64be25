"""`hybrid`: ExpertMap's own policy, FineMoE's map searches corrected by Fate's cross-layer gate.

- Layer l+1 (next): the cross-layer gate (layer l+1's router on layer l's router input), which
  sees this very token's hidden state: top-(k+1) per token, priority = gate probability.
- Layers l+2..l+d: FineMoE's semantic / trajectory search over the expert-map store, with the
  similarity-adaptive expert count, priority p / distance.
- Eviction: FineMoE's predicted probability x frequency, the next layer's probability taken from
  the gate; prefetched experts protected until their layer has passed.
- Admission (the link is the bottleneck): a prefetch may evict an expert only if its expected
  value (probability x (frequency + 1)) beats the victim's, so a doubtful prediction never pushes
  out an expert that is likely to be used again.
"""

from __future__ import annotations

from predictor.policies.fate import gate_prediction
from predictor.policies.finemoe import PRIOR, FineMoE


class Hybrid(FineMoE):
    name = "hybrid"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._gate_plan = []

    def reset(self):
        super().reset()
        self._gate_plan = []

    def on_iteration_start(self, iteration, embedding):
        self._gate_plan = []
        super().on_iteration_start(iteration, embedding)

    def on_router(self, event):
        super().on_router(event)
        plan = gate_prediction(event, self.ctx.top_k + 1)
        for pf in plan:
            self.pred_prob[pf.key] = pf.priority
        self._gate_plan = plan

    def prefetch_plan(self):
        if not self.ctx.prefetch:
            return []
        nxt = {pf.key[0] for pf in self._gate_plan}
        far = [pf for pf in self._plan if pf.key[0] not in nxt]
        return self._gate_plan + far

    def admit(self, prefetch, victim):
        if victim is None:
            return True
        if self.is_protected(victim):
            return False
        value = self.pred_prob.get(prefetch.key, PRIOR) * (self.freq[prefetch.key] + 1)
        return value > self.score(victim)
