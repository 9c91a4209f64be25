"""Engine behaviour on the bundled model: statistics, policies' ordering, recording, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from expertmap.actors.config import Budget, EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.model_folder import ModelFolderError, load_plain_model
from expertmap.actors.expert_cache import CacheBudgetError
from expertmap.predictor.policies import PolicyInputs
from tests.tiny_models import save_tiny

INSTANT = LinkConfig(mode="instant", profile="instant")
PROMPTS = ["def merge_sort(items):\n", "Question: A farmer has 12 cows", "The river ran through the old town"]


def run_policy(folder, policy, budget, link, trace=None, max_new_tokens=16):
    engine = OffloadEngine(EngineConfig(model=folder, policy=policy, budget=budget, link=link), PolicyInputs(trace=trace))
    try:
        for p in PROMPTS:
            engine.generate(p, max_new_tokens=max_new_tokens, do_sample=True, seed=1)
        return engine.stats, engine.trace
    finally:
        engine.close()


def test_resident_has_no_misses_and_oracle_beats_on_demand_at_every_budget(bundled_model):
    link = LinkConfig(mode="emulated", copy_layer_ratio=2.0)
    resident, trace = run_policy(bundled_model.folder, "resident", 1.0, INSTANT)
    assert resident.misses == 0 and resident.hits == resident.accesses > 0 and resident.bytes_moved == 0
    for budget in (0.5, 0.25, 0.125, bundled_model.smallest_budget):
        lru, _ = run_policy(bundled_model.folder, "on-demand", budget, link)
        oracle, _ = run_policy(bundled_model.folder, "oracle", budget, link, trace=trace)
        assert lru.accesses == oracle.accesses == resident.accesses
        assert oracle.hit_rate >= lru.hit_rate, f"budget {budget}: oracle {oracle.hit_rate:.3f} < lru {lru.hit_rate:.3f}"
        assert oracle.precision <= 1.0


def test_compute_thread_waiting_counts_a_thread_that_holds_the_interpreter(bundled_model):
    """``waiting_frac``: iteration time the compute thread neither ran nor stalled for an expert
    (``unstalled_s``: the time not stalled, a mean per iteration).
    A pure-Python thread spinning beside it makes the compute thread wait for the interpreter at
    every return from a kernel, so the share rises well above the uncontended run's."""
    import threading

    engine = OffloadEngine(EngineConfig(model=bundled_model.folder, policy="on-demand", budget=0.25, link=INSTANT))
    try:
        engine.generate(PROMPTS[0], max_new_tokens=8, do_sample=False)
        alone = engine.waiting_frac
        rt = engine.runtime
        assert 0.0 < rt.iterations_cpu_s <= rt.iterations_s and 0.0 <= alone < 1.0
        stall = rt.cache.snapshot_stats().stall_s  # misses wait for the copy, even an instant one
        assert engine.unstalled_s * (rt.iteration + 1) == pytest.approx(rt.iterations_s - stall)
        engine.runtime.reset()
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                pass

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        try:
            engine.generate(PROMPTS[0], max_new_tokens=8, do_sample=False)
        finally:
            stop.set()
            spinner.join(5)
        contended = engine.waiting_frac
        assert contended > alone + 0.1 and contended > 0.2, (alone, contended)
    finally:
        engine.close()


def test_trace_recorder_keeps_one_expert_map_per_iteration(bundled_model):
    """The trace recorder listens to the shard runtime's events: one entry per iteration with
    every layer's router distribution, the pooled token embedding and the experts computed."""
    from expertmap.actors.trace_recorder import TraceRecorder

    recorder = TraceRecorder(bundled_model.folder)
    try:
        trace = recorder.record({"id": "a", "category": "", "prompt": PROMPTS[0]}, 5, do_sample=False, seed=0)
        engine = recorder.engine
        assert len(trace.iterations) == 5  # prefill + 4 decode steps
        L, J, k = len(engine.layers), engine.num_experts, engine.top_k
        prompt_ids = bundled_model.tokenizer(PROMPTS[0]).input_ids
        for it in trace.iterations:
            assert it.expert_map().shape == (L, J) and len(it.selected) == L
            np.testing.assert_allclose(it.expert_map().sum(-1), 1.0, rtol=1e-5)
            for probs, selected in zip(it.probs, it.selected):  # each token's top-k were computed
                assert set(np.argsort(-probs, axis=1)[:, :k].ravel().tolist()) == set(selected)
        assert trace.iterations[0].num_tokens == len(prompt_ids) and trace.iterations[1].num_tokens == 1
        # the embedding is the token-embedding output pooled over the iteration's tokens
        with torch.no_grad():
            emb = engine.model.get_input_embeddings()(torch.tensor([prompt_ids])).mean(dim=1)
        np.testing.assert_allclose(trace.iterations[0].embedding, emb[0].numpy(), rtol=1e-6)
        assert [it.selected for it in trace.iterations] == engine.trace  # the oracle's input agrees
    finally:
        recorder.close()


def test_budget_too_small_is_a_clear_error(bundled_model):
    with pytest.raises(CacheBudgetError, match="smallest budget is"):
        OffloadEngine(EngineConfig(model=bundled_model.folder, budget="1KiB", link=INSTANT))


def test_budget_parsing():
    assert Budget.parse("25%").fraction == 0.25
    assert Budget.parse("0.5").fraction == 0.5
    assert Budget.parse("2MiB").bytes == 2 * 2**20
    assert Budget.parse("3GB").bytes == 3 * 10**9
    for bad in ("0", "1.5", "-1", "12 parsecs", "abc"):
        with pytest.raises(ValueError, match="budget"):
            Budget.parse(bad)


def test_unsupported_architecture_and_remote_code_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(dense)  # fmt: skip
    with pytest.raises(ValueError, match="not a supported MoE architecture.*mixtral"):
        OffloadEngine(EngineConfig(model=dense, link=INSTANT))

    remote = save_tiny("mixtral", tmp_path / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="never runs code"):
        OffloadEngine(EngineConfig(model=remote, link=INSTANT))

    pickled = save_tiny("mixtral", tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="only safetensors"):
        load_plain_model(pickled)


def expertmap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "expertmap.cluster.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_generate_prints_text_and_statistics():
    r = expertmap("generate", "--prompt", "def add(a, b):", "--max-new-tokens", "6", "--link", "instant")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def add(a, b):")
    for field in ("hits", "misses", "stall", "moved", "TTFT", "TPOT"):
        assert field in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--budget", "1.5"], "out of range"),
        (["--budget", "0"], "out of range"),
        (["--budget", "1KiB"], "smallest budget"),
        (["--model", "/does/not/exist"], "does not exist"),
        (["--link", "carrier-pigeon"], "unknown link profile"),
        (["--max-new-tokens", "0"], "at least 1"),
    ],
)
def test_cli_bad_arguments_give_one_line_and_exit_2(args, message):
    r = expertmap("generate", "--prompt", "hello", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("expertmap: error:") and message in lines[0]


def test_cli_refuses_a_folder_that_is_not_moe(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)  # fmt: skip
    r = expertmap("generate", "--prompt", "hello", "--model", str(tmp_path))
    assert r.returncode == 2 and "not a supported MoE architecture" in r.stderr
