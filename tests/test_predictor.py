"""Prediction: searches against brute force, FineMoE's rules, Fate's quotas and ARC, the planner."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from expertmap.predictor.arc import ARC
from expertmap.predictor.background import BackgroundPlanner
from expertmap.predictor.map_store_memory import InMemoryMapStore
from expertmap.predictor.policies import PolicyInputs, make_policy
from expertmap.predictor.policies.base import RouterEvent
from expertmap.predictor.policies.fate import layer_quotas
from expertmap.predictor.replica import StoreReplica
from expertmap.predictor.search import SearchIndex, experts_to_fetch, union_max

L, J, D = 6, 8, 16


def random_store(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, D)).astype(np.float32)
    maps = rng.dirichlet(np.full(J, 0.3), size=(n, L)).astype(np.float32)
    return emb, maps


def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_semantic_search_matches_brute_force(backend):
    emb, maps = random_store(300)
    index = SearchIndex(emb, maps, semantic_backend=backend)
    rng = np.random.default_rng(1)
    for _ in range(20):
        q = rng.standard_normal(D).astype(np.float32)
        sims = [cos(q, e) for e in emb]
        best, sim = index.semantic(q)
        assert best == int(np.argmax(sims))
        assert sim == pytest.approx(max(sims), abs=1e-5)


def test_trajectory_search_matches_brute_force_prefix_cosine():
    emb, maps = random_store(200, seed=2)
    index = SearchIndex(emb, maps)
    query = np.random.default_rng(3).dirichlet(np.full(J, 0.3), size=L).astype(np.float32)  # [L, J]
    traj = index.trajectory()
    for layer in range(L):
        traj.observe(layer, query[layer])
        prefix = query[: layer + 1].reshape(-1)
        sims = [cos(prefix, m[: layer + 1].reshape(-1)) for m in maps]
        best, sim = traj.best()
        assert best == int(np.argmax(sims))
        assert sim == pytest.approx(max(sims), abs=1e-6)
    with pytest.raises(ValueError, match="in order"):
        index.trajectory().observe(2, query[2])


def test_expert_count_adapts_to_similarity():
    dist = np.array([0.4, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0])
    assert [e for e, _ in experts_to_fetch(dist, 1.0, 2)] == [0, 1]  # delta 0: top-k only
    assert [e for e, _ in experts_to_fetch(dist, 0.2, 2)] == [0, 1, 2]  # delta 0.8: 0.4+0.3+0.15 >= 0.8
    assert [e for e, _ in experts_to_fetch(dist, 0.05, 2)] == [0, 1, 2, 3]  # delta 0.95
    assert len(experts_to_fetch(dist, -1.0, 2)) == 5  # delta clipped to 1: all with mass
    assert union_max([[(1, 0.2), (2, 0.5)], [(1, 0.6)]]) == [(1, 0.6), (2, 0.5)]


def finemoe(slots=8, distance=2, publish=False, store_n=50):
    emb, maps = random_store(store_n, seed=4)
    store = InMemoryMapStore(L, J, D, 1000, prefetch_distance=distance)
    for e, m in zip(emb, maps):
        store.add(e, m)
    from expertmap.predictor.policies.finemoe import FineMoETuning

    # the paper's rules (FineMoETuning.paper()); the code's rules: tests/test_finemoe_faithful.py
    inputs = PolicyInputs(replica=StoreReplica(store), prefetch_distance=distance, synchronous=True, publish=publish,
                          tuning=FineMoETuning.paper())  # fmt: skip
    return make_policy("finemoe", inputs.context(L, J, 2, slots, True)), emb, maps, store


def test_finemoe_plans_the_window_with_priority_p_over_distance():
    policy, emb, maps, _ = finemoe(distance=2)
    policy.on_iteration_start(0, torch.from_numpy(emb[7])[None])  # exact match: similarity 1
    plan = policy.prefetch_plan()
    assert {pf.key[0] for pf in plan} == {0, 1}  # layers 0..d-1
    for pf in plan:
        layer, e = pf.key
        assert pf.priority == pytest.approx(maps[7, layer, e] / (layer + 1), rel=1e-5)
    assert [pf.priority for pf in plan] == sorted((pf.priority for pf in plan), reverse=True)
    # after observing layer 0 exactly as entry 7: the window moves to layers 1..2, from entry 7
    policy.on_router(RouterEvent(0, torch.from_numpy(maps[7, 0])[None]))
    plan = policy.prefetch_plan()
    assert {pf.key[0] for pf in plan} == {1, 2}
    for pf in plan:
        layer, e = pf.key
        assert pf.priority == pytest.approx(maps[7, layer, e] / (layer - 0), rel=1e-5)
    policy.close()


def test_finemoe_evicts_lowest_probability_times_frequency_and_protects_prefetches():
    policy, emb, maps, _ = finemoe()
    policy.pred_prob.update({(3, 0): 0.5, (3, 1): 0.1, (3, 2): 0.9})
    for _ in range(3):
        policy.on_access((3, 1), True)  # 0.1 x 4 = 0.4
    policy.on_access((3, 0), True)  # 0.5 x 2 = 1.0
    policy.on_access((3, 2), True)  # 0.9 x 2 = 1.8
    assert policy.choose_victim([(3, 0), (3, 1), (3, 2)]) == (3, 1)
    # a prefetched expert for layer 4 is protected while the computation is at or before layer 4
    policy.on_iteration_start(0, None)
    policy.on_layer_start(2, [])
    policy.on_insert((4, 5), prefetched=True)  # score PRIOR x 1: the lowest
    assert policy.choose_victim([(3, 1), (4, 5)]) == (3, 1)
    assert not policy.admit(make_prefetch((5, 1)), (4, 5))
    policy.on_layer_start(5, [])  # layer 4 has passed
    assert policy.choose_victim([(3, 1), (4, 5)]) == (4, 5)
    policy.close()


def make_prefetch(key, priority=1.0):
    from expertmap.predictor.policies.base import Prefetch

    return Prefetch(key, priority)


def test_finemoe_publishes_each_finished_iteration_to_the_store():
    policy, emb, maps, store = finemoe(publish=True)
    before = len(store)
    policy.on_iteration_start(0, torch.ones(1, D))
    for layer in range(L):
        policy.on_router(RouterEvent(layer, torch.full((3, J), 1.0 / J)))
    policy.on_iteration_end(0)
    assert len(store) == before + 1
    _, stored_maps = store.arrays()
    np.testing.assert_allclose(stored_maps[-1], np.full((L, J), 1.0 / J), rtol=1e-6)
    policy.close()


def test_background_planner_applies_everything_but_skips_stale_plans():
    applied, planned = [], []
    gate = threading.Event()

    def apply(item):
        gate.wait(5)
        applied.append(item)

    planner = BackgroundPlanner(apply, lambda: planned.append(applied[-1]), maxsize=64)
    for i in range(10):
        planner.submit(i)
    gate.set()
    assert planner.drain(5)
    assert applied == list(range(10))  # incremental state sees every layer, in order
    assert planned[-1] == 9 and len(planned) < 10  # planning for older positions was skipped
    assert planner.skipped_plans == 10 - len(planned)
    planner.close()


def test_background_planner_plans_only_for_planning_items_and_counts_its_time():
    applied, planned = [], []
    planner = BackgroundPlanner(applied.append, lambda: planned.append(applied[-1]), synchronous=True)
    planner.submit("router", replan=False)
    planner.submit("used")
    assert applied == ["router", "used"] and planned == ["used"]  # one plan, after both updates

    gate = threading.Event()

    def slow_apply(item):
        gate.wait(5)
        start = time.thread_time()
        while time.thread_time() - start < 0.01:  # 10 ms of the worker's CPU time
            pass
        applied.append(item)

    applied.clear()
    planned.clear()
    planner = BackgroundPlanner(slow_apply, lambda: planned.append(applied[-1]), maxsize=64)
    planner.submit(1)  # a planning item whose plan is owed while newer state is waiting
    planner.submit(2, replan=False)
    gate.set()
    assert planner.drain(5)
    assert applied == [1, 2] and planned[-1] == 2  # the owed plan runs after the last update
    planner.submit(3, replan=False)
    assert planner.drain(5)
    assert planned[-1] == 2  # an update alone does not plan
    assert planner.busy_s >= 0.03  # three applies of at least 10 ms each
    planner.close()


def test_background_planner_drops_when_full_and_says_so():
    dropped = []
    block = threading.Event()
    planner = BackgroundPlanner(lambda item: block.wait(5), lambda: None, on_drop=dropped.append, maxsize=2)
    for i in range(6):
        planner.submit(i)
    time.sleep(0.05)
    assert planner.dropped >= 3 and dropped == list(range(6 - len(dropped), 6))
    block.set()
    planner.close()


def test_background_planner_starts_its_thread_with_the_first_item_and_not_after_close():
    def planner_threads():
        return [t for t in threading.enumerate() if t.name == "lazy-planner"]

    applied, dropped = [], []
    planner = BackgroundPlanner(applied.append, lambda: None, on_drop=dropped.append, name="lazy-planner")
    assert planner_threads() == []  # a policy that never submits (hybrid's process mode) has no thread
    planner.submit(1)
    assert planner.drain(5) and applied == [1] and len(planner_threads()) == 1
    planner.close()
    assert planner_threads() == []
    planner.submit(2)  # after close: nothing runs it, and the consumer is told
    assert applied == [1] and dropped == [2] and planner.dropped == 1 and planner_threads() == []

    unused = BackgroundPlanner(applied.append, lambda: None, name="lazy-planner")
    unused.close()
    unused.submit(3)
    assert planner_threads() == [] and unused.dropped == 1


def test_fate_quotas_favour_shallow_layers():
    assert layer_quotas(8, 16, 2, 32) == [4] * 8  # 16 + 7 x 3 > 32: no whole layer fits
    assert layer_quotas(8, 16, 2, 64) == [16, 16, 16, 3, 3, 3, 3, 3]  # 48 + 5 x 3 <= 64
    assert layer_quotas(4, 8, 2, 32) == [8, 8, 8, 8]


def test_arc_keeps_frequent_keys_over_a_scan():
    arc = ARC(3)
    for k in ("a", "b"):
        arc.insert(k)
        arc.access(k)  # seen twice: T2
    arc.insert("x")
    resident = {"a", "b", "x"}
    for scan in ("s1", "s2", "s3"):  # one-off keys must evict each other, not a/b
        victim = arc.victim(resident)
        arc.evict(victim)
        resident.discard(victim)
        arc.insert(scan)
        resident.add(scan)
    assert {"a", "b"} <= resident
