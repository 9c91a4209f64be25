"""Pipeline stages in-process (no Ray): a model cut into N shards, requests interleaved in
micro-batches, gives exactly the tokens of the single-device engine, for every family."""

from __future__ import annotations

import pytest

from expertmap.actors.config import EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.sampling import SamplingParams
from expertmap.actors.shard import MicroBatch, ShardRuntime, StageStateError, Step, split_layers
from expertmap.predictor.policies import PolicyInputs
from tests.tiny_models import TINY_CONFIGS, save_tiny

INSTANT = LinkConfig(mode="instant", profile="instant")
NEW = 6


def run_pipeline(stages: list[ShardRuntime], prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """All prompts in one micro-batch per iteration, through every stage in order."""
    out: list[list[int]] = [[] for _ in prompts]
    steps = [Step(str(i), 0, p, params) for i, p in enumerate(prompts)]
    for _ in range(params.max_new_tokens):
        mb = MicroBatch(steps)
        for stage in stages:
            mb = stage.forward(mb)
        steps = []
        for s in mb.steps:
            out[int(s.rid)].append(s.token)
            steps.append(Step(s.rid, s.start + len(s.token_ids), [s.token]))
    release = MicroBatch([], release=[str(i) for i in range(len(prompts))])
    for stage in stages:
        stage.forward(release)
        assert stage.requests == {}  # KV caches freed on every stage
    return out


def engine_tokens(config: EngineConfig, prompts, **gen) -> list[list[int]]:
    engine = OffloadEngine(config)
    try:
        return [engine.generate(p, max_new_tokens=NEW, **gen).token_ids for p in prompts]
    finally:
        engine.close()


def test_split_layers():
    assert [(s.start, s.end) for s in split_layers(8, 3)] == [(0, 3), (3, 6), (6, 8)]
    assert [(s.start, s.end) for s in split_layers(8, 6)] == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8)]
    assert [(s.start, s.end) for s in split_layers(8, 2, [5, 3])] == [(0, 5), (5, 8)]
    with pytest.raises(ValueError, match="every stage needs at least one layer"):
        split_layers(4, 5)
    with pytest.raises(ValueError, match=r"layer split \[4, 3\]"):
        split_layers(8, 2, [4, 3])


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_split_in_two_matches_the_engine(family, tmp_path):
    folder = save_tiny(family, tmp_path / family)
    vocab = TINY_CONFIGS[family]().vocab_size
    prompts = [[(13 * i + 5 + j) % vocab for i in range(6 + 2 * j)] for j in range(3)]
    config = EngineConfig(model=folder, policy="on-demand", budget=0.5, link=INSTANT)
    want = engine_tokens(config, prompts)
    layers = TINY_CONFIGS[family]().num_hidden_layers
    stages = [ShardRuntime(config, spec) for spec in split_layers(layers, 2)]
    try:
        assert run_pipeline(stages, prompts, SamplingParams(max_new_tokens=NEW)) == want
    finally:
        for s in stages:
            s.close()


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_bundled_model_split_n_ways_matches_greedy_and_seeded_sampling(bundled_model, n):
    tok = bundled_model.tokenizer
    prompts = [tok(t).input_ids for t in ("The river flows", "def add(a, b):", "Bonjour, je suis")]
    config = EngineConfig(policy="hybrid", budget=0.25, link=INSTANT)
    sample = {"do_sample": True, "seed": 7, "temperature": 0.8, "top_p": 0.9}
    want_greedy = engine_tokens(config, prompts)
    want_sampled = engine_tokens(config, prompts, **sample)
    stages = [ShardRuntime(config, spec) for spec in split_layers(8, n)]
    try:
        assert run_pipeline(stages, prompts, SamplingParams(max_new_tokens=NEW)) == want_greedy
        assert run_pipeline(stages, prompts, SamplingParams(max_new_tokens=NEW, **sample)) == want_sampled
        # each stage cached only its own layers' experts
        for stage in stages:
            owned = {m.index for m in stage.moe}
            assert {layer for layer, _ in stage.cache.resident_keys()} <= owned
            assert stage.stats()["accesses"] > 0
    finally:
        for s in stages:
            s.close()


def test_a_step_for_a_lost_kv_cache_is_refused(bundled_model):
    config = EngineConfig(policy="on-demand", link=INSTANT)
    (stage,) = [ShardRuntime(config, spec) for spec in split_layers(8, 1)]
    try:
        with pytest.raises(StageStateError, match="holds no KV cache for request 'x' at position 5"):
            stage.forward(MicroBatch([Step("x", 5, [3])]))
        stage.forward(MicroBatch([Step("y", 0, [3, 4], SamplingParams(max_new_tokens=2))]))
        with pytest.raises(StageStateError, match="has 2 cached tokens, the step starts at 7"):
            stage.forward(MicroBatch([Step("y", 7, [3])]))
    finally:
        stage.close()


def test_stage_zero_hints_the_next_stage_before_its_activations_arrive(bundled_model):
    """The semantic search for stage 1's first layers runs as soon as stage 0 has embedded the
    micro-batch; stage 1's idle link copies the predicted experts before its own step starts."""
    import time

    import numpy as np

    from expertmap.predictor.map_store_memory import InMemoryMapStore
    from expertmap.predictor.replica import StoreReplica

    rng = np.random.default_rng(0)
    store = InMemoryMapStore(8, 16, 128, prefetch_distance=3)
    maps = rng.dirichlet(np.full(16, 0.3), size=(4, 8)).astype(np.float32)  # [N, L, J]
    for m in maps:
        store.add(rng.standard_normal(128).astype(np.float32), m)
    config = EngineConfig(policy="hybrid", budget=0.5, link=INSTANT)
    specs = split_layers(8, 2)
    stages = [ShardRuntime(config, spec, inputs=PolicyInputs(replica=StoreReplica(store), prefetch_distance=3))
              for spec in specs]  # fmt: skip
    hinted: list[int] = []
    stages[0].on_embeddings = lambda emb: hinted.append(stages[1].hint(emb))
    try:
        prompt = bundled_model.tokenizer("The river flows").input_ids
        mb = stages[0].forward(MicroBatch([Step("a", 0, prompt, SamplingParams(max_new_tokens=2))]))
        assert hinted and hinted[0] > 0
        deadline = time.monotonic() + 10
        while stages[1].cache.snapshot_stats().prefetched < hinted[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        before = stages[1].cache.resident_keys()
        assert before and {layer for layer, _ in before} <= {m.index for m in stages[1].moe[:3]}
        assert stages[1].cache.snapshot_stats().prefetched == len(before)  # copied before stage 1 ran
        out = stages[1].forward(mb)
        want = engine_tokens(config, [prompt])[0]
        assert out.steps[0].token == want[0]
    finally:
        for s in stages:
            s.close()
