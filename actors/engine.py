"""The in-process engine: the shard runtime over all of a model's layers on one device, and a
generation loop around it (prefill, then one decode iteration per token, as ``generate()``).

It assembles nothing of its own: loading, the cache, the link, the policy and the router
observer are the shard runtime's (``actors/shard.py``); a pipeline stage is the same runtime
over a range of layers. Sampling is the runtime's ``TokenSampler`` with a private generator
per request, so the process's global RNG is never touched.

Lifecycle: ``OffloadEngine(config)`` loads; ``generate`` runs; ``stats`` reads the cache
counters; ``reset`` empties the cache; ``close`` stops the transfer worker.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

from expertmap.actors.cache_stats import CacheStats
from expertmap.actors.config import EngineConfig
from expertmap.actors.sampling import SamplingParams
from expertmap.actors.shard import MicroBatch, ShardRuntime, Step
from expertmap.predictor.policies import PolicyInputs

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    token_ids: list[int]
    ttft_s: float
    tpot_s: list[float]  # one entry per decode iteration
    stats: CacheStats
    iteration_times: list[float] = field(default_factory=list)  # seconds from the start to each iteration's end
    finish_reason: str = "length"


class OffloadEngine:
    def __init__(self, config: EngineConfig, inputs: PolicyInputs | None = None, progress: bool = False,
                 layer_time_s: float | None = None):  # fmt: skip
        """``layer_time_s``: one decoder layer's decode time for an emulated link's copy/layer
        ratio (None: measured at start-up). Engines compared on one link should share it: this
        machine's speed drifts, and each measurement would give its engine another link."""
        self.config = config
        self.runtime = ShardRuntime(config, inputs=inputs, progress=progress, layer_time_s=layer_time_s)
        rt = self.runtime
        self.model, self.tokenizer, self.device = rt.model, rt.tokenizer, rt.device
        self.layers, self.num_experts, self.top_k = rt.moe, rt.num_experts, rt.top_k
        self.host, self.cache, self.policy = rt.host, rt.cache, rt.policy
        self.num_slots, self.budget_bytes = rt.num_slots, rt.budget_bytes
        self.layer_time_s, self.bandwidth, self.link_mode = rt.layer_time_s, rt.bandwidth, rt.link_mode
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else list(eos or []))
        self._ids = itertools.count()

    def subscribe(self, listener) -> None:
        self.runtime.subscribe(listener)

    def reset(self) -> None:
        """Empty the cache (resident experts stay for `resident`), clear statistics and traces."""
        self.runtime.reset()

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model at {self.config.model} has no tokenizer: pass token ids")
            ids = self.tokenizer(prompt).input_ids
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        seed: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        min_new_tokens: int | None = None,
        on_token=None,
    ) -> Generation:
        """Generate ``max_new_tokens`` tokens (by default EOS is suppressed until then; with
        ``min_new_tokens``, e.g. 0, the model may stop at its end-of-sequence token).
        ``on_token(token)`` is called as each token is chosen. Tokens equal transformers'
        ``generate()`` on the plain model (greedy; seeded sampling after ``torch.manual_seed``)."""
        ids = self.encode(prompt)
        params = SamplingParams(max_new_tokens, do_sample, temperature, top_p, seed, min_new_tokens)
        rid = f"engine-{next(self._ids)}"
        before = self.cache.snapshot_stats()
        step = Step(rid, 0, ids, params)
        new: list[int] = []
        ends: list[float] = []
        reason = None
        t0 = time.perf_counter()
        try:
            while reason is None:
                self.runtime.forward(MicroBatch([step]))
                ends.append(time.perf_counter())
                new.append(step.token)
                if on_token is not None:
                    on_token(step.token)
                reason = params.finish_reason(len(new), step.token, self.eos_ids)
                step = Step(rid, step.start + len(step.token_ids), [step.token])
        finally:
            self.runtime.forward(MicroBatch([], release=[rid]))
        return Generation(
            text=self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer is not None else "",
            prompt_tokens=len(ids),
            token_ids=new,
            ttft_s=ends[0] - t0,
            tpot_s=[b - a for a, b in zip(ends, ends[1:])],
            stats=self.cache.snapshot_stats().minus(before),
            iteration_times=[t - t0 for t in ends],
            finish_reason=reason,
        )

    @property
    def overhead_frac(self) -> float:
        """The policy's callbacks on the compute thread as a fraction of iteration time."""
        return self.runtime.overhead_frac

    @property
    def prediction_frac(self) -> float:
        """The policy's callbacks and its own threads together as a fraction of iteration time."""
        return self.runtime.prediction_frac

    @property
    def decision_frac(self) -> float:
        """The cache worker's decisions (plan, victims, admission) as a fraction of iteration time."""
        return self.runtime.decision_frac

    @property
    def waiting_frac(self) -> float:
        """The share of iteration time the compute thread waited for the interpreter, a core or a
        lock (neither computing nor stalled for an expert); see ``ShardRuntime.waiting_frac``."""
        return self.runtime.waiting_frac

    @property
    def unstalled_s(self) -> float:
        """Mean seconds of an iteration not stalled for an expert (``ShardRuntime.unstalled_s``)."""
        return self.runtime.unstalled_s

    @property
    def process_frac(self) -> float:
        """The policy's planner process's CPU time as a fraction of iteration time (another core's)."""
        return self.runtime.process_frac

    @property
    def stats(self) -> CacheStats:
        return self.cache.snapshot_stats()

    @property
    def trace(self) -> list[list[list[int]]]:
        """[iteration][MoE layer] -> the experts selected: the oracle's input for a second pass."""
        return self.runtime.runner.trace

    def close(self) -> None:
        self.runtime.close()
