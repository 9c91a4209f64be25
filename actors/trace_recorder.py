"""Record what the model routes, once per prompt, for trace-driven replay of many policies.

A ``RequestTrace`` holds, per iteration: the semantic embedding, every MoE layer's router
distribution over the iteration's tokens, the cross-layer gate's distribution for the next layer
(next router applied to this layer's router input), and the experts each layer selected. It is
recorded with the real engine (`resident`, instant link) by a listener on its shard runtime's
events: lossless execution means every policy routes exactly the same way, so replaying this
trace gives each policy the inputs it would see. ``expertmap record`` and the bench use it.

The semantic embedding is, by default (``embedding="token"``), the model's token-embedding output
pooled over the iteration's tokens. With ``embedding="minilm"`` it is the all-MiniLM-L6-v2
sentence embedding (384 dims, ``predictor/sentence_embedding.py``) of the text the model has seen
so far in the request: the prompt at prefill, the prompt plus the tokens generated before it at
each decode step (token ids decoded with the model's tokenizer), embedded in one batch per request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from expertmap.actors.config import EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.predictor.policies.base import RouterEvent


@dataclass
class IterationTrace:
    embedding: np.ndarray  # [D]
    probs: list[np.ndarray] = field(default_factory=list)  # per layer [T, J]
    next_gate: list[np.ndarray | None] = field(default_factory=list)  # per layer [T, J]
    selected: list[list[int]] = field(default_factory=list)  # per layer

    @property
    def num_tokens(self) -> int:
        return self.probs[0].shape[0]

    def expert_map(self) -> np.ndarray:
        return np.stack([p.mean(axis=0) for p in self.probs])  # [L, J]


@dataclass
class RequestTrace:
    id: str
    category: str
    prompt: str
    text: str
    iterations: list[IterationTrace]


class TraceRecorder:
    """Runs prompts on a `resident` engine and keeps each iteration's routing.

    ``embedding``: "token" (the model's pooled token embeddings) or "minilm" (see module doc).
    ``embed_s`` / ``embed_iterations`` add up the time spent on MiniLM embeddings.
    """

    def __init__(self, model: Path, device: str = "cpu", max_prompt_tokens: int = 256,
                 embedding: Literal["token", "minilm"] = "token", embedder=None):  # fmt: skip
        if embedding not in ("token", "minilm"):
            raise ValueError(f"embedding {embedding!r}: use token or minilm")
        self.embedding = embedding
        self.embedder = None
        if embedding == "minilm":
            from expertmap.predictor.sentence_embedding import SentenceEmbedder

            self.embedder = embedder if embedder is not None else SentenceEmbedder(device=device)
            self.embedder.load()  # now (and fail now if the package is missing), not mid-recording
        self.embed_s = 0.0
        self.embed_iterations = 0
        self.engine = OffloadEngine(
            EngineConfig(model=model, device=device, policy="resident", link=LinkConfig(mode="instant"))
        )
        self.max_prompt_tokens = max_prompt_tokens
        self._current: list[IterationTrace] = []
        self.engine.subscribe(self)

    # --- shard runtime events (one request at a time) ----------------------------------------------
    def on_iteration_start(self, iteration: int, steps) -> None:
        self._current.append(IterationTrace(steps[0].embedding[0].float().cpu().numpy()))

    def on_router(self, request: int, event: RouterEvent) -> None:
        it = self._current[-1]
        it.probs.append(event.probs.float().cpu().numpy())
        gate = event.next_gate()
        it.next_gate.append(None if gate is None else gate.float().cpu().numpy())

    def on_layer(self, layer: int, experts: list[int]) -> None:
        self._current[-1].selected.append(list(experts))

    def record(self, rec: dict, max_new_tokens: int, do_sample: bool, seed: int) -> RequestTrace:
        tok = self.engine.tokenizer
        prompt = rec["prompt"]  # text, or token ids (a model folder without a tokenizer)
        ids = list(prompt) if not isinstance(prompt, str) else tok(prompt).input_ids[: self.max_prompt_tokens]
        ids = ids or [tok.bos_token_id]
        self._current = []
        self.engine.reset()
        g = self.engine.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed)
        if self.embedder is not None:
            self._embed_texts(ids, g.token_ids)
        return RequestTrace(rec["id"], rec["category"], str(prompt), g.text, self._current)

    def _embed_texts(self, prompt_ids: list[int], new_ids: list[int]) -> None:
        """Iteration i has seen the prompt and the first i generated tokens (the last one is its input)."""
        tok = self.engine.tokenizer
        t0 = time.perf_counter()  # decoding the texts counts: it is part of this embedding's cost
        texts = [tok.decode(prompt_ids + new_ids[:i], skip_special_tokens=True) for i in range(len(self._current))]
        vectors = self.embedder.embed(texts)
        self.embed_s += time.perf_counter() - t0
        self.embed_iterations += len(texts)
        for it, vec in zip(self._current, vectors):
            it.embedding = vec

    def record_all(self, records, max_new_tokens, do_sample, seed, desc="recording") -> list[RequestTrace]:
        return [self.record(r, max_new_tokens, do_sample, seed) for r in tqdm(records, desc=desc, unit="prompt")]

    def close(self) -> None:
        self.engine.close()
