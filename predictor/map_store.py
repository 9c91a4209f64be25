"""The expert-map store: the bounded history of (semantic embedding, expert map) entries that
FineMoE searches.

An entry is one iteration's semantic embedding, float32 [D], and its expert map, float32 [L, J]:
the router's softmax distribution over the J routed experts at each of the L MoE layers (rows sum
to about 1). The store holds at most C entries (FineMoE: C = 1,000; beyond 4,096 gains little).

Bound rule (FineMoE): while fewer than C entries are stored, a new entry is appended; once full,
it replaces the stored entry most redundant with it, where

    redundancy(new, old) = (d/L) * cos(new.embedding, old.embedding)
                         + ((L-d)/L) * cos(flatten(new.map), flatten(old.map))

and d is the prefetch distance (semantic search covers layers 1..d, trajectory search the rest).
:func:`redundancy` scores all stored entries at once; both back ends (``map_store_memory``,
``map_store_redis``) choose their slot with it.

Readers (search replicas) poll :attr:`MapStore.version`, which increases on every change, and
take a consistent snapshot with :meth:`MapStore.arrays` when it moved.
"""

from __future__ import annotations

import abc
import logging
import threading
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1000
MAX_CAPACITY = 4096


class StoreMismatchError(ValueError):
    """An entry, a file or a persisted store does not fit this store (shape, model or values)."""


