"""The budgeted device expert cache: fixed slots, bookkeeping in plain Python, copies on a worker.

State of one expert key (MoE layer, expert):
  absent -> loading (a copy job queued or on the link) -> resident (in a slot) -> absent (evicted)

Rules of the link (one worker thread, one copy at a time, non-preemptive):
- On-demand loads (misses) are served first, in the order the layer asked for them.
- While any on-demand load is waiting, no prefetch starts ("pause on miss").
- A prefetch starts only when the link is idle and no miss waits; it is taken from the policy's
  current plan (highest priority first) at that moment, so a plan that changed never leaves
  stale copies queued: there is no prefetch queue to go stale. A prefetch must find a free slot,
  or a victim the policy admits (``Policy.admit``).
- A prefetch already on the link pauses at its next chunk boundary while the waiting misses are
  copied, then resumes (the link is preemptible at chunk granularity, as chunked DMA is).
- A miss on an expert whose prefetch is already on the link waits for that copy (a miss, with
  its wait counted as stall time); nothing is copied twice.

Experts in use by the computing layer are pinned: never chosen as victims. Everything else is
the policy's choice (``Policy.choose_victim``).

With a host path (``--miss host|auto``: ``self.host``, set by ``actors.host_compute.attach_host_compute``)
each miss may instead be computed on the host (``HostCompute.choose``: the cost model, against
this link's queue); such a miss queues no copy, so prefetching goes on. When the link has nothing
from the plan to copy, the experts computed on the host most recently (newest first) are copied in
the background if the policy admits them (``Policy.admit_host_copy``), preemptible at chunk
boundaries as prefetches are. In ``copy`` mode none of this runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from expertmap.actors.cache_stats import CacheStats
from expertmap.actors.slot_pool import SlotPool
from expertmap.actors.transfer import TransferEngine
from expertmap.predictor.policies.base import Key, Policy, Prefetch

logger = logging.getLogger(__name__)


class CacheBudgetError(ValueError):
    pass


class ExpertCache:
    def __init__(
        self,
        pool: SlotPool,
        transfer: TransferEngine,
        policy: Policy,
        host_weights: Callable[..., dict[str, torch.Tensor]],
        expert_bytes: int,
        name: str = "cache",
        precision_bytes: dict[str, int] | None = None,
    ):
        self.pool = pool
        self.transfer = transfer
        self.policy = policy
        self.host_weights = host_weights
        self.expert_bytes = expert_bytes
        self.precision_bytes = precision_bytes or {"full": expert_bytes}
        self.stats = CacheStats()
        #: CPU seconds the worker spent deciding what to copy (the policy's plan, victims,
        #: admission; not its waits for the interpreter): Python on this interpreter, so it holds
        #: up a Python-bound compute thread
        self.decisions_s = 0.0
        self._cv = threading.Condition()
        self._slot_of: dict[Key, int] = {}  # resident
        self._loading: dict[Key, bool] = {}  # key -> is_prefetch (queued on demand, or on the link)
        self._demand: deque[Key] = deque()  # on-demand jobs not yet started
        self._free: list[int] = list(range(pool.num_slots - 1, -1, -1))
        self._pins: dict[Key, int] = {}
        self._unused_prefetch: set[Key] = set()  # prefetched, not yet accessed
        self._late_prefetch: set[Key] = set()  # accessed while its prefetch was still on the link
        self.host = None  # actors.host_compute.HostCompute: misses that may be computed on the host
        self._host_recent: OrderedDict[Key, None] = OrderedDict()  # computed on the host, not yet copied
        self._background: set[Key] = set()  # host-computed experts being copied in the background
        self._on_link: tuple[Key, bool, float, float] | None = None  # (key, prefetch, started, seconds)
        self._wake = False
        self._stop = False
        self._error: BaseException | None = None
        policy.contains = self.contains
        owned = policy.ctx.layers  # a pipeline stage's shard: plans may name other stages' layers
        self._owned: frozenset[int] | None = None if owned is None else frozenset(owned)
        self._worker = threading.Thread(target=self._run, name=f"{name}-link", daemon=True)
        self._worker.start()
        self._static = list(policy.static_keys())  # held for the whole run (host-static)
        if self._static:
            self.preload(self._static)

    # --- queries ------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.pool.num_slots

    def contains(self, key: Key) -> bool:
        """Resident or being loaded (called under the lock by policies, or by tests)."""
        return key in self._slot_of or key in self._loading

    def resident_keys(self) -> set[Key]:
        with self._cv:
            return set(self._slot_of)

    # --- compute-thread API -------------------------------------------------------------------
    def acquire(
        self, layer: int, experts: list[int], tokens: dict[int, int] | None = None
    ) -> Iterator[tuple[int, dict[str, torch.Tensor] | None]]:
        """Yield (expert, device weights) for every selected expert of ``layer``.

        With a host path, the misses it computes on the host come first, as (expert, None): the
        caller starts them on the host at once. Then the resident experts (computed while the
        misses load), then each copied miss as its copy lands. ``tokens``: each expert's number of
        tokens (the host's cost; default 1). The caller must call ``release`` for each expert once
        its kernels are issued.
        """
        misses: list[Key] = []
        ready: list[Key] = []
        hosted: list[Key] = []
        with self._cv:
            self._check_worker()
            if len(experts) and self.pool.num_slots < 1:
                raise CacheBudgetError("the expert cache has no slots")
            for e in experts:
                key = (layer, e)
                hit = key in self._slot_of
                self.stats.count_access(hit, key in self._unused_prefetch)
                self._unused_prefetch.discard(key)
                self.policy.on_access(key, hit)
                self._pins[key] = self._pins.get(key, 0) + 1
                if hit:
                    ready.append(key)
                elif self.host is not None and self._to_host(key, (tokens or {}).get(e, 1)):
                    hosted.append(key)
                else:
                    misses.append(key)
                    if key not in self._loading:
                        self._loading[key] = False
                        self._demand.append(key)
                        self.transfer.demand.set()  # a prefetch on the link pauses at its next chunk
                    elif self._loading[key]:
                        self._late_prefetch.add(key)
            if misses or hosted:
                self._wake = True
                self._cv.notify_all()
        for key in hosted:
            yield key[1], None
        for key in ready:
            yield key[1], self.pool.view(self._slot_of[key])
        for key in misses:
            with self._cv:
                if key not in self._slot_of:
                    t0 = time.perf_counter()
                    while key not in self._slot_of:
                        self._check_worker()
                        self._cv.wait(timeout=1.0)
                    self.stats.stall_s += time.perf_counter() - t0
                slot = self._slot_of[key]
            yield key[1], self.pool.view(slot)

    def _to_host(self, key: Key, tokens: int) -> bool:
        """Under the lock: compute this miss on the host? (the cost model against this link's queue)"""
        left = None
        wait = 0.0
        on = self._on_link
        if on is not None:
            okey, is_prefetch, started, seconds = on
            remaining = max(0.0, started + seconds - time.perf_counter())
            if okey == key:
                left = remaining
            else:  # a prefetch pauses at its next chunk boundary for the misses
                wait = min(remaining, seconds / self.transfer.chunks) if is_prefetch else remaining
        if left is None and key in self._loading:  # queued, or a prefetch paused for misses: a full copy
            left = wait + (len(self._demand) + 1) * self.transfer.estimate_s(self.expert_bytes)
        if left is None:
            wait += len(self._demand) * self.transfer.estimate_s(self.expert_bytes)
        if not self.host.choose(tokens, wait, left):
            return False
        self.stats.host_computed += 1
        if key not in self._loading:
            self._host_recent.pop(key, None)
            self._host_recent[key] = None
            while len(self._host_recent) > max(1, self.policy.ctx.num_layers):
                self._host_recent.popitem(last=False)
        return True

    def count_host_wait(self, seconds: float) -> None:
        """The compute thread waited this long for results computed on the host (stall time)."""
        with self._cv:
            self.stats.stall_s += seconds

    def release(self, key: Key) -> None:
        with self._cv:
            n = self._pins.get(key, 0) - 1
            if n <= 0:
                self._pins.pop(key, None)
                slot = self._slot_of.get(key)
                if slot is not None:
                    self.transfer.slot_released(slot)
                self._wake = True
                self._cv.notify_all()
            else:
                self._pins[key] = n

    def poke(self) -> None:
        """Tell the worker the policy's plan may have changed (e.g. a new layer started)."""
        with self._cv:
            self._wake = True
            self._cv.notify_all()

    def preload(self, keys: list[Key]) -> None:
        """Fill slots synchronously before a run (no statistics): the `resident` policy's set-up."""
        with self._cv:
            keys = [k for k in keys if k not in self._slot_of]
            if len(keys) > len(self._free):
                raise CacheBudgetError(f"cannot preload {len(keys)} experts into {len(self._free)} free slots")
            for key in keys:
                slot = self._free.pop()
                self.pool.write(slot, self.host_weights(key))
                self._slot_of[key] = slot
                self.policy.on_insert(key, prefetched=False)

    def clear(self, keep_all: bool = False) -> None:
        """Forget every cached expert (or keep them all: `resident`), reset statistics and policy."""
        with self._cv:
            while self._loading:  # let a copy on the link finish; nothing new starts meanwhile
                self._demand.clear()
                self.transfer.demand.clear()
                self._cv.wait(timeout=0.1)
            if not keep_all:
                self._free.extend(self._slot_of.values())
                self._slot_of.clear()
            self._pins.clear()
            self._unused_prefetch.clear()
            self._late_prefetch.clear()
            self._host_recent.clear()
            self.stats = CacheStats()
            self.policy.reset()
            for key in self._slot_of:
                self.policy.on_insert(key, prefetched=False)
        if self._static and not keep_all:
            self.preload(self._static)
        if self.host is not None:
            self.host.reset()

    def snapshot_stats(self) -> CacheStats:
        with self._cv:
            return replace(self.stats)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._worker.join(timeout=5)
        if self.host is not None:
            self.host.close()

    # --- worker -------------------------------------------------------------------------------
    def _check_worker(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"expert transfer worker failed: {self._error!r}") from self._error

    def _victims(self) -> list[Key]:
        return [k for k in self._slot_of if k not in self._pins]

    def _next_job(self) -> tuple[Key, int, bool] | None:
        """Under the lock: (key, slot, is_prefetch) to copy now, or None to wait."""
        if self._demand:
            key = self._demand[0]
            slot = self._take_slot(key, None)
            if slot is None:
                return None  # every slot is pinned by the computing layer: wait for a release
            self._demand.popleft()
            if not self._demand:
                self.transfer.demand.clear()
            return key, slot, False
        if not self.policy.ctx.prefetch:
            return self._next_host_copy()
        plan = self.policy.prefetch_plan()
        if not self.policy.plan_sorted:
            plan = sorted(plan, key=lambda p: -p.priority)
        for want in plan:
            if self.contains(want.key) or (self._owned is not None and want.key[0] not in self._owned):
                continue
            slot = self._take_slot(want.key, want)
            if slot is not None:
                self._loading[want.key] = True
                return want.key, slot, True
            break  # the best wanted expert cannot come in now; do not let worse ones jump it
        return self._next_host_copy()

    def _next_host_copy(self) -> tuple[Key, int, bool] | None:
        """Under the lock: a background copy of an expert computed on the host (newest first), if
        the policy admits it; None when there is none (always in copy mode)."""
        while self._host_recent:
            key, _ = self._host_recent.popitem(last=True)
            if self.contains(key) or (self._owned is not None and key[0] not in self._owned):
                continue
            slot = self._take_slot(key, None, host_copy=True)
            if slot is None:
                continue  # not admitted (or every slot pinned): the policy keeps what it has
            self._loading[key] = True
            self._background.add(key)
            return key, slot, True
        return None

    def _take_slot(self, key: Key, prefetch: Prefetch | None, host_copy: bool = False) -> int | None:
        if self._free:
            if prefetch is not None and not self.policy.admit(prefetch, None):
                return None
            if host_copy and not self.policy.admit_host_copy(key, None):
                return None
            return self._free.pop()
        candidates = self._victims()
        if not candidates:
            return None
        victim = self.policy.choose_victim(candidates, key)
        if prefetch is not None and not self.policy.admit(prefetch, victim):
            return None
        if host_copy and not self.policy.admit_host_copy(key, victim):
            return None
        slot = self._slot_of.pop(victim)
        self._unused_prefetch.discard(victim)
        self.policy.on_evict(victim)
        return slot

    def _execute(self, key: Key, slot: int, is_prefetch: bool) -> None:
        """Copy one expert (a prefetch pauses between chunks for waiting misses), then land it."""
        pause = self._serve_demands if is_prefetch else None
        precision = self.policy.precision(key, is_prefetch)
        if precision == "full":
            host, nbytes = self.host_weights(key), self.expert_bytes
        else:  # lossy mode: the link carries the quantised bytes
            host, nbytes = self.host_weights(key, precision), self.precision_bytes[precision]
        if self.host is not None:
            before, self._on_link = self._on_link, (key, is_prefetch, time.perf_counter(), self.transfer.estimate_s(nbytes))
        self.transfer.copy(slot, host, nbytes, between_chunks=pause)
        if self.host is not None:
            self._on_link = before
        with self._cv:
            self._loading.pop(key, None)
            self._slot_of[key] = slot
            late = key in self._late_prefetch  # right prediction, too late to be a hit
            self._late_prefetch.discard(key)
            background = key in self._background  # a host-computed expert, copied in the background
            self._background.discard(key)
            self.stats.count_copy(nbytes, is_prefetch and not background, late)
            if is_prefetch and not late and not background:
                self._unused_prefetch.add(key)
            self.policy.on_insert(key, prefetched=is_prefetch)
            self._cv.notify_all()

    def _serve_demands(self) -> None:
        """Pause on miss: between a prefetch's chunks, copy every waiting on-demand load first."""
        while True:
            with self._cv:
                if not self._demand or self._stop:
                    self.transfer.demand.clear()
                    return
                key = self._demand[0]
                t0 = time.thread_time()
                slot = self._take_slot(key, None)
                self.decisions_s += time.thread_time() - t0
                if slot is None:
                    return
                self._demand.popleft()
            self._execute(key, slot, False)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    job = None
                    while not self._stop:
                        t0 = time.thread_time()
                        job = self._next_job()
                        self.decisions_s += time.thread_time() - t0
                        if job is not None:
                            break
                        self._wake = False
                        self._cv.wait_for(lambda: self._wake or self._stop, timeout=0.5)
                    if self._stop:
                        return
                self._execute(*job)
        except BaseException as exc:  # surfaced to the compute thread by _check_worker
            logger.exception("expert transfer worker failed")
            with self._cv:
                self._error = exc
                self._cv.notify_all()
