"""OLMoE (``olmoe``).

Every layer is sparse. ``config.num_experts`` (aliased as ``num_local_experts``) counts experts;
``mlp.gate`` returns (logits, top-k weights, top-k indices), softmax of the logits is the routing
distribution.
"""

from __future__ import annotations

from expertmap.actors.adapters.base import ArchitectureAdapter, gated_mlp_expert, sparse_block


class OlmoeAdapter(ArchitectureAdapter):
    model_types = ("olmoe",)

    def moe_block(self, decoder_layer):
        return sparse_block(decoder_layer.mlp)

    def read_expert(self, reader, decoder_index, expert):
        return gated_mlp_expert(reader, decoder_index, expert)
