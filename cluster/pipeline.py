"""The pipeline: N stage actors (one per GPU bundle), the expert-map service, and the scheduler
that keeps every stage busy.

Continuous batching across the pipeline: requests join and leave between iterations. The
scheduler groups the requests whose next iteration can run into micro-batches and keeps several
in flight (how many and how large: ``cluster/microbatch_sizing.py``, from the stages' measured
times; N + 1 until it has measured), each a chain of
actor calls stage 0 -> ... -> stage N-1 whose intermediate results pass from actor to actor
without coming back here. While stage k runs one micro-batch, stage k-1 runs the next. When a
micro-batch returns, its requests get their tokens; finished ones are released on every stage
(their KV caches freed) with the next micro-batch, the rest are ready for their next iteration.

A stage that dies (its process killed, its node lost) is restarted by Ray (``max_restarts``) and
reloads its shard; the KV caches it held are gone, so the requests in flight then either start
again from their prompt (those that have not produced a token: nobody saw anything yet) or end
with ``StageFailedError`` naming the stage (those that have: a retry would change what the
client already received). The pipeline keeps serving without a restart of the app.

No silent stalls: a watchdog in the scheduler's loop reports a micro-batch still in flight past
its deadline (derived from the layer and link times, ``stall_deadline``; or set
``PipelineConfig.stall_deadline_s``): a log line with every stage's counters and the metric
``expertmap_scheduler_stalled_microbatches_total``; its requests are then handled as after a
stage failure (started again if they have no token yet, else failed with ``PipelineStallError``),
and a late result of the stalled micro-batch is ignored.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import ray
from pydantic import BaseModel, ConfigDict, Field

from expertmap.actors import defaults
from expertmap.actors.cache_stats import CacheStats
from expertmap.actors.config import EngineConfig
from expertmap.actors.sampling import SamplingParams
from expertmap.actors.shard import MicroBatch, Step, split_layers
from expertmap.cluster.microbatch_sizing import MicroBatchSizer
from expertmap.cluster.placement import STRATEGIES, bundle_nodes, bundle_strategy, stage_placement_group

logger = logging.getLogger(__name__)



class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = EngineConfig()
    gpus: int = Field(default=1, ge=1)  # stages, one per GPU
    split: list[int] | None = None  # decoder layers per stage; None: even
    placement: str = "PACK"
    max_batch: int = Field(default=defaults.MAX_BATCH, ge=1)  # requests per micro-batch at most
    #: micro-batches in flight; None: chosen from the stages' measured times (cluster/microbatch_sizing.py)
    inflight: int | None = Field(default=None, ge=1)
    redis_url: str | None = None  # None: the embedded in-process store inside the service actor
    store_namespace: str = "expertmap"
    map_service_name: str = "expertmap-map-service"  # pipelines naming the same service share it
    store_capacity: int = Field(default=1000, ge=1, le=4096)
    prefetch_distance: int = Field(default=defaults.PREFETCH_DISTANCE, ge=1)
    sync_interval_s: float = Field(default=1.0, gt=0)  # how often a stage's replica asks for a new version
    torch_threads: int | None = 1  # intra-op threads per stage on a CPU device (None: torch's default)
    ready_timeout_s: float = Field(default=900.0, gt=0)
    hints: bool = True  # stage 0 sends each micro-batch's embeddings ahead to the later stages
    #: a micro-batch in flight longer than this is reported and its requests re-run or failed;
    #: None: derived from the layer and link times (``stall_deadline``)
    stall_deadline_s: float | None = Field(default=None, gt=0)

    def model_post_init(self, _):
        if self.placement not in STRATEGIES:
            raise ValueError(f"placement {self.placement!r}: choose one of {', '.join(STRATEGIES)}")


class StageFailedError(RuntimeError):
    """A stage died while the request had produced tokens: it cannot be continued exactly."""


class PipelineClosedError(RuntimeError):
    pass


class PipelineStallError(RuntimeError):
    """A micro-batch stayed in the pipeline past its deadline after the request produced tokens."""


STALL_FLOOR_S = 30.0  # the shortest deadline: start-up jitter, Python and Ray overheads
STALL_MARGIN = 20.0  # deadline = margin x the slowest plausible iteration


def stall_deadline(num_layers: int, top_k: int, max_batch: int, layer_time_s: float | None,
                   copy_layer_ratio: float | None) -> float:  # fmt: skip
    """Seconds a micro-batch may stay in flight: ``STALL_MARGIN`` x an iteration in which every
    layer copies every expert that ``max_batch`` requests can select (no hits at all), at least
    ``STALL_FLOOR_S``. Without a measured layer time (a real CUDA link) the floor alone."""
    if layer_time_s is None:
        return STALL_FLOOR_S
    copies = max_batch * top_k * (copy_layer_ratio or 0.0)  # layer times of copies per layer
    worst = num_layers * layer_time_s * (max_batch + copies)
    return max(STALL_FLOOR_S, STALL_MARGIN * worst)


class PipelineRequest:
    """One request's progress; ``result()`` waits for its tokens."""

    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, eos_ids: set[int],
                 on_token: Callable[[int], None] | None = None,
                 on_done: Callable[["PipelineRequest"], None] | None = None):  # fmt: skip
        self.rid = rid
        self.prompt = prompt
        self.params = params
        self.eos_ids = eos_ids
        self.on_token = on_token  # called on the scheduler thread with each new token
        self.on_done = on_done  # called on the scheduler thread once the request ends (or fails)
        self.tokens: list[int] = []
        # with params.logprobs: one (logprob, [(token, logprob)] top N) per token, appended before on_token
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # prompt tokens 1.. (prefill)
        self.stats = CacheStats()  # cache counters during this request's iterations, all stages
        self.started_at: float | None = None  # first launched into the pipeline
        self.token_times: list[float] = []
        self.submitted_at = time.perf_counter()
        self.finish_reason: str | None = None  # "length", "stop", "cancelled", "error"
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._cancel = threading.Event()
        self.attempt = 0
        self.start = 0  # tokens in the stages' KV caches
        self.next_ids: list[int] = prompt

    @property
    def key(self) -> str:  # the id the stages know this attempt by
        return f"{self.rid}#{self.attempt}"

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def result(self, timeout: float | None = None) -> list[int]:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.rid} not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.tokens

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.submitted_at if self.token_times else None

    @property
    def tpot_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    # --- scheduler side ------------------------------------------------------------------------
    def step(self) -> Step:
        first = self.start == 0
        return Step(self.key, self.start, list(self.next_ids), self.params if first else None)

    def deliver(self, token: int, stats: CacheStats | None = None, step: Step | None = None) -> bool:
        """Record a token (with the log-probabilities ``step`` carries); True when the request is finished."""
        if stats is not None:
            self.stats = self.stats.merge(stats)
        if step is not None:
            if step.prompt_logprobs is not None:
                self.prompt_logprobs = step.prompt_logprobs
            if step.token_logprob is not None:
                self.logprobs.append((step.token_logprob, step.top_logprobs or []))
        self.start += len(self.next_ids)
        self.tokens.append(token)
        self.token_times.append(time.perf_counter())
        self.next_ids = [token]
        if self.on_token is not None:
            try:
                self.on_token(token)
            except Exception:  # a consumer's error must not stop the scheduler
                logger.exception("on_token callback of request %s failed; cancelling it", self.rid)
                self.cancel()
        if self.cancelled:
            self.finish_reason = "cancelled"
        else:
            self.finish_reason = self.params.finish_reason(len(self.tokens), token, self.eos_ids)
        return self.finish_reason is not None

    def restart(self) -> None:
        self.attempt += 1
        self.start = 0
        self.next_ids = self.prompt

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.finish_reason = "error"
        self.end()

    def end(self) -> None:
        self.done.set()
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:
                logger.exception("on_done callback of request %s failed", self.rid)


