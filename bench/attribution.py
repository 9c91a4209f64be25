"""Where a policy's hits come from and where its misses go: loss attribution in the replay.

``AttributedCache`` is the replay's ``ReplayCache`` with bookkeeping around the same rules (it
changes no decision): every access is classified once, every copy and eviction is followed, and
the policy's prefetch plan is read at every position of the run (iteration start, then after each
layer's router), so a miss can be traced to the predictor (nothing named it) or to the cache's
rules (named, but the link was busy or the admission refused it).

Per access (hits + misses = accesses):
- ``hits_prefetch``: the first access to a copy a prefetch brought in time: hits prefetches created.
- ``hits_other``: every other hit (a copy that was loaded on demand, or already used).
- ``misses_late``: a prefetch of this expert was on the link (or paused on it) at the access.
- ``misses_predicted``: the plan named the expert since its layer last ran, but it was not fetched
  (``misses_refused``, a subset: the cache refused its admission in that window; the rest: the link
  was busy with other copies, or the plan ranked it too low).
- ``misses_unnamed``: no plan named the expert since its layer last ran.
Across those:
- ``hits_destroyed``: misses on an expert whose last eviction was to make room for a prefetch
  (it would have been a hit had that eviction not happened and nothing else evicted it before
  this access: an upper bound, since the counterfactual cache is not replayed).
Per copy:
- ``prefetches``: prefetch copies that landed; ``prefetches_unused``: of those, evicted before any
  access; ``demand_loads``: copies made for a miss.

Per predictor (the plan, whatever the policy puts in it), per target layer and distance in layers
(d = target - position, counting into the next iteration, 1..L): ``named`` experts, ``true`` experts
(the router's selection at the target) and ``correct`` (named and selected);
precision = correct / named, recall = correct / true (a position with no prediction for a target
counts its true experts: recall measures coverage too).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from expertmap.bench.simulator import ReplayCache, SimResult, access_trace, replay
from expertmap.predictor.policies.base import Key, Policy

NEVER = -(10**12)  # position index of a key never named / refused


@dataclass
class Attribution:
    accesses: int = 0
    hits_prefetch: int = 0
    hits_other: int = 0
    misses_late: int = 0
    misses_predicted: int = 0
    misses_refused: int = 0
    misses_unnamed: int = 0
    hits_destroyed: int = 0
    prefetches: int = 0
    prefetches_unused: int = 0
    demand_loads: int = 0
    #: [target layer, distance - 1] counters of the predictor (the prefetch plan)
    named: np.ndarray | None = None
    true: np.ndarray | None = None
    correct: np.ndarray | None = None

    @property
    def hits(self) -> int:
        return self.hits_prefetch + self.hits_other

    @property
    def misses(self) -> int:
        return self.misses_late + self.misses_predicted + self.misses_unnamed

    def precision(self) -> np.ndarray:
        """[layer, distance-1] precision of the plan (nan where it named nothing)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.named > 0, self.correct / np.maximum(self.named, 1), np.nan)

    def recall(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.true > 0, self.correct / np.maximum(self.true, 1), np.nan)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray) and v is not None}
        d["hits"], d["misses"] = self.hits, self.misses
        n = max(1, self.accesses)
        d["shares"] = {k: d[k] / n for k in ("hits_prefetch", "hits_other", "misses_late", "misses_predicted",
                                             "misses_unnamed", "hits_destroyed")}  # fmt: skip
        if self.named is not None:
            d["predictor"] = {
                "precision_by_distance": _ratio(self.correct.sum(0), self.named.sum(0)),
                "recall_by_distance": _ratio(self.correct.sum(0), self.true.sum(0)),
                "precision": _nan_list(self.precision()),
                "recall": _nan_list(self.recall()),
            }
        return d


def _ratio(a: np.ndarray, b: np.ndarray) -> list[float | None]:
    return [None if y == 0 else float(x / y) for x, y in zip(a, b)]


def _nan_list(a: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in a]


