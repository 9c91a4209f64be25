"""The fine-grained bundled model (expertmap-moe-fine): its shape, offline loading by name, and an
offloaded greedy run equal to transformers' ``generate``.

The lossless tests of every policy and budget run on both bundled models in test_lossless.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from expertmap.actors.config import EngineConfig, LinkConfig, require_model_folder
from expertmap.actors.defaults import BUNDLED_MODELS
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.model_folder import load_plain_model

FINE = "expertmap-moe-fine"
INSTANT = LinkConfig(mode="instant", profile="instant")


def test_fine_model_has_the_fine_grained_shape():
    folder = require_model_folder(FINE)  # by name, as --model takes it
    assert folder == BUNDLED_MODELS[FINE]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe"
    assert cfg["num_experts"] >= 60 and cfg["num_experts_per_tok"] >= 4 and cfg["num_hidden_layers"] >= 12
    assert cfg["shared_expert_intermediate_size"] > 0  # Qwen1.5-MoE's shared expert
    assert cfg["mlp_only_layers"] == [] and cfg["decoder_sparse_step"] == 1  # every layer is MoE
    assert cfg["dtype"] == "bfloat16"
    model = load_plain_model(folder)
    layer = model.model.layers[0].mlp
    assert layer.experts.gate_up_proj.shape == (cfg["num_experts"], 2 * cfg["moe_intermediate_size"], cfg["hidden_size"])
    assert next(model.parameters()).dtype == torch.bfloat16


def test_fine_model_loads_offline_by_name_from_the_command_line(tmp_path):
    """`expertmap generate --model expertmap-moe-fine` from an empty folder with the hub switched off."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-m", "expertmap.cluster.cli", "generate", "--model", FINE, "--prompt", "The river",
         "--max-new-tokens", "4", "--budget", "0.125"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "The river" in out.stdout
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


def test_fine_model_offloaded_greedy_equals_generate():
    folder = BUNDLED_MODELS[FINE]
    plain = load_plain_model(folder)
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(folder)("Once upon a time, in a small village,").input_ids
    ids = torch.tensor([prompt])
    expected = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
    engine = OffloadEngine(EngineConfig(model=folder, policy="on-demand", budget=0.125, link=INSTANT))
    try:
        g = engine.generate(prompt, max_new_tokens=12)
        assert g.token_ids == expected
        assert g.stats.misses > 0 and g.stats.accesses > 0  # experts really came through the cache
        assert engine.num_experts >= 60 and engine.top_k >= 4
    finally:
        engine.close()


def test_model_names_resolve_everywhere_and_bad_names_say_what_exists():
    import pytest

    from expertmap.cluster.serve_args import AppArgs

    for name, folder in BUNDLED_MODELS.items():
        assert require_model_folder(name) == folder
        assert AppArgs(model=name).model_path == folder
        assert EngineConfig(model=name).model == folder
    with pytest.raises(ValueError, match=r"'expertmap-moe-huge' does not exist: neither a folder nor a bundled model name \(expertmap-moe-tiny, expertmap-moe-fine\)"):
        require_model_folder("expertmap-moe-huge")
