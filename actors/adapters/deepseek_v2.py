"""DeepSeek-V2 / V2-Lite (``deepseek_v2``).

The first ``config.first_k_dense_replace`` layers are dense; the others hold ``n_routed_experts``
routed experts plus ``mlp.shared_experts`` (resident, not routed). The router ``mlp.gate``
returns (float32 logits, top-k weights * routed_scaling_factor, top-k indices); softmax of the
logits is the router's own score (the base ``router_probs``). With
``topk_method="group_limited_greedy"`` the router also masks groups, which this distribution
does not apply.
"""

from __future__ import annotations

from expertmap.actors.adapters.base import ArchitectureAdapter, every_head_has_its_kv, gated_mlp_expert, sparse_block


class DeepseekV2Adapter(ArchitectureAdapter):
    selects_top_k = False  # a group limit (and for V3 a score bias) decides the choice
    model_types = ("deepseek_v2",)

    def num_experts(self, config):
        return int(config.n_routed_experts)

    def batches_decode_attention(self, config):
        return every_head_has_its_kv(config)

    def moe_block(self, decoder_layer):
        return sparse_block(decoder_layer.mlp)

    def read_expert(self, reader, decoder_index, expert):
        return gated_mlp_expert(reader, decoder_index, expert)