class AttributedCache(ReplayCache):
    """A ``ReplayCache`` that also fills an ``Attribution`` (same decisions, same timing).

    ``truth``: the run's accesses [iteration][layer] -> experts (``simulator.access_trace``)."""

    def __init__(self, policy: Policy, num_slots: int, ratio: float, truth: list[list[list[int]]]):
        super().__init__(policy, num_slots, ratio)
        self.truth = truth
        L = policy.ctx.num_layers
        self.L = L
        self.att = Attribution(named=np.zeros((L, L), np.int64), true=np.zeros((L, L), np.int64),
                               correct=np.zeros((L, L), np.int64))  # fmt: skip
        self._pos: tuple[int, int] | None = None
        self._named_at: dict[Key, int] = {}  # key -> position index it was last named at
        self._refused_at: dict[Key, int] = {}
        self._copy: dict[Key, str] = {}  # resident key -> "prefetch" (not yet used) | "used"
        self._evicted_for_prefetch: set[Key] = set()
        self._waited: set[Key] = set()  # prefetches an access already waited for (late)

    @classmethod
    def factory(cls, truth):
        return lambda policy, num_slots, ratio: cls(policy, num_slots, ratio, truth)

    # --- positions and the plan ------------------------------------------------------------------
    def _index(self, iteration: int, now: int) -> int:
        return iteration * (self.L + 1) + now + 1

    def _observe(self) -> None:
        pos = (self.policy.pos.iteration, self.policy.pos.layer)
        if pos == self._pos or pos[0] < 0:
            return
        self._pos = pos
        it, now = pos
        idx = self._index(it, now)
        by_target: dict[tuple[int, int], set[int]] = {}
        for pf in self.policy.prefetch_plan():
            self._named_at[pf.key] = idx
            layer, e = pf.key
            target_it = it if layer > now else it + 1
            by_target.setdefault((target_it, layer), set()).add(e)
        L = self.L
        for d in range(1, L + 1):  # every target this position can predict, named or not
            layer = now + d
            target_it = it + layer // L
            layer %= L
            if target_it >= len(self.truth) or layer >= len(self.truth[target_it]):
                continue
            true = set(self.truth[target_it][layer])
            named = by_target.get((target_it, layer), set())
            self.att.named[layer, d - 1] += len(named)
            self.att.true[layer, d - 1] += len(true)
            self.att.correct[layer, d - 1] += len(named & true)

    def advance(self, until: float) -> None:
        self._observe()
        super().advance(until)

    # --- copies and evictions ----------------------------------------------------------------------
    def _land(self) -> None:
        key, _, is_prefetch = self.in_flight
        late = key in self.late_prefetch or key in self._waited
        self._waited.discard(key)
        super()._land()
        if is_prefetch and not late:
            self.att.prefetches += 1
            self._copy[key] = "prefetch"
        else:
            self._copy[key] = "used"
            if is_prefetch:
                self.att.prefetches += 1
            else:
                self.att.demand_loads += 1

    def _make_room(self, key, prefetch) -> bool:
        before = set(self.resident)
        ok = super()._make_room(key, prefetch)
        for victim in before - self.resident:
            if self._copy.pop(victim, None) == "prefetch":
                self.att.prefetches_unused += 1
            if prefetch is not None:
                self._evicted_for_prefetch.add(victim)
            else:
                self._evicted_for_prefetch.discard(victim)
        if not ok and prefetch is not None and self.policy.pos.iteration >= 0:
            self._refused_at[key] = self._index(self.policy.pos.iteration, self.policy.pos.layer)
        return ok

    # --- accesses ------------------------------------------------------------------------------------
    def run_layer(self, layer, experts, t, *args, **kwargs):
        self.advance(t)  # as the base does first: the state the accesses see
        it = self.policy.pos.iteration
        window = self._index(it - 1, layer)  # named after this layer last ran
        a = self.att
        for e in experts:
            key = (layer, e)
            a.accesses += 1
            if key in self.resident:
                if self._copy.get(key) == "prefetch":
                    a.hits_prefetch += 1
                else:
                    a.hits_other += 1
                self._copy[key] = "used"
                continue
            if key in self._evicted_for_prefetch:
                a.hits_destroyed += 1
                self._evicted_for_prefetch.discard(key)
            in_flight = self.in_flight is not None and self.in_flight[0] == key and self.in_flight[2]
            paused = self.paused is not None and self.paused[0] == key
            if in_flight or paused:
                a.misses_late += 1
                self._waited.add(key)
            elif self._named_at.get(key, NEVER) > window:
                a.misses_predicted += 1
                a.misses_refused += self._refused_at.get(key, NEVER) > window
            else:
                a.misses_unnamed += 1
        return super().run_layer(layer, experts, t, *args, **kwargs)


def attributed_replay(policy: Policy, traces, num_slots: int, ratio: float, resident_keys=None) -> tuple[SimResult, Attribution]:
    """``simulator.replay`` with an ``AttributedCache``: the same result, and its attribution."""
    made: list[AttributedCache] = []
    base = AttributedCache.factory(access_trace(traces))

    def make(policy, slots, r):
        made.append(base(policy, slots, r))
        return made[-1]

    result = replay(policy, traces, num_slots, ratio, resident_keys=resident_keys, make_cache=make)
    return result, made[0].att


ATTRIBUTION_COLUMNS = (
    ("hits_prefetch", "hits from prefetch"),
    ("hits_other", "other hits"),
    ("hits_destroyed", "hits destroyed by prefetch evictions"),
    ("prefetches_unused", "prefetches evicted unused"),
    ("misses_late", "late prefetches"),
    ("misses_unnamed", "misses no prediction named"),
    ("misses_predicted", "misses predicted, not fetched"),
    ("misses_refused", "of which admission refused"),
)


def attribution_table(rows: dict[str, dict]) -> list[str]:
    """Markdown: one row per policy, each count as a share of its accesses (prefetch counts too)."""
    head = "| policy | hit rate | " + " | ".join(label for _, label in ATTRIBUTION_COLUMNS) + " | prefetches |"
    out = [head, "| --- | ---: |" + " ---: |" * (len(ATTRIBUTION_COLUMNS) + 1)]
    for name, d in rows.items():
        n = max(1, d["accesses"])
        cells = " | ".join(f"{d[k] / n:.3f}" for k, _ in ATTRIBUTION_COLUMNS)
        out.append(f"| {name} | {d['hits'] / n:.3f} | {cells} | {d['prefetches'] / n:.3f} |")
    return out


def predictor_table(rows: dict[str, dict], max_distance: int = 4) -> list[str]:
    """Markdown: each policy's plan's recall / precision by distance (all layers pooled)."""
    head = "| policy | " + " | ".join(f"d={d} recall / precision" for d in range(1, max_distance + 1)) + " |"
    out = [head, "| --- |" + " ---: |" * max_distance]
    for name, d in rows.items():
        p = d.get("predictor")
        if not p:
            continue
        cells = []
        for i in range(max_distance):
            r, q = p["recall_by_distance"][i], p["precision_by_distance"][i]
            cells.append(f"{'-' if r is None else f'{r:.2f}'} / {'-' if q is None else f'{q:.2f}'}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out
