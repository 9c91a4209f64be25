"""Read single tensors (or slices) from a folder of safetensors files, memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointReader:
    """Key -> tensor over ``model.safetensors`` or a sharded ``model.safetensors.index.json``.

    Files are opened once with ``safe_open`` (memory-mapped, so several processes reading the same
    experts share the page cache). Only safetensors are read: no pickle, no code from the folder.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            single = self.folder / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"{self.folder} holds no model.safetensors or model.safetensors.index.json")
            with safe_open(single, "pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        self._file_of = weight_map
        self._handles: dict[str, object] = {}

    def _handle(self, key: str):
        try:
            name = self._file_of[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in the checkpoint at {self.folder}") from None
        if name not in self._handles:
            self._handles[name] = safe_open(self.folder / name, "pt")
        return self._handles[name]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor without reading the rest (safetensors get_slice)."""
        return self._handle(key).get_slice(key)[index]
