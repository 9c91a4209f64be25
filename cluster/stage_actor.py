"""A pipeline stage (``actors.shard.ShardRuntime``) as a Ray actor pinned to one GPU bundle.

The actor holds the stage's layers, its expert cache, transfer engine and prefetch worker, and
the KV caches of the requests in flight. It reports its figures through Ray's metrics API
(``ray.util.metrics``: tagged by stage) after every micro-batch, and answers ``health`` from a
second thread while a micro-batch runs. Device: from the config (``EngineConfig.device``), never
from Ray's GPU ids, so declared GPUs on a CPU machine run on the CPU.
"""

from __future__ import annotations

import logging
import os

import ray

from expertmap.actors import defaults
from expertmap.actors.config import EngineConfig
from expertmap.actors.shard import MicroBatch, ShardRuntime, StageSpec
from expertmap.predictor.policies import PolicyInputs

logger = logging.getLogger(__name__)


class _StageMetrics:
    """Ray metrics of one stage (exported on each node's metrics port, scraped by Prometheus)."""

    def __init__(self, stage: int):
        from ray.util import metrics

        tags = ("stage",)
        self.tags = {"stage": str(stage)}
        self.hit_rate = metrics.Gauge("expertmap_stage_hit_rate", "expert cache hit rate", tags)
        self.busy = metrics.Gauge("expertmap_stage_busy_fraction", "share of wall time computing", tags)
        self.requests = metrics.Gauge("expertmap_stage_requests", "requests with KV caches on the stage", tags)
        self.misses = metrics.Counter("expertmap_stage_misses_total", "expert cache misses", tags)
        self.stall = metrics.Counter("expertmap_stage_stall_seconds_total", "seconds layers waited on copies", tags)
        self.moved = metrics.Counter("expertmap_stage_bytes_moved_total", "expert bytes copied host to device", tags)
        self.steps = metrics.Counter("expertmap_stage_steps_total", "request iterations computed", tags)
        self._last = {"misses": 0, "stall_s": 0.0, "bytes_moved": 0, "steps": 0}

    def update(self, s: dict) -> None:
        t = self.tags
        self.hit_rate.set(s["hit_rate"], t)
        self.busy.set(s["busy_frac"], t)
        self.requests.set(s["requests"], t)
        for counter, key in ((self.misses, "misses"), (self.stall, "stall_s"), (self.moved, "bytes_moved"),
                             (self.steps, "steps")):  # fmt: skip
            delta = s[key] - self._last[key]
            if delta > 0:
                counter.inc(delta, t)
            self._last[key] = s[key]


@ray.remote(num_cpus=0, num_gpus=1, max_restarts=-1, max_task_retries=0, concurrency_groups={"control": 2})
class StageActor:
    def __init__(self, config: EngineConfig, spec: StageSpec, layer_time_s: float | None, store_handle=None,
                 prefetch_distance: int = defaults.PREFETCH_DISTANCE, sync_interval_s: float = 1.0,
                 torch_threads: int | None = None):  # fmt: skip
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        replica = None
        if store_handle is not None:
            from expertmap.cluster.map_service_actor import ServiceStoreClient
            from expertmap.predictor.replica import StoreReplica

            replica = StoreReplica(ServiceStoreClient(store_handle, sync_interval_s))
        inputs = PolicyInputs(prefetch_distance=prefetch_distance, replica=replica)
        self.stage = ShardRuntime(config, spec, layer_time_s, inputs)
        self.stage.warm_up()
        self.metrics = _StageMetrics(spec.index)
        self.downstream: list = []

    @ray.method(concurrency_group="control")
    def set_downstream(self, handles: list) -> None:
        """Stage 0: the later stages, told each micro-batch's embeddings before its activations."""
        self.downstream = list(handles)
        self.stage.on_embeddings = self._tell_downstream if self.downstream else None

    def _tell_downstream(self, embeddings) -> None:
        for h in self.downstream:
            h.hint.remote(embeddings)  # fire and forget: a hint that comes late is simply replaced

    @ray.method(concurrency_group="control")
    def hint(self, embeddings) -> int:
        return self.stage.hint(embeddings)

    def forward(self, mb: MicroBatch) -> MicroBatch:
        out = self.stage.forward(mb)
        self.metrics.update(self.stage.stats())
        return out

    @ray.method(concurrency_group="control")
    def health(self) -> dict:
        return {**self.stage.health(), "pid": os.getpid()}

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        return self.stage.stats()

    def reset_stats(self) -> None:
        self.stage.reset()

    def layer_time_s(self) -> float | None:
        return self.stage.layer_time_s

    def shutdown(self) -> None:
        self.stage.close()
