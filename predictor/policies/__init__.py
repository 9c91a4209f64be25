"""Policies by name. One file per strategy; ``make_policy(name, ctx)`` builds one."""

from __future__ import annotations

from expertmap.predictor.policies.base import Key, Policy, PolicyContext, PolicyInputs, Position, Prefetch
from expertmap.predictor.policies.fate import Fate, FateLossy
from expertmap.predictor.policies.finemoe import FineMoE
from expertmap.predictor.policies.host_all import HostAll
from expertmap.predictor.policies.host_static import HostStatic
from expertmap.predictor.policies.hybrid import Hybrid
from expertmap.predictor.policies.lfu import LFU
from expertmap.predictor.policies.mixtral_offloading import MixtralOffloading
from expertmap.predictor.policies.moe_infinity import MoEInfinity
from expertmap.predictor.policies.on_demand import OnDemandLRU
from expertmap.predictor.policies.oracle import AccessTrace, Oracle
from expertmap.predictor.policies.resident import Resident

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (Resident, OnDemandLRU, LFU, Oracle, FineMoE, Fate, FateLossy, MoEInfinity, MixtralOffloading,
              Hybrid, HostAll, HostStatic)
}
POLICIES["lru"] = OnDemandLRU


class UnknownPolicyError(ValueError):
    pass


def policy_class(name: str) -> type[Policy]:
    """The registered class of ``name`` (its flags say what it needs and whether it is lossless)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(f"unknown policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}") from None


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    return policy_class(name)(ctx)


__all__ = [
    "POLICIES",
    "AccessTrace",
    "Key",
    "Policy",
    "PolicyContext",
    "PolicyInputs",
    "Position",
    "Prefetch",
    "UnknownPolicyError",
    "make_policy",
    "policy_class",
]
