"""hybrid's planner process (predictor/planner_process.py, planner_child.py): the same estimate as
the inline planner, lost events counted, failures reported, nothing left behind."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np

import pytest
import torch

from expertmap.actors import defaults
from expertmap.predictor.linear_router import LinearRouter
from expertmap.predictor.next_use_distance import DistanceModel
from expertmap.predictor.next_use_plan import NextUsePlanner
from expertmap.predictor.planner_process import SLOTS, PlannerSpec, ProcessPlanner
from expertmap.predictor.policies.base import PolicyInputs
from expertmap.predictor.policies.hybrid import DEFAULT_MODEL, DISTANCE_FILE
from expertmap.predictor.search import SearchIndex

L, J, H, K = 4, 8, 16, 2


def _routers(rng, layers=range(L)):
    return {l: LinearRouter(rng.normal(size=(J, H)).astype(np.float32), None, "softmax", K) for l in layers}


def _spec(routers, owned=tuple(range(L)), distance=None):
    return PlannerSpec(L, J, owned, 6, DEFAULT_MODEL.weights, 0.0, True, H, H, routers, distance)


def _bundled_distance():
    return DistanceModel.from_file(defaults.BUNDLED_MODEL / DISTANCE_FILE)


def _index(rng, n=20):
    maps = rng.dirichlet(np.ones(J), size=(n, L)).astype(np.float32)  # [N, L, J]
    return rng.normal(size=(n, H)).astype(np.float32), maps


def _iteration(rng, routers, inline, remote, it, tokens, send_mean=lambda layer: False) -> int:
    """One iteration's events to both planners (the inline one given the distribution, the gate
    and the choice; the process only the router input, and the distribution where
    ``send_mean(layer)``); then both plan. Returns the router-input bytes sent."""
    emb = rng.normal(size=H).astype(np.float32)
    inline.start(it, emb, tokens)
    remote.start(it, emb, tokens)
    sent = 0
    for layer in range(L):
        rows = rng.normal(size=(tokens, H)).astype(np.float32)  # [T, H]
        probs = routers[layer](rows)
        gate = routers[layer + 1](rows).max(axis=0) if layer + 1 < L else None
        inline.router(layer, probs.mean(axis=0), gate)
        inline.used(layer, routers[layer].chosen(probs))
        assert remote.router(layer, probs.mean(axis=0) if send_mean(layer) else None, rows)  # it derives the choice
        sent += rows.nbytes
    inline.plan()
    assert remote.drain(10)
    return sent


@pytest.mark.parametrize("with_distance", [False, True], ids=["next-pass model", "distance model"])
def test_the_process_plans_what_the_inline_planner_plans(with_distance):
    """Same events, same store: the process's estimate and plan equal the inline planner's, where
    the process computes each layer's distribution, gate and chosen experts from the router input
    (with the next-pass model's estimate, and with the bundled distance model's)."""
    rng = np.random.default_rng(0)
    routers = _routers(rng)
    embeddings, maps = _index(rng)
    distance = _bundled_distance() if with_distance else None
    inline = NextUsePlanner(L, J, range(L), 6, DEFAULT_MODEL, distance=distance)
    inline.index = SearchIndex(embeddings, maps)
    remote = ProcessPlanner(_spec(routers, distance=distance))
    try:
        remote.ship_index(embeddings, maps)
        for it in range(5):
            _iteration(rng, routers, inline, remote, it, 7 if it == 0 else 1)
            np.testing.assert_allclose(remote.t, inline.t, rtol=1e-5)
            keys, _ = remote.plan()
            assert keys.tolist() == inline.plan_keys.tolist()
        assert remote.dropped == 0 and remote.error is None
        assert remote.busy_s > 0
    finally:
        remote.close()


def test_payloads_of_every_size_survive_the_ring_wrapping_around():
    """Prefill-sized and decode-sized events, some with the distribution sent beside the rows,
    more bytes in all than the payload ring holds: each event reaches the child whole (its
    estimate equals the inline planner's after every iteration)."""
    rng = np.random.default_rng(4)
    routers = _routers(rng)
    inline = NextUsePlanner(L, J, range(L), 6, DEFAULT_MODEL)
    spec = _spec(routers)
    remote = ProcessPlanner(spec)
    sent = 0
    try:
        for it in range(72):
            tokens = spec.max_rows if it % 3 else 1 + it % 5  # the largest router event, or a few rows
            sent += _iteration(rng, routers, inline, remote, it, tokens, send_mean=lambda layer: layer % 2 == 1)
            np.testing.assert_allclose(remote.t, inline.t, rtol=1e-5)
        assert sent > 4 * spec.ring_floats  # it went round
        assert remote.dropped == 0 and remote.error is None
    finally:
        remote.close()


def test_events_the_ring_cannot_hold_are_dropped_and_counted():
    rng = np.random.default_rng(1)
    remote = ProcessPlanner(_spec(_routers(rng)))
    try:
        os.kill(remote._proc.pid, signal.SIGSTOP)  # the child applies nothing meanwhile
        for i in range(SLOTS + 5):
            remote.used(i % L, [0, 1])
        assert remote.dropped == 5 and remote.written == SLOTS
        os.kill(remote._proc.pid, signal.SIGCONT)
        assert remote.drain(10)
    finally:
        remote.close()


def test_a_bad_event_is_reported_and_the_process_goes_on():
    """A router event with neither the distribution nor a router for its layer fails in the child:
    counted, said on its stderr, and the next events are applied."""
    rng = np.random.default_rng(2)
    remote = ProcessPlanner(_spec(_routers(rng, layers=(0, 1))))
    try:
        remote.start(0, None, 1)
        remote.router(3, None, rng.normal(size=(1, H)).astype(np.float32))  # layer 3 has no router here
        remote.used(0, [1, 2])
        assert remote.drain(10)
        assert remote.error == "the planner process failed on 1 events (its stderr says how)"
        assert np.isfinite(remote.t).all() and (remote.t < 1e6).any()  # the use event was planned
    finally:
        remote.close()


def test_close_stops_the_process_and_removes_its_files():
    rng = np.random.default_rng(3)
    remote = ProcessPlanner(_spec(_routers(rng)))
    folder = remote.dir
    remote.ship_index(*_index(rng))
    remote.close()
    assert remote._proc.returncode == 0 and not folder.exists()


def test_an_unknown_planner_is_refused():
    with pytest.raises(ValueError, match="PolicyInputs.planner='gpu': use one of process, thread"):
        PolicyInputs(planner="gpu")


@pytest.mark.parametrize("name", ["expertmap-moe-tiny", "expertmap-moe-fine"])
def test_the_adapter_gives_each_bundled_router_as_numpy(name):
    from transformers import AutoModelForCausalLM

    from expertmap.actors.adapters import adapter_for
    from expertmap.actors.defaults import BUNDLED_MODELS

    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODELS[name])
    adapter = adapter_for(model.config)
    layer = adapter.moe_layers(model)[1]
    router = adapter.linear_router(layer.router, adapter.top_k(model.config))
    assert router is not None and router.top_k == adapter.top_k(model.config)
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    with torch.no_grad():
        want = adapter.router_probs(layer.router(x)).float().numpy()
    np.testing.assert_allclose(router(x.float().numpy()), want, atol=1e-2)
    assert adapter.linear_router(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2) is None  # not such a router
    # an observer hooked to the router (as the shard runtime's is) does not run in the check
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        assert adapter.linear_router(layer.router, adapter.top_k(model.config)) is not None and not seen
    finally:
        handle.remove()


