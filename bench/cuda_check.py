"""One short GPU check: tokens identical on CUDA, and copy/compute overlap shown by timings.

    python -m expertmap.bench.cuda_check [--model DIR]

Prints: token equality per budget; the time of N expert copies alone on the copy stream, of N
decode-sized compute steps alone, and of both at once (overlap when "both" < "copies" + "compute").
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from expertmap.actors.config import BUNDLED_MODEL, EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.model_folder import load_plain_model


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def overlap(engine: OffloadEngine, copies: int) -> dict[str, float]:
    pool, host = engine.pool, engine.host
    keys = host.keys()[:copies]
    stream = torch.cuda.Stream()
    x = torch.randn(64, 4096, device="cuda")
    w = torch.randn(4096, 4096, device="cuda")

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
        torch.cuda.current_stream().wait_stream(stream)

    for f in (do_copies, do_compute, both):
        timed(f)  # warm-up
    return {"copies_s": timed(do_copies), "compute_s": timed(do_compute), "both_s": timed(both)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(BUNDLED_MODEL))
    args = ap.parse_args()
    plain = load_plain_model(args.model).to("cuda")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok("def fibonacci(n):\n    ").input_ids
    x = torch.tensor([ids], device="cuda")
    ref = plain.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    del plain
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for budget in (1.0, 0.25, 0.125):
        engine = OffloadEngine(EngineConfig(model=args.model, device="cuda", budget=budget, link=LinkConfig(mode="cuda")))
        g = engine.generate(ids, max_new_tokens=32)
        report[f"budget_{budget}"] = {
            "tokens_identical": g.token_ids == ref,
            "hit_rate": g.stats.hit_rate,
            "copies": g.stats.copies,
            "stall_s": g.stats.stall_s,
            "tpot_ms_mean": 1e3 * sum(g.tpot_s) / max(1, len(g.tpot_s)),
        }
        if budget == 0.25:
            report["overlap"] = overlap(engine, copies=200)
        engine.close()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
