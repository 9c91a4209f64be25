"""Token selection for a pipeline's last stage, step for step as transformers' ``generate()`` does it.

The last stage holds one ``TokenSampler`` per request: the logits processors ``generate()`` would
build for the same options (EOS held back until ``min_new_tokens``; then temperature, top-k from
the model's generation config, top-p), and, when sampling, a private ``torch.Generator`` seeded
with the request's seed. A CPU generator seeded with ``s`` yields the same stream as
``torch.manual_seed(s)``, so a seeded request gives the same tokens as transformers' ``generate()``
after ``torch.manual_seed(s)``, while many requests interleave and the global generator is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from expertmap.actors import defaults

MAX_LOGPROBS = 20  # top log-probabilities per position at most (vLLM's default limit)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    min_new_tokens: int | None = None  # None: max_new_tokens (EOS suppressed, the engine's default)
    ignore_eos: bool = False  # an end-of-sequence token does not end the request (it runs to max_new_tokens)
    logprobs: int | None = None  # the last stage returns each new token's log-probability and the top N (0: none)
    prompt_logprobs: int | None = None  # at prefill: every prompt token's log-probability and the top N

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name}={value}: must be in [0, {MAX_LOGPROBS}]")

    @property
    def min_new(self) -> int:
        return self.max_new_tokens if self.min_new_tokens is None else self.min_new_tokens

    def finish_reason(self, generated: int, token: int, eos_ids: set[int]) -> str | None:
        """After ``generated`` new tokens, the last being ``token``: "length", "stop" (end of
        sequence once ``min_new_tokens`` are out) or None (go on), as ``generate()`` decides."""
        if generated >= self.max_new_tokens:
            return "length"
        if token in eos_ids and generated >= self.min_new and not self.ignore_eos:
            return "stop"
        return None


class TokenSampler:
    def __init__(self, params: SamplingParams, prompt_len: int, generation_config, device: torch.device):
        """Log-probabilities (``SamplingParams.logprobs``) are the caller's: see ``log_probs``."""
        from transformers import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.params = params
        eos = generation_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else list(eos or []))
        processors = LogitsProcessorList()
        if params.min_new > 0 and self.eos_ids:
            processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, params.min_new, sorted(self.eos_ids), device))
        if params.do_sample:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            top_k = _resolved(generation_config, "top_k")
            if top_k:
                processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
        self.processors = processors
        self.generator = None
        if params.do_sample:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.ids: list[int] = []  # prompt + generated, as generate()'s input_ids
        self.device = device

    def next_token(self, logits: torch.Tensor) -> int:
        """``logits``: [1, V] of the last position. Returns the chosen token and appends it."""
        ids = torch.tensor([self.ids], device=self.device)
        scores = self.processors(ids, logits.to(copy=True, dtype=torch.float32))  # [1, V]
        if self.generator is not None:
            probs = nn.functional.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0])
        else:
            token = int(torch.argmax(scores, dim=-1)[0])
        self.ids.append(token)
        return token


def _resolved(generation_config, name: str):
    """A generation option as ``generate()`` resolves it: the model's value, else transformers' own
    default (``top_k`` is 50 there when the model sets none)."""
    value = getattr(generation_config, name, None)
    if value is None:
        value = type(generation_config)._get_default_generation_params().get(name)
    return value


def log_probs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """The model's own distribution at each row of ``logits`` [P, V] (raw logits, before any
    temperature, top-k, top-p or EOS suppression): log-softmax in float32; the log-probability of
    ``chosen`` [P] in each row, and the ``top`` most likely (token, log-probability) pairs, most
    likely first."""
    lp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    picked = lp.gather(-1, chosen.view(-1, 1).to(lp.device)).squeeze(-1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in picked]
    if top > 0:
        values, ids = torch.topk(lp, k=min(top, lp.shape[-1]), dim=-1, sorted=True)
        values, ids = values.tolist(), ids.tolist()
        tops = [list(zip(i, v)) for i, v in zip(ids, values)]
    return picked, tops
