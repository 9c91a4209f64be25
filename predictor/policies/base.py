"""The policy interface: what a cache asks of a prediction/eviction strategy.

A policy sees the run through a few callbacks on the compute thread (cheap: they must not block)
and answers two questions for the cache:

- ``choose_victim(candidates)``: which resident expert to evict (eviction rule);
- ``prefetch_plan()``: which experts to copy ahead, with priorities (prediction). The cache polls
  it whenever the link would otherwise idle; the plan is advisory and may change at any time.

Bookkeeping is plain Python over ``Key = (moe_layer, expert)``; policies never touch tensors
except the router probabilities they are shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import numpy as np
import torch

from expertmap.actors import defaults

Key = tuple[int, int]  # (MoE layer index, expert index)


class RouterEvent:
    """What a policy learns when a layer's router has run (before that layer's experts compute).

    ``probs``: [T, J] router distribution of this iteration's tokens (a device tensor in the engine;
    convert off the critical path). ``next_gate()``: [T, J] distribution that the *next* MoE layer's
    router gives when applied to this layer's router input (Fate's cross-layer gate), or None for
    the last layer. Computed only when called. ``router_input``: this layer's router input [T, H]
    (None where it is not known: an earlier stage's replayed layer); a planner outside this
    interpreter applies ``PolicyContext.linear_routers`` to it.
    """

    __slots__ = ("layer", "probs", "router_input", "_next_gate", "_next_value")

    def __init__(self, layer: int, probs: torch.Tensor, next_gate=None, router_input: torch.Tensor | None = None):
        self.layer = layer
        self.probs = probs
        self.router_input = router_input
        self._next_gate = next_gate  # callable -> tensor, a tensor, or None
        self._next_value = None

    def next_gate(self) -> torch.Tensor | None:
        if self._next_value is None and self._next_gate is not None:
            self._next_value = self._next_gate() if callable(self._next_gate) else self._next_gate
        return self._next_value


DEFAULT_PREFETCH_DISTANCE = defaults.PREFETCH_DISTANCE  # layers ahead (docs/policies.md)
PLANNERS = ("process", "thread")


@dataclass(frozen=True, kw_only=True)
class PolicyInputs:
    """What a run hands its policy besides the cache's shape; each policy class says which it
    needs (``needs_store``, ``needs_trace``, ``needs_eams``). ``PolicyContext`` adds the shape."""

    prefetch_distance: int = DEFAULT_PREFETCH_DISTANCE
    #: the expert-map store (a ``predictor.replica.StoreReplica``) for map-searching policies
    replica: Any = None
    #: publish each finished iteration's map to ``replica`` (a pipeline: only its last stage does)
    publish: bool = True
    #: the run's future accesses, [iteration][moe layer] -> experts (the oracle)
    trace: list | None = None
    #: earlier requests' expert activation matrices [R, L, J] (MoE-Infinity)
    eams: np.ndarray | None = None
    #: run background planning inline (trace-driven replay, tests)
    synchronous: bool = False
    #: the policy's own tuning: an instance of its ``Tuning`` dataclass; None: its defaults
    tuning: Any = None
    #: warm-up usage counts [L, J]: how often each expert was selected in the warm-up traces (host-static)
    usage: np.ndarray | None = None
    #: one expert copy's time in decode-layer times (the link's ratio; 0: instant); None: not known
    copy_layers: float | None = None
    #: where a policy's background planning runs: "process" (a planner process of its own, for
    #: the policies that have one: hybrid) or "thread" (a thread of this interpreter);
    #: ``synchronous`` runs it inline whatever this says
    planner: str = "process"
    #: {MoE layer: its router as a NumPy ``LinearRouter``} for this cache's layers, and the router
    #: input's width: a planner outside this interpreter computes each layer's distribution and
    #: the cross-layer gate from the router input (the runtime fills them for ``needs_linear_routers``)
    linear_routers: dict | None = None
    hidden_size: int | None = None

    def __post_init__(self):
        if self.planner not in PLANNERS:
            raise ValueError(f"PolicyInputs.planner={self.planner!r}: use one of {', '.join(PLANNERS)}")

    def context(self, num_layers: int, num_experts: int, top_k: int, num_slots: int, prefetch: bool = True,
                layers: tuple[int, ...] | None = None, **overrides) -> PolicyContext:  # fmt: skip
        given = {f.name: getattr(self, f.name) for f in fields(PolicyInputs)}
        return PolicyContext(num_layers, num_experts, top_k, num_slots, prefetch, layers=layers, **{**given, **overrides})


@dataclass(frozen=True)
class PolicyContext(PolicyInputs):
    """What a run hands its policy: the cache's shape, and the inputs (``PolicyInputs``)."""

    num_layers: int  # MoE layers L
    num_experts: int  # routed experts per layer J
    top_k: int
    num_slots: int  # cache capacity in experts
    prefetch: bool = True  # False: eviction rule alone (ablation)
    #: The MoE layers whose experts this cache holds (a pipeline stage's shard); None: all L.
    #: Layer indices stay global: a stage's policy still sees the trajectory of earlier stages.
    layers: tuple[int, ...] | None = field(default=None, kw_only=True)

    @property
    def owned_layers(self) -> tuple[int, ...]:
        return tuple(range(self.num_layers)) if self.layers is None else self.layers


@dataclass(frozen=True)
class NoTuning:
    """A policy without tunable settings."""


@dataclass(frozen=True)
class Prefetch:
    key: Key
    priority: float  # higher first


@dataclass
class Position:
    """Where the computation is: iteration number and the MoE layer now computing."""

    iteration: int = -1
    layer: int = -1


class Policy:
    """Base class: LRU eviction, no prefetching. Subclasses override what differs."""

    name = "base"
    #: resident experts are loaded before the run and never evicted
    all_resident = False
    #: output equals the un-offloaded model's (False: quantised transfers, e.g. fate-lossy)
    lossless = True
    #: it copies experts ahead of use (so "no prefetch" is a meaningful ablation)
    predictive = False
    #: which ``PolicyContext`` inputs it needs
    needs_store = False
    needs_trace = False
    needs_eams = False
    needs_usage = False
    needs_linear_routers = False  # its planner applies the routers outside torch (PolicyContext.linear_routers)
    plan_sorted = False  # its prefetch_plan comes highest priority first (the cache need not sort it)
    #: every miss is computed on the host, whatever the miss mode (host-all, host-static)
    host_misses = False
    #: its settings; ``ctx.tuning`` must be an instance (or None for the defaults)
    Tuning: type = NoTuning

    @classmethod
    def tuning_for_model(cls, folder) -> Any:
        """Settings this policy ships with a model folder (e.g. weights fitted on that model's
        warm-up traces); None: the defaults. Used when the caller gives no tuning."""
        return None

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        tuning = self.Tuning() if ctx.tuning is None else ctx.tuning
        if not isinstance(tuning, self.Tuning):
            raise TypeError(f"policy {self.name!r} takes tuning {self.Tuning.__name__}, got {type(tuning).__name__}")
        self.tuning = tuning
        self.pos = Position()
        self._recency: dict[Key, int] = {}
        self._clock = 0

    def reset(self) -> None:
        """Forget run history (the cache was emptied). Subclasses clear their own state too."""
        self.pos = Position()
        self._recency.clear()
        self._clock = 0

    # --- run callbacks (compute thread) ------------------------------------------------------
    def on_iteration_start(self, iteration: int, embedding: torch.Tensor | None, tokens: int = 1) -> None:
        """A new iteration; ``embedding`` is its semantic embedding [B, D] (token-embedding output,
        pooled per request); ``tokens`` the most tokens one request computes in it (a prefill's
        prompt length, 1 when every request decodes)."""
        self.pos = Position(iteration, -1)

    def on_router(self, event: RouterEvent) -> None:
        """A layer's router ran; see ``RouterEvent``. Must return quickly (compute thread)."""

    def on_layer_start(self, layer: int, experts: list[int]) -> None:
        self.pos.layer = layer

    def on_iteration_end(self, iteration: int) -> None:
        pass

    def on_request_start(self) -> None:
        """A new request (prompt) begins; its prefill is the next iteration."""

    def on_hint(self, embeddings: np.ndarray) -> int:
        """An earlier pipeline stage has embedded the micro-batch that comes here next
        (``embeddings`` [B, D]): a policy may plan the copies it wants before the activations
        arrive. Called on a control thread beside the computation; the next
        ``on_iteration_start`` supersedes it. Returns how many experts it planned (default: 0)."""
        return 0

    def close(self) -> None:
        """Stop background work."""

    @property
    def background_s(self) -> float:
        """Seconds of work on the policy's own threads so far (its planner; default: none)."""
        return 0.0

    @property
    def process_s(self) -> float:
        """CPU seconds of the policy's work in a process of its own (its planner process; default:
        none): work off this interpreter, on another core where there is one."""
        return 0.0

    # --- cache callbacks (under the cache lock) ----------------------------------------------
    def on_access(self, key: Key, hit: bool) -> None:
        self._clock += 1
        self._recency[key] = self._clock

    def on_insert(self, key: Key, prefetched: bool) -> None:
        self._clock += 1
        self._recency.setdefault(key, self._clock)

    def on_evict(self, key: Key) -> None:
        self._recency.pop(key, None)

    def choose_victim(self, candidates: list[Key], incoming: Key | None = None) -> Key:
        """Which of ``candidates`` (resident, not in use) to evict for ``incoming``. Default: LRU."""
        return min(candidates, key=lambda k: self._recency.get(k, 0))

    def prefetch_plan(self) -> Iterable[Prefetch]:
        """The experts to copy ahead (a list, or an iterable read once), any order unless
        ``plan_sorted`` says it comes highest priority first."""
        return []

    def precision(self, key: Key, prefetch: bool) -> str:
        """How ``key`` travels and is cached: 'full' (lossless, the default), 'int4' or 'int2'."""
        return "full"

    def admit(self, prefetch: Prefetch, victim: Key | None) -> bool:
        """May ``prefetch`` evict ``victim`` (None: a free slot)? Default: only into free slots."""
        return victim is None

    def admit_host_copy(self, key: Key, victim: Key | None) -> bool:
        """An expert a miss just computed on the host (``--miss host|auto``): copy it in the
        background, when the link has nothing planned, over ``victim`` (the policy's own
        ``choose_victim``; None: a free slot)? Default: yes, as a copy-mode miss would be."""
        return True

    def static_keys(self) -> list[Key]:
        """Experts the cache holds for the whole run, loaded before it (default: none)."""
        return []
