"""The expert-map service as one named Ray actor, and the store view a stage's replica reads.

``map_service(...)`` gets or creates the cluster's service actor (one per Ray namespace and store
name). ``ServiceStoreClient`` gives a stage's ``StoreReplica`` the store interface it expects
(``version``, ``arrays``, ``add``): ``version`` is asked at most every ``sync_interval_s`` (the
replica rebuilds its search index only when it moved), ``add`` is fire-and-forget, so no
per-layer network round trip sits on the critical path.
"""

from __future__ import annotations

import logging
import os
import time

import ray

from expertmap.predictor.map_service import ExpertMapService

logger = logging.getLogger(__name__)

SERVICE_NAME = "expertmap-map-service"
#: how long ``map_service`` waits for a dying service of the same name to go before it gives up
DYING_SERVICE_WAIT_S = 30.0


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)
class MapServiceActor:
    def __init__(self, shape: dict, redis_url: str | None, namespace: str, capacity: int, max_pending: int):
        if redis_url:
            from expertmap.predictor.map_store_redis import RedisMapStore

            def open_store():
                return RedisMapStore(redis_url, namespace, capacity=capacity, **shape)
        else:
            from expertmap.predictor.map_store_memory import InMemoryMapStore

            def open_store():
                return InMemoryMapStore(capacity=capacity, **shape)

        self.service = ExpertMapService(open_store, max_pending=max_pending)
        self.config = {"shape": shape, "redis_url": redis_url, "namespace": namespace, "capacity": capacity}

    def add(self, embedding, expert_map) -> bool:
        return self.service.add(embedding, expert_map)

    def add_many(self, entries: list) -> int:
        """Warm the store from recorded (embedding, map) pairs in one call; how many were kept."""
        return sum(bool(self.service.add(e, m)) for e, m in entries)

    def version(self):
        return self.service.version()

    def arrays(self):
        return self.service.arrays()

    def status(self) -> dict:
        return {**self.service.status(), "pid": os.getpid()}

    def flush(self) -> int:
        return self.service.flush()

    def describe(self) -> dict:
        """What this service was built for: shape, store (Redis url or None: in-process), namespace, capacity."""
        return self.config


def map_service(shape: dict, redis_url: str | None, namespace: str = "expertmap", capacity: int = 1000,
                max_pending: int = 10_000, name: str = SERVICE_NAME):  # fmt: skip
    """The named service actor (created on first use; later callers share it).

    A pipeline that closed just before may have left its service dying (its last handle dropped,
    the name not yet released): ``get_if_exists`` can hand back that actor, whose first call then
    fails with ``ActorDiedError``. Such a handle is dropped and the actor asked for again, for at
    most ``DYING_SERVICE_WAIT_S``.
    """
    deadline = time.monotonic() + DYING_SERVICE_WAIT_S
    while True:
        handle = MapServiceActor.options(name=name, get_if_exists=True, lifetime=None).remote(
            shape, redis_url, namespace, capacity, max_pending
        )
        try:
            found = ray.get(handle.describe.remote())
            break
        except ray.exceptions.ActorDiedError:
            if time.monotonic() >= deadline:
                raise
            logger.info("the map service %r was shutting down; asking for it again", name)
            time.sleep(0.2)
    wanted = {"shape": shape, "redis_url": redis_url, "namespace": namespace, "capacity": capacity}
    if found != wanted:
        from expertmap.predictor.map_store_redis import _redact

        def show(c: dict) -> dict:
            return {**c, "redis_url": _redact(c["redis_url"]) if c["redis_url"] else "in-process"}

        raise ValueError(
            f"an expert-map service named {name!r} already runs with {show(found)}; this pipeline asks for "
            f"{show(wanted)}: give it another map_service_name, or the same store settings"
        )
    return handle


class ServiceStoreClient:
    """What a stage's ``StoreReplica`` reads, backed by the service actor."""

    #: ``add`` only submits an actor call (returns at once): no publishing thread is needed
    adds_asynchronously = True

    def __init__(self, handle, sync_interval_s: float = 1.0, timeout_s: float = 5.0):
        self.handle = handle
        self.sync_interval_s = sync_interval_s
        self.timeout_s = timeout_s
        self._version = None
        self._asked = 0.0
        self.publish_errors = 0
        self._warned = False

    @property
    def version(self):
        now = time.monotonic()
        if now - self._asked >= self.sync_interval_s:
            self._asked = now
            try:
                self._version = ray.get(self.handle.version.remote(), timeout=self.timeout_s)
            except Exception as exc:  # the service restarting: keep predicting from the replica we have
                self._warn(exc)
        return self._version

    def arrays(self):
        return ray.get(self.handle.arrays.remote(), timeout=self.timeout_s)

    def add(self, embedding, expert_map) -> None:
        try:
            self.handle.add.remote(embedding, expert_map)
        except Exception as exc:  # pragma: no cover - submission itself rarely fails
            self.publish_errors += 1
            self._warn(exc)

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("expert-map service not answering (%s); predictions use the local replica", exc)
