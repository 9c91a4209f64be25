"""Fate's lossy mode against the lossless engine: speed, and what it does to the output.

    python -m expertmap.bench.lossy [--workload FILE] [--corpus DIR] [--prompts 16] [--out bench/results/lossy]

Runs `fate` and `fate-lossy` (same budget and link) on the workload's first prompts (default: the
bundled sample, bench/workloads/) with greedy decoding and
reports hit rate, TPOT, bytes moved, token agreement with the full model (share of generated
positions whose token equals the full model's, and the mean position of the first difference),
and, with ``--corpus`` (the training corpus, a folder of .txt files that is not part of the
project), perplexity of held-out corpus text (the tails of the corpus files that training never
saw) under each engine, next to the full model's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from expertmap.actors import defaults
from expertmap.actors.config import EngineConfig, require_model_folder
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.model_folder import load_plain_model
from expertmap.actors.link_profiles import link_config
from expertmap.bench.paths import DEFAULT_WORKLOAD, recorded
from expertmap.cluster.workload import load_workload

logger = logging.getLogger(__name__)


def corpus_files(corpus: Path) -> list[Path]:
    """The corpus folder's .txt files; ValueError naming the folder when there are none."""
    files = sorted(Path(corpus).glob("*.txt"))
    if not files:
        raise ValueError(f"--corpus {str(corpus)!r} holds no .txt files (it should be the training corpus folder)")
    return files


def heldout_windows(tokenizer, files: list[Path], windows: int, length: int) -> list[list[int]]:
    """Windows from the last 2% of each corpus file (never trained on, see models/train.py)."""
    out = []
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(defaults.BUNDLED_MODEL), type=require_model_folder, help=defaults.MODEL_HELP)
    ap.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="JSONL prompt workload (default: the bundled sample)")
    ap.add_argument("--corpus", type=Path, default=None,
                    help="training corpus folder (.txt files) for held-out perplexity; without it perplexity is skipped")
    ap.add_argument("--prompts", type=int, default=16, help="prompts from the start of the workload (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS, help="new tokens per prompt")
    ap.add_argument("--budget", default=defaults.BUDGET, help="fraction of all expert bytes (0.25, 25%%) or a size (2GiB)")
    ap.add_argument("--link", default=defaults.LINK, help="link profile, ratio:R or instant")
    ap.add_argument("--windows", type=int, default=18, help="held-out windows of 128 tokens for perplexity")
    ap.add_argument("--out", default="bench/results/lossy", help="folder for results.json")
    args = ap.parse_args(argv)
    try:
        files = corpus_files(args.corpus) if args.corpus is not None else None
        link = link_config(args.link)
    except ValueError as exc:
        ap.error(str(exc))
    records = load_workload(args.workload)[: args.prompts]
    plain = load_plain_model(args.model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = [tok(r["prompt"]).input_ids[:256] for r in records]
    windows = heldout_windows(tok, files, args.windows, 128) if files else []
    if not windows:
        logger.warning("no --corpus: held-out perplexity is not measured")
    reference = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = plain.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.max_new_tokens, do_sample=False)  # fmt: skip
        reference.append(out[0, len(ids) :].tolist())
    report = {"full_model": {"perplexity": perplexity(plain, windows) if windows else None}}
    del plain
    layer_s = None
    for policy in ("fate", "fate-lossy"):
        engine = OffloadEngine(EngineConfig(model=args.model, policy=policy, budget=args.budget, link=link),
                               layer_time_s=layer_s)  # fmt: skip
        layer_s = engine.layer_time_s  # the first engine's, shared: both policies get one link
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
            "perplexity": perplexity(engine.model, windows) if windows else None,
        }
        engine.close()
    report["config"] = {"workload": recorded(args.workload), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "budget": args.budget,
                        "link": args.link, "heldout_windows": len(windows), "decoding": "greedy"}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
