"""`finemoe`: FineMoE's fine-grained expert offloading (Yu et al., EuroSys '26), as docs/policies.md describes it.

Prediction (off the critical path, in a ``BackgroundPlanner``):
- semantic search at iteration start: the stored entry whose embedding is most cosine-similar
  to this iteration's semantic embedding predicts layers 0..d-1;
- trajectory search as layers run: after observing layers 0..m, the stored map whose prefix is
  most cosine-similar predicts the layers up to m + d;
- how many experts: delta = clip(1 - similarity, 0, 1), experts in descending probability until
  their cumulative probability reaches delta, at least top-k;
- prefetch priority p / (l - l_now): likely and near first.
Eviction: the lowest predicted probability x access frequency; recency is ignored; an expert
prefetched for layer l is protected until layer l has passed.

The store is read through a ``StoreReplica`` (``ctx.replica``); finished iterations'
maps are published to it at iteration end when ``ctx.publish`` is true.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from expertmap.predictor.background import BackgroundPlanner
from expertmap.predictor.policies.base import Key, Policy, Prefetch, RouterEvent
from expertmap.predictor.search import experts_to_fetch

logger = logging.getLogger(__name__)

PRIOR = 1e-3  # predicted probability of an expert no search has mentioned


class FineMoE(Policy):
    name = "finemoe"
    predictive = True
    needs_store = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.replica = ctx.replica
        self.distance = ctx.prefetch_distance
        if not 1 <= self.distance <= ctx.num_layers:
            raise ValueError(f"prefetch distance {self.distance} must be in 1..{ctx.num_layers} (MoE layers)")
        self.publish = ctx.publish
        self.freq: Counter[Key] = Counter()
        self.pred_prob: dict[Key, float] = {}
        self.protected: dict[Key, tuple[int, int]] = {}  # key -> (iteration, layer) it was fetched for
        self._plan: list[Prefetch] = []
        self._hint_plan: list[Prefetch] = []  # from on_hint, until this cache's iteration starts
        self._iteration_maps: list[np.ndarray] = []
        self._embedding: np.ndarray | None = None
        self._index = None
        self._trajectory = None
        self._layer_pred: dict[int, tuple[np.ndarray, float]] = {}  # layer -> (distribution [J], similarity)
        self._observed_layer = -1
        self._last_event: RouterEvent | None = None  # the newest router event, for subclasses' planning
        self.planner = BackgroundPlanner(
            self._apply, self._replan, on_drop=self._dropped, synchronous=ctx.synchronous,
            name=f"{self.name}-planner",
        )  # fmt: skip

    # --- compute-thread callbacks (cheap) ------------------------------------------------------
    def reset(self):
        super().reset()
        self.freq.clear()
        self.pred_prob.clear()
        self.protected.clear()
        self._plan = []

    def on_iteration_start(self, iteration, embedding):
        super().on_iteration_start(iteration, embedding)
        self._hint_plan = []  # this iteration's own plan takes over
        emb = None if embedding is None else embedding.detach().float().mean(dim=0)  # [D], batch pooled
        self.planner.submit(("start", iteration, emb))

    def on_router(self, event: RouterEvent):
        self.planner.submit(("router", self.pos.iteration, event.layer, event.probs.float().mean(dim=0), event))

    def on_iteration_end(self, iteration):
        self.planner.submit(("end", iteration, None))

    # --- cache callbacks -----------------------------------------------------------------------
    def on_access(self, key, hit):
        super().on_access(key, hit)
        self.freq[key] += 1

    def on_insert(self, key, prefetched):
        super().on_insert(key, prefetched)
        if prefetched:
            self.protected[key] = (self.pos.iteration, key[0])

    def on_evict(self, key):
        super().on_evict(key)
        self.protected.pop(key, None)

    def is_protected(self, key: Key) -> bool:
        fetched_for = self.protected.get(key)
        if fetched_for is None:
            return False
        it, layer = fetched_for
        if (self.pos.iteration, self.pos.layer) <= (it, layer):
            return True
        del self.protected[key]
        return False

    def score(self, key: Key) -> float:
        """Eviction value: predicted probability x access frequency (lowest is evicted)."""
        return self.pred_prob.get(key, PRIOR) * (self.freq[key] + 1)

    def choose_victim(self, candidates, incoming=None):
        unprotected = [k for k in candidates if not self.is_protected(k)]
        return min(unprotected or candidates, key=self.score)

    def admit(self, prefetch, victim):
        return victim is None or not self.is_protected(victim)

    def prefetch_plan(self):
        return (self._plan or self._hint_plan) if self.ctx.prefetch else []

    def on_hint(self, embeddings):
        """Semantic prediction for this cache's first ``d`` layers, made when an earlier stage has
        embedded the micro-batch and before its activations arrive (so an idle link starts
        copying): for each request, the best stored map's experts up to the similarity-adjusted
        count, priority p / (rank of the layer among this cache's layers); the union over requests
        with each expert's highest priority."""
        index = self.replica.index() if self.replica is not None else None
        if index is None or not self.ctx.prefetch:
            return 0
        first = self.ctx.owned_layers[: self.distance]
        best_p: dict[Key, float] = {}
        for emb in np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1):  # [B, D]
            best, sim = index.semantic(emb)
            for rank, layer in enumerate(first):
                for e, p in experts_to_fetch(index.maps[best, layer], sim, self.ctx.top_k):
                    best_p[(layer, e)] = max(best_p.get((layer, e), 0.0), p / (rank + 1))
        self._hint_plan = sorted((Prefetch(k, p) for k, p in best_p.items()), key=lambda pf: -pf.priority)
        return len(self._hint_plan)

    # --- background work -----------------------------------------------------------------------
    def _dropped(self, item):
        self._trajectory = None  # a lost layer breaks the incremental prefix: stop using it

    def _apply(self, item):
        kind = item[0]
        if kind == "start":
            _, iteration, emb = item
            self._embedding = None if emb is None else emb.cpu().numpy()
            self._iteration_maps = []
            self._layer_pred = {}
            self._observed_layer = -1
            self._index = self.replica.index() if self.replica is not None else None
            self._trajectory = self._index.trajectory() if self._index is not None else None
            if self._index is not None and self._embedding is not None:
                best, sim = self._index.semantic(self._embedding)
                for layer in range(self.ctx.num_layers):  # the whole map as a prior; layers < d are its prediction
                    self._layer_pred[layer] = (self._index.maps[best, layer], sim)
        elif kind == "router":
            _, iteration, layer, dist, self._last_event = item
            dist = dist.cpu().numpy()
            self._iteration_maps.append(dist)
            self._observed_layer = layer
            if self._trajectory is not None and self._trajectory.observed == layer:
                self._trajectory.observe(layer, dist)
                best, sim = self._trajectory.best()
                for target in range(layer + 1, self.ctx.num_layers):
                    self._layer_pred[target] = (self._index.maps[best, target], sim)
        elif kind == "end":
            if self.publish and self.replica is not None and self._embedding is not None:
                if len(self._iteration_maps) == self.ctx.num_layers:
                    self.replica.publish(self._embedding, np.stack(self._iteration_maps))

    def _replan(self):
        now = self._observed_layer
        plan: list[Prefetch] = []
        for target in range(now + 1, min(now + self.distance, self.ctx.num_layers - 1) + 1):
            pred = self._layer_pred.get(target)
            if pred is None:
                continue
            dist, sim = pred
            for e, p in experts_to_fetch(dist, sim, self.ctx.top_k):
                self.pred_prob[(target, e)] = p
                plan.append(Prefetch((target, e), priority=p / (target - now)))
        plan.sort(key=lambda pf: -pf.priority)
        self._plan = plan

    def close(self):
        self.planner.close()
