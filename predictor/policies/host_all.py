"""`host-all`: every routed expert computed on the host, nothing cached on the device.

What llama.cpp's ``--cpu-moe`` and Fiddler without a cache do: the device runs attention, the
router and the shared experts; every routed expert is computed by the host CPU from host memory
and only activations cross the link. Every access is a miss computed on the host
(actors/host_compute.py), whatever ``--miss`` says; the device's expert slots stay empty.
"""

from expertmap.predictor.policies.base import Policy


class HostAll(Policy):
    name = "host-all"
    host_misses = True

    def admit_host_copy(self, key, victim):
        return False
