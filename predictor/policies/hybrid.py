"""`hybrid`: ExpertMap's own policy: a predicted-Belady cache over every signal there is.

For every (layer, expert) it estimates the time to its next use, in layers, with
``predictor.next_use`` (the semantic match for the whole iteration at its start, the trajectory
match, the cross-layer gate for the next layer, the request's own recent use, the store's
popularity, the distance in layers; a small logistic model fitted on warm-up traces,
``bench/fit_next_use.py``). One yardstick for the three decisions:
- eviction: the resident expert expected furthest in the future goes;
- admission: a prefetch may displace only an expert expected later than itself (by ``margin``
  layers, so that two near-equal estimates do not swap back and forth over the link);
- prefetch order: soonest expected use first, over every layer of this cache (the next layers of
  this iteration and the early layers of the next one), never more than the cache holds;
- no prefetching when one copy takes an iteration's layers or longer (``ctx.copy_layers`` >= L):
  the plan names each expert for its layer's next pass, at most L layers ahead, so every copy
  would land after the use it was made for and only take the link from misses and a slot from a
  kept expert (replay, warm-up prompts: at ratio 13.1 TPOT 0.91x -> 0.88x on-demand's).
All of it runs on the background planner (the compute thread only enqueues its events); the cache
reads the newest estimate. It plans once per layer, when the layer's experts are chosen.
The hint plan and map publishing are FineMoE's (the paper's rules); the searches are
``NextUseState``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertmap.predictor.next_use import NextUseModel, NextUseState
from expertmap.predictor.policies.base import Policy, Prefetch
from expertmap.predictor.policies.finemoe import FineMoE, FineMoETuning

# Fitted by `python -m expertmap.bench.fit_next_use --workload .../dev_mix.jsonl --out
# bench/results/issue12/fit.json` on the warm-up split of dev_mix (store from its first 240
# prompts, fitted on prompts 240-300; never on evaluation prompts); rows GROUPS, columns FEATURES.
DEFAULT_MODEL = NextUseModel((
    (10.4017, 1.8102, 0.6285, -2.803, 1.9876, 8.2547, 1.4881, -0.1723, 1.0046, 0.0, -0.0206, -23.8281, 0.9652, -0.8478, 0.1324, 0.8225, 0.0979, 5.5333, 0.0008, 1.0238),
    (5.8946, 1.1959, 0.6876, 1.4974, 1.3997, 0.0, 0.0, 0.5197, -0.1496, 0.0, 0.0333, -28.0308, 1.3631, -0.2776, 0.2262, 0.9272, 0.5877, 10.9503, -0.1714, 1.4017),
    (-0.6174, 0.3404, -0.0896, -0.4338, 0.1051, 0.0, 0.0, -0.0773, 1.9649, 0.167, -0.0762, 1.5896, -0.1214, 0.2817, -0.0538, -1.687, 0.6035, 7.6551, 0.1818, 0.0269),
))  # fmt: skip


@dataclass(frozen=True)
class HybridTuning:
    model: NextUseModel = field(default=DEFAULT_MODEL)  # the next-use model (predictor/next_use.py)
    margin: float = 0.0  # admission: expected next use of the prefetch + margin < the victim's (layers)
    min_p: float = 0.0  # prefetch only experts whose next pass uses them with at least this probability

    def __post_init__(self):
        if not isinstance(self.model, NextUseModel):
            raise TypeError(f"HybridTuning.model must be a NextUseModel, got {type(self.model).__name__}")
        if not (np.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"HybridTuning.margin {self.margin} must be a finite number >= 0")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"HybridTuning.min_p {self.min_p} must be in [0, 1)")


#: A model folder may ship its own next-use weights under this name (the output of
#: ``python -m expertmap.bench.fit_next_use --model FOLDER --out FOLDER/next_use.json``).
WEIGHTS_FILE = "next_use.json"


class Hybrid(FineMoE):
    name = "hybrid"
    Tuning = HybridTuning

    @classmethod
    def tuning_for_model(cls, folder):
        path = Path(folder) / WEIGHTS_FILE
        return HybridTuning(model=NextUseModel.from_file(path)) if path.is_file() else None

    def __init__(self, ctx):
        self.state = NextUseState(ctx.num_layers, ctx.num_experts)
        self._t = np.full((ctx.num_layers, ctx.num_experts), 1e6)  # expected layers to next use
        self._owned = np.zeros(ctx.num_layers, bool)
        self._owned[list(ctx.owned_layers)] = True
        super().__init__(ctx)
        self.model = self.tuning.model
        self.margin = self.tuning.margin
        slow_link = ctx.copy_layers is not None and ctx.copy_layers >= ctx.num_layers
        self.prefetches = ctx.prefetch and not slow_link  # a copy could land before the pass it is for
        # (FineMoE's prefetch_plan and on_hint read it: no plan and no hint plan on such a link)
        self.contains = lambda key: False  # set by the cache: resident or in flight

    def _rules(self):
        return FineMoETuning.paper()  # the map searches as the paper describes them

    def reset(self):
        super().reset()
        self.state = NextUseState(self.ctx.num_layers, self.ctx.num_experts)
        self._t = np.full_like(self._t, 1e6)

    # --- compute thread: enqueue only ----------------------------------------------------------
    def on_layer_start(self, layer, experts):
        super().on_layer_start(layer, experts)
        self.planner.submit(("used", layer, list(experts)))

    def _plans_after_router(self, layer):
        # a layer this cache computes is followed at once by its use (on_layer_start), which plans:
        # one plan per layer; an earlier stage's layer (its trajectory replayed) has no use event
        return not self._owned[layer]

    # FineMoE's visit and access counts are its eviction score's: hybrid keeps only the base's recency
    on_access = Policy.on_access
    on_insert = Policy.on_insert
    on_evict = Policy.on_evict

    # --- background planner ------------------------------------------------------------------------
    def _apply(self, item):
        """The planner's state updates; FineMoE's own searches are not run (``NextUseState`` does
        the semantic and trajectory matches hybrid uses), only its map publishing."""
        kind = item[0]
        if kind == "start":
            _, iteration, emb, tokens = item
            self._begin_iteration(emb)
            self.state.start(iteration, self._index, self._embedding, tokens)
        elif kind == "router":
            _, _, layer, mean, _, event = item
            dist = self._record_layer(mean)  # [J]
            gate = event.next_gate() if event is not None else None
            gate = None if gate is None else gate.float().amax(dim=0).cpu().numpy()  # [J]
            self.state.router(layer, dist, gate)
        elif kind == "used":
            _, layer, experts = item
            self.state.used(layer, experts)
        elif kind == "end":
            self._publish_iteration()

    def _replan(self):
        p, t = self.state.next_use(self.model)
        self._t = t
        if not self.prefetches:
            return
        t = np.where(self._owned[:, None] & (p >= self.tuning.min_p), t, np.inf).reshape(-1)  # [L*J]
        order = np.argsort(t, kind="stable")[: self.ctx.num_slots]
        order = order[np.isfinite(t[order])]
        layers, experts = np.divmod(order, self.ctx.num_experts)
        self._plan = [Prefetch((l, e), -v) for l, e, v in zip(layers.tolist(), experts.tolist(), t[order].tolist())]

    # --- the cache's questions ---------------------------------------------------------------------
    def time_to_next_use(self, key) -> float:
        return float(self._t[key])

    def choose_victim(self, candidates, incoming=None):
        t = self._t
        return max(candidates, key=lambda k: t[k])

    def admit(self, prefetch, victim):
        if victim is None:
            return True
        return self._t[prefetch.key] + self.margin < self._t[victim]

