"""Misses computed on the host (``--miss host|auto``): the cost model, the host profiles, the
baselines host-all / host-static, the replay's host path, and that every mode gives the plain
model's tokens (bundled model and two other families)."""

from __future__ import annotations

import numpy as np
import pytest
from expertmap.actors.config import EngineConfig, HostConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.host_compute import MissCostModel, check_miss_mode, host_units
from expertmap.actors.host_profiles import PROFILES, UnknownHostProfileError, host_config, resolve
from expertmap.actors.link_profiles import PROFILES as LINKS
from expertmap.actors.trace_recorder import IterationTrace, RequestTrace
from expertmap.bench.simulator import HostReplayCache, host_cache, replay
from expertmap.predictor.policies import PolicyInputs, make_policy
from expertmap.predictor.policies.base import PolicyContext
from pydantic import ValidationError

from tests.test_lossless import NEW_TOKENS, reference_tokens
from tests.tiny_models import save_tiny

INSTANT = LinkConfig(mode="instant", profile="instant")
EMULATED = LinkConfig(mode="emulated", copy_layer_ratio=2.0)  # a fast link: auto mixes copies and host
FAST_HOST = HostConfig(profile="ratio:1", decode_ratio=1.0, crossover_tokens=4.0)


# --- the cost model --------------------------------------------------------------------------------
def desktop_model() -> MissCostModel:
    """Units: decode-layer times. Copy 13.1 (RTX 3090, PCIe 4.0, Mixtral); host: desktop DDR5."""
    cfg = host_config("desktop-ddr5")
    return MissCostModel(13.1, lambda t: host_units(t, cfg.decode_ratio, cfg.crossover_tokens))


def test_decode_goes_to_the_host_long_prefill_copies():
    m = desktop_model()
    decode = m.choose(tokens=1)
    assert decode.where == "host" and decode.host_done_s == pytest.approx(6.99, abs=0.01)
    prefill = m.choose(tokens=512)  # compute-bound: 6.99 x 512 / 25 = 143 layer times
    assert prefill.where == "copy" and prefill.host_done_s > 100


def test_a_busy_link_sends_a_miss_to_the_host_a_busy_host_sends_it_to_the_link():
    m = desktop_model()
    assert m.choose(tokens=60).where == "copy"  # 16.8 on the host against 13.1 on an idle link
    assert m.choose(tokens=60, link_wait_s=10.0).where == "host"  # the link's queue: 23.1
    assert m.choose(tokens=1, host_wait_s=10.0).where == "copy"  # 17.0 on a busy host
    assert m.choose(tokens=1, on_link_left_s=2.0).where == "copy"  # its own prefetch lands soon


def test_profiles_arithmetic_and_node_sharing():
    ref = LINKS["rtx3090-pcie4-mixtral"]
    desktop, server = PROFILES["desktop-ddr5"], PROFILES["server-ddr5-8ch"]
    # Mixtral expert 352 MB: 5.87 ms at 60 GB/s (+ 20 us round trip) over a 0.842 ms layer
    assert desktop.decode_ratio(ref) == pytest.approx((352321536 / 60e9 + 20e-6) / ref.layer_s)
    assert 6.5 < desktop.decode_ratio(ref) < 7.5 and 1.5 < server.decode_ratio(ref) < 2.0
    assert desktop.decode_ratio(ref) < ref.ratio  # host memory beats PCIe at decode
    six = resolve(host_config("server-ddr5-8ch"), "rtx3090-pcie4-mixtral", stages=6)
    assert six.decode_ratio == pytest.approx(6 * server.decode_ratio(ref))
    assert desktop.share(2).memory_bytes_per_s == desktop.memory_bytes_per_s / 2
    assert host_config("ratio:3.5").decode_ratio == 3.5


@pytest.mark.parametrize("name", ["bogus", "ratio:abc", "ratio:-1", "ratio:inf"])
def test_unknown_host_profile_is_a_clear_error(name):
    with pytest.raises(UnknownHostProfileError, match="host|ratio"):
        host_config(name)


def test_unknown_miss_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="miss mode 'sometimes' is not one of copy, host, auto"):
        check_miss_mode("sometimes")
    with pytest.raises(ValidationError):
        EngineConfig(miss="sometimes")
    from expertmap.cluster.serve_args import AppArgs

    with pytest.raises(ValidationError, match="miss mode"):
        AppArgs(miss="sometimes")
    with pytest.raises(ValidationError, match="unknown host profile"):
        AppArgs(host_profile="laptop")
    assert AppArgs(miss="auto", host_profile="server-ddr5-8ch").miss == "auto"


def test_cli_errors_name_the_bad_value(capsys):
    from expertmap.cluster.cli import main

    assert main(["generate", "--prompt", "x", "--miss", "sometimes"]) == 2
    assert "miss mode 'sometimes'" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--host", "laptop"]) == 2
    assert "unknown host profile 'laptop'" in capsys.readouterr().err
    assert main(["bench", "--miss", "auto", "--host", "ratio:0"]) == 2
    assert "ratio must be a finite number greater than 0" in capsys.readouterr().err


