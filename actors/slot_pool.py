"""Fixed-size expert slots on the device: one stacked tensor per expert parameter."""

from __future__ import annotations

import torch


class SlotPool:
    """``num_slots`` slots, each able to hold one expert (all routed experts share one shape).

    Tensors only; which expert sits in which slot is the cache's bookkeeping.
    """

    def __init__(self, num_slots: int, shapes: dict[str, torch.Size], dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self.tensors = {name: torch.empty((num_slots, *shape), dtype=dtype, device=device) for name, shape in shapes.items()}

    def view(self, slot: int) -> dict[str, torch.Tensor]:
        return {name: t[slot] for name, t in self.tensors.items()}

    def write(self, slot: int, host: dict[str, torch.Tensor], non_blocking: bool = False) -> None:
        for name, t in self.tensors.items():
            t[slot].copy_(host[name], non_blocking=non_blocking)
