"""Mixtral (and Mixtral-architecture models such as the bundled one)."""

from __future__ import annotations

from expertmap.actors.adapters.base import ArchitectureAdapter, gated_from_three


class MixtralAdapter(ArchitectureAdapter):
    model_types = ("mixtral",)
    mask_rule = "sliding_window"

    def moe_block(self, decoder_layer):
        return decoder_layer.mlp

    def read_expert(self, reader, decoder_index, expert):
        prefix = f"model.layers.{decoder_index}.block_sparse_moe.experts.{expert}"
        return gated_from_three(reader, prefix, "w1", "w3", "w2")
