"""Beyond one node: Ray's own multi-node test cluster (two raylets on this machine, three declared
GPUs each); a six-stage pipeline spans both nodes and gives the one-node tokens."""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest
import ray
from ray.cluster_utils import Cluster

from expertmap.actors.config import EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.sampling import SamplingParams
from expertmap.cluster.pipeline import Pipeline, PipelineConfig

INSTANT = LinkConfig(mode="instant", profile="instant")


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 3, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    cluster.add_node(num_cpus=0, num_gpus=3, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_six_stages_over_two_nodes_match_one_engine(two_nodes, bundled_model):
    prompts = [bundled_model.tokenizer(t).input_ids for t in ("The river flows", "def add(a, b):", "1 + 1 =")]
    config = EngineConfig(policy="hybrid", budget=0.25, link=INSTANT)
    engine = OffloadEngine(config)
    want = [engine.generate(p, max_new_tokens=6).token_ids for p in prompts]
    engine.close()
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    pipe = Pipeline(PipelineConfig(engine=config, gpus=6))
    try:
        assert len(set(pipe.nodes)) == 2  # no node has six GPUs: the stages span both
        assert pipe.generate(prompts, SamplingParams(max_new_tokens=6), timeout=180) == want
    finally:
        pipe.close()
