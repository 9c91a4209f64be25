"""Trace-driven replay of a policy against the expert cache's rules, in virtual time.

Why: at the paper's link ratio a miss costs ~13 layer times, so real-time emulation of hundreds
of prompts x a dozen policies takes hours on a 2-core CPU. The replay runs the *same policy
objects* through the same callbacks the engine makes, and applies the same link rules as
``actors.expert_cache.ExpertCache``, with time counted in decode-layer units:

- a decode layer computes for 1 unit; a prefill layer of T tokens for ``prefill_unit(T)``;
- one expert copy holds the link for ``ratio`` units (the link profile's ratio);
- misses are copied first, in the layer's order; a prefetch already on the link pauses at its
  next chunk boundary (``CHUNKS`` per copy) and resumes after them; while misses wait no
  prefetch starts; a prefetch starts only on an idle link, taken from the policy's plan at that
  moment, into a free slot or a victim the policy admits;
- a layer computes its resident experts first, then each miss as it lands.

The engine's bench runs (real threads, real emulated link) validate the replay on a subset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from expertmap.actors.cache_stats import CacheStats
from expertmap.actors.trace_recorder import RequestTrace
from expertmap.predictor.policies.base import Key, Policy, Prefetch, RouterEvent


CHUNKS = 8  # as actors.transfer.TransferEngine.chunks


def prefill_unit(tokens: int) -> float:
    """Compute time of a prefill layer relative to a decode layer (memory-bound up to ~32 tokens)."""
    return max(1.0, tokens / 32.0)


@dataclass
class SimResult:
    stats: CacheStats = field(default_factory=CacheStats)
    iteration_units: list[float] = field(default_factory=list)  # decode iterations only
    prefill_units: list[float] = field(default_factory=list)
    link_busy_units: float = 0.0
    host_busy_units: float = 0.0  # HostReplayCache: time the host lane computed experts


class ReplayCache:
    def __init__(self, policy: Policy, num_slots: int, ratio: float):
        self.policy = policy
        self.slots = num_slots
        self.ratio = ratio
        self.resident: set[Key] = set()
        self.in_flight: tuple[Key, float, bool] | None = None  # (key, lands at, is prefetch)
        self.paused: tuple[Key, float] | None = None  # a prefetch paused for misses: (key, units left)
        self.link_free = 0.0
        self.pins: set[Key] = set()
        self.unused_prefetch: set[Key] = set()
        self.late_prefetch: set[Key] = set()
        self.result = SimResult()
        policy.contains = self.contains

    @property
    def stats(self) -> CacheStats:
        return self.result.stats

    def contains(self, key: Key) -> bool:
        return (
            key in self.resident
            or (self.in_flight is not None and self.in_flight[0] == key)
            or (self.paused is not None and self.paused[0] == key)
        )

    def preload(self, keys: list[Key]) -> None:
        for key in keys[: self.slots]:
            self.resident.add(key)
            self.policy.on_insert(key, prefetched=False)

    # --- link ---------------------------------------------------------------------------------
    def _start_planned(self, start: float, started: set[Key]) -> None:
        """Start the policy's best wanted prefetch at ``start`` if it may come in now; a better
        one that cannot come in blocks the worse ones (as the cache's link worker does)."""
        for want in sorted(self.policy.prefetch_plan(), key=lambda p: -p.priority):
            if self.contains(want.key) or (self.ratio == 0 and want.key in started):
                continue
            if self._make_room(want.key, want):
                self._start(want.key, start, True)
                started.add(want.key)
            break

    def _land(self) -> None:
        key, _, is_prefetch = self.in_flight
        self.in_flight = None
        self.resident.add(key)
        late = key in self.late_prefetch
        self.late_prefetch.discard(key)
        self.stats.count_copy(1, is_prefetch, late)  # bytes in expert units here
        if is_prefetch and not late:
            self.unused_prefetch.add(key)
        self.policy.on_insert(key, prefetched=is_prefetch)

    def _make_room(self, key: Key, prefetch: Prefetch | None) -> bool:
        if len(self.resident) + (self.in_flight is not None) + (self.paused is not None) < self.slots:  # a paused prefetch keeps its slot
            return prefetch is None or self.policy.admit(prefetch, None)
        candidates = [k for k in self.resident if k not in self.pins]
        if not candidates and prefetch is None and self.paused is not None:
            self.paused = None  # the layer needs every slot: the prefetch paused for it gives its slot up
            return True
        if not candidates:
            if prefetch is None:
                raise RuntimeError("replay: every slot is pinned by the computing layer (budget below one layer)")
            return False
        victim = self.policy.choose_victim(candidates, key)
        if prefetch is not None and not self.policy.admit(prefetch, victim):
            return False
        self.resident.discard(victim)
        self.unused_prefetch.discard(victim)
        self.policy.on_evict(victim)
        return True

    def _start(self, key: Key, at: float, is_prefetch: bool) -> None:
        self.in_flight = (key, at + self.ratio, is_prefetch)
        self.link_free = at + self.ratio
        self.result.link_busy_units += self.ratio

    def advance(self, until: float) -> None:
        """Run the link up to time ``until``: land finished copies, start prefetches on an idle link."""
        started: set[Key] = set()  # an instant link (ratio 0): each expert once per call, so the loop ends
        while True:
            if self.in_flight is not None:
                if self.in_flight[1] > until:
                    return
                self._land()
            start = self.link_free
            if start >= until or not self.policy.ctx.prefetch:
                self.link_free = max(self.link_free, until)
                return
            self._start_planned(start, started)
            if self.in_flight is None:  # nothing admissible now: idle until the next event
                self.link_free = until
                return

    def load_now(self, key: Key, at: float) -> float:
        """A miss at time ``at``: copy ``key`` on demand; return when it lands.

        A prefetch of another expert on the link pauses at its next chunk boundary (``resume``
        restarts it after the layer's misses); a prefetch of this very expert just completes.
        """
        if key in self.resident:  # its prefetch landed while this layer's earlier misses loaded
            return at
        if self.in_flight is not None:
            fkey, lands, is_prefetch = self.in_flight
            if fkey == key or not is_prefetch or self.ratio == 0:
                self._land()
                self.link_free = max(self.link_free, lands)
                if fkey == key:
                    return lands
            else:
                chunk = self.ratio / CHUNKS
                started = lands - self.ratio
                boundary = started + chunk * np.ceil(max(0.0, at - started) / chunk - 1e-9)
                if boundary >= lands:
                    self._land()
                    self.link_free = lands
                else:
                    self.paused = (fkey, lands - boundary)
                    self.in_flight = None
                    self.link_free = boundary
        start = max(at, self.link_free)
        self._make_room(key, None)
        self._start(key, start, False)
        lands = self.in_flight[1]
        self._land()
        return lands

    def resume(self) -> None:
        """After a layer's misses: the paused prefetch continues where it stopped."""
        if self.paused is not None:
            key, remaining = self.paused
            self.paused = None
            self.in_flight = (key, self.link_free + remaining, True)
            self.link_free += remaining

    def on_router(self, layer: int, probs: np.ndarray) -> None:
        """The layer's router distribution [T, J], before its experts run (HostReplayCache counts
        each expert's tokens from it)."""

    # --- one layer ----------------------------------------------------------------------------
    def _access(self, layer: int, experts: list[int]) -> tuple[list[Key], list[Key]]:
        """Count the layer's accesses, tell the policy, pin them; (hits, misses) in order."""
        hits, misses = [], []
        for e in experts:
            key = (layer, e)
            hit = key in self.resident
            self.stats.count_access(hit, key in self.unused_prefetch)
            self.unused_prefetch.discard(key)
            self.policy.on_access(key, hit)
            self.pins.add(key)
            (hits if hit else misses).append(key)
        return hits, misses

    def _copy_miss(self, key: Key, t: float, cursor: float, per_expert: float) -> float:
        """A miss that waits for its copy: loaded on demand at ``t`` (a paused prefetch of it
        resumes), the wait beyond ``cursor`` counted as stall; when the expert has computed."""
        if self.paused is not None and self.paused[0] == key:
            self.resume()  # promoted: the paused prefetch is what this miss waits for
        lands = self.load_now(key, t)
        if lands > cursor:
            self.stats.stall_s += lands - cursor  # in layer units here
            cursor = lands
        return cursor + per_expert

    def run_layer(self, layer: int, experts: list[int], t: float, compute: float) -> float:
        """Access a layer's experts at time t; return when the layer has finished computing."""
        self.advance(t)
        hits, misses = self._access(layer, experts)
        if self.in_flight is not None and self.in_flight[2] and self.in_flight[0] in misses:
            self.late_prefetch.add(self.in_flight[0])  # its prefetch was on the link at the access
        per_expert = compute / max(1, len(experts))
        cursor = t + per_expert * len(hits)
        for key in misses:
            cursor = self._copy_miss(key, t, cursor, per_expert)
        self.resume()
        self.pins.clear()
        return max(cursor, t + compute)


def replay(
    policy: Policy,
    traces: list[RequestTrace],
    num_slots: int,
    ratio: float,
    resident_keys: list[Key] | None = None,
    make_cache=None,
) -> SimResult:
    """``make_cache``: builds the cache (default ``ReplayCache``); e.g. bench/attribution.py's
    ``AttributedCache``, which records where each access's hit or miss came from."""
    cache = (make_cache or ReplayCache)(policy, num_slots, ratio)
    if policy.all_resident and resident_keys:
        cache.preload(resident_keys)
    t = 0.0
    iteration = -1
    for req in traces:
        policy.on_request_start()
        for it in req.iterations:
            iteration += 1
            t0 = t
            policy.on_iteration_start(iteration, torch.from_numpy(it.embedding)[None], it.num_tokens)
            compute = prefill_unit(it.num_tokens)
            for layer, (probs, gate, experts) in enumerate(zip(it.probs, it.next_gate, it.selected)):
                cache.advance(t)
                policy.on_router(RouterEvent(layer, torch.from_numpy(probs), None if gate is None else torch.from_numpy(gate)))
                policy.on_layer_start(layer, experts)
                cache.on_router(layer, probs)
                t = cache.run_layer(layer, experts, t, compute)
            policy.on_iteration_end(iteration)
            (cache.result.prefill_units if it.num_tokens > 1 else cache.result.iteration_units).append(t - t0)
    policy.close()
    return cache.result


def access_trace(traces: list[RequestTrace]) -> list[list[list[int]]]:
    """The oracle's input: [iteration][layer] -> experts, over the whole replay."""
    return [it.selected for req in traces for it in req.iterations]


def summarize_units(units: list[float]) -> dict[str, float]:
    if not units:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    a = np.asarray(units)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


# --- a host path (--miss host|auto; actors/host_compute.py) -------------------------------------------
class HostReplayCache(ReplayCache):
    """The replay with misses that may be computed on the host, as ``actors.expert_cache`` does
    with a host path, in the same virtual time:

    - one expert on the host for t tokens holds the host lane (serial) for
      ``decode_ratio x max(1, t / crossover)`` units (``actors.host_compute.host_units``);
    - per miss, in the layer's order: ``auto`` computes it on the host when the host would be done
      before its copy would land (the link's queue as ``load_now`` would find it), ``host``
      always; policies with ``host_misses`` (host-all, host-static) always; a miss on the host
      queues no copy and pauses no prefetch;
    - the device computes its hits and copied misses; the layer ends when both are done;
    - when the plan has nothing to start, the newest host-computed expert not resident is copied
      in the background if ``Policy.admit_host_copy`` admits it (preemptible like a prefetch).
    """

    def __init__(self, policy: Policy, num_slots: int, ratio: float, mode: str = "auto",
                 decode_ratio: float = 1.0, crossover_tokens: float = 32.0):  # fmt: skip
        super().__init__(policy, num_slots, ratio)
        if mode not in ("host", "auto"):
            raise ValueError(f"host replay mode {mode!r}: use host or auto (copy is ReplayCache)")
        self.mode = "host" if policy.host_misses else mode
        self.decode_ratio = decode_ratio
        self.crossover = crossover_tokens
        self.host_free = 0.0
        self.host_recent: dict[Key, None] = {}  # insertion-ordered: newest last
        self.background: set[Key] = set()
        self._tokens: dict[int, int] = {}
        static = policy.static_keys()
        if static:
            self.preload(static)

    def on_router(self, layer, probs):
        if probs.shape[0] == 1:
            self._tokens = {}
            return
        top = np.argsort(-probs, axis=1, kind="stable")[:, : self.policy.ctx.top_k]
        self._tokens = dict(zip(*np.unique(top, return_counts=True)))

    def host_units(self, tokens: int) -> float:
        return self.decode_ratio * max(1.0, tokens / self.crossover)

    def _copy_lands(self, key: Key, t: float) -> float:
        """When a copy of ``key`` asked for at ``t`` would land (``load_now``'s rules, no change made)."""
        if self.in_flight is not None:
            fkey, lands, is_prefetch = self.in_flight
            if fkey == key:
                return lands
            free = lands
            if is_prefetch and self.ratio > 0:
                chunk = self.ratio / CHUNKS
                started = lands - self.ratio
                free = min(lands, started + chunk * np.ceil(max(0.0, t - started) / chunk - 1e-9))
            return max(t, free) + self.ratio
        if self.paused is not None and self.paused[0] == key:
            return max(t, self.link_free) + self.paused[1]
        return max(t, self.link_free) + self.ratio

    def _land(self):
        key, lands, _ = self.in_flight
        if key in self.background:  # a background copy of a host-computed expert: not a prediction
            self.background.discard(key)
            self.in_flight = (key, lands, False)
        super()._land()

    def advance(self, until: float) -> None:
        """``ReplayCache.advance``, and a background copy of a host-computed expert when the plan
        has nothing to start."""
        started: set[Key] = set()
        while True:
            if self.in_flight is not None:
                if self.in_flight[1] > until:
                    return
                self._land()
            start = self.link_free
            if start >= until:
                self.link_free = max(self.link_free, until)
                return
            if self.policy.ctx.prefetch:
                self._start_planned(start, started)
            while self.in_flight is None and self.host_recent:
                key = next(reversed(self.host_recent))
                del self.host_recent[key]
                if self.contains(key) or key in started or not self._room_for_host_copy(key):
                    continue
                self.background.add(key)
                self._start(key, start, True)
                started.add(key)
            if self.in_flight is None:  # nothing admissible now: idle until the next event
                self.link_free = until
                return

    def _room_for_host_copy(self, key: Key) -> bool:
        if len(self.resident) + (self.in_flight is not None) + (self.paused is not None) < self.slots:
            return self.policy.admit_host_copy(key, None)
        candidates = [k for k in self.resident if k not in self.pins]
        if not candidates:
            return False
        victim = self.policy.choose_victim(candidates, key)
        if not self.policy.admit_host_copy(key, victim):
            return False
        self.resident.discard(victim)
        self.unused_prefetch.discard(victim)
        self.policy.on_evict(victim)
        return True

    def run_layer(self, layer, experts, t, compute):
        self.advance(t)
        hits, misses = self._access(layer, experts)
        per_expert = compute / max(1, len(experts))
        cursor = t + per_expert * len(hits)
        host_end = t
        for key in misses:
            if key in self.resident:  # its prefetch landed during the layer's earlier misses
                cursor += per_expert
                continue
            h = self.host_units(int(self._tokens.get(key[1], 1)))
            host_done = max(t, self.host_free) + h
            if self.mode == "host" or host_done < self._copy_lands(key, t):
                self.host_free = host_done
                host_end = host_done
                self.result.host_busy_units += h
                self.stats.host_computed += 1
                if not self.contains(key):
                    self.host_recent.pop(key, None)
                    self.host_recent[key] = None
                    while len(self.host_recent) > max(1, self.policy.ctx.num_layers):
                        del self.host_recent[next(iter(self.host_recent))]
                continue
            if self.in_flight is not None and self.in_flight[0] == key and self.in_flight[2]:
                self.late_prefetch.add(key)
            cursor = self._copy_miss(key, t, cursor, per_expert)
        self.resume()
        self.pins.clear()
        end = max(cursor, t + compute)
        if host_end > end:
            self.stats.stall_s += host_end - end
        return max(end, host_end)


def host_cache(mode: str, decode_ratio: float, crossover_tokens: float):
    """``replay``'s ``make_cache`` for a host path (``mode`` host or auto)."""
    return lambda policy, num_slots, ratio: HostReplayCache(policy, num_slots, ratio, mode, decode_ratio, crossover_tokens)
