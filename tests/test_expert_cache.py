"""The expert cache's rules: right weights in the slots, eviction order, pause on miss, admission."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from expertmap.actors.expert_cache import ExpertCache
from expertmap.actors.slot_pool import SlotPool
from expertmap.actors.transfer import EmulatedLink, InstantLink, TransferEngine
from expertmap.predictor.policies import PolicyContext, Prefetch, make_policy
from expertmap.predictor.policies.base import Policy

LAYERS, EXPERTS = 4, 8


def host_weights(key):
    layer, expert = key
    return {"w": torch.full((2, 3), float(layer * 100 + expert))}


def make_cache(policy: Policy, slots: int, transfer_cls=InstantLink) -> ExpertCache:
    pool = SlotPool(slots, {"w": torch.Size([2, 3])}, torch.float32, torch.device("cpu"))
    return ExpertCache(pool, transfer_cls(pool), policy, host_weights, expert_bytes=24)


def ctx(slots: int, prefetch: bool = True, **inputs) -> PolicyContext:
    return PolicyContext(LAYERS, EXPERTS, 2, slots, prefetch, **inputs)


def run_layer(cache: ExpertCache, layer: int, experts: list[int]) -> dict[int, float]:
    """Acquire a layer's experts like the runner does; return the value each slot held."""
    seen = {}
    for e, w in cache.acquire(layer, experts):
        seen[e] = w["w"][0, 0].item()
        cache.release((layer, e))
    return seen


def test_slots_hold_the_right_experts_and_counts_add_up():
    cache = make_cache(make_policy("on-demand", ctx(3)), 3)
    try:
        assert run_layer(cache, 0, [1, 2]) == {1: 1.0, 2: 2.0}
        assert run_layer(cache, 1, [5]) == {5: 105.0}
        assert run_layer(cache, 0, [2, 1]) == {2: 2.0, 1: 1.0}
        s = cache.snapshot_stats()
        assert (s.accesses, s.hits, s.misses, s.copies) == (5, 2, 3, 3)
        assert s.bytes_moved == 3 * 24
    finally:
        cache.close()


def test_lru_evicts_least_recently_used():
    cache = make_cache(make_policy("on-demand", ctx(2)), 2)
    try:
        run_layer(cache, 0, [0])
        run_layer(cache, 0, [1])
        run_layer(cache, 0, [0])  # 1 is now least recent
        run_layer(cache, 0, [2])
        assert cache.resident_keys() == {(0, 0), (0, 2)}
    finally:
        cache.close()


def test_lfu_evicts_least_frequently_used():
    cache = make_cache(make_policy("lfu", ctx(2)), 2)
    try:
        for _ in range(3):
            run_layer(cache, 0, [0])
        run_layer(cache, 0, [1])
        run_layer(cache, 0, [1])
        run_layer(cache, 0, [0])  # 0 used 4 times, 1 twice but more recently
        run_layer(cache, 0, [2])
        assert cache.resident_keys() == {(0, 0), (0, 2)}
    finally:
        cache.close()


def test_oracle_evicts_the_expert_needed_furthest_ahead():
    # trace: iteration 0 uses layer 0 experts 0,1 then layer 1 expert 2; iteration 1 needs (0,1) then (1,0)...
    trace = [[[0, 1], [2], [], []], [[1], [], [], []], [[0], [], [], []]]
    policy = make_policy("oracle", ctx(2, prefetch=False, trace=trace))
    cache = make_cache(policy, 2)
    try:
        policy.on_iteration_start(0, None)
        policy.on_layer_start(0, [0, 1])
        run_layer(cache, 0, [0, 1])
        policy.on_layer_start(1, [2])
        run_layer(cache, 1, [2])  # must evict (0,0) (next use: iteration 2), keep (0,1) (iteration 1)
        assert cache.resident_keys() == {(0, 1), (1, 2)}
    finally:
        cache.close()


def test_layer_needing_more_experts_than_slots_streams_through_them():
    cache = make_cache(make_policy("on-demand", ctx(2)), 2)
    try:
        assert run_layer(cache, 2, [0, 1, 2, 3, 4]) == {e: 200.0 + e for e in range(5)}
    finally:
        cache.close()


class GatedLink(TransferEngine):
    """Copies wait for the test to open a gate, pause once mid-copy, and record completion order."""

    def __init__(self, pool):
        super().__init__(pool)
        self.order: list[int] = []
        self.gate = threading.Semaphore(0)

    def copy(self, slot, host, nbytes, between_chunks=None):
        self.gate.acquire()
        if between_chunks is not None:
            between_chunks()  # the chunk boundary where a prefetch yields to waiting misses
        self.pool.write(slot, host)
        self.order.append(int(host["w"][0, 0].item()))


class FixedPlan(Policy):
    name = "fixed-plan"

    def __init__(self, ctx, plan):
        super().__init__(ctx)
        self.plan = plan

    def prefetch_plan(self):
        return self.plan

    def admit(self, prefetch, victim):
        return True


