"""What batching changes: greedy tokens of a request run alone against the same request inside a
micro-batch of B, over many prompts (the packed MLP's matmuls may round differently).

    python -m expertmap.bench.batch_agreement [--prompts 100] [--batch 16] [--new-tokens 16] [--out DIR]

Lossless is defined per batch composition (offloaded == resident for the same micro-batches;
tests/test_batched.py); across compositions this measures how often a token differs and where
the first difference falls. Writes DIR/results.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from expertmap.actors.config import EngineConfig, LinkConfig
from expertmap.actors.sampling import SamplingParams
from expertmap.actors.shard import MicroBatch, ShardRuntime, Step
from expertmap.bench.paths import DEFAULT_WORKLOAD, recorded
from expertmap.cluster.workload import load_workload


def generate(runtime: ShardRuntime, prompts: list[list[int]], new: int, tag: str) -> list[list[int]]:
    """All ``prompts`` in one micro-batch per iteration, greedy, ``new`` tokens each."""
    params = SamplingParams(max_new_tokens=new)
    steps = [Step(f"{tag}{i}", 0, p, params) for i, p in enumerate(prompts)]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(new):
        runtime.forward(MicroBatch(steps))
        for i, s in enumerate(steps):
            out[i].append(s.token)
        steps = [Step(s.rid, s.start + len(s.token_ids), [s.token]) for s in steps]
    runtime.forward(MicroBatch([], release=[s.rid for s in steps]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default=str(DEFAULT_WORKLOAD), help="JSONL prompts (default: the bundled sample)")
    ap.add_argument("--prompts", type=int, default=100, help="prompts compared")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch size")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt")
    ap.add_argument("--max-prompt-tokens", type=int, default=64, help="prompts are cut to this many tokens")
    ap.add_argument("--out", default="bench/results/batch_agreement", help="output folder")
    args = ap.parse_args(argv)
    runtime = ShardRuntime(EngineConfig(policy="resident", link=LinkConfig(mode="instant")))
    tok = runtime.tokenizer
    records = load_workload(Path(args.workload))[: args.prompts]
    prompts = [tok(r["prompt"]).input_ids[: args.max_prompt_tokens] or [tok.bos_token_id] for r in records]
    alone = [generate(runtime, [p], args.new_tokens, f"a{i}-")[0] for i, p in enumerate(tqdm(prompts, desc="alone"))]
    batched: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), args.batch), desc=f"batches of {args.batch}"):
        batched += generate(runtime, prompts[start : start + args.batch], args.new_tokens, f"b{start}-")
    runtime.close()
    same = [a == b for a, b in zip(alone, batched)]
    first_diff = [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in zip(alone, batched) if a != b]
    tokens_equal = sum(x == y for a, b in zip(alone, batched) for x, y in zip(a, b))
    result = {
        "config": {"workload": recorded(args.workload), "prompts": len(prompts), "batch": args.batch,
                   "new_tokens": args.new_tokens, "max_prompt_tokens": args.max_prompt_tokens},  # fmt: skip
        "requests_identical": sum(same),
        "requests": len(same),
        "token_agreement": tokens_equal / (len(prompts) * args.new_tokens),
        "first_difference_at": first_diff,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
