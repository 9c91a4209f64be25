"""`InMemoryMapStore`: the embedded default expert-map store, preallocated NumPy arrays in this process.

Thread-safe (one lock); ``arrays()`` hands out read-only copies made once per version, so a
reader's snapshot never changes under it. ``save``/``load`` use one ``.npz`` file (no pickle)
holding the entries and the store's metadata (L, J, D, C, d).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from expertmap.predictor.map_store import DEFAULT_CAPACITY, EntryBuffer, MapStore, StoreMeta, StoreMismatchError

log = logging.getLogger(__name__)

FILE_FORMAT = 1
_META_KEYS = ("num_layers", "num_experts", "embed_dim", "capacity", "prefetch_distance")


class InMemoryMapStore(MapStore):
    """Bounded (embedding, expert map) store in this process's memory."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        embed_dim: int,
        capacity: int = DEFAULT_CAPACITY,
        *,
        prefetch_distance: int,
    ):
        super().__init__(num_layers, num_experts, embed_dim, capacity, prefetch_distance=prefetch_distance)
        self._buf = EntryBuffer(self.meta)
        self._version = 0

    # --- MapStore ----------------------------------------------------------------------------
    def add(self, embedding: np.ndarray, expert_map: np.ndarray) -> int:
        emb, emap = self.validate_entry(embedding, expert_map)  # [D], [L, J]
        with self._lock:
            slot = self._buf.choose_slot(emb, emap)
            if slot < self._buf.count:
                log.debug("store full (%d): new entry replaces slot %d", self.capacity, slot)
            self._buf.put(slot, emb, emap)
            self._version += 1
            return slot

    def __len__(self) -> int:
        return self._buf.count

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._buf.snapshot()

    @property
    def version(self) -> int:
        return self._version

    def clear(self) -> None:
        with self._lock:
            self._buf.reset()
            self._version += 1

    # --- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write all entries and the metadata to ``path`` (an ``.npz`` file, replaced atomically)."""
        path = Path(path)
        embeddings, maps = self.arrays()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                embeddings=embeddings,
                maps=maps,
                format=np.int64(FILE_FORMAT),
                **{k: np.int64(v) for k, v in self.meta.as_dict().items()},
            )
        os.replace(tmp, path)
        log.info("saved %d expert maps to %s", len(embeddings), path)
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Replace this store's entries with those saved in ``path``.

        The file must be for the same model (L, J, D), else StoreMismatchError; it may have been
        saved with another capacity or prefetch distance as long as its entries fit this store's
        capacity. This store keeps its own C and d.
        """
        file_meta, embeddings, maps = _read_file(Path(path))
        self.meta.check_same(file_meta, f"store file {path}", ("num_layers", "num_experts", "embed_dim"))
        n = embeddings.shape[0]
        if n > self.capacity:
            raise StoreMismatchError(
                f"store file {path} holds {n} entries, more than this store's capacity {self.capacity}"
            )
        with self._lock:
            self._buf.reset(n)
            self._buf.embeddings[:n] = embeddings
            self._buf.maps[:n] = maps
            self._version += 1
        log.info("loaded %d expert maps from %s", n, path)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> InMemoryMapStore:
        """A store with the settings (L, J, D, C, d) and entries saved in ``path``."""
        file_meta, _, _ = _read_file(Path(path))
        store = cls(
            file_meta.num_layers,
            file_meta.num_experts,
            file_meta.embed_dim,
            file_meta.capacity,
            prefetch_distance=file_meta.prefetch_distance,
        )
        store.load(path)
        return store


def _read_file(path: Path) -> tuple[StoreMeta, np.ndarray, np.ndarray]:
    """(metadata, embeddings [N, D], maps [N, L, J]) from a file written by ``save``, validated."""
    if not path.is_file():
        raise FileNotFoundError(f"store file {path}: does not exist")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in (*_META_KEYS, "format", "embeddings", "maps") if k not in npz.files]
        if missing:
            raise StoreMismatchError(f"store file {path}: missing {missing}; not written by InMemoryMapStore.save")
        fmt = int(npz["format"])
        if fmt != FILE_FORMAT:
            raise StoreMismatchError(f"store file {path}: format {fmt}, this code reads format {FILE_FORMAT}")
        meta = StoreMeta(**{k: int(npz[k]) for k in _META_KEYS})
        embeddings, maps = npz["embeddings"], npz["maps"]
    n = embeddings.shape[0] if embeddings.ndim else -1
    if embeddings.shape != (n, meta.embed_dim) or maps.shape != (n, *meta.map_shape):
        raise StoreMismatchError(
            f"store file {path}: arrays {embeddings.shape} and {maps.shape} do not match its metadata "
            f"(N, {meta.embed_dim}) and (N, {meta.num_layers}, {meta.num_experts})"
        )
    if embeddings.dtype != np.float32 or maps.dtype != np.float32:
        raise StoreMismatchError(f"store file {path}: dtypes {embeddings.dtype}/{maps.dtype}, expected float32")
    if not (np.isfinite(embeddings).all() and np.isfinite(maps).all()):
        raise StoreMismatchError(f"store file {path}: holds non-finite values")
    return meta, embeddings, maps
