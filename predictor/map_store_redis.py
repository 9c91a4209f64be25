"""`RedisMapStore`: the expert-map store kept in Redis, shared by every process that opens the same
url + namespace, with a local copy of the arrays for cheap reads.

Keys (all under one hash tag, ``{namespace}``, so a Redis Cluster keeps them on one node):

- ``{ns}:meta``     hash: L, J, D, C, d, format, uid (a random id made when the namespace is created);
- ``{ns}:version``  counter, INCR'd by every change;
- ``{ns}:entries``  hash: slot -> msgpack ``{embedding, embedding_shape, map, map_shape, dtype}``
                    (arrays as raw little-endian float32 bytes);
- ``{ns}:slotver``  sorted set: slot, scored by the version that last wrote it;
- ``{ns}:cleared``  the version of the last ``clear()``.

Reads: one Lua script returns, atomically, the version and every entry written since the version
this instance last saw (everything after a clear or a foreign namespace), so ``arrays()`` costs one
round trip when nothing changed. Writes are optimistic: choose the slot (append, or
:func:`predictor.map_store.most_redundant` when full) on the local copy at version v, then a Lua
script writes it only if the store is still at version v; a writer that lost a race re-syncs and
chooses again. The result equals applying the adds one after the other in commit order.
"""

from __future__ import annotations

import logging
import uuid
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from expertmap.predictor.map_store import DEFAULT_CAPACITY, EntryBuffer, MapStore, StoreMeta, StoreMismatchError

try:
    import msgpack
    import redis
except ImportError as exc:  # pragma: no cover - depends on the environment
    _HINT = "RedisMapStore needs the redis and msgpack packages: pip install 'expertmap[redis]'"
    raise ImportError(f"{_HINT} ({exc})") from exc

log = logging.getLogger(__name__)

FORMAT = 1
MAX_ADD_ATTEMPTS = 64  # optimistic retries before add() gives up under contention
_META_FIELDS = ("num_layers", "num_experts", "embed_dim", "capacity", "prefetch_distance")

# KEYS: meta. ARGV: field, value, ... Create the metadata unless present; return it.
_INIT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: version, cleared, slotver, entries, meta. ARGV: version last seen (-1: none).
# Returns {version, uid} when nothing changed, else {version, uid, full, count, slots, payloads}.
_READ_LUA = """
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
local uid = redis.call('HGET', KEYS[5], 'uid') or ''
local since = tonumber(ARGV[1])
if v == since then return {v, uid} end
local cleared = tonumber(redis.call('GET', KEYS[2]) or '0')
local full = 0
local slots
if since < 0 or v < since or cleared > since then
  full = 1
  slots = redis.call('ZRANGE', KEYS[3], 0, -1)
else
  slots = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. since, '+inf')
end
local payloads = {}
if #slots > 0 then payloads = redis.call('HMGET', KEYS[4], unpack(slots)) end
return {v, uid, full, redis.call('HLEN', KEYS[4]), slots, payloads}
"""

# KEYS: version, entries, slotver, meta. ARGV: expected version, slot, payload, capacity, uid.
# Writes slot only if the store is still at the expected version; returns the new version or -1.
_ADD_LUA = """
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if v ~= tonumber(ARGV[1]) or redis.call('HGET', KEYS[4], 'uid') ~= ARGV[5] then return -1 end
local n = redis.call('HLEN', KEYS[2])
local slot = tonumber(ARGV[2])
local cap = tonumber(ARGV[4])
if slot < 0 or slot > n or slot >= cap or (slot < n and n < cap) then
  return redis.error_reply('expertmap: slot ' .. ARGV[2] .. ' is neither the next free slot nor a slot'
    .. ' of a full store (count ' .. n .. ', capacity ' .. cap .. ')')
end
local nv = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], nv, ARGV[2])
return nv
"""

# KEYS: version, entries, slotver, cleared. Returns the new version.
_CLEAR_LUA = """
local nv = redis.call('INCR', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SET', KEYS[4], nv)
return nv
"""


