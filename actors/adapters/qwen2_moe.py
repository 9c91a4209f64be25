"""Qwen1.5-MoE / Qwen2-MoE (``qwen2_moe``).

Routed experts sit in ``mlp.experts`` next to a shared expert (``mlp.shared_expert`` gated by
``mlp.shared_expert_gate``), which is not routed and stays resident. Layers listed in
``config.mlp_only_layers``, or not on the ``decoder_sparse_step`` stride, are dense.
The router ``mlp.gate`` returns (logits, top-k weights, top-k indices); softmax of the logits
is the model's own routing distribution (the base ``router_probs``).
"""

from __future__ import annotations

from expertmap.actors.adapters.base import ArchitectureAdapter, gated_mlp_expert, sparse_block


class Qwen2MoeAdapter(ArchitectureAdapter):
    model_types = ("qwen2_moe",)
    mask_rule = "layer_types"

    def moe_block(self, decoder_layer):
        return sparse_block(decoder_layer.mlp)

    def read_expert(self, reader, decoder_index, expert):
        return gated_mlp_expert(reader, decoder_index, expert)
