"""One pass per layer per micro-batch: the offloaded runtime equals the same runtime with every
expert resident and the same micro-batches, whatever joins and leaves; shards read only their
own tensors."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from expertmap.actors.config import EngineConfig, LinkConfig
from expertmap.actors.sampling import SamplingParams
from expertmap.actors.shard import MicroBatch, ShardRuntime, Step, split_layers
from tests.tiny_models import TINY_CONFIGS, save_tiny

INSTANT = LinkConfig(mode="instant", profile="instant")
SLOW = LinkConfig(mode="emulated", copy_layer_ratio=3.0)

# request -> (iteration it joins, new tokens); A and B overlap, C joins as A leaves
SCHEDULE = {"a": (0, 6), "b": (2, 5), "c": (5, 4), "d": (5, 3)}


def run_schedule(stages: list[ShardRuntime], prompts: dict[str, list[int]], params: dict[str, SamplingParams]):
    """Iteration by iteration, every live request in one micro-batch (prefills beside decodes),
    finished ones released in the next micro-batch. Returns each request's tokens."""
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    live: dict[str, Step] = {}
    release: list[str] = []
    it = 0
    while it == 0 or live or any(join >= it for join, _ in SCHEDULE.values()):
        for rid, (join, _) in SCHEDULE.items():
            if join == it:
                live[rid] = Step(rid, 0, prompts[rid], params[rid])
        mb = MicroBatch(list(live.values()), release=release)
        for stage in stages:
            mb = stage.forward(mb)
        release = []
        for step in mb.steps:
            out[step.rid].append(step.token)
            if len(out[step.rid]) == SCHEDULE[step.rid][1]:
                del live[step.rid]
                release.append(step.rid)
            else:
                live[step.rid] = Step(step.rid, step.start + len(step.token_ids), [step.token])
        it += 1
    for stage in stages:
        stage.forward(MicroBatch([], release=release))
        assert stage.requests == {}
    return out


def schedule_inputs(vocab: int, tokenizer=None):
    texts = {"a": "The river flows", "b": "def add(a, b):\n    return", "c": "Bonjour", "d": "7 times 8 is"}
    if tokenizer is not None:
        prompts = {rid: tokenizer(t).input_ids for rid, t in texts.items()}
    else:
        prompts = {rid: [(11 * i + 3 * n + 5) % vocab for i in range(3 + 2 * n)] for n, rid in enumerate(texts)}
    params = {rid: SamplingParams(max_new_tokens=n, do_sample=rid in "bd", seed=5, temperature=0.9)
              for rid, (_, n) in SCHEDULE.items()}  # fmt: skip
    return prompts, params


def tokens_of(config: EngineConfig, n_stages: int, num_layers: int, prompts, params):
    stages = [ShardRuntime(config, spec) for spec in split_layers(num_layers, n_stages)]
    try:
        out = run_schedule(stages, prompts, params)
        accesses = sum(s.stats()["accesses"] for s in stages)
        return out, accesses
    finally:
        for s in stages:
            s.close()


@pytest.mark.parametrize("n_stages", [1, 3])
def test_batched_offloaded_equals_batched_resident_bundled(bundled_model, n_stages):
    prompts, params = schedule_inputs(0, bundled_model.tokenizer)
    want, _ = tokens_of(EngineConfig(policy="resident", link=INSTANT), n_stages, 8, prompts, params)
    # 0.07 of a stage's experts: 2 slots on a 2-layer stage, the smallest a layer can run in
    for policy, budget, link in (("on-demand", 0.07, SLOW), ("hybrid", 0.25, INSTANT)):
        got, accesses = tokens_of(EngineConfig(policy=policy, budget=budget, link=link), n_stages, 8, prompts, params)
        assert got == want, f"{policy} at budget {budget}, {n_stages} stages"
        assert accesses > 0


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_batched_offloaded_equals_batched_resident_other_families(family, tmp_path):
    folder = save_tiny(family, tmp_path / family)
    cfg = TINY_CONFIGS[family]()
    prompts, params = schedule_inputs(cfg.vocab_size)
    want, _ = tokens_of(EngineConfig(model=folder, policy="resident", link=INSTANT), 2, cfg.num_hidden_layers,
                        prompts, params)  # fmt: skip
    got, _ = tokens_of(EngineConfig(model=folder, policy="on-demand", budget=0.5, link=INSTANT), 2,
                       cfg.num_hidden_layers, prompts, params)  # fmt: skip
    assert got == want


