"""DeepSeek-V3 / R1 (``deepseek_v3``).

The first ``config.first_k_dense_replace`` layers are dense; the others hold ``n_routed_experts``
routed experts plus ``mlp.shared_experts`` (resident, not routed). Released checkpoints are FP8
(``weight_scale_inv`` next to each weight): ``read_expert`` reads the stored tensors as they are,
so use a bf16/fp32 conversion. Extra multi-token-prediction layers on disk are never asked for.
"""

from __future__ import annotations

import torch

from expertmap.actors.adapters.base import ArchitectureAdapter, every_head_has_its_kv, gated_mlp_expert, sparse_block


class DeepseekV3Adapter(ArchitectureAdapter):
    selects_top_k = False  # a group limit (and for V3 a score bias) decides the choice
    model_types = ("deepseek_v3",)

    def num_experts(self, config):
        return int(config.n_routed_experts)

    def batches_decode_attention(self, config):
        return every_head_has_its_kv(config)

    def moe_block(self, decoder_layer):
        return sparse_block(decoder_layer.mlp)

    def router_probs(self, router_output):
        """Normalised sigmoid scores, [T, J].

        The router returns raw float32 logits but routes by ``sigmoid(logits)`` (plus
        ``e_score_correction_bias`` and a group limit for the choice, which this does not apply,
        then top-k weights renormalised). Dividing the sigmoid scores by their row sum gives a
        distribution over experts with the same ranking as the unbiased scores.
        """
        logits = router_output[0] if isinstance(router_output, tuple) else router_output
        scores = torch.sigmoid(logits.float())  # [T, J]
        return scores / scores.sum(dim=-1, keepdim=True)

    def read_expert(self, reader, decoder_index, expert):
        return gated_mlp_expert(reader, decoder_index, expert)
