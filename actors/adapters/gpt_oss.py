"""GPT-OSS (``gpt_oss``).

Stored fused on disk, in the module's own layout: ``mlp.experts.gate_up_proj`` [E, H, 2I]
(transposed, gate/up interleaved along the last dim), ``gate_up_proj_bias`` [E, 2I],
``down_proj`` [E, I, H], ``down_proj_bias`` [E, H]; one expert is one row of each (read with
``get_row``). OpenAI's release stores MXFP4 ``*_blocks`` / ``*_scales`` instead: only dequantized
(bf16) checkpoints can be read. The router ``mlp.router`` (with a bias) returns (logits, softmax
over the top-k logits, indices); softmax over all logits is the base ``router_probs``, and its
top-k renormalised equals the router's weights. The expert is a clamped SwiGLU
(``experts._apply_gate``) with biases.
"""

from __future__ import annotations

from expertmap.actors.adapters.base import ArchitectureAdapter, aligned, sparse_block


class GptOssAdapter(ArchitectureAdapter):
    model_types = ("gpt_oss",)
    mask_rule = "layer_types"
    expert_params = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

    def moe_block(self, decoder_layer):
        return sparse_block(decoder_layer.mlp)

    def router_of(self, block):
        return block.router

    def mlp_output(self, output):
        return output[0]  # (hidden states, router scores)

    def read_expert(self, reader, decoder_index, expert):
        prefix = f"model.layers.{decoder_index}.mlp.experts"
        if f"{prefix}.gate_up_proj" not in reader and f"{prefix}.gate_up_proj_blocks" in reader:
            raise ValueError(f"{reader.folder} holds MXFP4-quantized GPT-OSS experts; use a dequantized (bf16) copy")
        return {name: aligned(reader.get_row(f"{prefix}.{name}", expert)) for name in self.expert_params}

    def expert_forward(self, experts, w, x):
        """The eager loop's ops: ``x @ gate_up + b``, ``_apply_gate``, ``@ down + b``; x [t, H] -> [t, H]."""
        gate_up = x @ w["gate_up_proj"] + w["gate_up_proj_bias"]  # [t, 2I] interleaved
        gated = experts._apply_gate(gate_up)  # [t, I]
        return gated @ w["down_proj"] + w["down_proj_bias"]  # [t, H]