def test_decode_steps_share_one_attention_call_and_match_each_request_alone(bundled_model):
    """Three requests with caches of different lengths decode in one micro-batch: each layer's
    attention runs once for all three (padded to the longest cache, masked), and every request's
    tokens and log-probabilities equal those it gets decoding alone (to float rounding)."""
    config = EngineConfig(policy="resident", link=INSTANT)
    batched, alone = (ShardRuntime(config, split_layers(8, 1)[0]) for _ in range(2))
    tok = bundled_model.tokenizer
    texts = ("The river", "def add(a, b):\n    return a +", "Bonjour, comment allez-vous")
    prompts = [tok(t).input_ids for t in texts]
    assert len({len(p) for p in prompts}) == 3
    params = SamplingParams(max_new_tokens=8, logprobs=3)
    rows_per_call: list[int] = []
    first_attention = batched.layers[0].self_attn
    hook = first_attention.register_forward_pre_hook(
        lambda module, args, kwargs: rows_per_call.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        steps = {name: [] for name in ("batched", "alone")}
        for name, stage in (("batched", batched), ("alone", alone)):
            for i, p in enumerate(prompts):  # prefill one by one
                steps[name].append(stage.forward(MicroBatch([Step(str(i), 0, p, params)])).steps[0])
        assert rows_per_call == [1, 1, 1]
        for _ in range(4):
            nxt = {name: [Step(s.rid, s.start + len(s.token_ids), [s.token]) for s in steps[name]] for name in steps}
            batched.forward(MicroBatch(nxt["batched"]))
            for step in nxt["alone"]:
                alone.forward(MicroBatch([step]))
            for b, a in zip(nxt["batched"], nxt["alone"]):
                assert b.token == a.token
                assert b.token_logprob == pytest.approx(a.token_logprob, abs=1e-5)
                assert [t for t, _ in b.top_logprobs] == [t for t, _ in a.top_logprobs]
            steps = nxt
        assert rows_per_call[3:] == [3, 3, 3, 3]  # one call per decode iteration, all three rows
        assert [s.requests[r].length for s in (batched, alone) for r in "012"] == [len(p) + 4 for p in prompts] * 2
    finally:
        hook.remove()
        batched.close()
        alone.close()


def test_one_micro_batch_copies_a_shared_expert_once(bundled_model):
    """Four requests in one micro-batch: the cache sees each layer's union of experts once, so
    there are at most (layers x distinct experts) accesses per iteration, not one per request."""
    config = EngineConfig(policy="on-demand", budget=0.25, link=INSTANT)
    (stage,) = [ShardRuntime(config, spec) for spec in split_layers(8, 1)]
    tok = bundled_model.tokenizer
    try:
        steps = [Step(str(i), 0, tok(t).input_ids[:1], SamplingParams(max_new_tokens=1))
                 for i, t in enumerate(["The", "The", "The", "def"])]  # fmt: skip
        stage.forward(MicroBatch(steps))
        accesses = stage.stats()["accesses"]
        assert accesses <= 8 * 2 * 2  # 8 layers x (top-2 of two distinct inputs)
        assert accesses >= 8 * 2
    finally:
        stage.close()


def _checkpoint_bytes(folder, keep) -> int:
    total = 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        for key in f.keys():
            if keep(key):
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    return total


def test_a_shard_reads_only_its_own_tensors(bundled_model):
    """Stage 2 of 4 owns decoder layers 2-3: it reads exactly their tensors (attention, norms,
    routers, experts) and nothing of the embedding, the head or the other layers."""
    config = EngineConfig(policy="on-demand", budget=0.25, link=INSTANT)
    spec = split_layers(8, 4)[1]
    stage = ShardRuntime(config, spec)
    try:
        own = tuple(f"model.layers.{i}." for i in range(spec.start, spec.end))
        want = _checkpoint_bytes(bundled_model.folder, lambda k: k.startswith(own))
        everything = _checkpoint_bytes(bundled_model.folder, lambda k: True)
        assert stage.bytes_read == want
        assert stage.bytes_read < everything / 3
    finally:
        stage.close()