class RedisMapStore(MapStore):
    """Bounded (embedding, expert map) store in Redis; instances on one url + namespace share it."""

    def __init__(
        self,
        url: str,
        namespace: str = "expertmap",
        *,
        num_layers: int,
        num_experts: int,
        embed_dim: int,
        capacity: int = DEFAULT_CAPACITY,
        prefetch_distance: int,
    ):
        super().__init__(num_layers, num_experts, embed_dim, capacity, prefetch_distance=prefetch_distance)
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError(f"namespace={namespace!r}: must be non-empty and contain no braces")
        self.namespace = namespace
        self.url = _redact(url)
        self._r = redis.Redis.from_url(url)
        tag = "{" + namespace + "}"
        self._k = {name: f"{tag}:{name}" for name in ("meta", "version", "entries", "slotver", "cleared")}
        self._init = self._r.register_script(_INIT_LUA)
        self._read = self._r.register_script(_READ_LUA)
        self._write = self._r.register_script(_ADD_LUA)
        self._wipe = self._r.register_script(_CLEAR_LUA)
        self._buf = EntryBuffer(self.meta)
        self._seen_version = -1  # server version the local copy reflects (-1: none yet)
        self._uid = self._open_namespace()

    # --- MapStore ----------------------------------------------------------------------------
    def add(self, embedding: np.ndarray, expert_map: np.ndarray) -> int:
        emb, emap = self.validate_entry(embedding, expert_map)  # [D], [L, J]
        payload = _encode(emb, emap)
        k = self._k
        with self._lock:
            for attempt in range(MAX_ADD_ATTEMPTS):
                self._sync()
                slot = self._buf.choose_slot(emb, emap)
                args = [self._seen_version, slot, payload, self.capacity, self._uid]
                new_version = int(self._write(keys=[k["version"], k["entries"], k["slotver"], k["meta"]], args=args))
                if new_version >= 0:
                    self._buf.put(slot, emb, emap)
                    self._seen_version = new_version
                    return slot
                log.debug("add: store moved past version %d (attempt %d); re-syncing", args[0], attempt + 1)
        raise RuntimeError(
            f"add: lost the race to other writers of namespace {self.namespace!r} {MAX_ADD_ATTEMPTS} times in a row"
        )

    def __len__(self) -> int:
        with self._lock:
            self._sync()
            return self._buf.count

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self._sync()
            return self._buf.snapshot()

    @property
    def version(self) -> int:
        return int(self._r.get(self._k["version"]) or 0)

    def clear(self) -> None:
        k = self._k
        with self._lock:
            self._wipe(keys=[k["version"], k["entries"], k["slotver"], k["cleared"]])
            self._sync()

    # --- connection --------------------------------------------------------------------------
    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> RedisMapStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------
    def _open_namespace(self) -> str:
        """Create the namespace's metadata, or check that the existing one is for this store; its uid."""
        mine = {**self.meta.as_dict(), "format": FORMAT, "uid": uuid.uuid4().hex}
        flat = [x for kv in mine.items() for x in kv]
        reply = self._init(keys=[self._k["meta"]], args=flat)
        found = {_text(reply[i]): _text(reply[i + 1]) for i in range(0, len(reply), 2)}
        where = f"redis namespace {self.namespace!r} at {self.url}"
        if found.get("format") != str(FORMAT):
            raise StoreMismatchError(f"{where}: metadata format {found.get('format')!r}, expected {FORMAT}")
        try:
            theirs = StoreMeta(**{f: int(found[f]) for f in _META_FIELDS})
        except (KeyError, ValueError) as exc:
            raise StoreMismatchError(f"{where}: unreadable metadata {found} ({exc})") from exc
        self.meta.check_same(theirs, where)
        if found["uid"] == mine["uid"]:
            log.info("created expert-map store %s with %s", where, self.meta.as_dict())
        return found["uid"]

    def _sync(self) -> None:
        """Bring the local copy up to the server's version (caller holds the lock)."""
        k = self._k
        keys = [k["version"], k["cleared"], k["slotver"], k["entries"], k["meta"]]
        for _ in range(3):
            reply = self._read(keys=keys, args=[self._seen_version])
            version, uid = int(reply[0]), _text(reply[1])
            if uid != self._uid:
                log.warning("namespace %r was recreated (uid %r -> %r); reloading", self.namespace, self._uid, uid)
                self._uid = self._open_namespace()
                self._seen_version = -1
                continue
            if len(reply) > 2:
                self._apply(bool(reply[2]), int(reply[3]), reply[4], reply[5])
            self._seen_version = version
            return
        raise RuntimeError(f"namespace {self.namespace!r} keeps being recreated under this store; giving up")

    def _apply(self, full: bool, count: int, slots: list[bytes], payloads: list[bytes | None]) -> None:
        """Write the changed entries into the local copy and set its count."""
        changed = [int(s) for s in slots]
        if full and sorted(changed) != list(range(count)):
            raise StoreMismatchError(
                f"namespace {self.namespace!r}: stored slots {sorted(changed)[:8]}... do not cover 0..{count - 1}"
            )
        for slot, payload in zip(changed, payloads, strict=True):
            if payload is None or slot >= count:
                raise StoreMismatchError(
                    f"namespace {self.namespace!r}: slot {slot} is missing or beyond the count {count}"
                )
            emb, emap = _decode(payload, self.meta, slot)
            self._buf.embeddings[slot] = emb
            self._buf.maps[slot] = emap
        self._buf.reset(count)


def _encode(embedding: np.ndarray, expert_map: np.ndarray) -> bytes:
    return msgpack.packb(
        {
            "embedding": embedding.astype("<f4").tobytes(),
            "embedding_shape": list(embedding.shape),
            "map": expert_map.astype("<f4").tobytes(),
            "map_shape": list(expert_map.shape),
            "dtype": "<f4",
        },
        use_bin_type=True,
    )


def _decode(payload: bytes, meta: StoreMeta, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """(embedding [D], map [L, J]) from a stored entry, checked against ``meta``."""
    entry = msgpack.unpackb(payload, raw=False)
    emb_shape, map_shape = tuple(entry["embedding_shape"]), tuple(entry["map_shape"])
    if emb_shape != (meta.embed_dim,) or map_shape != meta.map_shape or entry.get("dtype") != "<f4":
        raise StoreMismatchError(
            f"stored entry {slot}: embedding {emb_shape}, map {map_shape}, dtype {entry.get('dtype')!r}; "
            f"this store has embedding ({meta.embed_dim},), map {meta.map_shape}, '<f4'"
        )
    emb = np.frombuffer(entry["embedding"], dtype="<f4").reshape(emb_shape)  # [D]
    emap = np.frombuffer(entry["map"], dtype="<f4").reshape(map_shape)  # [L, J]
    return emb, emap


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _redact(url: str) -> str:
    """The url without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))
