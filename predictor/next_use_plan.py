"""`hybrid`'s planning, NumPy only: events in, the expected time to next use and a prefetch plan out.

``NextUsePlanner`` is fed the run's events (iteration start, a layer's router distribution and
the cross-layer gate, a layer's chosen experts) and, when asked to ``plan``, turns the
``NextUseState`` into:

- ``t`` [L, J]: each (layer, expert)'s expected layers to its next use (the cache evicts the
  largest, admits a prefetch only over a later one);
- ``plan_keys`` / ``plan_t``: the experts of this cache's layers to copy ahead, soonest expected
  use first, at most as many as the cache holds (flat keys ``layer * J + expert``).

The same object runs inline (the replay, tests), on the policy's planner thread, or in a planner
process of its own (``predictor.planner_process``): it touches no tensors and imports no torch.
"""

from __future__ import annotations

import numpy as np

from expertmap.predictor.next_use import NextUseModel, NextUseState

UNKNOWN = 1e6  # expected layers to next use before any estimate


class NextUsePlanner:
    def __init__(self, num_layers: int, num_experts: int, owned_layers, num_slots: int, model: NextUseModel,
                 min_p: float = 0.0, prefetches: bool = True, distance=None):  # fmt: skip
        """``distance``: a ``DistanceModel`` whose predicted layers to next use order the experts
        (None: the next-pass model's ``ahead + (1 - p) L / q``)."""
        self.L, self.J = num_layers, num_experts
        self.distance = distance
        self.owned = np.zeros(num_layers, bool)
        self.owned[list(owned_layers)] = True
        self.num_slots = num_slots
        self.model = model
        self.min_p = min_p
        self.prefetches = prefetches
        self.index = None
        self.reset()

    def reset(self) -> None:
        self.state = NextUseState(self.L, self.J)
        self.t = np.full((self.L, self.J), UNKNOWN)  # [L, J]
        self.plan_keys = np.zeros(0, np.int64)  # [S] flat keys, soonest first
        self.plan_t = np.zeros(0)  # [S]

    # --- events -------------------------------------------------------------------------------
    def start(self, iteration: int, embedding: np.ndarray | None, tokens: int) -> None:
        self.state.start(iteration, self.index, embedding, tokens)

    def router(self, layer: int, distribution: np.ndarray, gate: np.ndarray | None) -> None:
        """Layer ``layer``'s mean router distribution [J]; ``gate`` [J]: the next layer's router on
        this layer's router input, max over tokens (None: not known)."""
        self.state.router(layer, distribution, gate)

    def used(self, layer: int, experts) -> None:
        self.state.used(layer, experts)

    def plans_after_router(self, layer: int) -> bool:
        """A layer this cache computes is followed at once by its use event, which plans (one plan
        per layer); an earlier stage's layer (its trajectory replayed) has no use event."""
        return not self.owned[layer]

    # --- planning -----------------------------------------------------------------------------
    def plan(self) -> None:
        p, t = self.state.next_use(self.model, self.distance)  # [L, J] each
        self.t = t
        if not self.prefetches:
            return
        t = np.where(self.owned[:, None] & (p >= self.min_p), t, np.inf).reshape(-1)  # [L*J]
        order = np.argsort(t, kind="stable")[: self.num_slots]
        order = order[np.isfinite(t[order])]
        self.plan_keys, self.plan_t = order, t[order]