# --- the replay's host path --------------------------------------------------------------------------
def decode_trace(accesses: list[list[int]], J: int = 8) -> list[RequestTrace]:
    its = [IterationTrace(np.ones(4, np.float32), [np.full((1, J), 1.0 / J, np.float32)], [None], [e]) for e in accesses]
    return [RequestTrace("r", "c", "p", "t", its)]


def ctx(slots: int, **kw) -> PolicyContext:
    return PolicyContext(num_layers=1, num_experts=8, top_k=2, num_slots=slots, **kw)


def test_replay_auto_with_a_useless_host_equals_copy_and_a_fast_host_is_faster():
    traces = decode_trace([[0, 1], [2, 3], [4, 5], [0, 2], [1, 3], [6, 7]] * 3)
    copy = replay(make_policy("on-demand", ctx(3)), traces, 3, 4.0)
    slow = replay(make_policy("on-demand", ctx(3)), traces, 3, 4.0, make_cache=host_cache("auto", 100.0, 25.0))
    assert slow.iteration_units == copy.iteration_units and slow.stats.host_computed == 0
    fast = replay(make_policy("on-demand", ctx(3)), traces, 3, 4.0, make_cache=host_cache("auto", 1.0, 25.0))
    assert fast.stats.host_computed > 0 and sum(fast.iteration_units) < sum(copy.iteration_units)
    assert fast.host_busy_units == pytest.approx(fast.stats.host_computed * 1.0)


def test_replay_host_all_and_host_static():
    traces = decode_trace([[0, 1], [0, 2], [0, 1], [3, 1]])
    res = replay(make_policy("host-all", ctx(2)), traces, 2, 4.0, make_cache=host_cache("auto", 2.0, 25.0))
    assert res.stats.hits == 0 and res.stats.copies == 0 and res.stats.host_computed == res.stats.accesses == 8
    assert res.iteration_units == [4.0] * 4  # two experts in turn on the serial host lane
    usage = np.zeros((1, 8))
    usage[0, [0, 1]] = [5, 3]
    policy = make_policy("host-static", ctx(2, usage=usage))
    assert policy.static_keys() == [(0, 0), (0, 1)]
    res = replay(policy, traces, 2, 4.0, make_cache=host_cache("host", 2.0, 25.0))
    assert res.stats.hits == 6 and res.stats.host_computed == 2 and res.stats.copies == 0
    with pytest.raises(ValueError, match="host-static policy needs warm-up usage counts"):
        make_policy("host-static", ctx(2))


def test_replay_prefill_tokens_per_expert_drive_the_choice():
    """A prefill of 64 tokens over 2 experts: 32+ tokens each, compute-bound on a host whose
    crossover is 4 tokens (x8 and more): it copies; the same experts at decode go to the host."""
    J = 8
    probs = np.zeros((64, J), np.float32)
    probs[:, 0], probs[:, 1] = 0.6, 0.4
    pre = IterationTrace(np.ones(4, np.float32), [probs], [None], [[0, 1]])
    dec = IterationTrace(np.ones(4, np.float32), [probs[:1]], [None], [[2, 3]])
    traces = [RequestTrace("r", "c", "p", "t", [pre, dec])]
    cache = {}

    def make(policy, slots, ratio):
        cache["c"] = HostReplayCache(policy, slots, ratio, "auto", 1.0, 4.0)
        return cache["c"]

    res = replay(make_policy("on-demand", ctx(4)), traces, 4, 3.0, make_cache=make)
    assert res.stats.host_computed == 2  # the decode's two misses; the prefill's copied
    assert res.stats.copies >= 2


# --- the engine ----------------------------------------------------------------------------------
def engine_tokens(folder, prompt, policy="on-demand", budget=0.25, link=INSTANT, miss="host", host=FAST_HOST, usage=None):
    engine = OffloadEngine(EngineConfig(model=folder, policy=policy, budget=budget, link=link, miss=miss, host=host),
                           PolicyInputs(usage=usage))  # fmt: skip
    try:
        g = engine.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=True, seed=5)
        return g.token_ids, g.stats, engine.runtime.host_compute.chosen
    finally:
        engine.close()


def test_bundled_model_host_and_auto_give_the_plain_models_tokens(bundled_model):
    prompt = bundled_model.tokenizer("def fibonacci(n):\n    ").input_ids
    expected = reference_tokens(bundled_model.folder, prompt, do_sample=True, seed=5)
    tokens, stats, chosen = engine_tokens(bundled_model.folder, prompt, miss="host")
    assert tokens == expected
    assert stats.host_computed == stats.misses > 0 and chosen["copy"] == 0
    assert stats.copies > 0  # on-demand admits host-computed experts: copied in the background
    tokens, stats, chosen = engine_tokens(bundled_model.folder, prompt, link=EMULATED, miss="auto", budget=bundled_model.smallest_budget)
    assert tokens == expected
    assert stats.host_computed > 0 and chosen["host"] == stats.host_computed


