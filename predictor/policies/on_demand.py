"""`on-demand`: load on a miss, evict the least recently used expert (the base policy's rules)."""

from expertmap.predictor.policies.base import Policy


class OnDemandLRU(Policy):
    name = "on-demand"
