"""The Ray pipeline: real stage actors in a placement group (declared GPUs, stages on the CPU),
the expert-map service actor, a real redis-server. Tokens must equal the in-process engine's."""

from __future__ import annotations

import os
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest
import ray

from expertmap.actors.config import EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.sampling import SamplingParams
from expertmap.cluster.pipeline import Pipeline, PipelineConfig, StageFailedError


INSTANT = LinkConfig(mode="instant", profile="instant")
TEXTS = ["The river flows", "def add(a, b):", "Bonjour, je suis", "1 + 1 =", "Once upon a time", "import numpy"]
GREEDY = SamplingParams(max_new_tokens=8)
SAMPLED = SamplingParams(max_new_tokens=5, do_sample=True, seed=11, temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, num_gpus=6, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts(bundled_model):
    return [bundled_model.tokenizer(t).input_ids for t in TEXTS]


def engine_tokens(prompts, params: SamplingParams, policy="hybrid") -> list[list[int]]:
    engine = OffloadEngine(EngineConfig(policy=policy, budget=0.25, link=INSTANT))
    try:
        return [
            engine.generate(p, max_new_tokens=params.max_new_tokens, do_sample=params.do_sample, seed=params.seed,
                            temperature=params.temperature, top_p=params.top_p).token_ids  # fmt: skip
            for p in prompts
        ]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def reference(prompts):
    return {"greedy": engine_tokens(prompts, GREEDY), "sampled": engine_tokens(prompts, SAMPLED)}


def pipeline(gpus: int, policy: str = "hybrid", **kw) -> Pipeline:
    return Pipeline(PipelineConfig(engine=EngineConfig(policy=policy, budget=0.25, link=INSTANT), gpus=gpus, **kw))


@pytest.mark.parametrize("gpus", [1, 2, 3, 6])
def test_tokens_identical_to_the_engine_for_any_gpu_count(ray_cluster, prompts, reference, gpus):
    pipe = pipeline(gpus)
    try:
        # a request mix: greedy and seeded sampling, different lengths, all in flight at once
        greedy = [pipe.submit(p, GREEDY) for p in prompts]
        sampled = [pipe.submit(p, SAMPLED) for p in prompts]
        assert [r.result(120) for r in greedy] == reference["greedy"]
        assert [r.result(120) for r in sampled] == reference["sampled"]
        stats = pipe.stats()
        assert [s["layers"] for s in stats] == [[sp.start, sp.end] for sp in pipe.specs]
        assert all(s["accesses"] > 0 for s in stats)
        if gpus > 1:  # more than one micro-batch was in flight at once
            assert pipe.scheduler.microbatches > GREEDY.max_new_tokens + 1
        deadline = time.monotonic() + 10
        while any(s["requests"] for s in pipe.stats()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [s["requests"] for s in pipe.stats()] == [0] * gpus  # every KV cache released
    finally:
        pipe.close()


def test_a_request_joins_mid_flight(ray_cluster, prompts, reference):
    pipe = pipeline(2)
    try:
        long = pipe.submit(prompts[0], SamplingParams(max_new_tokens=24))
        deadline = time.monotonic() + 60
        while len(long.tokens) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert 3 <= len(long.tokens) < 24, "the first request should be mid-flight"
        late = [pipe.submit(p, GREEDY) for p in prompts[1:3]]
        assert [r.result(120) for r in late] == reference["greedy"][1:3]
        assert long.result(120)[:8] == reference["greedy"][0]
        assert long.finish_reason == "length" and len(long.tokens) == 24
    finally:
        pipe.close()


def test_a_killed_stage_restarts_and_its_requests_end_clearly(ray_cluster, prompts, reference):
    pipe = pipeline(3)
    try:
        reqs = [pipe.submit(p, SamplingParams(max_new_tokens=40)) for p in prompts[:4]]
        while not any(r.tokens for r in reqs):
            time.sleep(0.005)
        killed_at = time.monotonic()
        ray.kill(pipe.stages[1], no_restart=False)  # the process dies; Ray restarts the actor
        for r in reqs:
            try:
                tokens = r.result(180)
            except StageFailedError as exc:
                assert "retry the request" in str(exc)
            else:  # restarted from its prompt (no token had been produced) or finished before
                assert tokens[:8] == reference["greedy"][prompts.index(r.prompt)]
        assert any(r.error is not None for r in reqs) or pipe.scheduler.stage_failures == 0
        # the pipeline serves again without a restart of the app, with the same tokens
        after = pipe.submit(prompts[4], GREEDY)
        assert after.result(180) == reference["greedy"][4]
        recovery_s = time.monotonic() - killed_at
        assert pipe.scheduler.stage_failures >= 1
        assert recovery_s < 120
    finally:
        pipe.close()


def test_redis_stopped_and_restarted_under_load_loses_no_map(ray_cluster, prompts, reference, redis_server):
    from expertmap.predictor.map_store_redis import RedisMapStore

    ns = f"pipeline-{time.time_ns()}"
    from expertmap.cluster.map_service_actor import map_service

    # a service of that name already serves an in-process store: a Redis pipeline must not reuse it
    taken = f"in-process-{ns}"
    other = map_service({"num_layers": 8, "num_experts": 16, "embed_dim": 128, "prefetch_distance": 3}, None, name=taken)
    with pytest.raises(ValueError, match="already runs with"):
        pipeline(2, redis_url=redis_server.url, store_namespace=ns, map_service_name=taken)
    assert ray.get(other.describe.remote())["redis_url"] is None  # untouched (the handle keeps it alive)
    pipe = pipeline(2, redis_url=redis_server.url, store_namespace=ns, map_service_name=f"service-{ns}")
    service = pipe.map_service
    try:
        assert pipe.generate(prompts[:2], GREEDY, timeout=120) == reference["greedy"][:2]
        ray.get(service.flush.remote())
        before = ray.get(service.status.remote())
        assert before["connected"] and before["stored"] == 2 * GREEDY.max_new_tokens  # one map per iteration
        direct = RedisMapStore(redis_server.url, ns, **pipe.shape)
        emb_before, maps_before = direct.arrays()
        direct.close()

        redis_server.stop()
        try:  # serving goes on with Redis down; the new maps wait in the service
            assert pipe.generate(prompts[2:4], GREEDY, timeout=120) == reference["greedy"][2:4]
            # the last stage submits its maps as fire-and-forget actor calls: calls from the stage and
            # from this driver are not ordered, so wait (bounded) for the last one to arrive
            deadline = time.monotonic() + 10
            while ray.get(service.status.remote())["pending"] < 2 * GREEDY.max_new_tokens and time.monotonic() < deadline:
                time.sleep(0.1)
            during = ray.get(service.status.remote())
            assert not during["connected"] and during["pending"] == 2 * GREEDY.max_new_tokens
        finally:
            redis_server.start()
        deadline = time.monotonic() + 30
        while ray.get(service.status.remote())["pending"] and time.monotonic() < deadline:
            time.sleep(0.2)
        after = ray.get(service.status.remote())
        assert after["pending"] == 0 and after["dropped"] == 0 and after["connected"]
        direct = RedisMapStore(redis_server.url, ns, **pipe.shape)
        emb_after, maps_after = direct.arrays()
        direct.close()
        assert len(emb_after) == 4 * GREEDY.max_new_tokens  # every acknowledged map is in Redis
        assert (emb_after[: len(emb_before)] == emb_before).all() and (maps_after[: len(maps_before)] == maps_before).all()
    finally:
        pipe.close()


def test_too_many_gpus_is_a_clear_error(ray_cluster):
    from expertmap.cluster.placement import PlacementError

    with pytest.raises(PlacementError, match="asks for 7 GPUs but the Ray cluster has 6"):
        pipeline(7, policy="on-demand")  # (no map service: this is about GPUs)
