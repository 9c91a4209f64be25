"""The CUDA path: pinned host store, copy stream + events, tokens identical on the GPU."""

from __future__ import annotations

import pytest
import torch

from expertmap.actors.config import EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.model_folder import load_plain_model
from expertmap.actors.transfer import CudaTransfer

pytestmark = pytest.mark.gpu


def test_cuda_offloaded_tokens_identical_and_copies_real(bundled_model):
    ids = bundled_model.tokenizer("def fibonacci(n):\n    ").input_ids
    plain = load_plain_model(bundled_model.folder).to("cuda")
    x = torch.tensor([ids], device="cuda")
    expected = plain.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    expected = expected[0, len(ids) :].tolist()
    del plain
    for budget in (1.0, 0.25, bundled_model.smallest_budget):
        engine = OffloadEngine(EngineConfig(model=bundled_model.folder, device="cuda", budget=budget, link=LinkConfig(mode="cuda")))
        try:
            assert isinstance(engine.cache.transfer, CudaTransfer)
            assert all(t.is_pinned() for t in engine.host[(0, 0)].values())
            g = engine.generate(ids, max_new_tokens=16)
            assert g.token_ids == expected, f"budget {budget}"
            assert g.stats.bytes_moved > 0
        finally:
            engine.close()
