"""`finemoe` follows FineMoE's public code (IntelliSys-Lab/FineMoE-EuroSys26): small examples by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmap.predictor.map_store_memory import InMemoryMapStore
from expertmap.predictor.policies import PolicyInputs, make_policy
from expertmap.predictor.policies.base import PolicyContext, Prefetch, RouterEvent
from expertmap.predictor.policies.finemoe import FineMoE, FineMoETuning, code_expert_count
from expertmap.predictor.replica import StoreReplica


def bare(tuning=None) -> FineMoE:
    return FineMoE(PolicyContext(4, 4, 1, 4, synchronous=True, tuning=tuning))


def test_eviction_is_lowest_int_prob_times_visits_since_cached():
    """RemoveCachedSparseNode: lowest int(prob x incache_visit_count), ties in topology order.

    key       prob  hits  visits (1 + hits)  prob x visits  int  paper: prob x (accesses + 1)
    a (1, 0)  0.6   2     3                  1.8            1    0.6 x 3 = 1.8
    b (1, 1)  0.9   0     1                  0.9            0    0.9 x 1 = 0.9
    c (2, 0)  0.5   3     4                  2.0            2    0.5 x 4 = 2.0
    d (2, 3)  -     5     6                  0 (unnamed)    0    1e-3 x 6 = 0.006
    Code: b and d tie at 0, b comes first in (layer, expert) order; the paper's rule evicts d.
    """
    a, b, c, d = (1, 0), (1, 1), (2, 0), (2, 3)
    hits = {a: 2, b: 0, c: 3, d: 5}
    victims = {}
    for name, tuning in (("code", None), ("paper", FineMoETuning.paper())):
        p = bare(tuning)
        p.pred_prob.update({a: 0.6, b: 0.9, c: 0.5})
        for k in (a, b, c, d):
            p.on_insert(k, prefetched=False)
            for _ in range(hits[k]):
                p.on_access(k, True)
        victims[name] = p.choose_victim([a, b, c, d])
    assert victims == {"code": b, "paper": d}


def test_the_score_is_truncated_and_ties_go_in_topology_order():
    # a: 0.6 x 3 = 1.8 -> 1; e (3, 2): 0.55 x 2 = 1.1 -> 1: a tie, and (1, 0) comes first
    # (without the truncation e, 1.1 < 1.8, would go)
    a, e = (1, 0), (3, 2)
    p = bare()
    p.pred_prob.update({a: 0.6, e: 0.55})
    for k, n in ((a, 2), (e, 1)):
        p.on_insert(k, prefetched=False)
        for _ in range(n):
            p.on_access(k, True)
    assert p.score(a) == p.score(e) == 1
    assert p.choose_victim([e, a]) == a


def test_leaving_the_device_resets_prob_and_visits():
    a, b = (1, 0), (2, 1)
    p = bare()
    p.pred_prob.update({a: 0.9, b: 0.5})
    for k in (a, b):
        p.on_insert(k, prefetched=False)
    for _ in range(4):
        p.on_access(a, True)  # a: int(0.9 x 5) = 4; b: int(0.5 x 1) = 0
    assert p.choose_victim([a, b]) == b
    p.on_evict(a)
    p.on_insert(a, prefetched=False)  # back on demand: visits 1, prob 0 (nothing named it since)
    assert p.score(a) == 0 and a not in p.pred_prob
    assert p.choose_victim([a, b]) == a  # tie at 0, (1, 0) first


def test_candidates_are_not_evicted_nor_displaced_by_a_prefetch():
    a, b = (1, 0), (2, 1)
    p = bare()
    for k in (a, b):
        p.on_insert(k, prefetched=False)
    p.candidates = frozenset({a})
    assert p.choose_victim([a, b]) == b
    assert not p.admit(Prefetch((3, 0), 1.0), a)
    assert p.admit(Prefetch((3, 0), 1.0), b)
    assert p.choose_victim([a]) == a  # nothing else: an on-demand load still gets a slot


def test_expert_count_is_cumulative_at_most_delta_at_least_top_k():
    dist = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    assert [e for e, _ in code_expert_count(dist, 0.2, 1)] == [0, 1]  # delta 0.8: 0.4, 0.7 <= 0.8; 0.85 > 0.8
    assert [e for e, _ in code_expert_count(dist, 1.0, 2)] == [0, 1]  # delta 0: top-k
    assert code_expert_count(np.zeros(4), 0.0, 2) == []


def test_bands_priorities_and_candidates_follow_the_code():
    """L 6, d 2, top-1, one stored entry matched exactly (similarity 1, so one expert per layer).

    Start: semantic band [0, 2): w(l) = 1 - (l - 0) / (2 + 1): w0 = 1, w1 = 2/3.
    After layer 0: trajectory band [0 + 1 + 2, 6) = [3, 6): w = 1 - (l - 3) / 7. Layer 2 is never
    predicted. After layer 3: 3 + 1 + 2 = 6: no band, the plan and candidates stay."""
    L, J, D, d = 6, 4, 5, 2
    rng = np.random.default_rng(0)
    m = rng.dirichlet(np.ones(J), size=L).astype(np.float32)
    emb = rng.normal(size=D).astype(np.float32)
    store = InMemoryMapStore(L, J, D, 10, prefetch_distance=d)
    store.add(emb, m)
    inputs = PolicyInputs(replica=StoreReplica(store), prefetch_distance=d, synchronous=True, publish=False)
    p = make_policy("finemoe", inputs.context(L, J, 1, 8, True))
    p.on_iteration_start(0, torch.from_numpy(emb)[None])
    plan = p.prefetch_plan()
    assert len(plan) == 2 * J and p.candidates == {(l, e) for l in (0, 1) for e in range(J)}
    pri = {pf.key: pf.priority for pf in plan}
    for layer, w in ((0, 1.0), (1, 2 / 3)):
        top = int(np.argmax(m[layer]))
        assert pri[(layer, top)] == pytest.approx(m[layer, top] * w + 1e-6, rel=1e-5)
        assert all(pri[(layer, e)] == pytest.approx(1e-6) for e in range(J) if e != top)
        assert p.pred_prob[(layer, top)] == pytest.approx(m[layer, top], rel=1e-6)
    assert [pf.priority for pf in plan] == sorted(pri.values(), reverse=True)
    p.on_router(RouterEvent(0, torch.from_numpy(m[0])[None]))
    plan = p.prefetch_plan()
    assert {pf.key[0] for pf in plan} == {3, 4, 5}
    pri = {pf.key: pf.priority for pf in plan}
    for layer in (3, 4, 5):
        top = int(np.argmax(m[layer]))
        assert pri[(layer, top)] == pytest.approx(m[layer, top] * (1 - (layer - 3) / 7) + 1e-6, rel=1e-5)
    for layer in (1, 2, 3):
        p.on_router(RouterEvent(layer, torch.from_numpy(m[layer])[None]))
    assert {pf.key[0] for pf in p.prefetch_plan()} == {5}  # after layer 2: band [5, 6); layer 3 adds none
    assert p.candidates == {(5, e) for e in range(J)}
    p.close()


def test_bad_tuning_names_the_value():
    with pytest.raises(ValueError, match="eviction='lru'"):
        FineMoETuning(eviction="lru")
