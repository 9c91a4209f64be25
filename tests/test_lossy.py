"""Fate's lossy mode: the quantiser's error and byte counts, the precision rules, and that the
lossy engine really moves fewer bytes (while plain `fate` stays lossless: test_lossless.py)."""

from __future__ import annotations

import pytest
import torch

from expertmap.actors.config import EngineConfig, LinkConfig
from expertmap.actors.quantize import expert_at, quantize_dequantize
from expertmap.predictor.policies import PolicyContext, make_policy
from expertmap.predictor.policies.base import RouterEvent


def test_quantiser_error_and_bytes():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q4, b4 = quantize_dequantize(w, 4, 64)
    q2, b2 = quantize_dequantize(w, 2, 32)
    assert q4.shape == w.shape and q4.dtype == w.dtype
    assert b4 == 64 * 256 // 2 + (64 * 256 // 64) * 4 and b2 == 64 * 256 // 4 + (64 * 256 // 32) * 4
    err4, err2 = (q4 - w).abs().max().item(), (q2 - w).abs().max().item()
    rng = (w.max() - w.min()).item()
    assert 0 < err4 < rng / 15 and err4 < err2 < rng / 3 + 1e-3  # half a level at most, per group
    assert len(torch.unique(q2.reshape(-1, 32)[0])) <= 4
    with pytest.raises(ValueError, match="group size"):
        quantize_dequantize(torch.randn(4, 30), 4, 64)
    bias = torch.randn(64)
    tensors, nbytes = expert_at({"w": w, "bias": bias}, "int4")
    assert torch.equal(tensors["bias"], bias) and torch.equal(tensors["w"], q4)  # 1-D stays full
    assert nbytes == b4 + 64 * 4


def test_fate_lossy_precision_rules():
    policy = make_policy("fate-lossy", PolicyContext(4, 8, 2, 8, True))
    gate = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0]])
    policy.on_router(RouterEvent(1, gate, gate))
    plan = policy.prefetch_plan()
    assert [p.key for p in plan] == [(2, 0), (2, 1), (2, 2)]  # top-(k+1)
    assert policy.precision((2, 0), prefetch=True) == "int4"
    assert policy.precision((2, 2), prefetch=True) == "int2"  # least popular of the prediction
    assert policy.precision((3, 5), prefetch=False) == "int2"  # on-demand loads
    assert policy.precision((0, 1), prefetch=False) == "full"  # layer 0 kept full
    assert make_policy("fate", PolicyContext(4, 8, 2, 8, True)).precision((2, 0), True) == "full"


def test_lossy_engine_moves_fewer_bytes(bundled_model):
    from expertmap.actors.engine import OffloadEngine

    link = LinkConfig(mode="instant", profile="instant")
    moved = {}
    for policy in ("fate", "fate-lossy"):
        engine = OffloadEngine(EngineConfig(model=bundled_model.folder, policy=policy, budget=0.25, link=link))
        try:
            g = engine.generate("The history of the city", max_new_tokens=8)
            moved[policy] = g.stats.bytes_moved / g.stats.copies
        finally:
            engine.close()
    assert moved["fate-lossy"] < moved["fate"] / 4  # INT4/INT2 of float32 weights
