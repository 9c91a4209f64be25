"""The prepared GPU run: one command, at most about 10 minutes on one GPU.

    python -m expertmap.bench.cuda_check [--shape qwen3-30b-a3b] [--layers 4] [--out DIR]
    python -m expertmap.bench.cuda_check --device cpu --shape tiny --layers 2   # the CPU form (tests)

1. The bundled model on the device: offloaded greedy tokens equal the plain model's at budgets
   1, 0.25 and 0.125 (real copies from pinned memory on a copy stream with events).
2. Host-to-device bandwidth: copies of one expert of the chosen real shape from pinned memory,
   measured; set against the link profiles' assumed bandwidths.
3. A random-weight model with the real expert sizes (``bench/random_models.py``; a few layers):
   every lossless policy at budget 25% with real copies: TPOT, hit rate, and tokens equal to
   the resident run of the same model.
4. Copy/compute overlap on the copy stream (copies alone, compute alone, both at once).

On a CPU device (the form the tests run) the link is emulated, the bandwidth step times plain
memory copies, and the overlap step is skipped. Writes DIR/results.json and prints it. Needs
no Ray (the GPU machines have none).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from expertmap.actors.config import BUNDLED_MODEL, EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import PROFILES
from expertmap.actors.model_folder import load_plain_model
from expertmap.actors.trace_recorder import TraceRecorder
from expertmap.bench.random_models import SHAPES, make_random_checkpoint
from expertmap.bench.run import PolicyFactory, build_store, request_eams
from expertmap.predictor.policies import POLICIES

PROMPT = "def fibonacci(n):\n    "


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def link_for(device: torch.device) -> LinkConfig:
    return LinkConfig(mode="cuda") if device.type == "cuda" else LinkConfig(mode="emulated", copy_layer_ratio=2.0)


def bundled_tokens(device: torch.device, new: int) -> dict:
    """Offloaded greedy tokens against the plain model's, on the device."""
    plain = load_plain_model(BUNDLED_MODEL).to(device)
    engine = OffloadEngine(EngineConfig(model=BUNDLED_MODEL, device=str(device), budget=1.0, link=link_for(device)))
    ids = engine.encode(PROMPT)
    x = torch.tensor([ids], device=device)
    ref = plain.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False)[0, len(ids):].tolist()  # fmt: skip
    engine.close()
    del plain
    out = {}
    for budget in (1.0, 0.25, 0.125):
        engine = OffloadEngine(EngineConfig(model=BUNDLED_MODEL, device=str(device), budget=budget, link=link_for(device)))
        g = engine.generate(ids, max_new_tokens=new)
        out[f"budget_{budget}"] = {"tokens_identical": g.token_ids == ref, "hit_rate": g.stats.hit_rate,
                                   "copies": g.stats.copies, "stall_s": g.stats.stall_s}  # fmt: skip
        engine.close()
    return out


def bandwidth(engine: OffloadEngine, copies: int) -> dict:
    """Host-to-device bytes/s of whole-expert copies from the host store (pinned on CUDA)."""
    pool, host, device = engine.runtime.pool, engine.host, engine.device
    keys = host.keys()[:copies]
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run():
        for i, k in enumerate(keys):
            if stream is not None:
                with torch.cuda.stream(stream):
                    pool.write(i % pool.num_slots, host[k], non_blocking=True)
            else:
                pool.write(i % pool.num_slots, host[k])

    run()  # warm-up
    seconds = timed(run, device)
    measured = len(keys) * host.expert_bytes / seconds
    return {
        "expert_bytes": host.expert_bytes,
        "copies": len(keys),
        "bytes_per_s": measured,
        "pinned": device.type == "cuda" and all(t.is_pinned() for t in host[keys[0]].values()),
        "profiles_assume": {name: p.link_bytes_per_s for name, p in PROFILES.items()},
    }


