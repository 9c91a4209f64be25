"""Fate's lossy mode against the lossless engine: speed, and what it does to the output.

    python -m bench.lossy [--prompts 16] [--max-new-tokens 32] [--out bench/results/lossy]

Runs `fate` and `fate-lossy` (same budget and link) on prompts of dev_mix with greedy decoding and
reports hit rate, TPOT, bytes moved, token agreement with the full model (share of generated
positions whose token equals the full model's, and the mean position of the first difference),
and perplexity of held-out corpus text (the tails of the corpus files that training never saw)
under each engine, next to the full model's.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from expertmap.actors.config import BUNDLED_MODEL, EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine, load_plain_model
from expertmap.actors.link_profiles import DEFAULT_PROFILE, get_profile
from expertmap.bench.routing_trace import load_workload

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def heldout_windows(tokenizer, windows: int, length: int) -> list[list[int]]:
    """Windows from the last 2% of each corpus file (never trained on, see models/train.py)."""
    out = []
    files = sorted((SHARED / "corpus").glob("*.txt"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        ids = tokenizer(text[int(len(text) * 0.985) :]).input_ids
        for start in range(0, max(0, len(ids) - length), length)[: max(1, windows // len(files))]:
            out.append(ids[start : start + length])
    return out[:windows]


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        x = torch.tensor([w])
        loss = model(input_ids=x, labels=x).loss.item()
        nll += loss * (len(w) - 1)
        count += len(w) - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(BUNDLED_MODEL))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--link", default=DEFAULT_PROFILE)
    ap.add_argument("--windows", type=int, default=18)
    ap.add_argument("--out", default="bench/results/lossy")
    args = ap.parse_args()
    records = load_workload(SHARED / "workloads" / "dev_mix.jsonl")[: args.prompts]
    plain = load_plain_model(args.model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = [tok(r["prompt"]).input_ids[:256] for r in records]
    windows = heldout_windows(tok, args.windows, 128)
    reference = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = plain.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.max_new_tokens, do_sample=False)  # fmt: skip
        reference.append(out[0, len(ids) :].tolist())
    report = {"full_model": {"perplexity": perplexity(plain, windows)}}
    del plain
    link = LinkConfig(copy_layer_ratio=get_profile(args.link).ratio, profile=args.link)
    for policy in ("fate", "fate-lossy"):
        engine = OffloadEngine(EngineConfig(model=args.model, policy=policy, budget=args.budget, link=link))
        agree, first_diff, tpots = [], [], []
        for ids, ref in zip(prompts, reference):
            g = engine.generate(ids, max_new_tokens=args.max_new_tokens)
            same = [a == b for a, b in zip(g.token_ids, ref)]
            agree.append(float(np.mean(same)))
            first_diff.append(same.index(False) if False in same else len(same))
            tpots.extend(g.tpot_s)
        s = engine.stats
        report[policy] = {
            "hit_rate": s.hit_rate,
            "tpot_s_mean": float(np.mean(tpots)),
            "bytes_moved": s.bytes_moved,
            "token_agreement": float(np.mean(agree)),
            "mean_first_difference": float(np.mean(first_diff)),
            "perplexity": perplexity(engine.model, windows),
        }
        engine.close()
    report["config"] = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "budget": args.budget,
                        "link": args.link, "heldout_windows": len(windows), "decoding": "greedy"}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
