"""`moe-infinity`: request-level expert activation matrices (Xue et al., MoE-Infinity), see docs/policies.md.

Each request keeps an expert activation matrix (EAM): per MoE layer, how often each expert was
selected so far in this request. At every layer the current EAM (layers seen so far, flattened)
is cosine-matched against the EAMs of earlier requests (``ctx.eams``, [R, L, J], and
every finished request is added); the best match's most-activated experts of the coming layers
are prefetched (top-k per layer, priority = activation ratio / distance). Eviction: the lowest
activation ratio in the matched EAM plus the current request's own ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertmap.predictor.policies.base import Policy, Prefetch

EPS = 1e-12


@dataclass(frozen=True)
class MoEInfinityTuning:
    eam_capacity: int = 1000  # expert activation matrices kept (oldest dropped)


class MoEInfinity(Policy):
    name = "moe-infinity"
    predictive = True
    needs_eams = True
    Tuning = MoEInfinityTuning

    def __init__(self, ctx):
        super().__init__(ctx)
        eams = ctx.eams
        L, J = ctx.num_layers, ctx.num_experts
        self.eams = np.zeros((0, L, J), np.float32) if eams is None else np.asarray(eams, np.float32)
        self.distance = ctx.prefetch_distance
        self.capacity = self.tuning.eam_capacity
        self.current = np.zeros((L, J), np.float32)
        self.matched = np.full((L, J), 1.0 / J, np.float32)
        self._plan: list[Prefetch] = []

    def reset(self):
        super().reset()
        self.current[:] = 0
        self._plan = []

    def on_request_start(self):
        if self.current.sum() > 0:
            self.eams = np.concatenate([self.eams, self.current[None]])[-self.capacity :]
        self.current = np.zeros_like(self.current)

    def on_layer_start(self, layer, experts):
        super().on_layer_start(layer, experts)
        self.current[layer, experts] += 1
        if len(self.eams):
            self._match(layer)
        if self.ctx.prefetch:
            self._plan = self._predict(layer)

    def _match(self, layer: int) -> None:
        prefix = self.eams[:, : layer + 1].reshape(len(self.eams), -1)  # [R, (l+1) J]
        q = self.current[: layer + 1].reshape(-1)
        sims = prefix @ q / (np.linalg.norm(prefix, axis=1) * np.linalg.norm(q) + EPS)
        best = self.eams[int(np.argmax(sims))]
        self.matched = best / np.maximum(best.sum(axis=1, keepdims=True), EPS)  # activation ratios

    def _predict(self, now: int) -> list[Prefetch]:
        plan = []
        for target in range(now + 1, min(now + self.distance, self.ctx.num_layers - 1) + 1):
            ratios = self.matched[target]
            for e in np.argsort(-ratios)[: self.ctx.top_k]:
                plan.append(Prefetch((target, int(e)), float(ratios[e]) / (target - now)))
        plan.sort(key=lambda p: -p.priority)
        return plan

    def prefetch_plan(self):
        return self._plan

    def _ratio(self, key) -> float:
        layer, e = key
        own = self.current[layer]
        return float(self.matched[layer, e]) + float(own[e] / max(own.sum(), EPS))

    def choose_victim(self, candidates, incoming=None):
        return min(candidates, key=self._ratio)

    def admit(self, prefetch, victim):
        return victim is None or self._ratio(victim) < prefetch.priority