def test_bundled_model_host_all_and_host_static(bundled_model):
    prompt = bundled_model.tokenizer("The history of the city").input_ids
    expected = reference_tokens(bundled_model.folder, prompt, do_sample=True, seed=5)
    tokens, stats, _ = engine_tokens(bundled_model.folder, prompt, policy="host-all", miss="copy")
    assert tokens == expected
    assert stats.hits == 0 and stats.copies == 0 and stats.host_computed == stats.accesses > 0
    usage = np.zeros((8, 16))
    usage[:, :4] = 1.0  # experts 0-3 of every layer: the 32 slots of a 25% budget
    engine = OffloadEngine(EngineConfig(model=bundled_model.folder, policy="host-static", budget=0.25, link=INSTANT, miss="copy",
                                        host=FAST_HOST), PolicyInputs(usage=usage))  # fmt: skip
    try:
        pinned = {(layer, e) for layer in range(8) for e in range(4)}
        assert engine.cache.resident_keys() == pinned
        g = engine.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=True, seed=5)
        assert g.token_ids == expected
        assert g.stats.copies == 0 and g.stats.hits > 0 and g.stats.host_computed == g.stats.misses > 0
        engine.reset()
        assert engine.cache.resident_keys() == pinned  # the placement survives a reset
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_other_families_host_and_auto_lossless(family, tmp_path):
    from tests.tiny_models import TINY_CONFIGS

    folder = save_tiny(family, tmp_path / family)
    vocab = TINY_CONFIGS[family]().vocab_size
    prompt = [(13 * i + 5) % vocab for i in range(10)]
    expected = reference_tokens(folder, prompt, do_sample=True, seed=5)
    for miss, link in (("host", INSTANT), ("auto", EMULATED)):
        tokens, stats, _ = engine_tokens(folder, prompt, miss=miss, link=link, budget=0.5)
        assert tokens == expected, f"{family} --miss {miss}"
        assert stats.host_computed > 0, f"{family} --miss {miss}"


def test_pipeline_stages_with_host_misses_share_the_node_and_match_the_engine(bundled_model):
    """Two in-process stages, two requests per micro-batch, every miss on the host: the engine's
    tokens; each stage's host is half the node's (its decode ratio doubled)."""
    from expertmap.actors.sampling import SamplingParams
    from expertmap.actors.shard import ShardRuntime, split_layers

    from tests.test_stage import NEW, run_pipeline

    tok = bundled_model.tokenizer
    prompts = [tok("def add(a, b):").input_ids, tok("Once upon a time").input_ids]
    config = EngineConfig(model=bundled_model.folder, policy="on-demand", budget=0.25, link=INSTANT, miss="host",
                          host=host_config("desktop-ddr5"))  # fmt: skip
    engine = OffloadEngine(config)
    try:
        expected = [engine.generate(p, max_new_tokens=NEW).token_ids for p in prompts]
    finally:
        engine.close()
    stages = [ShardRuntime(config, spec) for spec in split_layers(8, 2)]
    try:
        assert run_pipeline(stages, prompts, SamplingParams(max_new_tokens=NEW)) == expected
        assert all(s.cache.snapshot_stats().host_computed > 0 for s in stages)
        assert stages[0].host_compute.host.decode_ratio == pytest.approx(2 * host_config("desktop-ddr5").decode_ratio)
    finally:
        for s in stages:
            s.close()


def test_threaded_host_lane_computes_off_the_calling_thread_and_learns_its_time():
    """The CUDA host lane, exercised on the CPU: results come back, failures surface, the
    estimate moves from the calibration towards the measured time."""
    import threading
    import time

    from expertmap.actors.host_compute import ThreadedHostLane

    lane = ThreadedHostLane(lambda t: 1.0)  # a calibration far from the truth
    try:
        seen = []

        def work():
            seen.append(threading.current_thread().name)
            time.sleep(0.01)
            return "out"

        jobs = [lane.submit(work, 1) for _ in range(3)]
        assert [j.future.result(timeout=5) for j in jobs] == ["out"] * 3
        assert seen and all(n.endswith("-host") for n in seen)
        assert lane.seconds(1) < 0.5 and lane.busy_s >= 0.03
        failing = lane.submit(lambda: 1 / 0, 1)
        with pytest.raises(ZeroDivisionError):
            failing.future.result(timeout=5)
    finally:
        lane.close()


def test_serve_takes_miss_and_host_into_the_stages_engine_config():
    from expertmap.cluster.cli import UsageError, _serve_plan, build_parser
    from expertmap.cluster.serve_args import AppArgs, engine_config

    args = build_parser().parse_args(["serve", "--miss", "auto", "--host", "server-ddr5-8ch"])
    _, apps = _serve_plan(args)
    app_args = apps[0][3]
    assert app_args["miss"] == "auto" and app_args["host_profile"] == "server-ddr5-8ch"
    assert app_args["host"] == "127.0.0.1"  # the HTTP host is another field
    cfg = engine_config(AppArgs.model_validate(app_args))
    assert cfg.miss == "auto" and cfg.host.decode_ratio == pytest.approx(host_config("server-ddr5-8ch").decode_ratio)
    with pytest.raises(UsageError, match="miss mode 'never'"):
        _serve_plan(build_parser().parse_args(["serve", "--miss", "never"]))
