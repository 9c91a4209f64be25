"""The expert-map service: the one writer-facing front of the cluster's expert-map store.

Stages publish finished iteration maps here (asynchronously) and read snapshots of the store into
their local search replicas. The store behind it is Redis (``RedisMapStore``) or, embedded, an
in-process ``InMemoryMapStore``. A plain class: ``cluster.map_service_actor`` runs it as one named
Ray actor.

When the store cannot be reached (Redis down or restarting), serving goes on:
- ``add`` keeps the new map in a bounded pending list (beyond ``max_pending`` the oldest is
  dropped and counted) and a flusher thread writes the list in order once the store answers;
- ``arrays`` answers from the last snapshot read, so replicas keep predicting;
- one warning is logged when the store goes away and one when it is back.
Nothing already stored is lost: the store itself persists (Redis AOF) and is never cleared here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

#: what a store raises when its server is away (redis' ConnectionError and TimeoutError are OSErrors
#: subclasses only in part, so both families are named)
_OUTAGE: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)
try:  # redis is an optional dependency of the embedded default
    import redis.exceptions as _rx

    _OUTAGE = _OUTAGE + (_rx.ConnectionError, _rx.TimeoutError, _rx.BusyLoadingError)
except ImportError:  # pragma: no cover
    pass


class ExpertMapService:
    def __init__(self, open_store: Callable[[], object], max_pending: int = 10_000, retry_s: float = 1.0):
        """``open_store()`` builds the store (it may fail while Redis is down: retried)."""
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending}: must be at least 1")
        self._open_store = open_store
        self.max_pending = max_pending
        self.retry_s = retry_s
        self._store = None
        self._lock = threading.Lock()
        self._pending: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._snapshot: tuple[np.ndarray, np.ndarray] | None = None
        self._snapshot_version: int | None = None
        self._local_version = 0  # moves with every accepted add, so replicas see buffered changes too
        self.stored = 0  # maps written to the store by this service
        self.dropped = 0  # maps lost because the pending list was full
        self.outages = 0
        self._down_since: float | None = None
        self._stop = threading.Event()
        self._try_connect()
        self._flusher = threading.Thread(target=self._flush_loop, name="map-service-flush", daemon=True)
        self._flusher.start()

    # --- API ---------------------------------------------------------------------------------
    def add(self, embedding: np.ndarray, expert_map: np.ndarray) -> bool:
        """Store one map now, or keep it for later when the store is away. False: it was dropped."""
        with self._lock:
            self._local_version += 1
            if self._store is not None and not self._pending:
                try:
                    self._store.add(embedding, expert_map)
                    self.stored += 1
                    return True
                except _OUTAGE as exc:
                    self._went_down(exc)
            self._pending.append((np.asarray(embedding, np.float32), np.asarray(expert_map, np.float32)))
            if len(self._pending) > self.max_pending:
                self._pending.popleft()
                self.dropped += 1
                return False
            return True

    def version(self) -> tuple[int | None, int]:
        """Changes whenever a replica should re-read ``arrays``: (store version, adds taken here)."""
        with self._lock:
            store_version = self._read(lambda s: int(s.version))
            return (store_version if store_version is not None else self._snapshot_version, self._local_version)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, D], maps [N, L, J]): the store's entries, or the last ones read while it is away."""
        with self._lock:
            fresh = self._read(lambda s: (s.arrays(), int(s.version)))
            if fresh is not None:
                self._snapshot, self._snapshot_version = fresh
            if self._snapshot is None:
                raise RuntimeError("the expert-map store has not been reachable yet: no entries to serve")
            return self._snapshot

    def status(self) -> dict:
        with self._lock:
            entries = self._read(len)
            return {
                "connected": self._store is not None and self._down_since is None,
                "entries": entries if entries is not None else (0 if self._snapshot is None else len(self._snapshot[0])),
                "pending": len(self._pending),
                "stored": self.stored,
                "dropped": self.dropped,
                "outages": self.outages,
            }

    def flush(self) -> int:
        """Write pending maps now, if the store answers; how many are still pending."""
        with self._lock:
            if self._store is None:
                self._try_connect()
            while self._store is not None and self._pending:
                emb, emap = self._pending[0]
                try:
                    self._store.add(emb, emap)
                except _OUTAGE as exc:
                    self._went_down(exc)
                    break
                self._pending.popleft()
                self.stored += 1
            if self._store is not None and not self._pending and self._down_since is not None:
                logger.warning("expert-map store is back after %.1f s; pending maps flushed", time.monotonic() - self._down_since)
                self._down_since = None
            return len(self._pending)

    def close(self) -> None:
        self._stop.set()
        self._flusher.join(timeout=5)
        self.flush()
        close = getattr(self._store, "close", None)
        if close is not None:
            close()

    # --- internals ---------------------------------------------------------------------------
    def _read(self, fn):
        if self._store is None:
            self._try_connect()
            if self._store is None:
                return None
        try:
            value = fn(self._store)
        except _OUTAGE as exc:
            self._went_down(exc)
            return None
        if self._down_since is not None and not self._pending:
            logger.warning("expert-map store is back after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
        return value

    def _try_connect(self) -> None:
        try:
            self._store = self._open_store()
        except _OUTAGE as exc:
            self._went_down(exc)

    def _went_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.outages += 1
            logger.warning(
                "expert-map store unreachable (%s): serving goes on from the last snapshot; new maps are kept "
                "(up to %d) and written when it is back", exc, self.max_pending,
            )  # fmt: skip

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.retry_s):
            if self._pending or self._store is None:
                self.flush()
