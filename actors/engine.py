"""The offloading engine of one device: load a Hugging Face MoE model, keep its routed experts in
host memory and a budgeted cache of them on the device, and generate with the model's own code.

Lifecycle: ``OffloadEngine(config)`` loads (model, host store, cache, link calibration);
``generate`` runs; ``stats`` reads the cache counters; ``close`` stops the transfer worker.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from expertmap.actors.adapters import adapter_for
from expertmap.actors.cache_stats import CacheStats
from expertmap.actors.checkpoint import CheckpointReader
from expertmap.actors.config import EngineConfig
from expertmap.actors.expert_cache import CacheBudgetError, ExpertCache
from expertmap.actors.host_store import HostExpertStore
from expertmap.actors.offloaded_experts import EXPERTS_IMPLEMENTATION, ExpertRunner, register_experts_implementation
from expertmap.actors.recorder import RoutingRecorder
from expertmap.actors.slot_pool import SlotPool
from expertmap.actors.transfer import EmulatedLink, InstantLink, make_transfer
from expertmap.predictor.policies import POLICIES, PolicyContext, make_policy

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelFolderError(ValueError):
    pass


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    token_ids: list[int]
    ttft_s: float
    tpot_s: list[float]  # one entry per decode iteration
    stats: CacheStats
    iteration_times: list[float] = field(default_factory=list)


def check_model_folder(folder: Path) -> dict:
    """Refuse folders that would run code: remote code or pickled weights."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map"):
        raise ModelFolderError(
            f"model folder {folder} asks to run its own code (auto_map in config.json); ExpertMap loads "
            "only transformers' built-in architectures and never runs code from a model folder"
        )
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        why = f" (found pickled weights {', '.join(pickles)})" if pickles else ""
        raise ModelFolderError(f"model folder {folder} has no safetensors weights{why}; ExpertMap loads only safetensors")
    return config


def load_plain_model(folder: Path, dtype: str = "auto", experts_implementation: str = "eager") -> nn.Module:
    """The un-offloaded reference model (used by tests and the lossless check)."""
    from transformers import AutoModelForCausalLM

    check_model_folder(Path(folder))
    kwargs = {} if dtype == "auto" else {"dtype": _DTYPES[dtype]}
    model = AutoModelForCausalLM.from_pretrained(
        folder, experts_implementation=experts_implementation, use_safetensors=True, trust_remote_code=False, **kwargs
    )
    return model.eval().requires_grad_(False)