def test_misses_pause_prefetching_and_go_first():
    plan = [Prefetch((3, e), priority=10 - e) for e in range(4)]
    policy = FixedPlan(ctx(8), plan)
    cache = make_cache(policy, 8, GatedLink)
    link: GatedLink = cache.transfer
    try:
        time.sleep(0.05)  # the worker has taken the first prefetch (3,0) and waits at the gate
        result = {}
        t = threading.Thread(target=lambda: result.update(run_layer(cache, 0, [5, 6])))
        t.start()
        for _ in range(6):
            link.gate.release()
        t.join(timeout=5)
        assert result == {5: 5.0, 6: 6.0}
        deadline = time.time() + 5
        while len(link.order) < 6 and time.time() < deadline:  # the paused prefetch and the rest finish
            time.sleep(0.01)
        # (3,0) was already on the link: it paused at a chunk boundary for both misses, then finished
        assert link.order[:3] == [5.0, 6.0, 300.0]
        assert link.order[3:] == [301.0, 302.0, 303.0]
        s = cache.snapshot_stats()
        assert s.misses == 2 and s.prefetched == 4 and s.prefetch_used == 0
    finally:
        for _ in range(8):
            link.gate.release()
        cache.close()


def test_prefetched_expert_counts_as_hit_and_used():
    policy = FixedPlan(ctx(4), [Prefetch((1, 3), priority=1.0)])
    cache = make_cache(policy, 4)
    try:
        deadline = time.time() + 5
        while (1, 3) not in cache.resident_keys() and time.time() < deadline:
            cache.poke()
            time.sleep(0.01)
        policy.plan = []
        assert run_layer(cache, 1, [3]) == {3: 103.0}
        s = cache.snapshot_stats()
        assert (s.hits, s.misses, s.prefetched, s.prefetch_used) == (1, 0, 1, 1)
        assert s.precision == 1.0
    finally:
        cache.close()


@pytest.mark.parametrize("plan_sorted, taken", [(False, (3, 1)), (True, (3, 0))])
def test_a_plan_is_sorted_unless_the_policy_says_it_comes_sorted(plan_sorted, taken):
    """One free slot, a plan listing a lower priority first: the cache sorts it and takes the
    higher, unless the policy declares its plan best-first; a one-shot iterable plan works too.
    The worker's deciding time is counted."""

    class Plan(Policy):  # the base's admission: free slots only, so the first taken stays
        name = "plan"

        def prefetch_plan(self):
            return iter([Prefetch((3, 0), priority=1.0), Prefetch((3, 1), priority=5.0)])

    policy = Plan(ctx(1))
    policy.plan_sorted = plan_sorted
    cache = make_cache(policy, 1)
    try:
        deadline = time.time() + 5
        while not cache.resident_keys() and time.time() < deadline:
            cache.poke()
            time.sleep(0.01)
        assert cache.resident_keys() == {taken}
        assert cache.decisions_s > 0
    finally:
        cache.close()


def test_prefetch_without_admission_never_evicts():
    policy = make_policy("on-demand", ctx(1))  # base admit(): free slots only
    policy.prefetch_plan = lambda: [Prefetch((2, 2), 1.0)]
    cache = make_cache(policy, 1)
    try:
        run_layer(cache, 0, [0])
        cache.poke()
        time.sleep(0.05)
        assert cache.resident_keys() == {(0, 0)}
    finally:
        cache.close()


def test_an_emulated_copy_pauses_for_a_miss_at_its_next_chunk_boundary_only():
    """The emulated link holds a copy for bytes / bandwidth; a prefetch lets waiting misses go
    first at the chunk boundary after one arrives (the cache sets ``demand``), not before it, and
    without one it does not stop at all."""
    pool = SlotPool(1, {"w": torch.Size([2, 3])}, torch.float32, torch.device("cpu"))
    link = EmulatedLink(pool, bandwidth_bytes_per_s=24 / 0.4)  # one copy: 0.4 s, 8 chunks of 0.05 s
    pauses = []
    link.copy(0, host_weights((1, 2)), 24, between_chunks=lambda: pauses.append("paused"))
    assert pauses == [] and pool.view(0)["w"][0, 0].item() == 102.0
    t0 = time.perf_counter()
    threading.Timer(0.12, link.demand.set).start()  # a miss arrives 0.12 s into the copy

    def serve_misses():
        pauses.append(time.perf_counter() - t0)
        link.demand.clear()

    link.copy(0, host_weights((3, 1)), 24, between_chunks=serve_misses)
    assert len(pauses) == 1 and 0.145 <= pauses[0] < 0.35  # at the 0.15 s boundary
    assert pool.view(0)["w"][0, 0].item() == 301.0


def test_worker_failure_surfaces_on_the_compute_thread():
    class Broken(TransferEngine):
        def copy(self, slot, host, nbytes, between_chunks=None):
            raise OSError("link down")

    cache = make_cache(make_policy("on-demand", ctx(2)), 2, Broken)
    try:
        with pytest.raises(RuntimeError, match="link down"):
            run_layer(cache, 0, [1])
    finally:
        cache.close()
