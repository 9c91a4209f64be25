"""The expert-map store: FineMoE's bound rule, validation, versions, persistence; both back ends.

The Redis back end runs against a real redis-server (the ``redis_server`` fixture).
"""

from __future__ import annotations

import itertools
import math
import threading
import uuid

import numpy as np
import pytest

from expertmap.predictor.map_store import MAX_CAPACITY, StoreMismatchError, redundancy
from expertmap.predictor.map_store_memory import InMemoryMapStore

L, J, D = 4, 6, 5  # small model: 4 MoE layers, 6 experts, 5-dim embeddings


# --- helpers ---------------------------------------------------------------------------------
def random_entry(rng: np.random.Generator, num_layers: int = L) -> tuple[np.ndarray, np.ndarray]:
    emb = rng.standard_normal(D).astype(np.float32)  # [D]
    logits = rng.standard_normal((num_layers, J)) * 2.0  # [L, J]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return emb, probs.astype(np.float32)


def _cos(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(math.fsum(x * x for x in a)), math.sqrt(math.fsum(y * y for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def reference_slot(entries: list[tuple[np.ndarray, np.ndarray]], emb: np.ndarray, emap: np.ndarray, d: int) -> int:
    """Brute force: the stored entry with the highest FineMoE redundancy (first one on ties)."""
    num_layers = emap.shape[0]
    new_e, new_m = [float(x) for x in emb], [float(x) for x in emap.ravel()]
    best, best_score = -1, -math.inf
    for i, (e, m) in enumerate(entries):
        score = d / num_layers * _cos(new_e, [float(x) for x in e])
        score += (num_layers - d) / num_layers * _cos(new_m, [float(x) for x in m.ravel()])
        if score > best_score:
            best, best_score = i, score
    return best


def assert_store_equals(store, entries: list[tuple[np.ndarray, np.ndarray]]) -> None:
    embeddings, maps = store.arrays()
    assert embeddings.dtype == np.float32 and maps.dtype == np.float32
    assert embeddings.shape == (len(entries), D) and maps.shape == (len(entries), L, J)
    for i, (e, m) in enumerate(entries):
        np.testing.assert_array_equal(embeddings[i], e)
        np.testing.assert_array_equal(maps[i], m)


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """``make_store(capacity=..., prefetch_distance=..., **shape)`` for the parametrised back end."""
    opened = []

    def make(capacity: int = 8, prefetch_distance: int = 1, namespace: str | None = None, **shape):
        dims = {"num_layers": L, "num_experts": J, "embed_dim": D, **shape}
        if request.param == "memory":
            return InMemoryMapStore(**dims, capacity=capacity, prefetch_distance=prefetch_distance)
        from expertmap.predictor.map_store_redis import RedisMapStore

        server = request.getfixturevalue("redis_server")
        ns = namespace or f"test-{uuid.uuid4().hex[:12]}"
        store = RedisMapStore(server.url, ns, **dims, capacity=capacity, prefetch_distance=prefetch_distance)
        opened.append(store)
        return store

    make.backend = request.param
    yield make
    for store in opened:
        store.close()


@pytest.fixture
def redis_store(redis_server):
    """``redis_store(namespace, **kw)``: a RedisMapStore for the small model, closed afterwards."""
    from expertmap.predictor.map_store_redis import RedisMapStore

    opened = []

    def make(namespace: str, capacity: int = 8, prefetch_distance: int = 1, **shape):
        dims = {"num_layers": L, "num_experts": J, "embed_dim": D, **shape}
        store = RedisMapStore(
            redis_server.url, namespace, **dims, capacity=capacity, prefetch_distance=prefetch_distance
        )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# --- both back ends --------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch_distance", [0, 1, 3, L])
def test_full_store_replaces_the_entry_brute_force_picks(make_store, prefetch_distance):
    rng = np.random.default_rng(100 + prefetch_distance)
    for _trial in range(3):
        store = make_store(capacity=6, prefetch_distance=prefetch_distance)
        mirror = []
        for i in range(store.capacity):  # appends fill slots in order
            emb, emap = random_entry(rng)
            assert store.add(emb, emap) == i
            mirror.append((emb, emap))
        for _ in range(8):  # full: each add replaces the most redundant entry
            emb, emap = random_entry(rng)
            expected = reference_slot(mirror, emb, emap, prefetch_distance)
            assert store.add(emb, emap) == expected
            mirror[expected] = (emb, emap)
            assert len(store) == store.capacity
        assert_store_equals(store, mirror)


def test_near_duplicate_replaces_its_twin(make_store):
    rng = np.random.default_rng(7)
    store = make_store(capacity=5, prefetch_distance=2)
    entries = [random_entry(rng) for _ in range(5)]
    for emb, emap in entries:
        store.add(emb, emap)
    for twin in (3, 0, 4):
        emb, emap = entries[twin]
        assert store.add(emb + 0.01, emap * 0.99) == twin


def test_capacity_bound_is_never_exceeded(make_store):
    rng = np.random.default_rng(1)
    store = make_store(capacity=5)
    for i in range(30):
        slot = store.add(*random_entry(rng))
        assert 0 <= slot < 5
        assert len(store) == min(i + 1, 5)
        embeddings, maps = store.arrays()
        assert embeddings.shape == (len(store), D) and maps.shape == (len(store), L, J)


def test_version_increases_on_every_change(make_store):
    rng = np.random.default_rng(2)
    store = make_store(capacity=2)
    seen = [store.version]
    for _ in range(4):  # two appends, two replacements
        store.add(*random_entry(rng))
        seen.append(store.version)
    store.clear()
    seen.append(store.version)
    assert all(b > a for a, b in itertools.pairwise(seen)), seen
    assert len(store) == 0
    embeddings, maps = store.arrays()
    assert embeddings.shape == (0, D) and maps.shape == (0, L, J)
    assert store.add(*random_entry(rng)) == 0  # appends again after clear


def test_snapshot_does_not_change_under_the_reader(make_store):
    rng = np.random.default_rng(3)
    store = make_store(capacity=2)
    store.add(*random_entry(rng))
    store.add(*random_entry(rng))
    embeddings, maps = store.arrays()
    before = embeddings.copy(), maps.copy()
    store.add(*random_entry(rng))  # replaces a row
    np.testing.assert_array_equal(embeddings, before[0])
    np.testing.assert_array_equal(maps, before[1])
    assert not embeddings.flags.writeable and not maps.flags.writeable
    assert not np.array_equal(store.arrays()[1], before[1])


@pytest.mark.parametrize(
    "emb_shape, map_shape, names",
    [((D + 1,), (L, J), ["(6,)", "(5,)"]), ((D,), (J, L), ["(6, 4)", "(4, 6)"]), ((D,), (L * J,), ["(24,)", "(4, 6)"])],
)
def test_wrong_shapes_are_rejected_naming_both(make_store, emb_shape, map_shape, names):
    store = make_store()
    version = store.version
    with pytest.raises(StoreMismatchError) as err:
        store.add(np.zeros(emb_shape, np.float32), np.full(map_shape, 1 / J, np.float32))
    for name in names:
        assert name in str(err.value)
    assert len(store) == 0 and store.version == version


@pytest.mark.parametrize("where", ["embedding", "map"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(make_store, where, bad):
    store = make_store()
    emb, emap = random_entry(np.random.default_rng(4))
    (emb if where == "embedding" else emap).flat[2] = bad
    with pytest.raises(StoreMismatchError, match="non-finite"):
        store.add(emb, emap)
    assert len(store) == 0


@pytest.mark.parametrize("capacity", [0, -1, MAX_CAPACITY + 1, 10_000, 2.5, True])
def test_capacity_outside_range_raises(make_store, capacity):
    with pytest.raises(ValueError, match=f"capacity={capacity!r}"):
        make_store(capacity=capacity)


def test_capacity_edges_are_accepted(make_store):
    assert make_store(capacity=1).capacity == 1
    assert make_store(capacity=MAX_CAPACITY).capacity == MAX_CAPACITY


def test_prefetch_distance_beyond_layers_raises(make_store):
    with pytest.raises(ValueError, match="prefetch_distance=5"):
        make_store(prefetch_distance=L + 1)


def test_redundancy_weights_semantic_and_whole_map_similarity():
    rng = np.random.default_rng(5)
    emb, emap = random_entry(rng)
    others = [random_entry(rng) for _ in range(4)]
    embeddings = np.stack([e for e, _ in others])  # [N, D]
    maps = np.stack([m for _, m in others])  # [N, L, J]
    for d in range(L + 1):
        scores = redundancy(emb, emap, embeddings, maps, d)
        assert scores.shape == (4,)
        expected = [reference_score(emb, emap, e, m, d) for e, m in others]
        np.testing.assert_allclose(scores, expected, rtol=1e-12)


def reference_score(emb, emap, e, m, d) -> float:
    flat = [float(x) for x in emap.ravel()]
    return d / L * _cos(list(map(float, emb)), list(map(float, e))) + (L - d) / L * _cos(
        flat, [float(x) for x in m.ravel()]
    )


# --- in-memory: save / load ------------------------------------------------------------------
def test_memory_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    store = InMemoryMapStore(L, J, D, capacity=4, prefetch_distance=2)
    for _ in range(7):
        store.add(*random_entry(rng))
    path = store.save(tmp_path / "maps.npz")
    assert path == tmp_path / "maps.npz" and path.is_file()

    other = InMemoryMapStore(L, J, D, capacity=4, prefetch_distance=2)
    other.add(*random_entry(rng))
    version = other.version
    other.load(path)
    assert other.version > version
    for a, b in zip(store.arrays(), other.arrays()):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)

    again = InMemoryMapStore.from_file(path)
    assert again.meta == store.meta
    np.testing.assert_array_equal(again.arrays()[1], store.arrays()[1])
    emb, emap = random_entry(rng)  # the loaded store goes on with the bound rule
    mirror = list(zip(*store.arrays()))
    assert again.add(emb, emap) == reference_slot(mirror, emb, emap, 2)


@pytest.mark.parametrize("shape", [{"num_experts": J + 2}, {"num_layers": L + 1}, {"embed_dim": D * 2}])
def test_memory_load_of_another_model_raises(tmp_path, shape):
    store = InMemoryMapStore(L, J, D, capacity=4, prefetch_distance=1)
    store.add(*random_entry(np.random.default_rng(8)))
    path = store.save(tmp_path / "maps.npz")
    dims = {"num_layers": L, "num_experts": J, "embed_dim": D, **shape}
    other = InMemoryMapStore(**dims, capacity=4, prefetch_distance=1)
    with pytest.raises(StoreMismatchError) as err:
        other.load(path)
    ((name, value),) = shape.items()
    assert f"{name}={value}" in str(err.value) and "(4, 6)" in str(err.value)
    assert len(other) == 0


def test_memory_load_more_entries_than_capacity_raises(tmp_path):
    store = InMemoryMapStore(L, J, D, capacity=5, prefetch_distance=1)
    rng = np.random.default_rng(9)
    for _ in range(5):
        store.add(*random_entry(rng))
    path = store.save(tmp_path / "maps.npz")
    with pytest.raises(StoreMismatchError, match="holds 5 entries, more than this store's capacity 3"):
        InMemoryMapStore(L, J, D, capacity=3, prefetch_distance=1).load(path)


def test_memory_load_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, embeddings=np.zeros((1, D), np.float32))
    with pytest.raises(StoreMismatchError, match="missing"):
        InMemoryMapStore(L, J, D, capacity=3, prefetch_distance=1).load(path)


# --- redis: sharing, other models, persistence, racing writers -------------------------------
def test_redis_two_instances_share_one_store(redis_store):
    rng = np.random.default_rng(10)
    a, b = redis_store("shared"), redis_store("shared")
    mirror = []
    for i in range(5):
        writer = (a, b)[i % 2]
        entry = random_entry(rng)
        assert writer.add(*entry) == i
        mirror.append(entry)
    assert len(a) == len(b) == 5 and a.version == b.version
    assert_store_equals(a, mirror)
    assert_store_equals(b, mirror)
    a.clear()
    assert len(b) == 0 and b.arrays()[0].shape == (0, D)
    assert redis_store("shared-elsewhere").arrays()[0].shape == (0, D)  # namespaces are separate


@pytest.mark.parametrize(
    "change",
    [{"num_experts": J + 1}, {"num_layers": L - 1}, {"embed_dim": D + 3}, {"capacity": 9}, {"prefetch_distance": 2}],
)
def test_redis_namespace_of_another_model_raises(redis_store, change):
    ns = f"model-{uuid.uuid4().hex[:8]}"
    redis_store(ns).add(*random_entry(np.random.default_rng(11)))
    with pytest.raises(StoreMismatchError) as err:
        redis_store(ns, **change)
    ((name, value),) = change.items()
    assert f"{name}={value}" in str(err.value) and ns in str(err.value)


@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
def test_redis_data_survives_a_server_restart(redis_server, redis_store, graceful):
    rng = np.random.default_rng(12)
    ns = f"persist-{uuid.uuid4().hex[:8]}"
    store = redis_store(ns, capacity=4)
    for _ in range(6):
        store.add(*random_entry(rng))
    count, version = len(store), store.version
    before = tuple(a.copy() for a in store.arrays())

    redis_server.stop(graceful=graceful)
    redis_server.start()

    reopened = redis_store(ns, capacity=4)
    assert len(reopened) == count == 4 and reopened.version == version
    for a, b in zip(before, reopened.arrays()):
        np.testing.assert_array_equal(a, b)
    entry = random_entry(rng)  # the old instance reconnects and goes on where it was
    assert store.add(*entry) == reference_slot(list(zip(*before)), *entry, 1)
    assert reopened.version == version + 1


@pytest.mark.parametrize("capacity", [40, 7])
def test_redis_racing_writers_lose_nothing(redis_store, capacity):
    ns = f"race-{uuid.uuid4().hex[:8]}"
    writers = [redis_store(ns, capacity=capacity) for _ in range(2)]
    per_writer = 20
    rngs = [np.random.default_rng(20 + i) for i in range(2)]
    added = [[random_entry(rng) for _ in range(per_writer)] for rng in rngs]
    errors = []
    barrier = threading.Barrier(2)

    def run(store, entries):
        try:
            barrier.wait()
            for entry in entries:
                store.add(*entry)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w, e)) for w, e in zip(writers, added)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    total = 2 * per_writer
    reader = redis_store(ns, capacity=capacity)
    assert len(reader) == min(total, capacity)
    assert reader.version == total  # every add committed exactly once
    embeddings, maps = reader.arrays()
    known = {e.tobytes(): m for e, m in (x for entries in added for x in entries)}
    stored = {e.tobytes() for e in embeddings}
    assert len(stored) == len(embeddings)  # no entry twice
    for e, m in zip(embeddings, maps):
        np.testing.assert_array_equal(m, known[e.tobytes()])  # each row a whole, real entry
