"""Loss attribution (bench/attribution.py) on a hand-made trace where each case happens once."""

from __future__ import annotations

import numpy as np
import pytest

from expertmap.actors.trace_recorder import IterationTrace, RequestTrace
from expertmap.bench.attribution import attributed_replay
from expertmap.bench.simulator import replay
from expertmap.predictor.policies.base import Policy, PolicyContext, Prefetch

J = 8
SLOTS = 3
A, B, C, D, E, F, G, H = ((0, e) for e in range(8))


class Scripted(Policy):
    """Plans and evictions by script: ``plans[(iteration, layer)]`` (layer -1: iteration start),
    evict the lowest ``rank``, refuse admission of the keys in ``refuse``; starts with A, B, H cached."""

    name = "scripted"
    all_resident = True  # only so that the replay preloads A and B
    predictive = True

    def __init__(self, ctx, plans, rank, refuse=()):
        super().__init__(ctx)
        self.plans, self.rank, self.refuse = plans, rank, set(refuse)

    def prefetch_plan(self):
        return [Prefetch(k, 1.0) for k in self.plans.get((self.pos.iteration, self.pos.layer), [])]

    def choose_victim(self, candidates, incoming=None):
        return min(candidates, key=lambda k: self.rank[k])

    def admit(self, prefetch, victim):
        return prefetch.key not in self.refuse


def trace(accesses: list[list[int]]) -> list[RequestTrace]:
    its = []
    for experts in accesses:
        probs = np.full((1, J), 1.0 / J, np.float32)
        its.append(IterationTrace(np.ones(4, np.float32), [probs], [None], [experts]))
    return [RequestTrace("r", "c", "p", "t", its)]


def scenario():
    """One MoE layer, 3 slots, a copy = 1.5 layer times, each iteration one decode layer (empty
    iterations let the link run ahead); A and H are never evicted (highest rank).

    it0 (t 0):   A hits (other).                                            cache A B H
    it1 (t 1):   start plan [C]: the idle link (free since 0) evicts B for C; C lands at 1.5 but
                 is accessed at 1: a late prefetch.                         cache A H C
    it2 (t 2.5): plan [D]: the link (free at 1.5) evicts C, D lands at 3.0.  cache A H D
    it3 (t 3.5): plan [E]: the link (free at 3.0) evicts D, never accessed: a prefetch evicted
                 unused; E lands at 4.5.                                    cache A H E
    it4 (t 4.5): E is accessed: a hit a prefetch created.
    it5 (t 5.5): B is accessed: a miss no prediction named, and B left for a prefetch: a hit
                 destroyed; its load evicts E.                              cache A H B
    it6 (t 8):   plan [F], refused admission; F is accessed: a miss predicted but not fetched.
    """
    rank = {A: 99, H: 100, B: 1, C: 2, D: 3, E: 4, F: 5}
    plans = {(1, -1): [C], (2, -1): [D], (3, -1): [E], (6, -1): [F]}
    accesses = [[0], [2], [], [], [4], [1], [5]]
    return plans, rank, accesses


def make(plans, rank, refuse=()):
    ctx = PolicyContext(num_layers=1, num_experts=J, top_k=1, num_slots=SLOTS)
    return Scripted(ctx, plans, rank, refuse)


def test_each_case_once():
    plans, rank, accesses = scenario()
    res, att = attributed_replay(make(plans, rank, refuse=[F]), trace(accesses), SLOTS, 1.5, resident_keys=[A, B, H])
    d = att.to_dict()
    assert d["accesses"] == 5
    assert (d["hits_other"], d["hits_prefetch"]) == (1, 1)  # it0's A; E
    assert d["misses_late"] == 1
    assert d["misses_unnamed"] == 1
    assert d["hits_destroyed"] == 1
    assert d["prefetches_unused"] == 1
    assert (d["misses_predicted"], d["misses_refused"]) == (1, 1)
    assert d["prefetches"] == 3  # C (late), D, E
    assert d["hits"] + d["misses"] == d["accesses"]
    assert res.stats.hits == d["hits"]  # the bookkeeping changes no decision


def test_same_decisions_as_plain_replay():
    plans, rank, accesses = scenario()
    plain = replay(make(plans, rank, [F]), trace(accesses), SLOTS, 1.5, resident_keys=[A, B, H])
    res, _ = attributed_replay(make(plans, rank, [F]), trace(accesses), SLOTS, 1.5, resident_keys=[A, B, H])
    assert plain.stats.to_dict() == res.stats.to_dict()
    assert plain.iteration_units == res.iteration_units


def test_predictor_recall_precision():
    # at it0's start the plan names A and G for layer 0 of it0 (distance 1): A is right, G wrong
    plans = {(0, -1): [A, G]}
    rank = {A: 9, B: 0, G: 0, H: 10}
    _, att = attributed_replay(make(plans, rank), trace([[0], [1]]), SLOTS, 1.5, resident_keys=[A, B, H])
    p = att.to_dict()["predictor"]
    assert p["precision_by_distance"][0] == pytest.approx(1 / 2)
    # true experts at distance 1: it0 layer 0 (from it0 start), it1 layer 0 (from it0 layer 0 and
    # from it1's start): 3 targets of one expert each, one of them predicted right
    assert p["recall_by_distance"][0] == pytest.approx(1 / 3)


def test_paused_prefetch_keeps_its_slot():
    """A miss that pauses a prefetch on the link must not take the slot the prefetch lands in."""
    from expertmap.bench.simulator import ReplayCache

    peak = []

    class Checked(ReplayCache):
        def _land(self):
            super()._land()
            peak.append(len(self.resident))

    # 2 slots, A B cached; it1 prefetches C (evicting B) and D is accessed while C is in flight:
    # D's load pauses C, evicts A, and C lands afterwards into the slot it had reserved
    plans = {(1, -1): [C]}
    rank = {A: 5, B: 1, C: 2, D: 3, H: 9}
    policy = Scripted(PolicyContext(num_layers=1, num_experts=J, top_k=1, num_slots=2), plans, rank)
    replay(policy, trace([[0], [3], [2]]), 2, 1.5, resident_keys=[A, B], make_cache=Checked)
    assert peak and max(peak) <= 2


def test_regime_lists_parse_and_name_a_bad_value():
    from expertmap.bench.regimes import budget_slots, link_ratios, split_names

    assert split_names("ratio:1, rtx3090-pcie4-mixtral,", "--link") == ["ratio:1", "rtx3090-pcie4-mixtral"]
    with pytest.raises(ValueError, match="--budgets ' , ' names nothing"):
        split_names(" , ", "--budgets")
    assert link_ratios(["ratio:1", "ratio:13.1"]) == {"ratio:1": 1.0, "ratio:13.1": 13.1}
    with pytest.raises(ValueError, match="'ratio:0'"):
        link_ratios(["ratio:0"])
    assert budget_slots("0.25", 128, 1000) == 32


def test_a_miss_whose_prefetch_landed_meanwhile_is_not_loaded_again():
    """A layer's later miss can land (its prefetch completes during an earlier miss's load):
    loading it again would evict for nothing, or fail when the layer pins every slot."""
    from expertmap.bench.simulator import ReplayCache

    cache = ReplayCache(make({}, {A: 1, B: 2}), 2, 1.5)
    cache.resident, cache.pins = {A, B}, {A, B}
    assert cache.load_now(B, 3.0) == 3.0
    assert cache.resident == {A, B}
