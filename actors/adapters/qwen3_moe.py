"""Qwen3-MoE (``qwen3_moe``).

Like Qwen2-MoE without the shared expert: ``mlp.gate`` returns (logits, top-k weights, top-k
indices), softmax of the logits is the routing distribution. ``mlp_only_layers`` /
``decoder_sparse_step`` can make layers dense.
"""

from __future__ import annotations

from expertmap.actors.adapters.base import ArchitectureAdapter, gated_mlp_expert, sparse_block


class Qwen3MoeAdapter(ArchitectureAdapter):
    model_types = ("qwen3_moe",)
    mask_rule = "sliding_window"

    def moe_block(self, decoder_layer):
        return sparse_block(decoder_layer.mlp)

    def read_expert(self, reader, decoder_index, expert):
        return gated_mlp_expert(reader, decoder_index, expert)
