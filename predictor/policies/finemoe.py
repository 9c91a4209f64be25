"""`finemoe`: FineMoE's fine-grained expert offloading (Yu et al., EuroSys '26), following its
public code (IntelliSys-Lab/FineMoE-EuroSys26: ``finemoe/runtime/model_offload.py``,
``finemoe/memory/expert_prefetcher.py``, ``core/prefetch/task_scheduler.cpp``,
``core/prefetch/archer_prefetch_handle.cpp``); docs/finemoe-fidelity.md lists each rule, each
difference that remains and its measured effect. The defaults (``FineMoETuning()``) are the code's
rules; ``FineMoETuning.paper()`` is the paper's description (the project's earlier `finemoe`).

The code's rules (``FineMoETuning`` fields in brackets):
- Semantic search at iteration start: the stored entry most cosine-similar to the iteration's
  embedding predicts layers [0, d). Trajectory search after layer l's router: the stored map whose
  layers 0..l are most cosine-similar to the observed ones predicts layers [l+1+d, L) (so with
  these two searches layer d is never predicted; after layer L-d-2 no new prediction is made)
  [``targets="code"``; "paper": the next d layers after the computing one, from the newest match].
  The trajectory query is the iteration's last token's router distribution.
- Expert count per predicted layer: the experts in descending probability whose cumulative
  probability stays <= delta = clip(1 - similarity, 0, 1), at least top-k
  [``expert_count="code"``; "paper": until the cumulative probability reaches delta, at least top-k].
- Each prediction replaces the queue of pending prefetches and the set of "candidates". Every
  expert of a predicted layer is queued and becomes a candidate: the selected ones at priority
  p x w(l) + 1e-6 with w(l) = 1 - (l - start) / (end + 1) over the band [start, end), the others
  at 1e-6 [``band_fill=True``; False: only the selected; ``priority="paper"``: p / (l - l_now)].
  A queued expert's ``prob`` is set to its probability in the matched map, resident or not.
- Eviction (``RemoveCachedSparseNode``): among resident experts that are neither candidates nor in
  use, the lowest ``int(prob * incache_visit_count)``; ``incache_visit_count`` is 1 when the expert
  lands and grows by one per hit; both are reset to 0 when it leaves the device, and an expert no
  prediction has named has prob 0. Equal scores go in topology order, (layer, expert) ascending
  [``eviction="code"``, ``tie_break="topology"``; "paper": the lowest prob x run-wide access
  count, unnamed prob 1e-3, a prefetched expert protected until its layer has passed].
  A prefetch that finds no evictable expert is dropped; an on-demand load that finds none
  overflows the cache in the code: here (a fixed number of slots) it evicts the lowest score
  among the candidates too.
Search and planning run on a ``BackgroundPlanner`` (off the critical path); finished iterations'
maps are published to ``ctx.replica`` when ``ctx.publish``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from expertmap.predictor.background import BackgroundPlanner
from expertmap.predictor.policies.base import Key, Policy, Prefetch, RouterEvent
from expertmap.predictor.search import experts_to_fetch

logger = logging.getLogger(__name__)

PRIOR = 1e-3  # paper rules: predicted probability of an expert no search has mentioned
BAND_EPS = 1e-6  # the code's priority floor for every expert of a predicted layer

_CHOICES = {
    "eviction": ("code", "paper"),
    "expert_count": ("code", "paper"),
    "priority": ("code", "paper"),
    "targets": ("code", "paper"),
    "tie_break": ("topology", "lru"),
}


@dataclass(frozen=True)
class FineMoETuning:
    """Which of FineMoE's rules to run: the public code's (default) or the paper's (``paper()``)."""

    eviction: str = "code"
    expert_count: str = "code"
    priority: str = "code"
    targets: str = "code"
    band_fill: bool = True
    tie_break: str = "topology"

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"FineMoETuning.{name}={value!r}: use one of {', '.join(allowed)}")

    @classmethod
    def paper(cls) -> FineMoETuning:
        """The paper's description (docs/policies.md), which the project ran before."""
        return cls(eviction="paper", expert_count="paper", priority="paper", targets="paper", band_fill=False,
                   tie_break="lru")  # fmt: skip


def code_expert_count(distribution: np.ndarray, similarity: float, top_k: int) -> list[tuple[int, float]]:
    """The code's ``_select_by_cumsum``: experts in descending probability whose cumulative
    probability is <= delta = clip(1 - similarity, 0, 1), at least ``top_k`` (none if all are 0)."""
    delta = min(max(1.0 - similarity, 0.0), 1.0)
    order = np.argsort(-distribution, kind="stable")
    vals = distribution[order]
    if not (vals > 0).any():
        return []
    k = int((np.cumsum(vals) <= delta).sum())
    k = max(top_k, min(k, len(vals)))
    return [(int(e), float(distribution[e])) for e in order[:k]]


def band_weight(layer: int, start: int, end: int) -> float:
    """The code's ``_layer_decay_weights`` inside the predicted band [start, end)."""
    return 1.0 - (layer - start) / (end + 1)


