"""The shard runtime: a contiguous range of decoder layers on one device, with that device's
expert cache, transfer engine, prediction policy and router observer. It is the one class that
runs layers: the in-process engine (``actors/engine.py``) is it over all layers, a pipeline
stage is it over its range inside a Ray actor (``cluster/stage_actor.py``); tests chain several
in-process. A plain class (no Ray). Only the shard's own tensors are read (``shard_loader``).

What travels between stages is a ``MicroBatch``: one ``Step`` per request (that request's
iteration: its prompt at prefill, one token at decode). A step carries its activations, the
iteration's semantic embedding (stage 0 computes it from the token embeddings) and the
*trajectory*: the pooled router distribution of every MoE layer run so far in this iteration, so
a downstream stage's policy predicts from all earlier layers, not only its own. The last stage
turns the activations into the next token (``TokenSampler``: generate()'s own rules) and
publishes each finished iteration's expert map (its embedding and all L layers' distributions).

Each request's KV cache lives on the stage that owns its layers, keyed by the request id, from
its prefill until a micro-batch lists it in ``release``. A micro-batch is one pass per layer:
attention per request over its own KV cache (no padding), then the layer's MLP once over all
the micro-batch's tokens, packed: the router runs once, each routed expert is applied once to
every token routed to it, and the cache sees the micro-batch's union of experts, so one copy
serves every request that needs it. A request alone computes exactly what the model's own layer
computes; in a micro-batch, the packed matmuls may round differently (docs/architecture.md).
For the policy the micro-batch is one iteration of a batch: one semantic embedding per request,
the earlier stages' router distributions per request, a router event per layer over all tokens.

Observers: ``subscribe(listener)`` adds an object whose optional methods ``on_iteration_start
(iteration, steps)``, ``on_router(request_index, event)`` (that request's tokens),
``on_layer(layer, experts)`` (the micro-batch's experts) and ``on_iteration_end(iteration,
steps)`` see every iteration (the trace recorder, ``actors/trace_recorder.py``, is one).

Lifecycle: ``ShardRuntime(config, spec)`` loads; ``warm_up``; ``forward`` (many times);
``health``; ``stats``; ``reset``; ``close``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from expertmap.actors.batched_attention import DecodeBatch, can_batch_decode
from expertmap.actors.cache_stats import CacheStats
from expertmap.actors.checkpoint import CheckpointReader
from expertmap.actors.config import EngineConfig
from expertmap.actors.expert_cache import CacheBudgetError, ExpertCache
from expertmap.actors.host_compute import attach_host_compute
from expertmap.actors.host_store import HostExpertStore
from expertmap.actors.model_folder import ModelFolderError, load_plain_model, load_tokenizer, open_model_folder
from expertmap.actors.shard_loader import build_skeleton, load_shard_tensors
from expertmap.actors.offloaded_experts import EXPERTS_IMPLEMENTATION, ExpertRunner
from expertmap.actors.sampling import SamplingParams, TokenSampler, log_probs
from expertmap.actors.slot_pool import SlotPool
from expertmap.actors.transfer import EmulatedLink, make_transfer
from expertmap.predictor.policies import PolicyInputs, make_policy, policy_class
from expertmap.predictor.policies.base import Position, RouterEvent

logger = logging.getLogger(__name__)


class StageStateError(RuntimeError):
    """A step arrived for a request this stage holds no (or another) KV cache for."""


@dataclass(frozen=True)
class StageSpec:
    index: int  # 0..count-1
    count: int  # stages in the pipeline
    start: int  # first decoder layer (inclusive)
    end: int  # last decoder layer (exclusive)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def split_layers(num_layers: int, stages: int, split: list[int] | None = None) -> list[StageSpec]:
    """Contiguous shards: ``split`` gives each stage's number of decoder layers; by default even
    (the first ``num_layers % stages`` stages take one more)."""
    if stages < 1:
        raise ValueError(f"stages={stages}: a pipeline needs at least one stage")
    if split is None:
        if stages > num_layers:
            raise ValueError(f"{stages} stages for {num_layers} decoder layers: every stage needs at least one layer")
        base, extra = divmod(num_layers, stages)
        split = [base + (i < extra) for i in range(stages)]
    if len(split) != stages or sum(split) != num_layers or min(split) < 1:
        raise ValueError(
            f"layer split {split}: needs {stages} positive counts summing to the model's {num_layers} decoder layers"
        )
    specs, start = [], 0
    for i, n in enumerate(split):
        specs.append(StageSpec(i, stages, start, start + n))
        start += n
    return specs


@dataclass
class Step:
    """One request's iteration as it travels through the stages."""

    rid: str
    start: int  # tokens of this request already in the KV caches (position of the first new token)
    token_ids: list[int]  # the iteration's new tokens: the prompt at prefill, one token at decode
    sampling: SamplingParams | None = None  # set at prefill (the last stage keeps its sampler)
    hidden: torch.Tensor | None = None  # [1, T, H] activations leaving the previous stage
    embedding: torch.Tensor | None = None  # [1, D] semantic embedding (stage 0 sets it)
    trajectory: np.ndarray | None = None  # [l, J] pooled router distribution of MoE layers run so far
    token: int | None = None  # the last stage's choice
    cache: CacheStats = field(default_factory=CacheStats)  # cache counters during this step, summed over stages
    # the last stage's log-probabilities (SamplingParams.logprobs / prompt_logprobs; None when not asked):
    token_logprob: float | None = None  # of ``token`` under the model's raw distribution
    top_logprobs: list[tuple[int, float]] | None = None  # the N most likely (token, logprob) at that position
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # prefill: prompt tokens 1.. each