class _SchedulerMetrics:
    def __init__(self):
        from ray.util import metrics

        self.waiting = metrics.Gauge("expertmap_scheduler_waiting", "requests ready for their next iteration")
        self.inflight = metrics.Gauge("expertmap_scheduler_inflight_microbatches", "micro-batches in the pipeline")
        self.active = metrics.Gauge("expertmap_scheduler_active_requests", "requests being generated")
        self.failures = metrics.Counter("expertmap_scheduler_stage_failures_total", "stage deaths seen")
        self.stalls = metrics.Counter("expertmap_scheduler_stalled_microbatches_total",
                                      "micro-batches in flight past their deadline")  # fmt: skip


class Scheduler:
    """Continuous batching over a chain of stage actors (see the module docstring)."""

    def __init__(self, stages: list, max_batch: int = defaults.MAX_BATCH,
                 on_stage_failure: Callable[[], None] | None = None, stall_deadline_s: float = STALL_FLOOR_S,
                 inflight: int | None = None):  # fmt: skip
        self.stages = stages
        self.stall_deadline_s = stall_deadline_s
        self.stalls = 0
        self._launched: dict[ray.ObjectRef, float] = {}  # in flight since (perf_counter)
        self.on_stage_failure = on_stage_failure  # e.g. re-arm what a restarted stage forgot
        self.max_batch = max_batch
        self.sizer = MicroBatchSizer(len(stages), max_batch, inflight)  # micro-batches in flight, their size
        self._cv = threading.Condition()
        self._new: deque[PipelineRequest] = deque()
        self._ready: deque[PipelineRequest] = deque()
        self._active: dict[str, PipelineRequest] = {}
        # micro-batch result -> (its requests with their attempt numbers, the keys it releases)
        self._inflight: dict[ray.ObjectRef, tuple[list[tuple[PipelineRequest, int]], list[str]]] = {}
        self._release: list[str] = []
        self._stop = False
        self.stage_failures = 0
        self.microbatches = 0
        self.inflight_at_launch = 0
        self.metrics = _SchedulerMetrics()
        self._thread = threading.Thread(target=self._loop, name="pipeline-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: PipelineRequest) -> PipelineRequest:
        with self._cv:
            if self._stop:
                raise PipelineClosedError("the pipeline is shut down")
            self._new.append(request)
            self._cv.notify_all()
        return request

    @property
    def active(self) -> int:
        with self._cv:
            return len(self._active) + len(self._new)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)
        for req in list(self._active.values()) + list(self._new):
            if not req.done.is_set():
                req.fail(PipelineClosedError("the pipeline shut down before the request finished"))

    # --- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                while self._new:
                    req = self._new.popleft()
                    self._active[req.rid] = req
                    self._ready.append(req)
                if not self._inflight and not self._ready and not self._release:
                    self._cv.wait(timeout=0.1)
                    continue
            try:
                self._launch()
                if self._inflight:
                    done, _ = ray.wait(list(self._inflight), num_returns=1, timeout=0.05)
                    for ref in done:
                        self._complete(ref)
                self._watch()
                self.metrics.waiting.set(len(self._ready))
                self.metrics.inflight.set(len(self._inflight))
                self.metrics.active.set(len(self._active))
            except Exception:  # never die silently: fail what is in flight, keep serving
                logger.exception("scheduler error; failing the requests in flight")
                for req in list(self._active.values()):
                    self._finish(req, error=RuntimeError("internal scheduler error; see the server log"))
                self._inflight.clear()
                self._launched.clear()
                self._ready.clear()

    def _chain(self, mb: MicroBatch) -> ray.ObjectRef:
        ref = mb
        for stage in self.stages:
            ref = stage.forward.remote(ref)
        return ref

    def _launch(self) -> None:
        depth, size = self.sizer.plan(len(self._active))
        while self._ready and len(self._inflight) < depth:
            take = []
            while self._ready and len(take) < size:
                req = self._ready.popleft()
                if req.cancelled:  # before its first or between iterations: stop here
                    req.finish_reason = "cancelled"
                    self._finish(req)
                    continue
                take.append(req)
            if not take:
                break
            now = time.perf_counter()
            for r in take:
                r.started_at = r.started_at or now
            mb = MicroBatch([r.step() for r in take], release=self._release)
            self._release = []
            ref = self._chain(mb)
            self._inflight[ref] = ([(r, r.attempt) for r in take], mb.release)
            self._launched[ref] = now
            self.microbatches += 1
            self.inflight_at_launch += len(self._inflight)  # / microbatches: how many were in flight
        if self._release and not self._inflight:  # nothing else will carry them: a release-only batch
            mb = MicroBatch([], release=self._release)
            self._release = []
            self._inflight[self._chain(mb)] = ([], mb.release)

    def _watch(self) -> None:
        """The watchdog: micro-batches in flight past the deadline are reported, their requests
        re-run (no token yet) or failed, and their late results ignored."""
        now = time.perf_counter()
        late = [ref for ref, t in self._launched.items() if now - t > self.stall_deadline_s and ref in self._inflight]
        for ref in late:
            reqs, release = self._inflight.pop(ref)
            waited = now - self._launched.pop(ref)
            self.stalls += 1
            self.metrics.stalls.inc()
            logger.error(
                "micro-batch of requests %s in flight for %.1f s (deadline %.1f s); stages: %s; re-running or "
                "failing its requests", [r.rid for r, _ in reqs], waited, self.stall_deadline_s, self._stage_report(),
            )  # fmt: skip
            self._release.extend(release)
            for req, attempt in reqs:
                if attempt != req.attempt or req.done.is_set():
                    continue
                self._release.append(req.key)  # whatever the stages hold of this attempt
                if req.tokens:
                    self._finish(req, error=PipelineStallError(
                        f"request {req.rid} was stuck in the pipeline for {waited:.0f} s after {len(req.tokens)} "
                        "tokens; retry the request"))  # fmt: skip
                else:
                    req.restart()
                    self._ready.append(req)

    def _stage_report(self) -> str:
        """Each stage's counters (which one is busy, stalled on copies, or unreachable)."""
        parts = []
        for i, stage in enumerate(self.stages):
            try:
                s = ray.get(stage.stats.remote(), timeout=2.0)
                parts.append(f"stage {i}: steps {s.get('steps')}, busy {s.get('busy_s', 0):.1f} s, "
                             f"copy stall {s.get('stall_s', 0):.1f} s, requests {s.get('requests')}")  # fmt: skip
            except Exception as exc:  # a stage that cannot answer is the finding
                parts.append(f"stage {i}: no answer ({exc.__class__.__name__})")
        return "; ".join(parts)

    def _complete(self, ref: ray.ObjectRef) -> None:
        launched = self._launched.pop(ref, None)
        reqs, _ = self._inflight.pop(ref)
        try:
            mb: MicroBatch = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._stage_died(exc)
            return
        except ray.exceptions.RayTaskError as exc:  # a stage raised for this micro-batch
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            for req, attempt in reqs:
                if attempt == req.attempt and not req.done.is_set():
                    self._finish(req, error=RuntimeError(f"pipeline stage error: {cause}"))
            return
        if launched is not None:
            self.sizer.observe(len(mb.steps), mb.stage_s, time.perf_counter() - launched)
        for step, (req, attempt) in zip(mb.steps, reqs, strict=True):
            if attempt != req.attempt or req.done.is_set():
                continue  # superseded by a restart after a stage failure, or already failed
            if req.deliver(step.token, step.cache, step):
                self._finish(req)
            else:
                self._ready.append(req)

    def _finish(self, req: PipelineRequest, error: BaseException | None = None) -> None:
        self._active.pop(req.rid, None)
        if req.started_at is not None:  # it entered the pipeline: stages may hold its KV caches
            self._release.append(req.key)
        if error is not None:
            req.fail(error)
        else:
            req.end()

    def _stage_died(self, exc: BaseException) -> None:
        """Every request in flight lost its KV caches on the dead stage."""
        self.stage_failures += 1
        self.metrics.failures.inc()
        logger.error("a pipeline stage died (%s); restarting or failing the requests in flight", exc)
        for _, release in self._inflight.values():  # their results are void: drop them, keep their releases
            self._release.extend(release)
        self._inflight.clear()
        self._launched.clear()
        for req in list(self._active.values()):
            self._release.append(req.key)  # stale caches on the surviving stages
            if req.tokens:
                self._active.pop(req.rid, None)
                req.fail(StageFailedError(
                    f"a pipeline stage failed after request {req.rid} produced {len(req.tokens)} tokens; "
                    f"its KV cache was lost, retry the request ({exc.__class__.__name__})"
                ))  # fmt: skip
            else:
                req.restart()
        self._ready = deque(r for r in self._active.values())
        if self.on_stage_failure is not None:
            try:
                self.on_stage_failure()
            except Exception:
                logger.exception("on_stage_failure callback failed")