class FineMoE(Policy):
    name = "finemoe"
    predictive = True
    needs_store = True
    Tuning = FineMoETuning

    def __init__(self, ctx):
        super().__init__(ctx)
        self.rules = self._rules()
        self.replica = ctx.replica
        self.distance = ctx.prefetch_distance
        self.prefetches = ctx.prefetch  # whether it copies ahead at all (a subclass may narrow it)
        if not 1 <= self.distance <= ctx.num_layers:
            raise ValueError(f"prefetch distance {self.distance} must be in 1..{ctx.num_layers} (MoE layers)")
        self.publish = ctx.publish
        self.freq: Counter[Key] = Counter()  # paper: run-wide access counts
        self.visits: dict[Key, int] = {}  # code: incache_visit_count (since the expert was cached)
        self.pred_prob: dict[Key, float] = {}
        self.candidates: frozenset[Key] = frozenset()  # code: the latest prediction's experts
        self.protected: dict[Key, tuple[int, int]] = {}  # paper: key -> (iteration, layer) it was fetched for
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

    def _rules(self) -> FineMoETuning:
        return self.tuning

    @property
    def _code_targets(self) -> bool:
        return self.rules.targets == "code"

    # --- compute-thread callbacks (cheap) ------------------------------------------------------
    def reset(self):
        super().reset()
        self.freq.clear()
        self.visits.clear()
        self.pred_prob.clear()
        self.protected.clear()
        self.candidates = frozenset()
        self._plan = []

    def on_iteration_start(self, iteration, embedding, tokens=1):
        super().on_iteration_start(iteration, embedding, tokens)
        self._hint_plan = []  # this iteration's own plan takes over
        emb = None if embedding is None else embedding.detach().float().mean(dim=0)  # [D], batch pooled
        self.planner.submit(("start", iteration, emb, tokens))

    def on_router(self, event: RouterEvent):
        probs = event.probs
        last = probs[-1].float().clone() if self._code_targets else None  # the code's trajectory query
        item = ("router", self.pos.iteration, event.layer, probs.float().mean(dim=0), last, event)
        self.planner.submit(item, replan=self._plans_after_router(event.layer))

    def _plans_after_router(self, layer: int) -> bool:
        """Whether a router event of ``layer`` is followed by planning (FineMoE: always)."""
        return True

    def on_iteration_end(self, iteration):
        self.planner.submit(("end", iteration, None))

    # --- cache callbacks -----------------------------------------------------------------------
    def on_access(self, key, hit):
        super().on_access(key, hit)
        self.freq[key] += 1
        if hit:
            self.visits[key] = self.visits.get(key, 0) + 1

    def on_insert(self, key, prefetched):
        super().on_insert(key, prefetched)
        self.visits[key] = 1  # the copy's own visit (the code counts the task that loads it)
        if prefetched:
            self.protected[key] = (self.pos.iteration, key[0])

    def on_evict(self, key):
        super().on_evict(key)
        self.protected.pop(key, None)
        self.visits.pop(key, None)
        if self.rules.eviction == "code":
            self.pred_prob.pop(key, None)  # prob = 0 once it leaves the device

    def is_protected(self, key: Key) -> bool:
        if self._code_targets:
            return key in self.candidates
        fetched_for = self.protected.get(key)
        if fetched_for is None:
            return False
        it, layer = fetched_for
        if (self.pos.iteration, self.pos.layer) <= (it, layer):
            return True
        del self.protected[key]
        return False

    def score(self, key: Key) -> float:
        """Eviction value (lowest is evicted): the code's int(prob x visits since cached), or the
        paper's prob x run-wide access count."""
        if self.rules.eviction == "code":
            return float(int(self.pred_prob.get(key, 0.0) * self.visits.get(key, 0)))
        return self.pred_prob.get(key, PRIOR) * (self.freq[key] + 1)

    def _order(self, key: Key):
        tie = key if self.rules.tie_break == "topology" else self._recency.get(key, 0)
        return (self.score(key), tie)

    def choose_victim(self, candidates, incoming=None):
        unprotected = [k for k in candidates if not self.is_protected(k)]
        return min(unprotected or candidates, key=self._order)

    def admit(self, prefetch, victim):
        return victim is None or not self.is_protected(victim)

    def prefetch_plan(self):
        return (self._plan or self._hint_plan) if self.prefetches else []

    def on_hint(self, embeddings):
        """Semantic prediction for this cache's first ``d`` layers, made when an earlier stage has
        embedded the micro-batch and before its activations arrive (so an idle link starts
        copying): for each request, the best stored map's experts up to the similarity-adjusted
        count, priority p / (rank of the layer among this cache's layers); the union over requests
        with each expert's highest priority."""
        index = self.replica.index() if self.replica is not None else None
        if index is None or not self.prefetches:
            return 0
        first = self.ctx.owned_layers[: self.distance]
        best_p: dict[Key, float] = {}
        for emb in np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1):  # [B, D]
            best, sim = index.semantic(emb)
            for rank, layer in enumerate(first):
                for e, p in self._count(index.maps[best, layer], sim):
                    best_p[(layer, e)] = max(best_p.get((layer, e), 0.0), p / (rank + 1))
        self._hint_plan = sorted((Prefetch(k, p) for k, p in best_p.items()), key=lambda pf: -pf.priority)
        return len(self._hint_plan)

    def _count(self, dist: np.ndarray, sim: float) -> list[tuple[int, float]]:
        if self.rules.expert_count == "code":
            return code_expert_count(dist, sim, self.ctx.top_k)
        return experts_to_fetch(dist, sim, self.ctx.top_k)

    # --- background work -----------------------------------------------------------------------
    def _dropped(self, item):
        self._trajectory = None  # a lost layer breaks the incremental prefix: stop using it

    def _band(self, expert_map: np.ndarray, sim: float, start: int, end: int) -> None:
        """The code's ``process_expert_map`` + ``prefetch_experts``: a new queue and candidate set."""
        plan: list[Prefetch] = []
        now = self._observed_layer
        for layer in range(start, min(end, self.ctx.num_layers)):
            dist = expert_map[layer]
            chosen = dict(self._count(dist, sim))
            experts = range(self.ctx.num_experts) if self.rules.band_fill else chosen
            for e in experts:
                p = float(dist[e])
                if e in chosen:
                    if self.rules.priority == "code":
                        priority = p * band_weight(layer, start, end) + BAND_EPS
                    else:
                        priority = p / max(1, layer - now)
                else:
                    priority = BAND_EPS
                self.pred_prob[(layer, e)] = p
                plan.append(Prefetch((layer, e), priority))
        plan.sort(key=lambda pf: (-pf.priority, pf.key))
        self._plan = plan
        self.candidates = frozenset(pf.key for pf in plan)

    def _apply(self, item):
        kind = item[0]
        if kind == "start":
            _, iteration, emb, _ = item
            self._begin_iteration(emb)
            self._layer_pred = {}
            self._observed_layer = -1
            self._trajectory = self._index.trajectory() if self._index is not None else None
            if self._index is not None and self._embedding is not None:
                best, sim = self._index.semantic(self._embedding)
                for layer in range(self.ctx.num_layers):  # the whole map as a prior; layers < d are its prediction
                    self._layer_pred[layer] = (self._index.maps[best, layer], sim)
                if self._code_targets:
                    self._band(self._index.maps[best], sim, 0, self.distance)
        elif kind == "router":
            _, iteration, layer, mean, last, self._last_event = item
            dist = self._record_layer(mean)
            self._observed_layer = layer
            if self._trajectory is not None and self._trajectory.observed == layer:
                query = last.cpu().numpy() if self._code_targets else dist  # code: the last token's
                self._trajectory.observe(layer, query)
                start = layer + 1 + self.distance
                if self._code_targets and start < self.ctx.num_layers:
                    best, sim = self._trajectory.best()
                    self._band(self._index.maps[best], sim, start, self.ctx.num_layers)
                elif not self._code_targets:
                    best, sim = self._trajectory.best()
                    for target in range(layer + 1, self.ctx.num_layers):
                        self._layer_pred[target] = (self._index.maps[best, target], sim)
        elif kind == "end":
            self._publish_iteration()

    def _begin_iteration(self, emb) -> None:
        """A new iteration's embedding [D] (a tensor or None), its map so far, the store's index."""
        self._embedding = None if emb is None else emb.cpu().numpy()
        self._iteration_maps = []
        self._index = self.replica.index() if self.replica is not None else None

    def _record_layer(self, mean) -> np.ndarray:
        """A layer's mean router distribution (a tensor) as a row [J] of the iteration's map."""
        dist = mean.cpu().numpy()
        self._iteration_maps.append(dist)
        return dist

    def _publish_iteration(self) -> None:
        """The finished iteration's map [L, J] to the store, when this cache publishes and saw every layer."""
        if self.publish and self.replica is not None and self._embedding is not None:
            if len(self._iteration_maps) == self.ctx.num_layers:
                self.replica.publish(self._embedding, np.stack(self._iteration_maps))

    def _replan(self):
        if self._code_targets:
            return  # the code plans per search (``_band``), not per position
        now = self._observed_layer
        plan: list[Prefetch] = []
        for target in range(now + 1, min(now + self.distance, self.ctx.num_layers - 1) + 1):
            pred = self._layer_pred.get(target)
            if pred is None:
                continue
            dist, sim = pred
            for e, p in self._count(dist, sim):
                self.pred_prob[(target, e)] = p
                plan.append(Prefetch((target, e), priority=p / (target - now)))
        plan.sort(key=lambda pf: -pf.priority)
        self._plan = plan

    @property
    def background_s(self):
        return self.planner.busy_s

    def close(self):
        self.planner.close()