@dataclass
class MicroBatch:
    steps: list[Step]
    release: list[str] = field(default_factory=list)  # finished requests: free their KV caches
    stage_s: list[float] = field(default_factory=list)  # each stage's compute time for it, in order


@dataclass
class _RequestState:
    cache: object  # transformers DynamicCache over the model's layers (this stage fills its own)
    length: int = 0
    sampler: TokenSampler | None = None


class ShardRuntime:
    def __init__(
        self,
        config: EngineConfig,
        spec: StageSpec | None = None,
        layer_time_s: float | None = None,
        inputs: PolicyInputs | None = None,
        progress: bool = False,
    ):
        """``spec``: the decoder layers to run (None: all of them, the in-process engine);
        ``layer_time_s``: one decoder layer's decode time, measured here when an emulated link
        needs it and none is given; ``inputs``: what the policy needs besides the cache's shape."""
        self.config = config
        self.device = torch.device(config.device)
        folder = Path(config.model)
        self.hf_config, self.adapter = open_model_folder(folder)
        model = build_skeleton(folder, self.hf_config, config.dtype)  # on meta: no weights yet
        self.tokenizer = load_tokenizer(folder)
        decoder_layers = self.adapter.decoder_layers(model)
        spec = spec or StageSpec(0, 1, 0, len(decoder_layers))
        if spec.end > len(decoder_layers):
            raise ValueError(f"stage {spec} ends past the model's {len(decoder_layers)} decoder layers")
        self.spec = spec
        all_moe = self.adapter.moe_layers(model)
        if not all_moe:
            raise ModelFolderError(f"model at {folder} has no MoE layers")
        self.num_moe_layers = len(all_moe)
        self.moe = [m for m in all_moe if spec.start <= m.decoder_index < spec.end]
        self.num_experts = self.adapter.num_experts(self.hf_config)
        self.top_k = self.adapter.top_k(self.hf_config)
        self.moe_before = sum(1 for m in all_moe if m.decoder_index < spec.start)  # trajectory rows expected

        mode = resolve_link_mode(config.link, self.device)
        self.link_mode = mode
        self.layer_time_s = layer_time_s
        needs_time = mode == "emulated" and config.link.bandwidth_bytes_per_s is None
        if needs_time and config.link.copy_layer_ratio is None:  # say so before the measurement, not after
            raise ValueError("emulated link needs copy_layer_ratio or bandwidth_bytes_per_s")
        if needs_time and layer_time_s is None:
            self.layer_time_s = measure_folder_layer_time(folder, config.dtype, self.device)

        self.model = model
        self._keep_shard(decoder_layers)
        reader = CheckpointReader(folder)
        self.bytes_read = load_shard_tensors(model, reader, self.hf_config)  # this shard's tensors only
        self.layers = [decoder_layers[i] for i in range(spec.start, spec.end)]
        self.model.to(self.device)
        dtype = next(self.model.parameters()).dtype

        pin = self.device.type == "cuda" and config.pin_host_memory
        self.host = HostExpertStore(self.adapter, reader, self.moe, self.num_experts, dtype, pin, progress)
        self.bytes_read += self.host.total_bytes
        self.num_slots, self.budget_bytes = slots_for_budget(config, self.host, self.top_k)
        inputs = inputs or PolicyInputs()
        if inputs.tuning is None:  # the policy's settings shipped with this model, if any
            inputs = replace(inputs, tuning=policy_class(config.policy).tuning_for_model(folder))
        self.replica = inputs.replica
        self.publish = inputs.publish and spec.last  # the last stage publishes each request's finished map
        owned = None if len(self.moe) == self.num_moe_layers else tuple(m.index for m in self.moe)
        self.bandwidth: float | None = None
        copy_layers = 0.0 if mode == "instant" else None  # a CUDA link's copy time is not known ahead
        if mode == "emulated":
            self.bandwidth = link_bandwidth(config.link, self.host.expert_bytes, self.layer_time_s)
            copy_layers = self.host.expert_bytes / self.bandwidth / self.layer_time_s
        routers = self._linear_routers() if policy_class(config.policy).needs_linear_routers else None
        ctx = inputs.context(self.num_moe_layers, self.num_experts, self.top_k, self.num_slots, config.prefetch,
                             owned, publish=False, copy_layers=copy_layers, linear_routers=routers,
                             hidden_size=self.hf_config.hidden_size)  # fmt: skip
        self.policy = make_policy(config.policy, ctx)
        self.pool = SlotPool(self.num_slots, self.host.shapes, dtype, self.device)
        first = make_transfer("cuda" if mode == "cuda" else "instant", self.pool, self.device, None)
        self.cache = ExpertCache(
            self.pool, first, self.policy, self.host.at_precision, self.host.expert_bytes,
            name=f"stage{spec.index}", precision_bytes=self.host.precision_bytes,
        )  # fmt: skip
        if mode == "emulated":
            self.cache.transfer = EmulatedLink(self.pool, self.bandwidth)
        self.policy_s = 0.0  # time in policy callbacks on the compute thread (the critical path)
        self.iterations_s = 0.0
        self.iterations_cpu_s = 0.0  # the compute thread's CPU time in them (``waiting_frac``)
        self.runner = ExpertRunner(self.adapter, self.cache, self._on_layer_start)
        self.runner.num_layers = self.num_moe_layers
        self.host_compute = attach_host_compute(self)  # --miss host|auto (None: copy); actors/host_compute.py
        for m in self.moe:
            m.experts._expertmap_layer = m.index
            m.experts._expertmap_runner = self.runner
        self._probs: list[list[torch.Tensor]] = []  # per request of the running micro-batch: [J] per own MoE layer
        self._lengths: list[int] = []  # tokens per request of the running micro-batch, in order
        self._listeners: list = []
        self._hooks = [m.router.register_forward_hook(self._router_hook(row)) for row, m in enumerate(self.moe)]
        self.attention_types = [self.adapter.attention_type(self.hf_config, i) for i in range(spec.start, spec.end)]
        self.batch_decode = can_batch_decode(self.adapter, self.hf_config, self.attention_types)
        if self.policy.all_resident:
            self.cache.preload(self.host.keys())
        self.requests: dict[str, _RequestState] = {}
        self.on_embeddings = None  # stage 0: callback(embeddings [B, D]) as soon as a micro-batch is embedded
        self.iteration = -1
        self.busy_s = 0.0
        self.steps_done = 0
        self._lock = threading.Lock()  # one forward at a time (a Ray actor may run health checks beside it)
        self._started = time.perf_counter()
        logger.info(
            "shard %d/%d ready: decoder layers %d..%d, %d MoE layers, %d slots (%.1f%% of its %d experts), "
            "policy %s, link %s%s",
            spec.index + 1, spec.count, spec.start, spec.end - 1, len(self.moe), self.num_slots,
            100 * self.num_slots / max(1, len(self.host)), len(self.host), config.policy, mode,
            f" ({self.bandwidth:.3g} B/s emulated)" if self.bandwidth else "",
        )  # fmt: skip

    # --- set-up ---------------------------------------------------------------------------------
    def _keep_shard(self, decoder_layers: nn.ModuleList) -> None:
        """Drop what other stages own: their decoder layers, the embedding (unless first or tied to
        the head of the last stage), the final norm and head (unless last); the fused experts."""
        spec = self.spec
        for i in range(len(decoder_layers)):
            if not spec.start <= i < spec.end:
                decoder_layers[i] = nn.Identity()
        inner = self.model.model
        tied = self.model.get_output_embeddings() is not None and (
            self.model.get_output_embeddings().weight is inner.embed_tokens.weight
        )
        if not spec.first and not (spec.last and tied):
            inner.embed_tokens = nn.Identity()
        if not spec.last:
            inner.norm = nn.Identity()
            self.model.lm_head = nn.Identity()
        drop_fused_experts(self.adapter, self.moe)

    def subscribe(self, listener) -> None:
        """See every iteration (module docstring): e.g. ``actors.trace_recorder.TraceRecorder``."""
        self._listeners.append(listener)

    def _emit(self, name: str, *args) -> None:
        for listener in self._listeners:
            fn = getattr(listener, name, None)
            if fn is not None:
                fn(*args)

    # --- lifecycle ------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """One short prefill and decode through this stage's layers alone, then forget it."""
        if not self.spec.first:
            return
        ids = calibration_ids(self.tokenizer, self.hf_config)[:4]
        mb = MicroBatch([Step("__warm_up__", 0, ids, SamplingParams(max_new_tokens=1))])
        self.forward(mb)
        self.forward(MicroBatch([], release=["__warm_up__"]))

    def health(self) -> dict:
        return {"stage": self.spec.index, "requests": len(self.requests), "iteration": self.iteration}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.cache.close()
        self.policy.close()

    # --- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, mb: MicroBatch) -> MicroBatch:
        with self._lock:
            for rid in mb.release:
                self.requests.pop(rid, None)
            if mb.steps:
                t0, c0 = time.perf_counter(), time.thread_time()
                self._run(mb.steps)
                elapsed = time.perf_counter() - t0
                self.iterations_cpu_s += time.thread_time() - c0
                mb.stage_s.append(elapsed)
                self.busy_s += elapsed
                self.iterations_s += elapsed
                self.steps_done += len(mb.steps)
        return mb

    def hint(self, embeddings: np.ndarray) -> int:
        """Stage 0 embedded a micro-batch that will come here: the policy may plan copies now
        (``Policy.on_hint``), so an idle link starts before the activations arrive. Thread-safe
        (a Ray actor calls it beside ``forward``); how many experts the policy planned."""
        planned = self.policy.on_hint(embeddings)
        self.cache.poke()
        return planned

    def _state(self, step: Step) -> _RequestState:
        state = self.requests.get(step.rid)
        if state is None:
            if step.start != 0:
                raise StageStateError(
                    f"stage {self.spec.index} holds no KV cache for request {step.rid!r} at position {step.start} "
                    "(the stage was restarted, or the request was released): the request must start again"
                )
            sampler = None
            if self.spec.last:
                params = step.sampling or SamplingParams()
                sampler = TokenSampler(params, len(step.token_ids), self.model.generation_config, self.device)
                sampler.ids = list(step.token_ids)  # later steps feed back the sampler's own tokens
            from transformers import DynamicCache

            state = _RequestState(DynamicCache(config=self.hf_config), 0, sampler)
            self.requests[step.rid] = state
            self._timed(self.policy.on_request_start)
        elif state.length != step.start:
            raise StageStateError(
                f"stage {self.spec.index}: request {step.rid!r} has {state.length} cached tokens, "
                f"the step starts at {step.start}"
            )
        return state

    def _linear_routers(self) -> dict:
        """{MoE layer: its router as NumPy} for this shard's layers, where the adapter can give it (a
        planner process computes the layer's distribution and the cross-layer gate with them)."""
        routers = {}
        for moe in self.moe:
            router = self.adapter.linear_router(moe.router, self.top_k)
            if router is not None:
                routers[moe.index] = router
        if len(routers) < len(self.moe):
            logger.info("stage %d: %d of %d routers are not linear maps a planner process can apply",
                        self.spec.index, len(self.moe) - len(routers), len(self.moe))  # fmt: skip
        return routers

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        fn(*args)
        self.policy_s += time.perf_counter() - t0

    def _on_layer_start(self, layer: int, experts: list[int]) -> None:
        self._timed(self.policy.on_layer_start, layer, experts)
        self._emit("on_layer", layer, experts)

    def _run(self, steps: list[Step]) -> None:
        """One iteration of every request in ``steps``, layer by layer."""
        for step in steps:
            rows = 0 if step.trajectory is None else len(step.trajectory)
            if rows != self.moe_before:
                raise StageStateError(f"stage {self.spec.index} expects the trajectory of {self.moe_before} "
                                      f"earlier MoE layers, got {rows} (request {step.rid!r})")  # fmt: skip
        states = [self._state(step) for step in steps]
        hidden = []
        for step in steps:
            if self.spec.first:
                ids = torch.tensor([step.token_ids], device=self.device)  # [1, T]
                h = self.model.model.embed_tokens(ids)  # [1, T, H]
                step.embedding = h.detach().float().mean(dim=1)  # [1, D]
            else:
                h = step.hidden.to(self.device)
            hidden.append(h)
        embeddings = torch.cat([s.embedding for s in steps])  # [B, D]
        if self.on_embeddings is not None:  # downstream stages start copying before the activations come
            self.on_embeddings(embeddings.cpu().numpy())
        self.iteration += 1
        self.runner.start_iteration()
        tokens = max(len(s.token_ids) for s in steps)  # > 1: a request's prefill is among them
        self._timed(self.policy.on_iteration_start, self.iteration, embeddings, tokens)
        self._emit("on_iteration_start", self.iteration, steps)
        self._replay_trajectories(steps)
        self.cache.poke()
        decode = self._decode_batch(steps, states, hidden)  # decode steps share one attention call
        alone = [i for i in range(len(steps)) if decode is None or i not in decode.rows]
        inputs = {i: self._layer_inputs(hidden[i], states[i].cache, steps[i].start) for i in alone}
        self._probs = [[] for _ in steps]
        self._lengths = [len(s.token_ids) for s in steps]
        before = self.cache.snapshot_stats()
        for layer, kind in zip(self.layers, self.attention_types):
            if decode is not None:
                decode.attend(self.adapter, layer, hidden)
            for i in alone:
                position_ids, masks, rotary = inputs[i]
                hidden[i] = self.adapter.attention_half(
                    layer, hidden[i], attention_mask=masks[kind], position_ids=position_ids, cache=states[i].cache,
                    use_cache=True, position_embeddings=rotary,
                )  # fmt: skip
            packed = self.adapter.mlp_half(layer, torch.cat(hidden, dim=1))  # [1, sum T, H]: one pass
            hidden = list(packed.split(self._lengths, dim=1))
        delta = self.cache.snapshot_stats().minus(before)  # the micro-batch's: its experts served all
        for step in steps:
            step.cache = step.cache.merge(delta)
        self._timed(self.policy.on_iteration_end, self.iteration)
        # what this stage does next is its first layer of the next iteration: say so to the policy
        # now, so that eviction, protection and admission of hinted prefetches look ahead from there
        self.policy.pos = Position(self.iteration + 1, self.moe_before - 1)
        if self.spec.last:  # the head once for the micro-batch's last positions
            logits = self.model.lm_head(self.model.model.norm(torch.cat([h[:, -1:, :] for h in hidden])))[:, -1, :]
        for i, (step, state) in enumerate(zip(steps, states)):
            if self._probs[i]:
                own = torch.stack(self._probs[i]).cpu().numpy()  # [L_own, J]
                step.trajectory = own if step.trajectory is None else np.concatenate([step.trajectory, own])
            state.length += len(step.token_ids)
            if self.spec.last:
                self._finish(step, state, hidden[i], logits[i : i + 1])  # [1, V]
            else:
                step.hidden = hidden[i]
        self._emit("on_iteration_end", self.iteration, steps)

    def _finish(self, step: Step, state: _RequestState, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Last stage: the next token from ``logits`` [1, V] of the last position (with its
        log-probabilities when asked), and the iteration's expert map to the store."""
        params = state.sampler.params
        if params.prompt_logprobs is not None and step.start == 0:
            normed = self.model.model.norm(hidden)  # [1, T, H]
            step.prompt_logprobs = self._prompt_logprobs(normed, step.token_ids, params.prompt_logprobs)
        step.token = state.sampler.next_token(logits)
        if params.logprobs is not None:
            picked, tops = log_probs(logits, torch.tensor([step.token]), params.logprobs)
            step.token_logprob, step.top_logprobs = picked[0], tops[0]
        step.hidden = None
        if self.publish and self.replica is not None and len(step.trajectory) == self.num_moe_layers:
            self.replica.publish_later(step.embedding[0].cpu().numpy(), step.trajectory)

    def _prompt_logprobs(self, normed: torch.Tensor, ids: list[int], top: int, chunk: int = 256) -> list:
        """(log-probability, top ``top``) of prompt tokens 1..T-1, each under the logits of the
        position before it (the first token has none), in chunks of positions (the logits of a
        whole long prompt at once would be T x vocabulary floats)."""
        out = []
        targets = torch.tensor(ids[1:])
        for a in range(0, len(ids) - 1, chunk):
            b = min(a + chunk, len(ids) - 1)
            logits = self.model.lm_head(normed[:, a:b, :])[0]  # [b - a, V]
            picked, tops = log_probs(logits, targets[a:b], top)
            out.extend(zip(picked, tops))
        return out

    def _router_hook(self, row: int):
        """The one router observer: after a router runs, keep the request's pooled distribution
        and tell the policy and the listeners (with the cross-layer gate of the next MoE layer
        of this shard, computed only if asked)."""
        layer = self.moe[row].index
        nxt = self.moe[row + 1].router if row + 1 < len(self.moe) else None

        def hook(module, args, output):
            probs = self.adapter.router_probs(output).detach()  # [sum T, J]: the micro-batch's tokens
            parts = probs.split(self._lengths)
            for mine, part in zip(self._probs, parts):
                mine.append(part.float().mean(dim=0))
            gate = None
            router_input = args[0].detach()  # [sum T, H]
            if nxt is not None:

                def gate():
                    with torch.no_grad():  # grad mode is per thread: the planner thread calling it has its own
                        return self.adapter.router_probs(nxt.forward(router_input))
            event = RouterEvent(layer, probs, gate, router_input)
            self._timed(self.policy.on_router, event)
            if self._listeners:
                start = 0
                for i, part in enumerate(parts):
                    rows = slice(start, start + len(part))
                    start += len(part)
                    part_gate = None if gate is None else (lambda rows=rows: event.next_gate()[rows])
                    self._emit("on_router", i, RouterEvent(layer, part, part_gate))

        return hook

    def _replay_trajectories(self, steps: list[Step]) -> None:
        """Show the policy what earlier stages' routers chose in this iteration, one event per
        earlier MoE layer with every request's distribution (no gate: the next layer's router
        input is not known here)."""
        for layer in range(self.moe_before):
            probs = torch.from_numpy(np.stack([s.trajectory[layer] for s in steps]))  # [B, J]
            self._timed(self.policy.on_router, RouterEvent(layer, probs))
            self.policy.pos.layer = layer

    def _decode_batch(self, steps: list[Step], states: list[_RequestState], hidden: list) -> DecodeBatch | None:
        """The micro-batch's one-token steps as one attention batch (None: fewer than two, or a
        layout that must attend per request)."""
        rows = [i for i, step in enumerate(steps) if len(step.token_ids) == 1]
        if len(rows) < 2 or not self.batch_decode:
            return None
        return DecodeBatch(
            rows, [steps[i].start for i in rows], [states[i].cache for i in rows], self.hf_config,
            self.model.model.rotary_emb, hidden[rows[0]],
        )  # fmt: skip

    def _layer_inputs(self, hidden: torch.Tensor, cache, start: int):
        """(position ids, masks by attention type, rotary embeddings) for one request at these
        positions, as the family's own ``Model.forward`` builds them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        T = hidden.shape[1]
        position_ids = torch.arange(start, start + T, device=self.device)[None]  # [1, T]
        attention_mask = torch.ones(1, start + T, dtype=torch.long, device=self.device)  # generate()'s mask
        masks = {}
        for kind, fn in (("full_attention", create_causal_mask), ("sliding_attention", create_sliding_window_causal_mask)):
            if kind in self.attention_types:
                first = self.spec.start + self.attention_types.index(kind)
                masks[kind] = fn(
                    config=self.hf_config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                    position_ids=position_ids, layer_idx=first,
                )  # fmt: skip
        return position_ids, masks, self.model.model.rotary_emb(hidden, position_ids)

    # --- figures --------------------------------------------------------------------------------
    @property
    def overhead_frac(self) -> float:
        """The policy's callbacks on the compute thread as a fraction of iteration time."""
        return self.policy_s / self.iterations_s if self.iterations_s else 0.0

    @property
    def prediction_frac(self) -> float:
        """The policy's callbacks and its own threads' work (a planner thread, hybrid's snapshot
        thread), as a fraction of iteration time: what prediction costs where the compute thread
        is Python-bound (those threads share the interpreter with it), an upper bound where it is
        not. The cache worker's decisions are apart (``decision_frac``)."""
        total = self.policy_s + self.policy.background_s
        return total / self.iterations_s if self.iterations_s else 0.0

    @property
    def decision_frac(self) -> float:
        """The cache worker's decisions (what to copy, which victim, admission: the policy's
        ``prefetch_plan``, ``choose_victim``, ``admit`` and the cache's own bookkeeping) as a
        fraction of iteration time: Python on this interpreter beside the compute thread."""
        return self.cache.decisions_s / self.iterations_s if self.iterations_s else 0.0

    @property
    def waiting_frac(self) -> float:
        """The share of iteration time the compute thread neither ran nor stalled for an expert:
        it waited for the interpreter (another thread of this process held the GIL), for a core
        (another process had it) or for a lock. On a CPU device, whose kernels run on this thread
        (one intra-op thread), it is what everything else running costs the critical path; on
        CUDA it also holds the waits for kernels."""
        if not self.iterations_s:
            return 0.0
        return max(0.0, self._unstalled_total_s() - self.iterations_cpu_s) / self.iterations_s

    @property
    def unstalled_s(self) -> float:
        """Mean seconds of an iteration the compute thread was not stalled for an expert: its
        compute, the policy's callbacks and its waits for the interpreter or a core. Two policies
        compute the same tokens, so on the same link and prompts the difference is what the one's
        prediction costs the critical path, everything included."""
        iterations = self.iteration + 1
        return self._unstalled_total_s() / iterations if iterations > 0 else 0.0

    def _unstalled_total_s(self) -> float:
        return max(0.0, self.iterations_s - self.cache.snapshot_stats().stall_s)

    @property
    def process_frac(self) -> float:
        """The CPU time of the policy's planner process (off this interpreter, on another core
        where there is one) as a fraction of iteration time; 0 for policies without one."""
        return self.policy.process_s / self.iterations_s if self.iterations_s else 0.0

    def stats(self) -> dict:
        s: CacheStats = self.cache.snapshot_stats()
        wall = time.perf_counter() - self._started
        return {
            "stage": self.spec.index,
            "layers": [self.spec.start, self.spec.end],
            "slots": self.num_slots,
            "hits": s.hits,
            "accesses": s.accesses,
            "misses": s.misses,
            "hit_rate": s.hit_rate,
            "stall_s": s.stall_s,
            "prefetched": s.prefetched,
            "prefetch_used": s.prefetch_used,
            "bytes_moved": s.bytes_moved,
            "busy_s": self.busy_s,
            "busy_frac": self.busy_s / wall if wall > 0 else 0.0,
            "steps": self.steps_done,
            "requests": len(self.requests),
        }

    def reset(self) -> None:
        """Empty the cache (resident experts stay for `resident`), clear statistics and traces."""
        with self._lock:
            self.cache.clear(keep_all=self.policy.all_resident)
            self.runner.trace = []
            self.iteration = -1
            self.busy_s = self.policy_s = self.iterations_s = self.iterations_cpu_s = 0.0
            self.steps_done = 0
            self._started = time.perf_counter()


# --- set-up helpers ---------------------------------------------------------------------------------
def slots_for_budget(config: EngineConfig, host: HostExpertStore, top_k: int) -> tuple[int, int]:
    """(expert slots, budget bytes) for the experts of ``host``: a fractional budget is a share of
    them (a pipeline stage: of its own layers' experts), a byte budget is this device's memory."""
    total = host.total_bytes
    budget_bytes = total if policy_class(config.policy).all_resident else config.budget.resolve(total)
    num_slots = min(len(host), budget_bytes // host.expert_bytes)
    if num_slots < top_k:
        need = top_k * host.expert_bytes
        raise CacheBudgetError(
            f"budget {config.budget} ({budget_bytes} bytes) holds {num_slots} experts; a layer can select "
            f"{top_k} (top-k) at once, so the smallest budget is {need} bytes "
            f"({need / total:.4f} of all {total} expert bytes)"
        )
    return num_slots, budget_bytes


def resolve_link_mode(link, device: torch.device) -> str:
    """The link a device uses: ``auto`` is a real CUDA copy stream on a GPU, the emulated link elsewhere."""
    if link.mode == "auto":
        return "cuda" if device.type == "cuda" else "emulated"
    return link.mode


def link_bandwidth(link, expert_bytes: int, layer_time_s: float | None) -> float:
    """The emulated link's bytes/s: given, or one expert copy = ``copy_layer_ratio`` layer times."""
    if link.bandwidth_bytes_per_s is not None:
        return link.bandwidth_bytes_per_s
    return expert_bytes / (link.copy_layer_ratio * layer_time_s)


def drop_fused_experts(adapter, moe_layers) -> None:
    """The fused expert tensors become empty placeholders: experts live in the host store."""
    for layer in moe_layers:
        for name in adapter.expert_params:
            setattr(layer.experts, name, nn.Parameter(torch.empty(0), requires_grad=False))


def calibration_ids(tokenizer, hf_config) -> list[int]:
    if tokenizer is not None:
        return tokenizer("The expert cache calibrates its link.").input_ids
    return [(7 * i + 3) % hf_config.vocab_size for i in range(8)]


def measure_folder_layer_time(folder: Path, dtype: str, device: torch.device) -> float:
    """``measure_layer_time`` on the folder's plain model, loaded for the measurement and dropped
    after it (the emulated link's calibration; a pipeline does it once, in a task of its own)."""
    model = load_plain_model(folder, dtype, EXPERTS_IMPLEMENTATION)
    try:
        return measure_layer_time(model, calibration_ids(load_tokenizer(folder), model.config), device)
    finally:
        del model


@torch.no_grad()
def measure_layer_time(model: nn.Module, ids: list[int], device: torch.device) -> float:
    """One decoder layer's decode time on this device: the plain model (all experts, eager loop),
    median decode step / number of decoder layers. Call it before the experts are dropped."""
    model.set_experts_implementation("eager")
    model.to(device)
    ids_t = torch.tensor([ids], device=device)

    def run(new_tokens: int) -> float:
        t0 = time.perf_counter()
        model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    run(4)  # warm-up
    estimates = sorted((run(13) - run(1)) / 12 for _ in range(3))  # decode steps only
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return max(estimates[1], 1e-6) / model.config.num_hidden_layers
