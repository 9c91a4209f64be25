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
The planning (``predictor.next_use_plan.NextUsePlanner``) runs in a planner process of its own
(``ctx.planner="process"``, the default: predictor/planner_process.py), so that it leaves this
interpreter: the compute thread writes its events into shared memory, the cache reads the newest
estimate. With ``ctx.planner="thread"`` (or where the process cannot start) it runs on a thread
here; ``ctx.synchronous`` runs it inline (the replay, tests). It plans once per layer, when the
layer's experts are chosen. The hint plan and map publishing are FineMoE's (the paper's rules);
the searches are ``NextUseState``'s.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertmap.predictor.next_use import NextUseModel
from expertmap.predictor.next_use_distance import DistanceModel
from expertmap.predictor.next_use_plan import NextUsePlanner
from expertmap.predictor.planner_process import FLOAT32, PlannerProcessError, PlannerSpec, ProcessPlanner
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
    #: predicts the layers to next use itself (predictor/next_use_distance.py); None: from the model's p
    distance: DistanceModel | None = None

    def __post_init__(self):
        if not isinstance(self.model, NextUseModel):
            raise TypeError(f"HybridTuning.model must be a NextUseModel, got {type(self.model).__name__}")
        if self.distance is not None and not isinstance(self.distance, DistanceModel):
            raise TypeError(f"HybridTuning.distance must be a DistanceModel or None, got {type(self.distance).__name__}")
        if not (np.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"HybridTuning.margin {self.margin} must be a finite number >= 0")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"HybridTuning.min_p {self.min_p} must be in [0, 1)")


logger = logging.getLogger(__name__)

#: A model folder may ship its own next-use weights under this name (the output of
#: ``python -m expertmap.bench.fit_next_use --model FOLDER --out FOLDER/next_use.json``).
WEIGHTS_FILE = "next_use.json"
DISTANCE_FILE = "next_use_distance.json"