def test_the_engine_plans_in_a_process_and_sends_only_router_events():
    """The engine's hybrid plans in its process: the bundled model's routers choose by top-k, so
    the compute thread sends one start and one router event per layer, no use events; the
    process's CPU time is counted apart from the callbacks."""
    from expertmap.actors.config import EngineConfig, LinkConfig
    from expertmap.actors.engine import OffloadEngine

    engine = OffloadEngine(EngineConfig(policy="hybrid", link=LinkConfig(mode="instant", profile="instant")))
    try:
        policy = engine.runtime.policy
        assert policy.remote is not None
        engine.generate(engine.tokenizer("The expert map").input_ids, max_new_tokens=6, do_sample=False)
        assert policy.drain(10)
        iterations, layers = engine.runtime.iteration + 1, engine.runtime.num_moe_layers
        assert policy.remote.written == iterations * (1 + layers) and policy.remote.dropped == 0
        assert policy.remote.error is None and (policy.remote.t < 1e6).all()
        assert not any(t.name == "hybrid-planner" for t in threading.enumerate())  # no planner thread
        # the plan the cache reads skips what the cache holds (resident or in flight), as it is read
        cache_holds = policy.contains
        policy.contains = lambda key: False
        full = list(policy.prefetch_plan())
        assert full
        policy.contains = {full[0].key}.__contains__
        assert list(policy.prefetch_plan()) == full[1:]
        policy.contains = cache_holds
        assert engine.process_frac > 0
        # prediction's share: the callbacks and this interpreter's snapshot thread, not the process
        shipping = policy.background_s / engine.runtime.iterations_s
        assert engine.prediction_frac == pytest.approx(engine.overhead_frac + shipping)
    finally:
        engine.close()
    assert policy.remote is None