@dataclass(frozen=True)
class StoreMeta:
    """What a store is built for; persisted next to the entries and compared on open/load."""

    num_layers: int  # MoE layers L
    num_experts: int  # routed experts per layer J
    embed_dim: int  # semantic embedding size D
    capacity: int  # most entries C
    prefetch_distance: int  # d, weights the redundancy rule

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "embed_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if not _is_int(self.capacity) or not 1 <= self.capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity={self.capacity!r}: must be an integer in 1..{MAX_CAPACITY}")
        d = self.prefetch_distance
        if not _is_int(d) or not 0 <= d <= self.num_layers:
            raise ValueError(f"prefetch_distance={d!r}: must be an integer in 0..num_layers={self.num_layers}")

    @property
    def map_shape(self) -> tuple[int, int]:
        return (self.num_layers, self.num_experts)

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}

    def check_same(self, other: StoreMeta, where: str, fields: tuple[str, ...] | None = None) -> None:
        """Raise StoreMismatchError when ``other`` (found at ``where``) differs in ``fields``."""
        names = fields or tuple(asdict(self))
        diff = [n for n in names if getattr(self, n) != getattr(other, n)]
        if diff:
            mine = ", ".join(f"{n}={getattr(self, n)}" for n in diff)
            theirs = ", ".join(f"{n}={getattr(other, n)}" for n in diff)
            raise StoreMismatchError(
                f"{where} was built for another store ({theirs}); this store has {mine}. "
                f"Map shape there {other.map_shape} x embedding ({other.embed_dim},), "
                f"here {self.map_shape} x embedding ({self.embed_dim},)"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _cosine_rows(rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``rows`` [N, K] with ``vec`` [K], in float64; 0 for a zero vector."""
    rows64 = rows.astype(np.float64, copy=False)  # [N, K]
    vec64 = vec.astype(np.float64, copy=False)  # [K]
    dots = rows64 @ vec64  # [N]
    norms = np.linalg.norm(rows64, axis=1) * np.linalg.norm(vec64)  # [N]
    out = np.zeros_like(dots)
    np.divide(dots, norms, out=out, where=norms > 0)
    return out


def redundancy(
    embedding: np.ndarray,  # [D]
    expert_map: np.ndarray,  # [L, J]
    embeddings: np.ndarray,  # [N, D]
    maps: np.ndarray,  # [N, L, J]
    prefetch_distance: int,
) -> np.ndarray:
    """FineMoE's redundancy of a new entry with each of N stored entries, [N] float64.

    ``(d/L) * cos(embedding) + ((L-d)/L) * cos(flattened map)``. Computed in float64 so that the
    choice does not depend on summation order.
    """
    n, num_layers = maps.shape[0], expert_map.shape[0]
    w_sem = prefetch_distance / num_layers
    sem = _cosine_rows(embeddings, embedding)  # [N]
    whole = _cosine_rows(maps.reshape(n, -1), expert_map.reshape(-1))  # [N]
    return w_sem * sem + (1.0 - w_sem) * whole


def most_redundant(
    embedding: np.ndarray, expert_map: np.ndarray, embeddings: np.ndarray, maps: np.ndarray, prefetch_distance: int
) -> int:
    """Index of the stored entry the new one replaces (first one on ties)."""
    if maps.shape[0] == 0:
        raise ValueError("most_redundant: no stored entries to compare with")
    return int(np.argmax(redundancy(embedding, expert_map, embeddings, maps, prefetch_distance)))


class EntryBuffer:
    """Preallocated entry arrays (slot i = entry i) with copy-once snapshots for readers.

    Not locked: the owning store serialises access.
    """

    def __init__(self, meta: StoreMeta):
        self.meta = meta
        self.embeddings = np.zeros((meta.capacity, meta.embed_dim), np.float32)  # [C, D]
        self.maps = np.zeros((meta.capacity, *meta.map_shape), np.float32)  # [C, L, J]
        self.count = 0
        self._snapshot: tuple[np.ndarray, np.ndarray] | None = None

    def put(self, slot: int, embedding: np.ndarray, expert_map: np.ndarray) -> None:
        """Write slot ``slot`` (an append when ``slot == count``)."""
        if not 0 <= slot <= min(self.count, self.meta.capacity - 1):
            raise IndexError(f"slot {slot}: outside 0..{min(self.count, self.meta.capacity - 1)}")
        self.embeddings[slot] = embedding
        self.maps[slot] = expert_map
        self.count = max(self.count, slot + 1)
        self._snapshot = None

    def choose_slot(self, embedding: np.ndarray, expert_map: np.ndarray) -> int:
        """Append while not full, else the slot of the most redundant stored entry."""
        if self.count < self.meta.capacity:
            return self.count
        return most_redundant(embedding, expert_map, self.embeddings, self.maps, self.meta.prefetch_distance)

    def reset(self, count: int = 0) -> None:
        """Forget all entries (``count``: how many the caller is about to fill in)."""
        self.count = count
        self._snapshot = None

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Read-only copies of the stored entries, ([N, D], [N, L, J]); copied once per change."""
        if self._snapshot is None:
            emb = self.embeddings[: self.count].copy()  # [N, D]
            maps = self.maps[: self.count].copy()  # [N, L, J]
            emb.flags.writeable = False
            maps.flags.writeable = False
            self._snapshot = (emb, maps)
        return self._snapshot


class MapStore(abc.ABC):
    """A bounded store of (embedding [D], expert map [L, J]) entries; see the module docstring."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        embed_dim: int,
        capacity: int = DEFAULT_CAPACITY,
        *,
        prefetch_distance: int,
    ):
        self.meta = StoreMeta(num_layers, num_experts, embed_dim, capacity, prefetch_distance)
        self._lock = threading.RLock()

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    @property
    def num_experts(self) -> int:
        return self.meta.num_experts

    @property
    def embed_dim(self) -> int:
        return self.meta.embed_dim

    @property
    def capacity(self) -> int:
        return self.meta.capacity

    @property
    def prefetch_distance(self) -> int:
        return self.meta.prefetch_distance

    @abc.abstractmethod
    def add(self, embedding: np.ndarray, expert_map: np.ndarray) -> int:
        """Store one entry; returns the slot (entry id, 0..C-1) it now occupies."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many entries are stored (at most ``capacity``)."""

    @abc.abstractmethod
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Consistent read-only snapshot: (embeddings [N, D], maps [N, L, J]), float32, row i = slot i."""

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """Increases on every change (add, clear, load)."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Remove every entry (the store keeps its shape and settings)."""

    def validate_entry(self, embedding: object, expert_map: object) -> tuple[np.ndarray, np.ndarray]:
        """Return the entry as contiguous float32 ([D], [L, J]); StoreMismatchError when it does not fit."""
        emb = _as_float32(embedding, "embedding")
        emap = _as_float32(expert_map, "expert map")
        if emb.shape != (self.embed_dim,):
            raise StoreMismatchError(
                f"embedding shape {emb.shape} does not match the store's ({self.embed_dim},) (embed_dim D)"
            )
        if emap.shape != self.meta.map_shape:
            raise StoreMismatchError(
                f"expert map shape {emap.shape} does not match the store's {self.meta.map_shape} "
                f"(num_layers L, num_experts J)"
            )
        for name, arr in (("embedding", emb), ("expert map", emap)):
            if not np.isfinite(arr).all():
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                raise StoreMismatchError(f"{name} has {bad} non-finite value(s) (NaN/inf); entries must be finite")
        return emb, emap

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"{type(self).__name__}(L={m.num_layers}, J={m.num_experts}, D={m.embed_dim}, C={m.capacity}, "
            f"d={m.prefetch_distance}, entries={len(self)})"
        )


def _as_float32(value: object, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: bring it to host memory first
        value = value.detach().to("cpu").float().numpy()
    try:
        return np.ascontiguousarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise StoreMismatchError(f"{name}: cannot be read as a float32 array ({exc})") from exc
