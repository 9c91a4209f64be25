"""Architecture adapters against tiny real checkpoints of every supported family.

For each family a tiny random model is saved with ``save_pretrained`` and reloaded with the eager
experts loop; the adapter must find its MoE layers, read every expert from the safetensors files
exactly as the loaded fused module holds it, reproduce the eager experts forward bit for bit, and
turn the router's real output into a distribution over experts.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from expertmap.actors.adapters import ADAPTERS, UnsupportedArchitectureError, adapter_for
from expertmap.actors.checkpoint import CheckpointReader
from tests.tiny_models import TINY_CONFIGS, save_tiny

#: family -> (adapter class name, decoder indices of its MoE layers)
EXPECTED = {
    "mixtral": ("MixtralAdapter", [0, 1]),
    "qwen2_moe": ("Qwen2MoeAdapter", [1, 2]),  # mlp_only_layers=[0]
    "qwen3_moe": ("Qwen3MoeAdapter", [0, 1]),
    "olmoe": ("OlmoeAdapter", [0, 1]),
    "phimoe": ("PhimoeAdapter", [0, 1]),
    "deepseek_v2": ("DeepseekV2Adapter", [1, 2]),  # first_k_dense_replace=1
    "deepseek_v3": ("DeepseekV3Adapter", [1, 2]),
    "gpt_oss": ("GptOssAdapter", [0, 1]),
}
TOKENS = 12


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    """(folder, eager model, adapter) for one family."""
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    model = AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager").eval()
    return folder, model, adapter_for(model.config)


def test_every_tiny_family_is_registered():
    assert set(TINY_CONFIGS) == set(EXPECTED)
    assert set(TINY_CONFIGS) <= set(ADAPTERS)


def test_adapter_and_moe_layers(tiny):
    _, model, adapter = tiny
    class_name, decoder_indices = EXPECTED[model.config.model_type]
    assert type(adapter).__name__ == class_name
    layers = adapter.moe_layers(model)
    assert [layer.decoder_index for layer in layers] == decoder_indices
    assert [layer.index for layer in layers] == list(range(len(layers)))
    for layer in layers:
        assert layer.experts.num_experts == adapter.num_experts(model.config)
        assert layer.router.top_k == adapter.top_k(model.config)


def test_read_expert_matches_loaded_module(tiny):
    folder, model, adapter = tiny
    reader = CheckpointReader(folder)
    for layer in adapter.moe_layers(model):
        for e in range(adapter.num_experts(model.config)):
            weights = adapter.read_expert(reader, layer.decoder_index, e)
            assert set(weights) == set(adapter.expert_params)
            for name in adapter.expert_params:
                assert torch.equal(weights[name], getattr(layer.experts, name)[e]), (layer.decoder_index, e, name)


def reference_experts(adapter, experts, weights, hidden, index, top_k_weights):
    """The eager experts loop rebuilt from ``adapter.expert_forward``: experts in ascending order."""
    out = torch.zeros_like(hidden)  # [T, H]
    for e, w in enumerate(weights):
        top_k_pos, token_idx = torch.where((index == e).T)  # over [k, T], as the eager loop orders them
        if token_idx.numel() == 0:
            continue
        y = adapter.expert_forward(experts, w, hidden[token_idx])  # [t, H]
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
    return out


@torch.no_grad()
def test_expert_forward_matches_eager_loop(tiny):
    folder, model, adapter = tiny
    reader = CheckpointReader(folder)
    torch.manual_seed(1)
    hidden = torch.randn(TOKENS, model.config.hidden_size)  # [T, H]
    for layer in adapter.moe_layers(model):
        _, top_k_weights, index = layer.router(hidden)  # [T, k] each
        expected = layer.experts(hidden, index, top_k_weights)  # [T, H]
        weights = [adapter.read_expert(reader, layer.decoder_index, e) for e in range(layer.experts.num_experts)]
        got = reference_experts(adapter, layer.experts, weights, hidden, index, top_k_weights)
        assert torch.equal(got, expected), layer.decoder_index


@torch.no_grad()
def test_router_probs_on_real_router_output(tiny):
    _, model, adapter = tiny
    layers = adapter.moe_layers(model)
    captured = {}
    hooks = [
        layer.router.register_forward_hook(lambda mod, args, out, i=layer.index: captured.__setitem__(i, out))
        for layer in layers
    ]
    try:
        model(torch.arange(3, 3 + TOKENS).reshape(2, TOKENS // 2))
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(captured) == [layer.index for layer in layers]
    for out in captured.values():
        probs = adapter.router_probs(out)  # [T, J]
        assert probs.shape == (TOKENS, adapter.num_experts(model.config))
        assert probs.dtype == torch.float32
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(TOKENS))
        assert probs.argmax(-1).unique().numel() > 1  # routing differs across tokens


def test_unsupported_model_type_lists_supported():
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for(config)
    message = str(err.value)
    assert "llama" in message
    for model_type in ADAPTERS:
        assert model_type in message
