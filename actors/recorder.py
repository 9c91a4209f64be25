"""Routing recorder: each iteration's expert map and semantic embedding, one host sync per iteration.

Forward hooks (the supported seam) on the token-embedding layer and on every MoE router keep
device tensors during the iteration; ``finish_iteration`` stacks them and copies them to the
host once. No per-layer device-to-host synchronisation is added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from expertmap.actors.adapters import ArchitectureAdapter, MoELayer
from expertmap.predictor.policies.base import RouterEvent


@dataclass
class IterationRecord:
    """One iteration of a batch of B sequences."""

    iteration: int
    expert_map: np.ndarray  # [B, L, J] float32: mean router distribution over the iteration's tokens
    embedding: np.ndarray  # [B, D] float32: token-embedding output, mean over the iteration's tokens
    num_tokens: int  # tokens per sequence in this iteration (prompt length at prefill, 1 at decode)


class RoutingRecorder:
    def __init__(self, adapter: ArchitectureAdapter, layers: list[MoELayer], on_router=None, on_embedding=None):
        self.adapter = adapter
        self.num_layers = len(layers)
        self.on_router = on_router  # callback(RouterEvent) for predictors
        self.on_embedding = on_embedding  # callback(embedding [B, D]) at the start of an iteration
        self._routers = [layer.router for layer in layers]
        self.records: list[IterationRecord] = []
        self.keep = True  # keep records in memory (False: only the latest)
        self._shape: tuple[int, int] | None = None
        self._probs: list[torch.Tensor | None] = [None] * len(layers)
        self._embedding: torch.Tensor | None = None
        self._handles = [layer.router.register_forward_hook(self._router_hook(layer.index)) for layer in layers]

    def attach_embedding(self, embed: nn.Module) -> None:
        self._handles.append(embed.register_forward_hook(self._embed_hook))

    def _embed_hook(self, module, args, output):
        # output: [B, S, D]
        self._shape = (output.shape[0], output.shape[1])
        self._embedding = output.detach().float().mean(dim=1)  # [B, D]
        if self.on_embedding is not None:
            self.on_embedding(self._embedding)

    def _router_hook(self, index: int):
        def hook(module, args, output):
            probs = self.adapter.router_probs(output).detach()  # [T, J]
            if self.on_router is not None:
                self.on_router(RouterEvent(index, probs, self._next_gate(index, args[0])))
            if self._shape is not None:
                b, s = self._shape
                self._probs[index] = probs.view(b, s, -1).mean(dim=1)  # [B, J]

        return hook

    def _next_gate(self, index: int, router_input: torch.Tensor):
        """Deferred: the next MoE layer's router applied to this layer's router input (no hooks fire)."""
        if index + 1 >= self.num_layers:
            return None
        nxt = self._routers[index + 1]
        return lambda: self.adapter.router_probs(nxt.forward(router_input.detach())).detach()

    def finish_iteration(self, iteration: int) -> IterationRecord | None:
        if self._shape is None or any(p is None for p in self._probs):
            return None
        maps = torch.stack(self._probs, dim=1)  # [B, L, J]
        record = IterationRecord(
            iteration=iteration,
            expert_map=maps.cpu().numpy(),
            embedding=self._embedding.cpu().numpy(),
            num_tokens=self._shape[1],
        )
        if self.keep:
            self.records.append(record)
        else:
            self.records = [record]
        self._probs = [None] * self.num_layers
        self._shape = None
        return record

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
