"""Host (CPU) copies of routed experts, read one expert at a time from the checkpoint."""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from expertmap.actors.adapters import ArchitectureAdapter, MoELayer
from expertmap.actors.checkpoint import CheckpointReader
from expertmap.actors.quantize import PRECISIONS, expert_at
from expertmap.predictor.policies.base import Key

logger = logging.getLogger(__name__)


class HostExpertStore:
    """All routed experts of the given MoE layers, in host memory, in the fused-module layout.

    Read per expert from safetensors (memory-mapped), cast to the model's dtype, and pinned when
    the device is CUDA so that copies can be asynchronous. Each stage holds only its own layers.
    """

    def __init__(
        self,
        adapter: ArchitectureAdapter,
        reader: CheckpointReader,
        layers: list[MoELayer],
        num_experts: int,
        dtype: torch.dtype,
        pin: bool,
        progress: bool = True,
    ):
        self._experts: dict[Key, dict[str, torch.Tensor]] = {}
        todo = [(layer, e) for layer in layers for e in range(num_experts)]
        for layer, e in tqdm(todo, desc="reading experts", unit="expert", disable=not progress, leave=False):
            tensors = adapter.read_expert(reader, layer.decoder_index, e)
            tensors = {n: t.to(dtype).contiguous() for n, t in tensors.items()}
            if pin:
                tensors = {n: t.pin_memory() for n, t in tensors.items()}
            self._experts[(layer.index, e)] = tensors
        first = next(iter(self._experts.values()))
        self.shapes = {n: t.shape for n, t in first.items()}
        self.expert_bytes = sum(t.numel() * t.element_size() for t in first.values())
        self.dtype = dtype
        self._lossy: dict[tuple[Key, str], dict[str, torch.Tensor]] = {}
        self.precision_bytes = {p: expert_at(first, p)[1] for p in PRECISIONS}  # bytes on the link
        logger.info("host store: %d experts, %.1f KiB each", len(self._experts), self.expert_bytes / 1024)

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor]:
        return self._experts[key]

    def at_precision(self, key: Key, precision: str = "full") -> dict[str, torch.Tensor]:
        """A lossy copy ('int4', 'int2': quantised then de-quantised), made once and kept."""
        if precision == "full":
            return self._experts[key]
        cached = self._lossy.get((key, precision))
        if cached is None:
            cached, nbytes = expert_at(self._experts[key], precision)
            self.precision_bytes[precision] = nbytes
            self._lossy[(key, precision)] = cached
        return cached

    def __len__(self) -> int:
        return len(self._experts)

    def keys(self) -> list[Key]:
        return list(self._experts)

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes * len(self._experts)