def _load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none (engines then take token ids)."""
    from transformers import AutoTokenizer

    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(folder)


def open_model_folder(folder: Path):
    """(Hugging Face config, adapter) of a model folder that ExpertMap can serve, or a clear error."""
    from transformers import AutoConfig

    check_model_folder(folder)
    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    adapter = adapter_for(hf_config)  # clear error for unsupported architectures
    if getattr(hf_config, "quantization_config", None):
        raise ModelFolderError(f"model folder {folder} is quantized; ExpertMap reads unquantized checkpoints only")
    register_experts_implementation()
    return hf_config, adapter


def slots_for_budget(config: EngineConfig, host: HostExpertStore, top_k: int) -> tuple[int, int]:
    """(expert slots, budget bytes) for the experts of ``host``: a fractional budget is a share of
    them (a pipeline stage: of its own layers' experts), a byte budget is this device's memory."""
    total = host.total_bytes
    all_resident = getattr(POLICIES.get(config.policy), "all_resident", False)
    budget_bytes = total if all_resident else config.budget.resolve(total)
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


class OffloadEngine:
    def __init__(
        self,
        config: EngineConfig,
        trace: list | None = None,
        progress: bool = False,
        extra_policy_options: dict | None = None,
    ):
        self.config = config
        self.device = torch.device(config.device)
        folder = Path(config.model)
        hf_config, self.adapter = open_model_folder(folder)
        self.model = load_plain_model(folder, config.dtype, EXPERTS_IMPLEMENTATION)
        self.tokenizer = _load_tokenizer(folder)
        self.layers = self.adapter.moe_layers(self.model)
        if not self.layers:
            raise ModelFolderError(f"model at {folder} has no MoE layers")
        self.num_experts = self.adapter.num_experts(hf_config)
        self.top_k = self.adapter.top_k(hf_config)
        dtype = next(self.model.parameters()).dtype

        pin = self.device.type == "cuda" and config.pin_host_memory
        self.host = HostExpertStore(
            self.adapter, CheckpointReader(folder), self.layers, self.num_experts, dtype, pin, progress
        )
        mode = resolve_link_mode(config.link, self.device)
        self.layer_time_s: float | None = None
        if mode == "emulated" and config.link.bandwidth_bytes_per_s is None:
            if config.link.copy_layer_ratio is None:  # say so before the measurement, not after
                raise ValueError("emulated link needs copy_layer_ratio or bandwidth_bytes_per_s")
            self.layer_time_s = self._measure_layer_time()
        drop_fused_experts(self.adapter, self.layers)
        self.model.to(self.device)

        num_slots, self.budget_bytes = slots_for_budget(config, self.host, self.top_k)
        self.num_slots = num_slots
        options = {"trace": trace} if trace is not None else {}
        options.update(extra_policy_options or {})
        self.policy = make_policy(
            config.policy,
            PolicyContext(len(self.layers), self.num_experts, self.top_k, num_slots, config.prefetch, options),
        )
        self.pool = SlotPool(num_slots, self.host.shapes, dtype, self.device)
        self.link_mode = mode
        first = make_transfer("cuda" if mode == "cuda" else "instant", self.pool, self.device, None)
        self.cache = ExpertCache(
            self.pool, first, self.policy, self.host.at_precision, self.host.expert_bytes,
            precision_bytes=self.host.precision_bytes,
        )
        self.policy_s = 0.0  # time in policy callbacks on the compute thread (critical path)
        self.iterations_s = 0.0
        self.runner = ExpertRunner(self.adapter, self.cache, self._timed(self.policy.on_layer_start))
        self.runner.num_layers = len(self.layers)
        for layer in self.layers:
            layer.experts._expertmap_layer = layer.index
            layer.experts._expertmap_runner = self.runner

        self.recorder = RoutingRecorder(
            self.adapter, self.layers, on_router=self._timed(self.policy.on_router), on_embedding=self._embedding_ready
        )
        self.recorder.attach_embedding(self.model.get_input_embeddings())
        self.iteration = -1
        self._iteration_ends: list[float] = []
        decoder = self.model.model
        decoder.register_forward_pre_hook(self._iteration_start)
        decoder.register_forward_hook(self._iteration_end)
        self.bandwidth: float | None = None
        if mode == "emulated":
            self._calibrate_link()
        if self.policy.all_resident:
            self.cache.preload(self.host.keys())
        logger.info(
            "engine ready: %s, %d MoE layers x %d experts, %d slots (%.1f%%), policy %s, link %s",
            folder.name, len(self.layers), self.num_experts, num_slots, 100 * num_slots / len(self.host),
            config.policy, mode,
        )

    # --- set-up helpers -----------------------------------------------------------------------
    def _measure_layer_time(self) -> float:
        return measure_layer_time(self.model, calibration_ids(self.tokenizer, self.model.config), self.device)

    def _calibrate_link(self) -> None:
        """Set the emulated link's bandwidth (given, or from the ratio and the measured layer time)."""
        bandwidth = link_bandwidth(self.config.link, self.host.expert_bytes, self.layer_time_s)
        self.bandwidth = bandwidth
        self.cache.transfer = EmulatedLink(self.pool, bandwidth)
        self.reset()
        logger.info(
            "emulated link: %.3g B/s (layer decode time %s, one expert copy = %.2f ms)",
            bandwidth,
            f"{self.layer_time_s * 1e3:.3f} ms" if self.layer_time_s else "n/a",
            1e3 * self.host.expert_bytes / bandwidth,
        )

    def reset(self) -> None:
        """Empty the cache (resident experts stay for `resident`), clear statistics and traces."""
        self.cache.clear(keep_all=self.policy.all_resident)
        self.runner.trace = []
        self.recorder.records = []
        self.iteration = -1
        self.policy_s = 0.0
        self.iterations_s = 0.0

    # --- iteration hooks ------------------------------------------------------------------------
    def _timed(self, fn):
        def timed(*args):
            t0 = time.perf_counter()
            fn(*args)
            self.policy_s += time.perf_counter() - t0

        return timed

    @property
    def overhead_frac(self) -> float:
        """The predictor's critical-path cost as a fraction of iteration time."""
        return self.policy_s / self.iterations_s if self.iterations_s else 0.0

    def _iteration_start(self, module, args, kwargs=None):
        self._iteration_t0 = time.perf_counter()
        self.iteration += 1
        self.runner.start_iteration()

    def _embedding_ready(self, embedding: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.policy.on_iteration_start(self.iteration, embedding)
        self.cache.poke()
        self.policy_s += time.perf_counter() - t0

    def _iteration_end(self, module, args, output):
        self.recorder.finish_iteration(self.iteration)
        t0 = time.perf_counter()
        self.policy.on_iteration_end(self.iteration)
        end = time.perf_counter()
        self.policy_s += end - t0
        self.iterations_s += end - self._iteration_t0
        self._iteration_ends.append(end)

    # --- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_ids(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool,
        seed: int,
        streamer=None,
        stopping_criteria=None,
        min_new_tokens: int | None = None,
        **sampling,
    ):
        torch.manual_seed(seed)
        extra = {}
        if streamer is not None:
            extra["streamer"] = streamer
        if stopping_criteria is not None:
            extra["stopping_criteria"] = stopping_criteria
        return self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if min_new_tokens is None else min_new_tokens,
            do_sample=do_sample,
            pad_token_id=self._pad_id,
            **({"temperature": sampling.get("temperature", 1.0), "top_p": sampling.get("top_p", 1.0)} if do_sample else {}),
            **extra,
        )

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        seed: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        streamer=None,
        stopping_criteria=None,
        min_new_tokens: int | None = None,
    ) -> Generation:
        """Generate ``max_new_tokens`` tokens (by default EOS is suppressed until then).

        Serving options (all default to the behaviour above): ``streamer`` is passed to
        ``model.generate(streamer=...)`` (a transformers ``BaseStreamer``: ``put`` gets the prompt
        ids first, then each new token); ``stopping_criteria`` (a ``StoppingCriteriaList``) can end
        the generation early, e.g. on a cancel flag or a stop string; ``min_new_tokens`` (e.g. 0)
        lets the model stop at its end-of-sequence token before ``max_new_tokens``.
        """
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model at {self.config.model} has no tokenizer: pass token ids")
            ids = self.tokenizer(prompt).input_ids
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        ids_t = torch.tensor([ids], device=self.device)
        self.policy.on_request_start()
        before = self.cache.snapshot_stats()
        self._iteration_ends = []
        t0 = time.perf_counter()
        out = self._generate_ids(
            ids_t, max_new_tokens, do_sample, seed, streamer=streamer, stopping_criteria=stopping_criteria,
            min_new_tokens=min_new_tokens, temperature=temperature, top_p=top_p,
        )  # fmt: skip
        ends = self._iteration_ends
        new = out[0, len(ids) :].tolist()
        return Generation(
            text=self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer is not None else "",
            prompt_tokens=len(ids),
            token_ids=new,
            ttft_s=ends[0] - t0 if ends else 0.0,
            tpot_s=[b - a for a, b in zip(ends, ends[1:])],
            stats=self.cache.snapshot_stats().minus(before),
            iteration_times=[t - t0 for t in ends],
        )

    @property
    def _pad_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        cfg = self.model.config
        return cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id

    @property
    def stats(self) -> CacheStats:
        return self.cache.snapshot_stats()

    @property
    def trace(self) -> list[list[list[int]]]:
        return self.runner.trace

    def close(self) -> None:
        self.cache.close()
        self.policy.close()
