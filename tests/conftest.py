"""Shared fixtures: the bundled model, and a real redis-server on a free loopback port."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.config import BUNDLED_MODEL

logging.getLogger("transformers").setLevel(logging.ERROR)


@dataclass
class BundledModel:
    folder: Path
    tokenizer: object
    top_k: int
    total_experts: int

    @property
    def smallest_budget(self) -> float:
        return self.top_k / self.total_experts + 1e-9


@pytest.fixture(scope="session")
def bundled_model() -> BundledModel:
    from transformers import AutoConfig, AutoTokenizer

    assert (BUNDLED_MODEL / "model.safetensors").exists(), f"bundled model missing at {BUNDLED_MODEL}"
    cfg = AutoConfig.from_pretrained(BUNDLED_MODEL)
    return BundledModel(
        BUNDLED_MODEL,
        AutoTokenizer.from_pretrained(BUNDLED_MODEL),
        cfg.num_experts_per_tok,
        cfg.num_local_experts * cfg.num_hidden_layers,
    )


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
