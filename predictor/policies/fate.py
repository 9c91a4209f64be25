"""`fate`: Fate's cross-layer gate (Fang et al., arXiv 2502.12224), as docs/policies.md describes it.

- Prediction: layer l+1's router applied to layer l's router input (the hidden state after the
  post-attention norm) predicts layer l+1's experts; each token's top-(k+1) are prefetched (union
  over tokens, priority = the gate probability).
- Cache: the shallow layers are cached fully when they fit (keeping at least k+1 slots for every
  deeper layer); the rest of the budget is split evenly over the deeper layers; inside each
  layer's quota, ARC decides what to evict.
`fate-lossy` adds Fate's quantised mode: prefetched experts travel and are cached as INT4
(group 64), the least popular of each prediction and every on-demand load as INT2 (group 32),
layer 0 at full precision; the link carries the quantised bytes. Its output is NOT the full
model's: it is reported separately, with token agreement and perplexity (bench/lossy.py).
"""

from __future__ import annotations

from expertmap.predictor.arc import ARC
from expertmap.predictor.policies.base import Policy, Prefetch, RouterEvent


def layer_quotas(num_layers: int, num_experts: int, top_k: int, slots: int) -> list[int]:
    """Slots per layer: whole shallow layers while they fit, the rest split evenly."""
    floor = min(num_experts, top_k + 1)
    full = 0
    while full < num_layers and (full + 1) * num_experts + (num_layers - full - 1) * floor <= slots:
        full += 1
    rest = num_layers - full
    share = (slots - full * num_experts) // rest if rest else 0
    return [num_experts] * full + [max(1, min(num_experts, share))] * rest


def gate_prediction(event: RouterEvent, width: int) -> list[Prefetch]:
    """The cross-layer gate: each token's top-``width`` experts of layer l+1 (union, max probability)."""
    gate = event.next_gate()  # [T, J] or None
    if gate is None:
        return []
    top = gate.float().topk(min(width, gate.shape[-1]), dim=-1)  # [T, width]
    best: dict[int, float] = {}
    for p_row, e_row in zip(top.values.tolist(), top.indices.tolist()):
        for p, e in zip(p_row, e_row):
            best[e] = max(best.get(e, 0.0), p)
    return [Prefetch((event.layer + 1, e), p) for e, p in sorted(best.items(), key=lambda ep: -ep[1])]


class Fate(Policy):
    name = "fate"
    predictive = True

    def __init__(self, ctx):
        super().__init__(ctx)
        owned = ctx.owned_layers  # quotas over the layers this cache holds (shallowest first)
        self.quotas = dict(zip(owned, layer_quotas(len(owned), ctx.num_experts, ctx.top_k, ctx.num_slots)))
        self.reset()

    def reset(self):
        super().reset()
        self.arcs = {layer: ARC(q) for layer, q in self.quotas.items()}
        self.count = dict.fromkeys(self.quotas, 0)
        self._plan = []

    def on_router(self, event):
        if self.ctx.prefetch:
            self._plan = gate_prediction(event, self.ctx.top_k + 1)

    def on_iteration_start(self, iteration, embedding, tokens=1):
        super().on_iteration_start(iteration, embedding, tokens)
        self._plan = []

    def prefetch_plan(self):
        return self._plan

    def on_access(self, key, hit):
        super().on_access(key, hit)
        self.arcs[key[0]].access(key)

    def on_insert(self, key, prefetched):
        super().on_insert(key, prefetched)
        self.arcs[key[0]].insert(key)
        self.count[key[0]] += 1

    def on_evict(self, key):
        super().on_evict(key)
        self.arcs[key[0]].evict(key)
        self.count[key[0]] -= 1

    def choose_victim(self, candidates, incoming=None):
        layer = incoming[0] if incoming is not None else None
        # within quota: take from the most over-quota layer; at quota: from the incoming layer itself
        if layer is None or self.count[layer] < self.quotas[layer]:
            over = sorted(self.quotas, key=lambda i: self.quotas[i] - self.count[i])
        else:
            over = [layer] + [i for i in self.quotas if i != layer]
        for i in over:
            mine = [k for k in candidates if k[0] == i]
            if mine:
                victim = self.arcs[i].victim(mine)
                if victim is not None:
                    return victim
        return super().choose_victim(candidates, incoming)

    def admit(self, prefetch, victim):
        # a prefetch may displace an expert of its own layer (its quota) or of an over-quota layer
        if victim is None:
            return True
        layer = victim[0]
        return layer == prefetch.key[0] or self.count[layer] > self.quotas[layer]


class FateLossy(Fate):
    name = "fate-lossy"
    lossless = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self._least_popular: set = set()

    def on_router(self, event):
        super().on_router(event)
        self._least_popular = {self._plan[-1].key} if len(self._plan) > 1 else set()

    def precision(self, key, prefetch):
        if key[0] == 0:
            return "full"
        if not prefetch or key in self._least_popular:
            return "int2"
        return "int4"
