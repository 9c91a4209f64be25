"""The architecture adapter interface: where a transformers 5.x MoE model keeps its routers and experts.

An adapter answers four questions for one model family, and nothing else:
- which decoder layers are MoE layers, and their router / experts modules (``moe_layers``);
- how to turn the router's output into a probability distribution over routed experts
  (``router_probs``), for the expert map;
- how to read one expert's weights from the checkpoint files, in the layout of the fused
  ``experts`` module (``read_expert``);
- how to compute one expert's output for some tokens with those weights (``expert_forward``),
  with exactly the operations of the model's own eager experts loop, so offloaded output is
  bit-identical to the plain model.

Shared experts and dense layers are not routed: they stay in the model, resident on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expertmap.predictor.linear_router import ACTIVATIONS, LinearRouter

if TYPE_CHECKING:
    from expertmap.actors.checkpoint import CheckpointReader


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a loaded model."""

    index: int  # MoE layer number 0..L-1 (dense layers are not counted)
    decoder_index: int  # position in model.model.layers
    router: nn.Module  # forward hook on it sees the router output
    experts: nn.Module  # the fused experts module (transformers' @use_experts_implementation class)


class ArchitectureAdapter(ABC):
    """Base class; one subclass per model family, registered in ``actors.adapters``."""

    #: ``config.model_type`` values this adapter serves.
    model_types: tuple[str, ...] = ()
    #: Parameter names on the experts module that hold per-expert weights, first dim = expert.
    expert_params: tuple[str, ...] = ("gate_up_proj", "down_proj")
    #: How the family's decoder picks each layer's attention mask (mirrors its ``Model.forward``):
    #: "full" (always causal), "sliding_window" (sliding for every layer when ``config.sliding_window``
    #: is set) or "layer_types" (``config.layer_types[i]``). A pipeline stage rebuilds the masks itself.
    mask_rule: str = "full"

    # --- model shape -------------------------------------------------------------------------
    def attention_type(self, config: Any, decoder_index: int) -> str:
        """'full_attention' or 'sliding_attention' for one decoder layer, as the family's forward decides."""
        if self.mask_rule == "layer_types" and getattr(config, "layer_types", None):
            return config.layer_types[decoder_index]
        if self.mask_rule == "sliding_window" and getattr(config, "sliding_window", None) is not None:
            return "sliding_attention"
        return "full_attention"

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, "num_local_experts", None) or config.num_experts)

    def top_k(self, config: Any) -> int:
        return int(config.num_experts_per_tok)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    @abstractmethod
    def moe_block(self, decoder_layer: nn.Module) -> nn.Module | None:
        """The sparse MoE block of one decoder layer, or None for a dense layer."""

    def router_of(self, block: nn.Module) -> nn.Module:
        return block.gate

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        layers = []
        for decoder_index, decoder_layer in enumerate(self.decoder_layers(model)):
            block = self.moe_block(decoder_layer)
            if block is None:
                continue
            layers.append(MoELayer(len(layers), decoder_index, self.router_of(block), block.experts))
        return layers

    def batches_decode_attention(self, config: Any) -> bool:
        """Whether the decode rows of several requests may share one masked attention call
        (``actors/batched_attention.py``); otherwise each request attends alone."""
        return True

    # --- the decoder layer's two halves ---------------------------------------------------------
    # Every supported family's decoder layer is ``h + attn(norm1(h))`` then ``h + mlp(norm2(h))``;
    # the shard runtime runs the first half per request (each over its own KV cache) and the second
    # once over the micro-batch's tokens, so the router and each expert run once for all of them.
    def attention_half(self, layer: nn.Module, hidden: torch.Tensor, **attention) -> torch.Tensor:
        """``hidden + self_attn(input_layernorm(hidden))`` [1, T, H], as the layer's own forward."""
        out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **attention)
        return hidden + out

    def mlp_half(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden + mlp(post_attention_layernorm(hidden))`` [1, T, H] (dense or MoE)."""
        return hidden + self.mlp_output(layer.mlp(layer.post_attention_layernorm(hidden)))

    def mlp_output(self, output: Any) -> torch.Tensor:
        """The hidden states of the family's ``mlp`` output (GPT-OSS also returns router scores)."""
        return output

    # --- routing ------------------------------------------------------------------------------
    def router_probs(self, router_output: Any) -> torch.Tensor:
        """[T, J] float32 distribution over routed experts from the router module's output."""
        logits = router_output[0] if isinstance(router_output, tuple) else router_output
        return torch.softmax(logits.float(), dim=-1)

    #: each token goes to the top-k experts of ``router_probs`` (False where a bias or a group
    #: limit decides: a planner process must then be told the choice)
    selects_top_k = True

    def linear_router(self, router: nn.Module, top_k: int) -> LinearRouter | None:
        """``router`` as NumPy (its weight, bias and activation) for a planner without torch, or
        None where it is not a linear map with one of ``linear_router.ACTIVATIONS``: the candidate
        must give ``router_probs(router(x))`` on random input to 1e-2 (bf16 routers round)."""
        weight, bias = getattr(router, "weight", None), getattr(router, "bias", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        w = weight.detach().float().cpu().numpy()  # [J, H]
        b = bias.detach().float().cpu().numpy() if isinstance(bias, torch.Tensor) else None
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, w.shape[1], generator=gen).to(weight.dtype)  # [4, H]
        with torch.no_grad():
            # forward, not __call__: the check is of the router's own map, not of any observer hooked to it
            want = self.router_probs(router.forward(x.to(weight.device))).float().cpu().numpy()  # [4, J]
        for activation in ACTIVATIONS:
            gate = LinearRouter(w, b, activation, top_k if self.selects_top_k else None)
            if want.shape == (4, w.shape[0]) and np.abs(gate(x.float().numpy()) - want).max() < 1e-2:
                return gate
        return None

    # --- weights ------------------------------------------------------------------------------
    @abstractmethod
    def read_expert(self, reader: CheckpointReader, decoder_index: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's tensors from the checkpoint, named and shaped like ``experts.<param>[expert]``."""

    def expert_forward(self, experts: nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Un-weighted output of one expert for tokens x [t, H] -> [t, H] (gated, concatenated layout)."""
        gate, up = F.linear(x, w["gate_up_proj"]).chunk(2, dim=-1)  # [t, I] each
        return F.linear(experts.act_fn(gate) * up, w["down_proj"])  # [t, H]


def every_head_has_its_kv(config: Any) -> bool:
    """Multi-head latent attention (DeepSeek) expands its cached latents to every query head, but
    transformers' sdpa decode path, given a mask, packs the query by ``num_attention_heads //
    num_key_value_heads`` groups all the same and mis-shapes it: batch only when that is 1."""
    return getattr(config, "num_key_value_heads", None) in (None, config.num_attention_heads)


def gated_from_three(reader: CheckpointReader, prefix: str, gate: str, up: str, down: str) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors (gate [I,H], up [I,H], down [H,I]) -> fused-module layout."""
    g = reader.get(f"{prefix}.{gate}.weight")
    u = reader.get(f"{prefix}.{up}.weight")
    return {"gate_up_proj": torch.cat([g, u], dim=0), "down_proj": aligned(reader.get(f"{prefix}.{down}.weight"))}


ALIGNMENT = 64  # bytes; torch's CPU allocator aligns every allocation to this


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if contiguous and 64-byte aligned, else a copy in torch-allocated memory.

    safetensors hands out tensors at file offsets (8-byte aligned) or in 32-byte-aligned buffers;
    CPU kernels may take a different, not bit-identical path for misaligned operands (seen: a
    one-token ``F.linear`` off by 1 ulp), so expert weights must sit where the model's own
    parameters would.
    """
    if t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def sparse_block(block: nn.Module) -> nn.Module | None:
    """``block`` if it is a sparse MoE block (has a fused ``experts`` module), else None (dense MLP).

    Families with dense layers (DeepSeek ``first_k_dense_replace``, Qwen-MoE ``mlp_only_layers`` /
    ``decoder_sparse_step``) build a plain MLP there; checking the module built follows whatever
    rule the modeling code used, instead of re-deriving it from the config.
    """
    return block if isinstance(getattr(block, "experts", None), nn.Module) else None


def gated_mlp_expert(reader: CheckpointReader, decoder_index: int, expert: int) -> dict[str, torch.Tensor]:
    """The common on-disk layout ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``."""
    prefix = f"model.layers.{decoder_index}.mlp.experts.{expert}"
    return gated_from_three(reader, prefix, "gate_proj", "up_proj", "down_proj")
