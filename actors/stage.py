"""One pipeline stage: a contiguous shard of decoder layers on one device, with that device's
expert cache, transfer engine and prediction policy. A plain class (no Ray): ``cluster/`` runs
one per GPU inside a Ray actor, tests chain them in-process.

What travels between stages is a ``MicroBatch``: one ``Step`` per request (that request's
iteration: its prompt at prefill, one token at decode). A step carries its activations, the
iteration's semantic embedding (stage 0 computes it from the token embeddings) and the
*trajectory*: the pooled router distribution of every MoE layer run so far in this iteration, so
a downstream stage's policy predicts from all earlier layers, not only its own. The last stage
turns the activations into the next token (``TokenSampler``: generate()'s own rules) and
publishes each finished iteration's expert map (its embedding and all L layers' distributions).

Each request's KV cache lives on the stage that owns its layers, keyed by the request id, from
its prefill until a micro-batch lists it in ``release``. A micro-batch runs layer by layer: at
each layer, every request's own computation in turn (no padding, so every request's numbers are
exactly those of running it alone), so an expert that one request loaded is resident for the
others at the same layer, as in a batched forward pass. For the policy the micro-batch is one
iteration of a batch: one semantic embedding per request, the earlier stages' router
distributions per request, and a router event per request and layer.

Lifecycle: ``PipelineStage(config, spec)`` loads; ``warm_up``; ``forward`` (many times);
``health``; ``stats``; ``close``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from expertmap.actors.cache_stats import CacheStats
from expertmap.actors.checkpoint import CheckpointReader
from expertmap.actors.config import EngineConfig
from expertmap.actors.engine import (
    _load_tokenizer,
    calibration_ids,
    drop_fused_experts,
    link_bandwidth,
    load_plain_model,
    measure_layer_time,
    open_model_folder,
    resolve_link_mode,
    slots_for_budget,
)
from expertmap.actors.expert_cache import ExpertCache
from expertmap.actors.host_store import HostExpertStore
from expertmap.actors.offloaded_experts import EXPERTS_IMPLEMENTATION, ExpertRunner
from expertmap.actors.sampling import SamplingParams, TokenSampler
from expertmap.actors.slot_pool import SlotPool
from expertmap.actors.transfer import EmulatedLink, make_transfer
from expertmap.predictor.policies import PolicyContext, make_policy
from expertmap.predictor.policies.base import Position, Prefetch, RouterEvent
from expertmap.predictor.search import experts_to_fetch

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


@dataclass
class MicroBatch:
    steps: list[Step]
    release: list[str] = field(default_factory=list)  # finished requests: free their KV caches


@dataclass
class _RequestState:
    cache: object  # transformers DynamicCache over the model's layers (this stage fills its own)
    length: int = 0
    sampler: TokenSampler | None = None


class PipelineStage:
    def __init__(
        self,
        config: EngineConfig,
        spec: StageSpec,
        layer_time_s: float | None = None,
        policy_options: dict | None = None,
        progress: bool = False,
    ):
        self.config = config
        self.spec = spec
        self.device = torch.device(config.device)
        folder = Path(config.model)
        self.hf_config, self.adapter = open_model_folder(folder)
        model = load_plain_model(folder, config.dtype, EXPERTS_IMPLEMENTATION)
        self.tokenizer = _load_tokenizer(folder)
        decoder_layers = self.adapter.decoder_layers(model)
        if spec.end > len(decoder_layers):
            raise ValueError(f"stage {spec} ends past the model's {len(decoder_layers)} decoder layers")
        all_moe = self.adapter.moe_layers(model)
        self.num_moe_layers = len(all_moe)
        self.moe = [m for m in all_moe if spec.start <= m.decoder_index < spec.end]
        self.num_experts = self.adapter.num_experts(self.hf_config)
        self.top_k = self.adapter.top_k(self.hf_config)
        self.moe_before = sum(1 for m in all_moe if m.decoder_index < spec.start)  # trajectory rows expected

        mode = resolve_link_mode(config.link, self.device)
        self.link_mode = mode
        self.layer_time_s = layer_time_s
        needs_time = mode == "emulated" and config.link.bandwidth_bytes_per_s is None
        if needs_time and config.link.copy_layer_ratio is None:
            raise ValueError("emulated link needs copy_layer_ratio or bandwidth_bytes_per_s")
        if needs_time and layer_time_s is None:
            self.layer_time_s = measure_layer_time(model, calibration_ids(self.tokenizer, self.hf_config), self.device)

        self.model = model
        self._keep_shard(decoder_layers)
        self.layers = [decoder_layers[i] for i in range(spec.start, spec.end)]
        self.model.to(self.device)
        dtype = next(self.model.parameters()).dtype

        pin = self.device.type == "cuda" and config.pin_host_memory
        self.host = HostExpertStore(
            self.adapter, CheckpointReader(folder), self.moe, self.num_experts, dtype, pin, progress
        )
        self.num_slots, self.budget_bytes = slots_for_budget(config, self.host, self.top_k)
        ctx = PolicyContext(
            self.num_moe_layers, self.num_experts, self.top_k, self.num_slots, config.prefetch,
            dict(policy_options or {}), layers=tuple(m.index for m in self.moe),
        )  # fmt: skip
        self.replica = ctx.options.get("replica")  # the last stage publishes maps (per request, below)
        ctx.options["publish"] = False
        self.policy = make_policy(config.policy, ctx)
        self.pool = SlotPool(self.num_slots, self.host.shapes, dtype, self.device)
        first = make_transfer("cuda" if mode == "cuda" else "instant", self.pool, self.device, None)
        self.cache = ExpertCache(
            self.pool, first, self.policy, self.host.at_precision, self.host.expert_bytes,
            name=f"stage{spec.index}", precision_bytes=self.host.precision_bytes,
        )  # fmt: skip
        self.bandwidth: float | None = None
        if mode == "emulated":
            self.bandwidth = link_bandwidth(config.link, self.host.expert_bytes, self.layer_time_s)
            self.cache.transfer = EmulatedLink(self.pool, self.bandwidth)
        self.runner = ExpertRunner(self.adapter, self.cache, self.policy.on_layer_start)
        self.runner.num_layers = self.num_moe_layers
        for m in self.moe:
            m.experts._expertmap_layer = m.index
            m.experts._expertmap_runner = self.runner
        self._probs: list[list[torch.Tensor]] = []  # per request of the running micro-batch: [J] per own MoE layer
        self._current = 0  # which request of the micro-batch is computing
        self._hooks = [m.router.register_forward_hook(self._router_hook(row)) for row, m in enumerate(self.moe)]
        self.attention_types = [self.adapter.attention_type(self.hf_config, i) for i in range(spec.start, spec.end)]
        if self.policy.all_resident:
            self.cache.preload(self.host.keys())
        self.requests: dict[str, _RequestState] = {}
        self.on_embeddings = None  # stage 0: callback(embeddings [B, D]) as soon as a micro-batch is embedded
        self.hint_distance = int(ctx.options.get("prefetch_distance", 3))
        self.iteration = -1
        self.busy_s = 0.0
        self.steps_done = 0
        self._lock = threading.Lock()  # one forward at a time (a Ray actor may run health checks beside it)
        self._started = time.perf_counter()
        logger.info(
            "stage %d/%d ready: decoder layers %d..%d, %d MoE layers, %d slots (%.1f%% of its %d experts), "
            "policy %s, link %s",
            spec.index + 1, spec.count, spec.start, spec.end - 1, len(self.moe), self.num_slots,
            100 * self.num_slots / max(1, len(self.host)), len(self.host), config.policy, mode,
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
                t0 = time.perf_counter()
                self._run(mb.steps)
                self.busy_s += time.perf_counter() - t0
                self.steps_done += len(mb.steps)
        return mb

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
            self.policy.on_request_start()
        elif state.length != step.start:
            raise StageStateError(
                f"stage {self.spec.index}: request {step.rid!r} has {state.length} cached tokens, "
                f"the step starts at {step.start}"
            )
        return state

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
        if self.on_embeddings is not None:  # downstream stages start copying before the activations come
            self.on_embeddings(torch.cat([s.embedding for s in steps]).cpu().numpy())
        self.cache.set_hint([])  # this micro-batch's own plan takes over
        self.iteration += 1
        self.policy.on_iteration_start(self.iteration, torch.cat([s.embedding for s in steps]))  # [B, D]
        self._replay_trajectories(steps)
        self.cache.poke()
        inputs = [self._layer_inputs(h, st.cache, s.start) for h, st, s in zip(hidden, states, steps)]
        self._probs = [[] for _ in steps]
        for layer, kind in zip(self.layers, self.attention_types):
            for i, (step, state, (position_ids, masks, rotary)) in enumerate(zip(steps, states, inputs)):
                self._current = i
                before = self.cache.snapshot_stats()
                hidden[i] = layer(
                    hidden[i], attention_mask=masks[kind], position_ids=position_ids, cache=state.cache,
                    use_cache=True, position_embeddings=rotary,
                )  # fmt: skip
                step.cache = step.cache.merge(self.cache.snapshot_stats().minus(before))
        self.policy.on_iteration_end(self.iteration)
        # what this stage does next is its first layer of the next iteration: say so to the policy
        # now, so that eviction, protection and admission of hinted prefetches look ahead from there
        self.policy.pos = Position(self.iteration + 1, self.moe_before - 1)
        for i, (step, state) in enumerate(zip(steps, states)):
            if self._probs[i]:
                own = torch.stack(self._probs[i]).cpu().numpy()  # [L_own, J]
                step.trajectory = own if step.trajectory is None else np.concatenate([step.trajectory, own])
            state.length += len(step.token_ids)
            if self.spec.last:
                self._finish(step, state, hidden[i])
            else:
                step.hidden = hidden[i]

    def _finish(self, step: Step, state: _RequestState, hidden: torch.Tensor) -> None:
        """Last stage: the next token, and the iteration's expert map to the store."""
        hidden = self.model.model.norm(hidden)
        logits = self.model.lm_head(hidden[:, -1:, :])[:, -1, :]  # [1, V]
        step.token = state.sampler.next_token(logits)
        step.hidden = None
        if self.replica is not None and step.trajectory is not None and len(step.trajectory) == self.num_moe_layers:
            self.replica.publish(step.embedding[0].cpu().numpy(), step.trajectory)

    def hint(self, embeddings: np.ndarray) -> int:
        """Stage 0 embedded a micro-batch that will come here: plan this stage's first ``d`` MoE
        layers from the semantic search (FineMoE's rule: the best stored map's experts up to the
        similarity-adjusted count, priority p / distance), so an idle link starts copying before
        the activations arrive. Thread-safe (a Ray actor calls it beside ``forward``); how many
        experts were planned."""
        index = self.replica.index() if self.replica is not None else None
        if index is None or not self.moe:
            return 0
        best_p: dict = {}
        for emb in np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1):  # [B, D]
            best, sim = index.semantic(emb)
            for rank, m in enumerate(self.moe[: self.hint_distance]):
                for e, p in experts_to_fetch(index.maps[best, m.index], sim, self.top_k):
                    key = (m.index, e)
                    best_p[key] = max(best_p.get(key, 0.0), p / (rank + 1))
        self.cache.set_hint([Prefetch(k, p) for k, p in best_p.items()])
        return len(best_p)

    def _router_hook(self, row: int):
        """After a router runs: keep the request's pooled distribution, tell the policy (with the
        cross-layer gate of the next MoE layer of this stage, computed only if asked)."""
        layer = self.moe[row].index
        nxt = self.moe[row + 1].router if row + 1 < len(self.moe) else None

        def hook(module, args, output):
            probs = self.adapter.router_probs(output).detach()  # [T, J]
            self._probs[self._current].append(probs.float().mean(dim=0))
            gate = None
            if nxt is not None:
                router_input = args[0].detach()
                gate = lambda: self.adapter.router_probs(nxt.forward(router_input)).detach()  # noqa: E731
            self.policy.on_router(RouterEvent(layer, probs, gate))

        return hook

    def _replay_trajectories(self, steps: list[Step]) -> None:
        """Show the policy what earlier stages' routers chose in this iteration, one event per
        earlier MoE layer with every request's distribution (no gate: the next layer's router
        input is not known here)."""
        for layer in range(self.moe_before):
            probs = torch.from_numpy(np.stack([s.trajectory[layer] for s in steps]))  # [B, J]
            self.policy.on_router(RouterEvent(layer, probs))
            self.policy.pos.layer = layer

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

    def reset_stats(self) -> None:
        with self._lock:
            self.cache.clear(keep_all=self.policy.all_resident)
            self.busy_s = 0.0
            self.steps_done = 0
            self._started = time.perf_counter()
