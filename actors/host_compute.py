"""A miss that does not wait for the link: compute the expert on the host when that finishes first.

Per miss, the cache (``ExpertCache.acquire``) asks ``HostCompute.choose``: wait for the copy, or
send the tokens' activations to the host, compute the expert there with the host copy of its
weights (the ``HostExpertStore``'s tensors: same weights, same dtype, no quantisation) and send
the result back. The cost model compares when each would be done:

    copy: the link's queue (the copy on the link: what is left of it, or one chunk if it is a
          prefetch, which pauses at its next chunk boundary; the on-demand copies queued ahead)
          + one expert's copy time;
    host: the host lane's queue + the host's time for this expert's tokens
          (host profile: decode ratio x max(1, tokens / crossover), in decode-layer times).

Decode (one token per expert) is memory-bound and favours the host; an expert that gets many
tokens of a long prefill is compute-bound and favours the copy; a busy link or a busy host tips
the choice to the other. Modes (``EngineConfig.miss``): ``copy`` (today's behaviour: nothing
here runs), ``host`` (every miss on the host), ``auto`` (the cost model). Policies whose misses
are always computed on the host (``Policy.host_misses``: `host-all`, `host-static`) run ``host``
whatever the mode.

The host lane is serial: the host's memory bandwidth is the resource (decode streams each
expert's weights once), so two experts at once would each take twice as long.

- On a CPU device (the device and the host are the same CPU) the lane is emulated as the link is:
  the expert is computed at once on the calling thread (bit-identical to the device path: the
  same kernel on equal weights), and its result is handed back only when the lane has been held
  for the profile's time for those tokens (``EmulatedHostLane``).
- On CUDA the activations go to the CPU, a worker thread computes the expert with the pinned host
  weights and the result goes back to the GPU (``ThreadedHostLane``): the same weights and dtype,
  but a CPU kernel, whose rounding may differ from the GPU's in the last bits.

Host compute runs beside the device computing its hits: the runner submits the host jobs first,
then computes the resident experts, then collects the host results; all are accumulated in
expert order (actors/offloaded_experts.py), so the output is that of the full model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

import torch
from expertmap.actors.config import MISS_MODES, HostConfig
from expertmap.actors.host_profiles import resolve

logger = logging.getLogger(__name__)

Where = Literal["copy", "host"]


def check_miss_mode(mode: str) -> str:
    """``mode`` if it is a miss mode, else ValueError naming it and the choices."""
    if mode not in MISS_MODES:
        raise ValueError(f"miss mode {mode!r} is not one of {', '.join(MISS_MODES)} (copy: wait for the link; "
                         "host: compute every miss on the host; auto: whichever finishes first)")  # fmt: skip
    return mode


def host_units(tokens: int, decode_ratio: float, crossover_tokens: float) -> float:
    """One expert's host time for ``tokens`` tokens, in decode-layer times (the roofline of
    actors/host_profiles.py: memory-bound up to the crossover, then proportional to the tokens)."""
    return decode_ratio * max(1.0, tokens / crossover_tokens)


@dataclass(frozen=True)
class Choice:
    where: Where
    copy_done_s: float  # from now until a copy would land
    host_done_s: float  # from now until the host would be done


class MissCostModel:
    """Which finishes first for one miss: the copy, or the host compute.

    ``copy_s``: one expert's copy time on an idle link; ``host_s(tokens)``: the host's time for
    one expert and that many tokens on an idle host. Ties go to the copy (the expert then stays)."""

    def __init__(self, copy_s: float, host_s: Callable[[int], float]):
        self.copy_s = copy_s
        self.host_s = host_s

    def choose(self, tokens: int, link_wait_s: float = 0.0, host_wait_s: float = 0.0,
               on_link_left_s: float | None = None) -> Choice:  # fmt: skip
        """``link_wait_s``: until the link could start this copy; ``host_wait_s``: until the host
        lane is free; ``on_link_left_s``: this very expert is already on the link, this much is left."""
        copy_done = on_link_left_s if on_link_left_s is not None else link_wait_s + self.copy_s
        host_done = host_wait_s + self.host_s(tokens)
        return Choice("host" if host_done < copy_done else "copy", copy_done, host_done)


# --- host lanes ----------------------------------------------------------------------------------
class HostJob:
    def __init__(self, future: Future, done_at: float, device: torch.device | None):
        self.future = future
        self.done_at = done_at  # when the lane hands the result back (emulated) or is expected to
        self.device = device


class EmulatedHostLane:
    """The host is this same CPU: compute at once, hand the result back when the lane has been
    held for ``seconds(tokens)`` (from when the lane was free for it). Compute-thread only."""

    emulated = True

    def __init__(self, seconds: Callable[[int], float]):
        self.seconds = seconds
        self.free_at = 0.0
        self.busy_s = 0.0
        self.jobs = 0

    def wait_s(self, now: float) -> float:
        return max(0.0, self.free_at - now)

    def submit(self, fn: Callable[[], torch.Tensor], tokens: int) -> HostJob:
        now = time.perf_counter()
        duration = self.seconds(tokens)
        start = max(now, self.free_at)
        self.free_at = start + duration
        self.busy_s += duration
        self.jobs += 1
        future: Future = Future()
        future.set_result(fn())
        return HostJob(future, self.free_at, None)

    def close(self) -> None:
        pass


class ThreadedHostLane:
    """CUDA: a worker thread computes host jobs one at a time on the CPU. ``estimate(tokens)``
    (seconds) is calibrated at start and refined from the jobs run (an EWMA per token bucket)."""

    emulated = False

    def __init__(self, estimate: Callable[[int], float], name: str = "host"):
        self._estimate = estimate
        self._measured: dict[int, float] = {}
        self.free_at = 0.0
        self.busy_s = 0.0
        self.jobs = 0
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name=f"{name}-host", daemon=True)
        self._worker.start()

    @staticmethod
    def _bucket(tokens: int) -> int:
        return max(1, tokens).bit_length()

    def seconds(self, tokens: int) -> float:
        return self._measured.get(self._bucket(tokens), self._estimate(tokens))

    def wait_s(self, now: float) -> float:
        return max(0.0, self.free_at - now)

    def submit(self, fn: Callable[[], torch.Tensor], tokens: int) -> HostJob:
        now = time.perf_counter()
        self.free_at = max(now, self.free_at) + self.seconds(tokens)
        future: Future = Future()
        self._queue.put((fn, tokens, future))
        return HostJob(future, self.free_at, None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, tokens, future = item
            t0 = time.perf_counter()
            try:
                future.set_result(fn())
            except BaseException as exc:  # surfaced on the compute thread by HostJob.future.result()
                logger.exception("host expert computation failed")
                future.set_exception(exc)
                continue
            took = time.perf_counter() - t0
            self.busy_s += took
            self.jobs += 1
            b = self._bucket(tokens)
            self._measured[b] = took if b not in self._measured else 0.8 * self._measured[b] + 0.2 * took

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)


# --- the runtime's host path -----------------------------------------------------------------------
class HostCompute:
    """What the cache and the runner of one shard use to compute misses on the host."""

    def __init__(self, mode: Where | Literal["auto"], lane, host: HostConfig, host_weights, device: torch.device,
                 copy_s: Callable[[], float]):  # fmt: skip
        self.mode = mode
        self.lane = lane
        self.host = host
        self.host_weights = host_weights  # key -> {name: host tensor} (the HostExpertStore)
        self.device = device
        self._copy_s = copy_s
        self.chosen = {"copy": 0, "host": 0}
        self._decided_s = 0.0  # host time of misses sent to the host and not yet submitted
        self._started = time.perf_counter()

    def cost_model(self) -> MissCostModel:
        return MissCostModel(self._copy_s(), self.lane.seconds)

    def choose(self, tokens: int, link_wait_s: float, on_link_left_s: float | None) -> bool:
        """True: compute this miss on the host (called by the cache, under its lock)."""
        if self.mode == "host":
            where = "host"
        else:
            host_wait = self.lane.wait_s(time.perf_counter()) + self._decided_s
            where = self.cost_model().choose(tokens, link_wait_s, host_wait, on_link_left_s).where
        self.chosen[where] += 1
        if where == "host":
            self._decided_s += self.lane.seconds(tokens)
        return where == "host"

    def submit(self, adapter, experts, key, x: torch.Tensor) -> HostJob:
        """Start computing expert ``key`` for the tokens ``x`` [t, H] on the host (un-weighted output)."""
        w = self.host_weights(key)
        self._decided_s = max(0.0, self._decided_s - self.lane.seconds(x.shape[0]))
        if self.device.type == "cuda":
            x_host = x.to("cpu")
            job = self.lane.submit(lambda: adapter.expert_forward(experts, w, x_host), x.shape[0])
            job.device = self.device
            return job
        return self.lane.submit(lambda: adapter.expert_forward(experts, w, x), x.shape[0])

    def result(self, job: HostJob) -> tuple[torch.Tensor, float]:
        """(the expert's output on the device, seconds the caller waited for it)."""
        t0 = time.perf_counter()
        out = job.future.result()
        if self.lane.emulated:
            left = job.done_at - time.perf_counter()
            if left > 0:
                time.sleep(left)
        if job.device is not None:
            out = out.to(job.device, non_blocking=False)
        return out, time.perf_counter() - t0

    @property
    def busy_s(self) -> float:
        return self.lane.busy_s

    def busy_frac(self) -> float:
        wall = time.perf_counter() - self._started
        return self.lane.busy_s / wall if wall > 0 else 0.0

    def reset(self) -> None:
        self.lane.busy_s = 0.0
        self.lane.jobs = 0
        self.chosen = {"copy": 0, "host": 0}
        self._started = time.perf_counter()

    def close(self) -> None:
        self.lane.close()


def calibrate_cpu_expert(adapter, experts, weights: dict[str, torch.Tensor], hidden: int) -> Callable[[int], float]:
    """Seconds of one expert on this CPU for t tokens: a + b x t fitted on 1 and 64 tokens (best of 3)."""

    def best(t: int) -> float:
        x = torch.zeros(t, hidden, dtype=next(iter(weights.values())).dtype)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            adapter.expert_forward(experts, weights, x)
            times.append(time.perf_counter() - t0)
        return min(times)

    one, many = best(1), best(64)
    slope = max(0.0, (many - one) / 63)
    return lambda t: one + slope * (max(1, t) - 1)


def attach_host_compute(rt) -> HostCompute | None:
    """Give a shard runtime's cache and runner their host path (None in ``copy`` mode: nothing changes).

    The host's time: on a CPU device, the host profile's decode ratio (shared among the stages of
    the node) x the measured decode-layer time, emulated; with an instant link, no delay (a test
    aid, like the link); on CUDA, the real CPU, its time calibrated here and measured as it runs."""
    config = rt.config
    mode = "host" if rt.policy.host_misses else check_miss_mode(config.miss)
    if mode == "copy":
        return None
    host = resolve(config.host, config.link.profile, rt.spec.count)
    if rt.device.type == "cuda":
        key = rt.host.keys()[0]
        estimate = calibrate_cpu_expert(rt.adapter, rt.moe[0].experts, rt.host[key], rt.hf_config.hidden_size)
        lane = ThreadedHostLane(estimate, name=f"stage{rt.spec.index}")
    elif rt.link_mode == "instant":
        lane = EmulatedHostLane(lambda t: 0.0)
    else:
        if rt.layer_time_s is None:
            raise ValueError(
                f"--miss {mode} on an emulated link given in bytes/s has no decode-layer time to apply the host "
                f"profile {host.profile!r} to: give the link as a profile or ratio:R"
            )
        layer_s = rt.layer_time_s
        lane = EmulatedHostLane(lambda t: host_units(t, host.decode_ratio, host.crossover_tokens) * layer_s)
    transfer = rt.cache
    hc = HostCompute(mode, lane, host, rt.host.__getitem__, rt.device,
                     copy_s=lambda: transfer.transfer.estimate_s(transfer.expert_bytes))  # fmt: skip
    rt.cache.host = hc
    rt.runner.host = hc
    logger.info("stage %d: misses %s, host %s (decode ratio %.2f over %d stage(s), crossover %.0f tokens)%s",
                rt.spec.index, mode, host.profile, host.decode_ratio, host.stages_per_node, host.crossover_tokens,
                "" if lane.emulated else ", real CPU compute")  # fmt: skip
    return hc
