"""`hybrid`'s next-use estimate (predictor/next_use.py) and the decisions it drives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmap.predictor.next_use import FEATURES, GROUPS, NextUseModel, NextUseState, _logistic
from expertmap.predictor.policies.base import PolicyContext, Prefetch, RouterEvent
from expertmap.predictor.policies.hybrid import Hybrid, HybridTuning


def test_groups_follow_the_position():
    s = NextUseState(4, 3)
    s.start(0, None, None, 1)
    s.router(1, np.full(3, 1 / 3), np.array([0.7, 0.2, 0.1]))  # layer 1 computing, gate for layer 2
    x, group, ahead = s.features()
    assert x.shape == (12, len(FEATURES))
    by_layer = group.reshape(4, 3)[:, 0].tolist()
    assert by_layer == [2, 2, 0, 1]  # passed layers: next iteration; layer 2: the gate's; layer 3: later
    assert ahead.reshape(4, 3)[:, 0].tolist() == [3, 4, 1, 2]
    gate_col = FEATURES.index("gate")
    assert x.reshape(4, 3, -1)[2, :, gate_col].tolist() == pytest.approx([0.7, 0.2, 0.1])


def test_every_feature_column_holds_its_named_value():
    s = NextUseState(2, 2)
    s.start(3, None, None, 4)
    s.router(0, np.array([0.9, 0.1]), np.array([0.6, 0.4]))
    s.used(0, [0])
    x, _, _ = s.features()
    col = {name: x[:, i] for i, name in enumerate(FEATURES)}
    assert col["bias"].tolist() == [1.0] * 4
    assert col["gate"].tolist() == pytest.approx([0.0, 0.0, 0.6, 0.4])  # the gate is layer 1's
    assert col["used this pass"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert col["ewma slow"].tolist() == pytest.approx([0.1, 0.0, 0.0, 0.0])
    assert col["log tokens"].tolist() == pytest.approx([np.log(4)] * 4)
    assert col["request rate"].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])  # one iteration, used in it
    for name in ("semantic", "trajectory", "gate", "ewma slow", "soft ewma", "prompt map"):
        assert col["log " + name] == pytest.approx(np.log(col[name] + 1e-3))


def test_expected_time_grows_as_the_probability_falls():
    weights = [[0.0] * len(FEATURES) for _ in GROUPS]
    for w in weights:
        w[FEATURES.index("ewma slow")] = 20.0
        w[0] = -5.0
    s = NextUseState(2, 2)
    s.start(0, None, None, 1)
    s.router(0, np.full(2, 0.5), None)
    s.used(0, [0])  # expert (0, 0) used: ewma slow 0.1 -> p higher than (0, 1)'s
    p, t = s.next_use(NextUseModel(tuple(tuple(w) for w in weights)))
    assert p[0, 0] > p[0, 1] and t[0, 0] < t[0, 1]


def test_model_shape_is_checked():
    with pytest.raises(ValueError, match=f"{len(GROUPS)} x {len(FEATURES)}"):
        NextUseModel(((1.0, 2.0),) * len(GROUPS))


def test_logistic_recovers_the_sign_and_scale():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(4000), rng.normal(size=4000)])
    y = (rng.random(4000) < 1 / (1 + np.exp(-(0.5 + 2.0 * x[:, 1])))).astype(float)
    w = _logistic(x, y, l2=1e-3, steps=30)
    assert w[0] == pytest.approx(0.5, abs=0.15) and w[1] == pytest.approx(2.0, abs=0.25)


def test_hybrid_evicts_the_latest_and_admits_only_an_earlier_prefetch():
    h = Hybrid(PolicyContext(2, 2, 1, 2, synchronous=True, prefetch_distance=1, tuning=HybridTuning(margin=1.0)))
    h._t = np.array([[3.0, 40.0], [10.0, 9.5]])
    assert h.choose_victim([(0, 0), (0, 1), (1, 0)]) == (0, 1)
    assert h.admit(Prefetch((1, 0), 1.0), (0, 1))  # 10 + 1 < 40
    assert not h.admit(Prefetch((1, 0), 1.0), (1, 1))  # 10 + 1 > 9.5
    assert h.admit(Prefetch((1, 0), 1.0), None)
    with pytest.raises(ValueError, match="margin -1"):
        HybridTuning(margin=-1)
    h.close()


@pytest.mark.parametrize("copy_layers, plans", [(None, True), (0.0, True), (3.9, True), (4.0, False), (13.1, False)])
def test_hybrid_prefetches_only_when_a_copy_can_land_before_its_pass(copy_layers, plans):
    """4 MoE layers: the plan names experts at most 4 layers ahead, so a copy of 4 layer times or
    more cannot land in time and hybrid plans nothing (eviction and admission stay)."""
    h = Hybrid(PolicyContext(4, 4, 1, 4, synchronous=True, prefetch_distance=1, copy_layers=copy_layers))
    h.on_iteration_start(0, torch.ones(1, 8), 5)
    h.on_router(RouterEvent(0, torch.tensor([[0.7, 0.1, 0.1, 0.1]]), torch.tensor([[0.1, 0.6, 0.2, 0.1]])))
    h.on_layer_start(0, [0])
    assert bool(h.prefetch_plan()) == plans
    assert np.isfinite(h._t).all()  # the next-use estimate is kept either way (eviction uses it)
    h.close()


def test_a_model_folder_ships_its_own_next_use_weights(tmp_path):
    import json

    from expertmap.predictor.policies.base import PolicyInputs

    assert Hybrid.tuning_for_model(tmp_path) is None  # no file: the shipped defaults
    weights = [[0.5 * (g + 1)] + [0.0] * (len(FEATURES) - 1) for g in range(len(GROUPS))]
    (tmp_path / "next_use.json").write_text(json.dumps({"features": list(FEATURES), "groups": list(GROUPS), "weights": weights}))
    tuning = Hybrid.tuning_for_model(tmp_path)
    assert tuning.model.weights[2][0] == 1.5 and tuning.model.weights[0][1] == 0.0
    policy = Hybrid(PolicyInputs(synchronous=True, tuning=tuning, prefetch_distance=1).context(2, 4, 1, 2))
    assert policy.model is tuning.model
    (tmp_path / "next_use.json").write_text(json.dumps({"features": ["bias"], "groups": list(GROUPS), "weights": [[1.0]] * 3}))
    with pytest.raises(ValueError, match="next-use weights .*next_use.json: features/groups are not this version's"):
        Hybrid.tuning_for_model(tmp_path)


def test_the_bench_and_the_runtime_give_hybrid_the_folder_weights(tmp_path):
    """PolicyFactory (replay) and ShardRuntime (engine, stages) both read next_use.json."""
    import json
    import shutil

    from expertmap.actors.config import EngineConfig, LinkConfig
    from expertmap.actors.defaults import BUNDLED_MODEL
    from expertmap.actors.engine import OffloadEngine
    from expertmap.bench.run import PolicyFactory

    folder = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, folder)
    weights = [[-1.0 - g] + [0.0] * (len(FEATURES) - 1) for g in range(len(GROUPS))]
    (folder / "next_use.json").write_text(json.dumps({"features": list(FEATURES), "groups": list(GROUPS), "weights": weights}))
    from expertmap.predictor.map_store_memory import InMemoryMapStore

    factory = PolicyFactory(InMemoryMapStore(8, 16, 128, 10, prefetch_distance=2), np.zeros((1, 8, 16)), (8, 16, 2), 2, folder)
    assert factory.inputs("hybrid", None, True).tuning.model.weights[1][0] == -2.0
    assert factory.inputs("on-demand", None, True).tuning is None
    engine = OffloadEngine(EngineConfig(model=folder, policy="hybrid", link=LinkConfig(mode="instant", profile="instant")))
    try:
        assert engine.runtime.policy.model.weights[2][0] == -3.0
    finally:
        engine.close()


def test_the_runtime_counts_the_planner_threads_work_as_prediction_cost():
    """The planner thread's time (busy_s) is part of what prediction costs, beside the callbacks."""
    from expertmap.actors.config import EngineConfig, LinkConfig
    from expertmap.actors.engine import OffloadEngine
    from expertmap.predictor.policies.base import PolicyInputs

    engine = OffloadEngine(EngineConfig(policy="hybrid", link=LinkConfig(mode="instant", profile="instant")),
                           PolicyInputs(planner="thread"))  # fmt: skip
    try:
        engine.generate(engine.tokenizer("The expert map").input_ids, max_new_tokens=6, do_sample=False)
        assert engine.runtime.policy.remote is None and engine.runtime.policy.drain(5)
        state = engine.runtime.policy.core.state  # the prefill reached it as one (its token count > 1):
        assert state.request_iterations == 6  # this request's iterations, counted from its prefill
        assert not np.allclose(state.prompt, 1 / state.J)  # the prompt's routing, as in the fit
        busy = engine.runtime.policy.background_s
        assert busy > 0
        assert engine.prediction_frac == pytest.approx((engine.runtime.policy_s + busy) / engine.runtime.iterations_s)
        assert engine.prediction_frac > engine.overhead_frac > 0
    finally:
        engine.close()


@pytest.mark.parametrize("link, copy_layers, plans", [("instant", 0.0, True), ("ratio:3", 3.0, True),
                                                     ("rtx3090-pcie4-mixtral", 13.1, False)])
def test_the_runtime_tells_the_policy_its_copy_time_in_layers(link, copy_layers, plans):
    from expertmap.actors.config import EngineConfig
    from expertmap.actors.engine import OffloadEngine
    from expertmap.actors.link_profiles import link_config

    engine = OffloadEngine(EngineConfig(policy="hybrid", link=link_config(link)))
    try:
        assert engine.runtime.policy.ctx.copy_layers == pytest.approx(copy_layers, abs=0.05)
        assert engine.runtime.policy.prefetches == plans  # the bundled model has 8 MoE layers
    finally:
        engine.close()