def overlap(engine: OffloadEngine, copies: int) -> dict:
    """Copies on the copy stream beside compute on the default stream (CUDA only)."""
    pool, host, device = engine.runtime.pool, engine.host, engine.device
    keys = host.keys()[:copies]
    stream = torch.cuda.Stream(device)
    x = torch.randn(64, 4096, device=device)
    w = torch.randn(4096, 4096, device=device)

    def do_copies():
        with torch.cuda.stream(stream):
            for i, k in enumerate(keys):
                pool.write(i % pool.num_slots, host[k], non_blocking=True)

    def do_compute():
        y = x
        for _ in range(copies):
            y = torch.tanh(y @ w)

    def both():
        do_copies()
        do_compute()
        torch.cuda.current_stream(device).wait_stream(stream)

    for f in (do_copies, do_compute, both):
        timed(f, device)  # warm-up
    return {"copies_s": timed(do_copies, device), "compute_s": timed(do_compute, device), "both_s": timed(both, device)}


def policy_runs(folder: Path, device: torch.device, new: int, prompts: list[list[int]]) -> dict:
    """Every lossless policy at budget 25% with the device's real link, against resident."""
    recorder = TraceRecorder(folder, device=str(device))
    warm = recorder.record_all([{"id": str(i), "category": "", "prompt": p} for i, p in enumerate(prompts[:2])],
                               new, do_sample=False, seed=0, desc="warm-up")  # fmt: skip
    engine = recorder.engine
    L, J, k = len(engine.layers), engine.num_experts, engine.top_k
    recorder.close()
    factory = PolicyFactory(build_store(warm, L, J, 1000, 2), request_eams(warm, L, J), (L, J, k), 2)
    rows, reference, trace = {}, None, None
    # every lossless copy policy once (lru is on-demand's alias; the host-compute baselines are
    # measured by bench/host_bench.py with --miss host)
    names = ["resident"] + [n for n, cls in sorted(POLICIES.items())
                            if cls.lossless and not cls.host_misses and n == cls.name and n != "resident"]  # fmt: skip
    for name in names:
        budget = 1.0 if name == "resident" else 0.25
        config = EngineConfig(model=folder, device=str(device), policy=name, budget=budget, link=link_for(device))
        engine = OffloadEngine(config, factory.inputs(name, trace, synchronous=False))
        try:
            gens = [engine.generate(p, max_new_tokens=new) for p in prompts]
        finally:
            engine.close()
        tokens = [g.token_ids for g in gens]
        if name == "resident":
            reference, trace = tokens, engine.trace
        tpot = [t for g in gens for t in g.tpot_s]
        stats = [g.stats for g in gens]
        hits, accesses = sum(s.hits for s in stats), sum(s.accesses for s in stats)
        rows[name] = {"tokens_identical": tokens == reference, "hit_rate": hits / accesses if accesses else 0.0,
                      "tpot_ms_mean": 1e3 * sum(tpot) / max(1, len(tpot)), "copies": sum(s.copies for s in stats)}  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The prepared GPU run (tokens, bandwidth, policies with real copies).")
    ap.add_argument("--device", default="cuda", help="cuda (the GPU run) or cpu (the small form the tests run)")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES), help="real expert sizes to use")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the random model")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens per generation")
    ap.add_argument("--out", default="bench/results/cuda_check", help="output folder")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("expertmap: error: --device cuda but no CUDA device is available (use --device cpu)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "shape": args.shape, "layers": args.layers}  # fmt: skip
    report["bundled"] = bundled_tokens(device, args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.shape
        report["checkpoint_bytes"] = make_random_checkpoint(folder, args.shape, args.layers)
        vocab = 4096
        prompts = [[(37 * i + 11 * j + 5) % vocab for i in range(8 + 4 * j)] for j in range(3)]
        engine = OffloadEngine(EngineConfig(model=folder, device=str(device), budget=0.25, link=link_for(device)))
        try:
            report["bandwidth"] = bandwidth(engine, copies=min(64, len(engine.host)))
            if device.type == "cuda":
                report["overlap"] = overlap(engine, copies=min(64, len(engine.host)))
        finally:
            engine.close()
        report["policies"] = policy_runs(folder, device, args.new_tokens, prompts)
    report["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
