"""Searches over the expert-map store: semantic (embedding cosine) and trajectory (prefix cosine).

Both work on a snapshot of the store's arrays (``embeddings [N, D]``, ``maps [N, L, J]``); a
replica rebuilds its ``SearchIndex`` when the store's version changes. Brute force in NumPy:
at the store sizes that matter (C <= 4,096 entries, D ~ 100s, L x J ~ 100s) a full scan is a
single small matrix-vector product, measured in ``bench/search_speed.py`` against FAISS.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def _faiss():
    try:
        import faiss

        return faiss
    except ImportError:
        return None


class SearchIndex:
    """Immutable snapshot of the store, with what the searches need precomputed.

    ``semantic_backend``: "numpy" (one matrix-vector product; the default, "auto") or "faiss" (an
    exact ``IndexFlatIP`` over unit vectors, same answer). At 4,096 entries x 128 dims both take
    tens of microseconds on this 2-core CPU, p99 well under 0.1 ms, FAISS no faster over repeated
    runs (bench/results/search_speed.json, ``python -m expertmap.bench.search_speed``): FAISS does not pay
    at the store sizes FineMoE uses (C <= 4,096), so NumPy is the default and FAISS an option.
    """

    def __init__(self, embeddings: np.ndarray, maps: np.ndarray, semantic_backend: str = "auto"):
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)  # [N, D]
        self.maps = np.ascontiguousarray(maps, dtype=np.float32)  # [N, L, J]
        norms = np.linalg.norm(self.embeddings, axis=1, keepdims=True)
        self.unit_embeddings = self.embeddings / np.maximum(norms, EPS)  # [N, D]
        # prefix_sq[n, l] = sum over layers 0..l of |maps[n, layer]|^2
        self.prefix_sq = np.cumsum((self.maps.astype(np.float64) ** 2).sum(axis=2), axis=1)  # [N, L]
        # per-layer maps transposed for one matvec per layer: [L, J, N]
        self.by_layer = np.ascontiguousarray(self.maps.transpose(1, 2, 0))
        if semantic_backend not in ("auto", "numpy", "faiss"):
            raise ValueError(f"semantic_backend {semantic_backend!r}: use auto, numpy or faiss")
        faiss = _faiss() if semantic_backend == "faiss" else None
        if semantic_backend == "faiss" and faiss is None:
            raise ValueError("semantic_backend 'faiss' needs the faiss-cpu package")
        self._faiss_index = None
        if faiss is not None and len(self.embeddings):
            self._faiss_index = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._faiss_index.add(self.unit_embeddings)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def num_layers(self) -> int:
        return self.maps.shape[1]

    def semantic(self, embedding: np.ndarray) -> tuple[int, float]:
        """(best entry, cosine similarity) for a query embedding [D]."""
        q = np.asarray(embedding, dtype=np.float32)
        q = q / max(float(np.linalg.norm(q)), EPS)
        if self._faiss_index is not None:
            sims, ids = self._faiss_index.search(q[None], 1)
            return int(ids[0, 0]), float(sims[0, 0])
        sims = self.unit_embeddings @ q  # [N]
        best = int(np.argmax(sims))
        return best, float(sims[best])

    def trajectory(self) -> TrajectorySearch:
        return TrajectorySearch(self)


class TrajectorySearch:
    """Incremental prefix cosine for one iteration: observe layers in order, ask for the best entry.

    After observing layers 0..l, ``best()`` returns the stored map whose layers 0..l are most
    cosine-similar to the observed ones (flattened), in O(N x J) per observed layer.
    """

    def __init__(self, index: SearchIndex):
        self.index = index
        self.dots = np.zeros(len(index), dtype=np.float64)  # [N]
        self.query_sq = 0.0
        self.observed = 0  # layers observed so far

    def observe(self, layer: int, distribution: np.ndarray) -> None:
        if layer != self.observed:
            raise ValueError(f"trajectory layers must come in order: expected layer {self.observed}, got {layer}")
        q = np.asarray(distribution, dtype=np.float32)  # [J]
        self.dots += self.index.by_layer[layer].T @ q  # [N]
        self.query_sq += float(q @ q)
        self.observed += 1

    def similarities(self) -> np.ndarray:
        if self.observed == 0:
            raise ValueError("no layer observed yet")
        denom = np.sqrt(self.index.prefix_sq[:, self.observed - 1] * self.query_sq)
        return self.dots / np.maximum(denom, EPS)  # [N]

    def best(self) -> tuple[int, float]:
        sims = self.similarities()
        best = int(np.argmax(sims))
        return best, float(sims[best])


def experts_to_fetch(distribution: np.ndarray, similarity: float, top_k: int) -> list[tuple[int, float]]:
    """FineMoE's similarity-adaptive expert count.

    delta = clip(1 - similarity, 0, 1); take experts in descending predicted probability until
    their cumulative probability reaches delta, but never fewer than top_k. Returns
    [(expert, probability)] in descending probability.
    """
    delta = min(max(1.0 - similarity, 0.0), 1.0)
    order = np.argsort(-distribution, kind="stable")
    chosen, total = [], 0.0
    for e in order:
        if len(chosen) >= top_k and total >= delta:
            break
        chosen.append((int(e), float(distribution[e])))
        total += float(distribution[e])
    return chosen


def union_max(predictions: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """For a batch: the union of the experts, each with its highest probability."""
    best: dict[int, float] = {}
    for pred in predictions:
        for e, p in pred:
            best[e] = max(best.get(e, 0.0), p)
    return sorted(best.items(), key=lambda ep: -ep[1])
