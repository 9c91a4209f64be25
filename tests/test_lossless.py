"""Offloaded execution gives exactly the plain model's tokens, for every family, budget and policy.

The reference is the plain transformers model with its eager experts loop; the engine runs the
same checkpoint with experts in a host store and only a budget of them in the device cache.
"""

from __future__ import annotations

import pytest
import torch

from expertmap.actors.config import EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.model_folder import load_plain_model
from expertmap.predictor.policies import PolicyInputs
from tests.tiny_models import TINY_CONFIGS, save_tiny

POLICIES = ["resident", "on-demand", "lfu", "oracle"]
INSTANT = LinkConfig(mode="instant", profile="instant")
NEW_TOKENS = 8


def smallest_budget(folder) -> float:
    """The smallest fraction that holds top-k experts (one token's selection)."""
    probe = OffloadEngine(EngineConfig(model=folder, policy="resident", link=INSTANT))
    try:
        return probe.top_k / len(probe.host) + 1e-9
    finally:
        probe.close()


def reference_tokens(folder, prompt: list[int], do_sample: bool = False, seed: int = 0) -> list[int]:
    model = load_plain_model(folder)
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=do_sample, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def offloaded_tokens(folder, policy: str, budget: float, prompt: list[int], link=INSTANT, **gen) -> tuple[list[int], object]:
    trace = None
    if policy == "oracle":
        first = OffloadEngine(EngineConfig(model=folder, policy="resident", link=link))
        first.generate(prompt, max_new_tokens=NEW_TOKENS, **gen)
        trace = first.trace
        first.close()
    engine = OffloadEngine(EngineConfig(model=folder, policy=policy, budget=budget, link=link), PolicyInputs(trace=trace))
    try:
        g = engine.generate(prompt, max_new_tokens=NEW_TOKENS, **gen)
        return g.token_ids, g.stats
    finally:
        engine.close()


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory):
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    vocab = TINY_CONFIGS[request.param]().vocab_size
    prompt = [(13 * i + 5) % vocab for i in range(10)]
    return folder, prompt, reference_tokens(folder, prompt)


@pytest.mark.parametrize("policy", POLICIES)
def test_tiny_families_lossless(tiny_model, policy):
    folder, prompt, expected = tiny_model
    for budget in (1.0, 0.5, 0.25, smallest_budget(folder)):
        tokens, stats = offloaded_tokens(folder, policy, budget, prompt)
        assert tokens == expected, f"{folder.name} {policy} budget {budget}"
        assert stats.accesses > 0


def test_bundled_model_lossless_every_policy_and_budget(each_bundled_model):
    prompt_ids = each_bundled_model.tokenizer("def fibonacci(n):\n    ").input_ids
    expected = reference_tokens(each_bundled_model.folder, prompt_ids)
    for policy in POLICIES:
        for budget in (1.0, 0.5, 0.25, each_bundled_model.smallest_budget):
            tokens, _ = offloaded_tokens(each_bundled_model.folder, policy, budget, prompt_ids)
            assert tokens == expected, f"{policy} budget {budget}"


def test_bundled_model_seeded_sampling_lossless_on_emulated_link(each_bundled_model):
    """Seeded sampling, and the real timing path (emulated link, prefetching) for the oracle."""
    prompt_ids = each_bundled_model.tokenizer("The history of the city").input_ids
    expected = reference_tokens(each_bundled_model.folder, prompt_ids, do_sample=True, seed=7)
    link = LinkConfig(mode="emulated", copy_layer_ratio=2.0)
    for policy in ("on-demand", "oracle"):
        tokens, stats = offloaded_tokens(each_bundled_model.folder, policy, 0.25, prompt_ids, link=link, do_sample=True, seed=7)
        assert tokens == expected, policy
        assert stats.misses > 0  # the cache really was exercised


def test_default_experts_implementation_gives_same_greedy_tokens(bundled_model):
    """Against transformers' default kernel (not just eager), greedy tokens still agree."""
    prompt_ids = bundled_model.tokenizer("Question: Tom has 3 apples").input_ids
    model = load_plain_model(bundled_model.folder, experts_implementation="grouped_mm")
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    tokens, _ = offloaded_tokens(bundled_model.folder, "on-demand", 0.25, prompt_ids)
    assert tokens == out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def warm_factory(each_bundled_model):
    """A map store and activation matrices warmed from a few prompts, as `expertmap bench` does."""
    from expertmap.actors.trace_recorder import TraceRecorder
    from expertmap.bench.run import PolicyFactory, build_store, request_eams

    recorder = TraceRecorder(each_bundled_model.folder)
    prompts = [{"id": str(i), "category": "", "prompt": p} for i, p in enumerate(
        ["import os\nimport sys\n", "The king said to the queen", "Question: what is 7 times 8?"])]  # fmt: skip
    traces = recorder.record_all(prompts, 8, do_sample=False, seed=0)
    L, J, k = len(recorder.engine.layers), recorder.engine.num_experts, recorder.engine.top_k
    recorder.close()
    return PolicyFactory(build_store(traces, L, J, 1000, 2), request_eams(traces, L, J), (L, J, k), 2)


@pytest.mark.parametrize("policy", ["finemoe", "fate", "moe-infinity", "mixtral-offloading", "hybrid"])
def test_predictive_policies_lossless_on_the_real_engine(each_bundled_model, warm_factory, policy):
    prompt_ids = each_bundled_model.tokenizer("def parse(line):\n    return").input_ids
    expected = reference_tokens(each_bundled_model.folder, prompt_ids, do_sample=True, seed=3)
    link = LinkConfig(mode="emulated", copy_layer_ratio=2.0)
    for budget in (0.25, each_bundled_model.smallest_budget):
        engine = OffloadEngine(
            EngineConfig(model=each_bundled_model.folder, policy=policy, budget=budget, link=link),
            warm_factory.inputs(policy, None, synchronous=False),
        )
        try:
            g = engine.generate(prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=True, seed=3)
            assert g.token_ids == expected, f"{policy} budget {budget}"
            assert g.stats.accesses > 0
        finally:
            engine.close()
