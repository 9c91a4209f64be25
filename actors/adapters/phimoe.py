"""Phi-3.5-MoE (``phimoe``).

The router is ``mlp.router``, an ``nn.Linear`` subclass; in transformers 5.x its forward returns
(logits, sparsemixer multipliers, indices) and the base ``router_probs`` takes softmax of the
logits (it also accepts a bare logits tensor). Sparsemixer picks the top-1 logit, then the best
of the rest, so this softmax ranks experts as the router does, although its values are not the
multipliers. On disk the checkpoint keeps the Mixtral names: ``block_sparse_moe.experts.E.w1/w3/w2``
and ``block_sparse_moe.gate.weight``.
"""

from __future__ import annotations

from expertmap.actors.adapters.base import ArchitectureAdapter, gated_from_three, sparse_block


class PhimoeAdapter(ArchitectureAdapter):
    model_types = ("phimoe",)
    mask_rule = "sliding_window"

    def moe_block(self, decoder_layer):
        return sparse_block(decoder_layer.mlp)

    def router_of(self, block):
        return block.router

    def read_expert(self, reader, decoder_index, expert):
        prefix = f"model.layers.{decoder_index}.block_sparse_moe.experts.{expert}"
        return gated_from_three(reader, prefix, "w1", "w3", "w2")