class Pipeline:
    """Stage actors + map service + scheduler. Needs a running Ray (``ray.init``)."""

    def __init__(self, config: PipelineConfig):
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        import torch

        from expertmap.actors.config import require_model_folder
        from expertmap.actors.model_folder import open_model_folder
        from expertmap.predictor.policies import policy_class
        from expertmap.cluster.stage_actor import StageActor

        self.config = config
        folder = require_model_folder(config.engine.model)
        hf_config, adapter = open_model_folder(folder)
        with torch.device("meta"):  # the layer structure, no weights
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        num_layers = len(adapter.decoder_layers(skeleton))
        moe = adapter.moe_layers(skeleton)
        self.shape = {
            "num_layers": len(moe), "num_experts": adapter.num_experts(hf_config),
            "embed_dim": int(hf_config.hidden_size), "prefetch_distance": config.prefetch_distance,
        }  # fmt: skip
        gen = GenerationConfig.from_pretrained(folder) if (Path(folder) / "generation_config.json").exists() else None
        eos = (gen.eos_token_id if gen is not None else None) or hf_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else list(eos or []))
        self.specs = split_layers(num_layers, config.gpus, config.split)

        self.map_service = None
        if policy_class(config.engine.policy).needs_store:
            from expertmap.cluster.map_service_actor import map_service

            self.map_service = map_service(self.shape, config.redis_url, config.store_namespace, config.store_capacity,
                                           name=config.map_service_name)  # fmt: skip
        self.pg = stage_placement_group(config.gpus, config.placement)
        engine = config.engine
        threads = config.torch_threads if config.engine.device == "cpu" else None

        def make(spec, layer_time):
            return StageActor.options(scheduling_strategy=bundle_strategy(self.pg, spec.index)).remote(
                engine, spec, layer_time, self.map_service, config.prefetch_distance, config.sync_interval_s, threads
            )

        link = config.engine.link
        needs_time = link.mode in ("auto", "emulated") and config.engine.device == "cpu" and link.bandwidth_bytes_per_s is None
        t0 = time.perf_counter()
        self.stages = []
        layer_time = None
        if needs_time:  # stage 0 measures the layer time once; the others take it (one link ratio for all)
            self.stages.append(make(self.specs[0], None))
            layer_time = ray.get(self.stages[0].layer_time_s.remote(), timeout=config.ready_timeout_s)
        self.layer_time_s = layer_time
        self.stages += [make(spec, layer_time) for spec in self.specs[len(self.stages):]]
        ray.get([s.health.remote() for s in self.stages], timeout=config.ready_timeout_s)
        rearm = None
        if config.hints and self.map_service is not None and len(self.stages) > 1:  # semantic hints ahead
            ray.get(self.stages[0].set_downstream.remote(self.stages[1:]))

            def rearm():  # a restarted stage 0 starts without its downstream list (queued until it is back)
                self.stages[0].set_downstream.remote(self.stages[1:])
        self.nodes = bundle_nodes(self.pg)
        logger.info("pipeline of %d stages ready in %.1f s (layers %s, nodes %d)", len(self.stages),
                    time.perf_counter() - t0, [(s.start, s.end) for s in self.specs], len(set(self.nodes)))  # fmt: skip
        deadline = config.stall_deadline_s or stall_deadline(
            num_layers, adapter.top_k(hf_config), config.max_batch, layer_time, config.engine.link.copy_layer_ratio
        )
        self.scheduler = Scheduler(self.stages, config.max_batch, rearm, deadline, config.inflight)
        self._ids = itertools.count()
        self._closed = False

    def submit(self, prompt: list[int], params: SamplingParams | None = None,
               on_token: Callable[[int], None] | None = None,
               on_done: Callable[[PipelineRequest], None] | None = None) -> PipelineRequest:  # fmt: skip
        if not prompt:
            raise ValueError("prompt is empty")
        req = PipelineRequest(f"r{next(self._ids)}", list(prompt), params or SamplingParams(), self.eos_ids,
                              on_token, on_done)  # fmt: skip
        return self.scheduler.submit(req)

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 timeout: float | None = None) -> list[list[int]]:  # fmt: skip
        reqs = [self.submit(p, params) for p in prompts]
        return [r.result(timeout) for r in reqs]

    def stats(self) -> list[dict]:
        return ray.get([s.stats.remote() for s in self.stages], timeout=30)

    def health(self, timeout: float = 10.0) -> list[dict]:
        return ray.get([s.health.remote() for s in self.stages], timeout=timeout)

    def reset_stats(self) -> None:
        ray.get([s.reset_stats.remote() for s in self.stages])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.scheduler.close()
        for s in self.stages:
            try:
                ray.get(s.shutdown.remote(), timeout=10)
            except Exception:  # already dead
                pass
            ray.kill(s)
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.pg)
