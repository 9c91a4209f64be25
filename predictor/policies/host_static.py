"""`host-static`: the experts most used in warm-up traces pinned on the device, the rest on the host.

What kTransformers and llama.cpp's ``--n-cpu-moe`` do: a fixed placement decided before the run.
The ``num_slots`` experts (of this cache's layers) selected most often in the warm-up traces
(``PolicyContext.usage``, [L, J] counts) are loaded before the run and never evicted; every other
access is a miss computed on the host (actors/host_compute.py), whatever ``--miss`` says, and is
never copied. Ties go to the lower (layer, expert).
"""

from __future__ import annotations

import numpy as np
from expertmap.predictor.policies.base import Key, Policy


class HostStatic(Policy):
    name = "host-static"
    host_misses = True
    needs_usage = True

    def __init__(self, ctx):
        super().__init__(ctx)
        usage = ctx.usage
        if usage is None:
            raise ValueError("the host-static policy needs warm-up usage counts (PolicyInputs.usage, [L, J]: "
                             "how often each expert was selected in warm-up traces; `expertmap bench` passes them)")  # fmt: skip
        usage = np.asarray(usage, dtype=np.float64)
        if usage.shape != (ctx.num_layers, ctx.num_experts):
            raise ValueError(f"host-static usage counts have shape {usage.shape}, the model needs "
                             f"({ctx.num_layers}, {ctx.num_experts}) (MoE layers x experts)")  # fmt: skip
        keys = [(layer, e) for layer in ctx.owned_layers for e in range(ctx.num_experts)]
        keys.sort(key=lambda k: (-usage[k], k))
        self._pinned: list[Key] = keys[: ctx.num_slots]

    def static_keys(self):
        return list(self._pinned)

    def admit_host_copy(self, key, victim):
        return False
