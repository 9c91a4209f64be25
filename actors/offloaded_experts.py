"""Offload-aware MoE execution through transformers' experts interface.

``expertmap_experts_forward`` is registered in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``
under the name ``"expertmap"`` and selected with ``experts_implementation="expertmap"``: the model's
own router, shared experts, ``generate()`` and router-logit capture keep working; only the routed
experts' computation comes here. Each experts module carries its MoE layer index and the
``ExpertRunner`` of its engine (set by the engine when it attaches).

The computation is the model's eager experts loop, operation for operation: per selected expert,
the same token gather, the same projections (``adapter.expert_forward``), the same routing-weight
product, and ``index_add_`` in ascending expert order. Experts are *computed* in cache order (hits
first, misses as they land) but *accumulated* in expert order, so the output is bit-identical to
the plain model whatever the cache did.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from expertmap.actors.adapters import ArchitectureAdapter
from expertmap.actors.expert_cache import ExpertCache

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "expertmap"


def expertmap_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    runner: ExpertRunner | None = getattr(self, "_expertmap_runner", None)
    if runner is None:
        raise RuntimeError(
            "experts_implementation='expertmap' but this experts module is not attached to an ExpertMap engine"
        )
    return runner.run(self._expertmap_layer, self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, expertmap_experts_forward)


class ExpertRunner:
    """Runs one MoE layer's routed experts from the cache; records the accesses of the run."""

    def __init__(self, adapter: ArchitectureAdapter, cache: ExpertCache, on_layer_start):
        self.adapter = adapter
        self.cache = cache
        self.on_layer_start = on_layer_start  # the policy's callback (timed by the engine)
        self.trace: list[list[list[int]]] = []  # [iteration][layer] -> experts (for the oracle)
        self.num_layers = 0

    def start_iteration(self) -> None:
        self.trace.append([[] for _ in range(self.num_layers)])

    def run(
        self,
        layer: int,
        experts: nn.Module,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, k]
        top_k_weights: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:
        # The one host sync a MoE layer needs: which experts to make resident.
        selected = torch.unique(top_k_index).tolist()
        selected = [e for e in selected if 0 <= e < experts.num_experts]  # drop EP sentinels
        if self.trace:
            self.trace[-1][layer] = selected
        self.on_layer_start(layer, selected)
        self.cache.poke()
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e, w in self.cache.acquire(layer, selected):
            try:
                top_k_pos, token_idx = torch.where((top_k_index == e).T)  # same order as the eager loop
                out = self.adapter.expert_forward(experts, w, hidden_states[token_idx])  # [t, H]
                outputs[e] = (token_idx, out * top_k_weights[token_idx, top_k_pos, None])
            finally:
                self.cache.release((layer, e))
        final = torch.zeros_like(hidden_states)  # [T, H]
        for e in sorted(outputs):
            token_idx, out = outputs[e]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final