class Hybrid(FineMoE):
    name = "hybrid"
    Tuning = HybridTuning
    needs_linear_routers = True
    plan_sorted = True  # soonest expected use first, as the planner orders it

    @classmethod
    def tuning_for_model(cls, folder):
        """The folder's fitted next-use weights and distance model, where it has either (None: none)."""
        weights, distance = Path(folder) / WEIGHTS_FILE, Path(folder) / DISTANCE_FILE
        if not (weights.is_file() or distance.is_file()):
            return None
        return HybridTuning(
            model=NextUseModel.from_file(weights) if weights.is_file() else DEFAULT_MODEL,
            distance=DistanceModel.from_file(distance) if distance.is_file() else None,
        )  # fmt: skip

    def __init__(self, ctx):
        super().__init__(ctx)
        slow_link = ctx.copy_layers is not None and ctx.copy_layers >= ctx.num_layers
        self.prefetches = ctx.prefetch and not slow_link  # a copy could land before the pass it is for
        # (FineMoE's prefetch_plan and on_hint read it: no plan and no hint plan on such a link)
        self.model, self.margin = self.tuning.model, self.tuning.margin
        self.core = NextUsePlanner(ctx.num_layers, ctx.num_experts, ctx.owned_layers, ctx.num_slots,
                                   self.tuning.model, self.tuning.min_p, self.prefetches,
                                   self.tuning.distance)  # fmt: skip
        self._t = self.core.t  # [L, J] expected layers to next use: the newest estimate
        self.remote = self._start_process() if ctx.planner == "process" and not ctx.synchronous else None
        self._plan_seen = -1  # the planner process's plan count behind self._plan_rows
        self._plan_rows = [], []  # its plan: flat keys and expected layers to use, soonest first
        self._keys = [(l, e) for l in range(ctx.num_layers) for e in range(ctx.num_experts)]  # flat -> key
        self._rows, self._rows_of = None, None  # the estimate as [L][J] lists, and which estimate
        self._process_s = 0.0
        self._derived = None  # the layer whose chosen experts the process derives itself
        self._routers = frozenset(ctx.linear_routers or ())
        self._ship = threading.Event()
        self._ship_s = 0.0  # CPU seconds of the snapshot thread: this interpreter's, so on the critical path
        self.replica_refresh = self.replica.refresh_every if self.replica is not None else 1
        if self.remote is not None:
            version = self._ship_snapshot(None)  # the store as it is, before the first iteration
            threading.Thread(target=self._ship_loop, args=(version,), name="hybrid-index", daemon=True).start()
        self.contains = lambda key: False  # set by the cache: resident or in flight

    def _rules(self):
        return FineMoETuning.paper()  # the map searches as the paper describes them

    def _start_process(self) -> ProcessPlanner | None:
        ctx = self.ctx
        if ctx.hidden_size is None:
            return None
        spec = PlannerSpec(ctx.num_layers, ctx.num_experts, tuple(ctx.owned_layers), ctx.num_slots,
                           self.tuning.model.weights, self.tuning.min_p, self.prefetches, ctx.hidden_size,
                           ctx.hidden_size, dict(ctx.linear_routers or {}), self.tuning.distance)  # fmt: skip
        try:
            return ProcessPlanner(spec)
        except (PlannerProcessError, OSError) as exc:
            logger.warning("hybrid: no planner process (%s); planning on a thread of this interpreter", exc)
            return None

    def reset(self):
        super().reset()
        self.core.reset()
        self._t = self.core.t
        if self.remote is not None:
            self.remote.reset()
            self._plan_seen = self.remote.plans  # the old plan is not asked for again: the reset's comes

    # --- compute thread ---------------------------------------------------------------------------
    def on_iteration_start(self, iteration, embedding, tokens=1):
        if self.remote is None:
            return super().on_iteration_start(iteration, embedding, tokens)
        Policy.on_iteration_start(self, iteration, embedding, tokens)
        self._hint_plan = []
        emb = None
        if embedding is not None:
            emb = _host(embedding)  # [B, D]
            emb = emb[0] if len(emb) == 1 else emb.mean(axis=0)  # [D], batch pooled
        self._embedding, self._iteration_maps = emb, []
        if iteration % self.replica_refresh == 0:
            self._ship.set()  # a changed store snapshot reaches the process, off this thread
        self.remote.start(iteration, emb, tokens)

    def on_router(self, event):
        if self.remote is None:
            return super().on_router(event)
        x = event.router_input
        rows = None
        if x is not None:
            rows = _host(x)  # [T, H]
            if rows.ndim != 2:
                rows = rows.reshape(-1, rows.shape[-1])
        mean = None
        if rows is None or event.layer not in self._routers or self.publish:
            mean = _host(event.probs).mean(axis=0)  # [J]; else the process computes it from the rows
        if self.publish:
            self._iteration_maps.append(mean)
        self._derived = event.layer if self.remote.router(event.layer, mean, rows) else None

    def on_layer_start(self, layer, experts):
        Policy.on_layer_start(self, layer, experts)
        if self.remote is None:
            self.planner.submit(("used", layer, list(experts)))
        elif self._derived != layer:  # unless the process took the choice from the router's top-k
            self.remote.used(layer, experts)

    def on_iteration_end(self, iteration):
        if self.remote is None:
            return super().on_iteration_end(iteration)
        self._publish_iteration()

    def _plans_after_router(self, layer):
        return self.core.plans_after_router(layer)

    # FineMoE's visit and access counts are its eviction score's: hybrid keeps only the base's recency
    on_access = Policy.on_access
    on_insert = Policy.on_insert
    on_evict = Policy.on_evict

    # --- planner (inline, thread) ----------------------------------------------------------------
    def _apply(self, item):
        """The planner's state updates; FineMoE's own searches are not run (the ``NextUsePlanner``
        does the semantic and trajectory matches hybrid uses), only its map publishing."""
        kind = item[0]
        if kind == "start":
            _, iteration, emb, tokens = item
            self._begin_iteration(emb)
            self.core.index = self._index
            self.core.start(iteration, self._embedding, tokens)
        elif kind == "router":
            _, _, layer, mean, _, event = item
            dist = self._record_layer(mean)  # [J]
            gate = event.next_gate() if event is not None else None
            gate = None if gate is None else gate.float().amax(dim=0).cpu().numpy()  # [J]
            self.core.router(layer, dist, gate)
        elif kind == "used":
            _, layer, experts = item
            self.core.used(layer, experts)
        elif kind == "end":
            self._publish_iteration()

    def _replan(self):
        self.core.plan()
        self._t = self.core.t
        self._plan = self._as_plan(self.core.plan_keys, self.core.plan_t)

    def _as_plan(self, keys: np.ndarray, t: np.ndarray) -> list[Prefetch]:
        return list(self._prefetches(keys.tolist(), t.tolist()))

    def _prefetches(self, keys: list[int], t: list[float], held=None):
        """Prefetch records, made as they are read, from flat keys and expected layers to use.
        ``held``: skip an expert it says is resident or in flight before its record is made (a
        plan read while the cache decides: most of it is resident, and the cache would make and
        drop a record for each, at every decision)."""
        key_of = self._keys
        if held is None:
            return (Prefetch(key_of[k], -v) for k, v in zip(keys, t))
        return (Prefetch(key_of[k], -v) for k, v in zip(keys, t) if not held(key_of[k]))

    # --- planner process ---------------------------------------------------------------------------
    def _ship_snapshot(self, version):
        """The store's arrays to the process if its version is not ``version``; the version shipped."""
        if self.replica is None:
            return version
        try:
            snapshot = self.replica.snapshot_if_changed(version)
        except Exception as exc:  # store away: keep the snapshot the process has
            logger.debug("hybrid: store snapshot not taken (%s)", exc)
            return version
        if snapshot is None:
            return version
        version, embeddings, maps = snapshot
        self.remote.ship_index(embeddings, maps)
        return version

    def _ship_loop(self, version) -> None:
        """Hand the process each new store snapshot (a version check every ``refresh_every``
        iterations of the replica, as its own index does), off the compute thread."""
        while True:
            self._ship.wait()
            self._ship.clear()
            if self.remote is None:
                return
            t0 = time.thread_time()
            try:
                version = self._ship_snapshot(version)
            except Exception as exc:  # closing meanwhile
                logger.debug("hybrid: store snapshot not shipped (%s)", exc)
            self._ship_s += time.thread_time() - t0

    def _estimate(self) -> np.ndarray:
        return self._t if self.remote is None else self.remote.t

    def prefetch_plan(self):
        if self.remote is None or not self.prefetches:
            return super().prefetch_plan()
        plans = self.remote.plans
        if plans != self._plan_seen:
            self._plan_seen = plans
            keys, t = self.remote.plan()
            self._plan_rows = keys.tolist(), t.tolist()
        keys, t = self._plan_rows
        if not keys:
            return self._hint_plan
        return self._prefetches(keys, t, self.contains)  # read as the cache decides; it stops at the first it can take

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every event so far is planned (tests, the end of a run)."""
        return self.planner.drain(timeout) if self.remote is None else self.remote.drain(timeout)

    @property
    def background_s(self):
        """The planner thread's CPU seconds (thread planner) or the snapshot thread's (process
        planner): this interpreter's threads, whose work waits on and holds up the compute thread."""
        return super().background_s + self._ship_s

    @property
    def process_s(self):
        return self._process_s if self.remote is None else self.remote.busy_s

    def close(self):
        super().close()
        remote, self.remote = self.remote, None
        if remote is not None:
            self._process_s = remote.busy_s  # still reported after the process is gone
            self._ship.set()
            remote.close()

    # --- the cache's questions ---------------------------------------------------------------------
    def _estimate_rows(self) -> list[list[float]]:
        """The estimate as [L][J] Python lists, converted once per new estimate: the cache's
        worker asks about single experts many times a layer, and a NumPy item costs a call."""
        if self.remote is None:
            of = self._t  # each plan makes a new array (held here, so its identity is not reused)
            fresh = of is not self._rows_of
        else:
            of = self.remote.plans  # the process writes a new estimate with each plan
            fresh = of != self._rows_of
        if fresh:
            self._rows, self._rows_of = self._estimate().tolist(), of
        return self._rows

    def time_to_next_use(self, key) -> float:
        layer, expert = key
        return self._estimate_rows()[layer][expert]

    def choose_victim(self, candidates, incoming=None):
        t = self._estimate_rows()
        return max(candidates, key=lambda k: t[k[0]][k[1]])

    def admit(self, prefetch, victim):
        if victim is None:
            return True
        t = self._estimate_rows()
        (pl, pe), (vl, ve) = prefetch.key, victim
        return t[pl][pe] + self.margin < t[vl][ve]


def _host(x) -> np.ndarray:
    """A tensor as a float32 NumPy array, with one torch call where it is a CPU tensor NumPy can
    view (each costs microseconds on a compute thread whose caches the model has just filled)."""
    try:
        a = x.numpy()
    except (TypeError, RuntimeError):  # on an accelerator, bfloat16 (no NumPy type), or requires grad
        return x.detach().float().cpu().numpy()
    return a if a.dtype is FLOAT32 else a.astype(np.float32)