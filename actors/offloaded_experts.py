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

With a host path (``--miss host|auto``, actors/host_compute.py) the misses the cache sends to the
host are started there first (the same ``adapter.expert_forward`` on the host copy of the
weights), the device computes its hits and copied misses meanwhile, and the host results join the
accumulation in the same expert order.
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
        self.host = None  # actors.host_compute.HostCompute (set by attach_host_compute), or None: copy mode

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
        if self.host is not None:
            self._run_with_host(layer, experts, hidden_states, top_k_index, top_k_weights, selected, outputs)
        else:
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

    def _run_with_host(self, layer, experts, hidden_states, top_k_index, top_k_weights, selected, outputs) -> None:
        """The loop above with a host path: host jobs start first, device experts meanwhile."""
        valid = top_k_index[(top_k_index >= 0) & (top_k_index < experts.num_experts)]
        counts = torch.bincount(valid.flatten(), minlength=experts.num_experts).tolist()
        tokens = {e: counts[e] for e in selected}
        pending = []
        for e, w in self.cache.acquire(layer, selected, tokens):
            try:
                top_k_pos, token_idx = torch.where((top_k_index == e).T)  # same order as the eager loop
                if w is None:  # computed on the host, beside the device
                    job = self.host.submit(self.adapter, experts, (layer, e), hidden_states[token_idx])
                    pending.append((e, top_k_pos, token_idx, job))
                    continue
                out = self.adapter.expert_forward(experts, w, hidden_states[token_idx])  # [t, H]
                outputs[e] = (token_idx, out * top_k_weights[token_idx, top_k_pos, None])
            finally:
                self.cache.release((layer, e))
        waited = 0.0
        for e, top_k_pos, token_idx, job in pending:
            out, w_s = self.host.result(job)
            waited += w_s
            outputs[e] = (token_idx, out * top_k_weights[token_idx, top_k_pos, None])
        if pending:
            self.cache.count_host_wait(waited)
