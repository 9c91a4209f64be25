"""A router as NumPy, for a planner that runs without torch (predictor/planner_child.py).

From a layer's router input it gives the layer's own distribution (its router) and Fate's
cross-layer gate (the next layer's router on the same input). Where the router is a linear map
followed by a fixed activation (every bundled family's is), ``LinearRouter`` holds its weight and
computes the same distribution from NumPy arrays; the adapter builds one and checks it against
the torch router (``ArchitectureAdapter.linear_router``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTIVATIONS = ("softmax", "sigmoid")  # "sigmoid": sigmoid scores over their row sum (DeepSeek-V3)


@dataclass(frozen=True)
class LinearRouter:
    weight: np.ndarray  # [J, H] float32
    bias: np.ndarray | None  # [J] or None
    activation: str = "softmax"
    #: the model sends each token to the top ``top_k`` of this distribution (None: its choice is
    #: made otherwise, e.g. with a bias or a group limit, and must be told)
    top_k: int | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LinearRouter activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if self.weight.ndim != 2:
            raise ValueError(f"LinearRouter weight must be [J, H], got shape {self.weight.shape}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """[T, J] distribution over experts for router inputs ``x`` [T, H]."""
        logits = x @ self.weight.T  # [T, J]
        if self.bias is not None:
            logits = logits + self.bias
        if self.activation == "softmax":
            z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        else:
            z = 1.0 / (1.0 + np.exp(-logits))
        return z / z.sum(axis=-1, keepdims=True)

    def chosen(self, probs: np.ndarray) -> list[int]:
        """The experts the tokens of ``probs`` [T, J] go to: the union of each row's top ``top_k``."""
        top = np.argpartition(-probs, self.top_k - 1, axis=-1)[:, : self.top_k]  # [T, k]
        return np.unique(top).tolist()
