"""The `expertmap` command line. The entry point: the only place that reads the environment.

    expertmap serve [--config FILE] [--model DIR] [--gpus N] [--address ADDR] [--port P]
                    [--policy P] [--budget B]

    expertmap generate --prompt "def fib(n):" [--model DIR] [--policy P] [--budget B]
                       [--link PROFILE] [--max-new-tokens N] [--device D] [--sample --seed S]

User mistakes (unknown policy, budget out of range, a folder that is not an MoE model) print one
line starting with ``expertmap: error:`` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from expertmap.actors import defaults
from expertmap.actors.config import Budget, EngineConfig, require_model_folder
from expertmap.actors.link_profiles import link_config

log = logging.getLogger("expertmap")


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


def engine_config(args: argparse.Namespace) -> EngineConfig:
    from expertmap.predictor.policies import POLICIES

    if args.policy not in POLICIES:
        raise UsageError(f"unknown policy {args.policy!r}; choose one of: {', '.join(sorted(POLICIES))}")
    try:
        budget = Budget.parse(args.budget)
        link = link_config(args.link)
        model = require_model_folder(args.model)
        miss, host = _miss_and_host(args.miss, args.host, args.link)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return EngineConfig(model=model, device=args.device, policy=args.policy, budget=budget, link=link, prefetch=not args.no_prefetch,
                        miss=miss, host=host)  # fmt: skip


def _miss_and_host(miss: str, host: str, link: str):
    """(miss mode, HostConfig) from --miss/--host; ValueError naming a bad value."""
    from expertmap.actors.host_compute import check_miss_mode
    from expertmap.actors.host_profiles import host_config

    return check_miss_mode(miss), host_config(host, link)


def _format_stats(stats, ttft: float, tpot: list[float]) -> str:
    tpot_mean = sum(tpot) / len(tpot) if tpot else 0.0
    rows = [
        ("accesses", f"{stats.accesses}"),
        ("hits", f"{stats.hits} ({stats.hit_rate:.1%})"),
        ("misses", f"{stats.misses}" + (f" ({stats.host_computed} computed on the host)" if stats.host_computed else "")),
        ("stall", f"{stats.stall_s:.3f} s"),
        ("moved", f"{stats.bytes_moved / 2**20:.1f} MiB in {stats.copies} copies"),
        ("prefetch", f"{stats.prefetched} copies, precision {stats.precision:.1%}, recall {stats.recall:.1%}"),
        ("TTFT", f"{ttft * 1e3:.1f} ms"),
        ("TPOT", f"{tpot_mean * 1e3:.1f} ms (mean of {len(tpot)})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def cmd_generate(args: argparse.Namespace) -> int:
    from expertmap.actors.engine import OffloadEngine
    from expertmap.predictor.policies import PolicyInputs, policy_class

    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    config = engine_config(args)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, seed=args.seed)
    trace = None
    if policy_class(config.policy).needs_trace:
        # The oracle needs the run's future accesses: a first pass records them (lossless
        # execution routes identically), then the oracle pass replays the same generation.
        first = OffloadEngine(config.model_copy(update={"policy": "resident"}), progress=args.progress)
        first.generate(args.prompt, **gen_kwargs)
        trace = first.trace
        first.close()
    replica = None
    if args.store:
        from expertmap.predictor.map_store_memory import InMemoryMapStore
        from expertmap.predictor.replica import StoreReplica

        if not Path(args.store).is_file():
            raise UsageError(f"map store file {args.store!r} does not exist (make one with `expertmap record`)")
        replica = StoreReplica(InMemoryMapStore.from_file(args.store))
    usage = None
    if policy_class(config.policy).needs_usage:  # host-static: the experts most used in recorded maps stay on the device
        if replica is None:
            raise UsageError(f"--policy {config.policy} pins the experts most used in warm-up traces: "
                             "give --store FILE (from `expertmap record`)")  # fmt: skip
        usage = InMemoryMapStore.from_file(args.store).arrays()[1].sum(axis=0)  # [L, J] expected selections
    inputs = PolicyInputs(trace=trace, replica=replica, publish=False, usage=usage)  # the store file is read, not changed
    engine = OffloadEngine(config, inputs, progress=args.progress)
    try:
        gen = engine.generate(args.prompt, **gen_kwargs)
    finally:
        engine.close()
    print(args.prompt + gen.text)
    print()
    link = config.link.profile
    if engine.bandwidth:
        link += f", {engine.bandwidth / 2**20:.1f} MiB/s emulated"
    print(
        f"policy {config.policy}, budget {config.budget} = {engine.num_slots} of {len(engine.host)} experts, "
        f"link {link}, {gen.prompt_tokens} prompt + {len(gen.token_ids)} new tokens"
        + (f", misses {engine.runtime.host_compute.mode} (host {config.host.profile})" if engine.runtime.host_compute else "")
    )
    print(_format_stats(gen.stats, gen.ttft_s, gen.tpot_s))
    return 0


def _workload(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"workload file {path!r} does not exist")
    return p


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise UsageError(f"{name} {value} must be at least 1")
    return value


def cmd_record(args: argparse.Namespace) -> int:
    """Run prompts and fill the expert-map store (an .npz file, or Redis with --redis-url)."""
    from expertmap.actors.trace_recorder import TraceRecorder
    from expertmap.cluster.workload import load_workload

    try:
        model = require_model_folder(args.model)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    records = load_workload(_workload(args.workload))[: _positive("--limit", args.limit)]
    recorder = TraceRecorder(model, args.device)
    engine = recorder.engine
    dim = engine.model.get_input_embeddings().weight.shape[1]
    shape = dict(num_layers=len(engine.layers), num_experts=engine.num_experts, embed_dim=dim,
                 capacity=args.capacity, prefetch_distance=args.prefetch_distance)  # fmt: skip
    if args.redis_url:
        from expertmap.predictor.map_store_redis import RedisMapStore

        store = RedisMapStore(args.redis_url, namespace=args.namespace, **shape)
    else:
        from expertmap.predictor.map_store_memory import InMemoryMapStore

        store = InMemoryMapStore(**shape)
        if Path(args.store).exists():
            store.load(args.store)
    traces = recorder.record_all(records, args.max_new_tokens, do_sample=not args.greedy, seed=args.seed)
    recorder.close()
    maps = 0
    for req in traces:
        for it in req.iterations:
            store.add(it.embedding, it.expert_map())
            maps += 1
    where = args.redis_url or str(store.save(args.store))
    print(f"recorded {maps} expert maps from {len(traces)} prompts; store holds {len(store)} (capacity {store.capacity}) at {where}")
    return 0


def _one_line(exc: Exception) -> str:
    """A pydantic ValidationError (or any ValueError) as one line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = str(first.get("msg", exc)).removeprefix("Value error, ")
            return f"{where}: {msg}" if where else msg
        except (IndexError, TypeError):
            pass
    return " ".join(str(exc).split())


def _serve_plan(args: argparse.Namespace) -> tuple[dict, list[tuple[str, str, str, dict]]]:
    """(http_options, [(app name, route prefix, import path, builder args)]), checked before Ray starts."""
    import yaml

    overrides = {k: v for k, v in (("model", args.model), ("gpus", args.gpus), ("policy", args.policy),
                                   ("budget", args.budget), ("miss", args.miss), ("host_profile", args.host)) if v is not None}  # fmt: skip
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"config file {args.config!r} does not exist")
        try:
            cfg = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UsageError(f"config file {args.config!r} is not valid YAML: {_one_line(exc)}") from None
        from ray.serve.schema import ServeDeploySchema

        try:
            schema = ServeDeploySchema.model_validate(cfg)
        except ValueError as exc:
            raise UsageError(f"config file {args.config!r} is not a Serve config: {_one_line(exc)}") from None
        http = dict(cfg.get("http_options") or {})
        apps = [(a.name, a.route_prefix or "/", a.import_path, {**(a.args or {}), **overrides}) for a in schema.applications]
    else:
        from expertmap.cluster.serve_args import AppArgs

        http = {"host": AppArgs().host, "port": AppArgs().port}
        apps = [("expertmap", "/", "expertmap.cluster.serve_app:build_app", dict(overrides))]
    if args.port is not None:
        if not 1 <= args.port <= 65535:
            raise UsageError(f"--port {args.port} must be in 1..65535")
        http["port"] = args.port
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    for _, _, import_path, app_args in apps:
        if import_path == "expertmap.cluster.serve_app:build_app":
            from expertmap.cluster.serve_args import AppArgs, check_exposure

            app_args.setdefault("host", http["host"])
            app_args["port"] = http["port"]
            try:
                parsed = AppArgs.model_validate(app_args)
                require_model_folder(parsed.model_path)
                check_exposure(parsed)
            except ValueError as exc:
                raise UsageError(_one_line(exc)) from None
    return http, apps


def cmd_serve(args: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy the Serve app(s), block until SIGINT/SIGTERM, then shut down."""
    import importlib
    import signal
    import threading

    if args.gpus is not None and args.gpus < 1:
        raise UsageError(f"--gpus {args.gpus} must be at least 1")
    http, apps = _serve_plan(args)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local-only unless joining a cluster
    import ray
    from ray import serve
    from ray.job_config import JobConfig

    # Logging of the worker processes (the Serve replica, the stage and map-service actors) is set
    # here, at the entry point: Ray applies it in each of them (their log files); the driver keeps main's.
    job = JobConfig()
    job.set_py_logging_config(ray.LoggingConfig(encoding="TEXT", log_level="INFO"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.address:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False, job_config=job)
    else:
        import torch

        gpus = max(torch.cuda.device_count(), sum(a[3].get("gpus", 1) for a in apps))
        # a CPU machine gets declared GPUs: every app's stages take one each
        ray.init(num_gpus=gpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, job_config=job)
    names = []
    try:
        serve.start(http_options=http)
        for name, prefix, import_path, app_args in apps:
            module, _, attr = import_path.partition(":")
            builder = getattr(importlib.import_module(module), attr)
            serve.run(builder(app_args), name=name, route_prefix=prefix, blocking=False)
            names.append(name)
            if stop.is_set():
                break
        host = "127.0.0.1" if http["host"] in ("0.0.0.0", "::") else http["host"]
        url = f"http://{host}:{http['port']}"
        from expertmap.cluster.serve_args import AppArgs

        model = AppArgs.model_validate({k: v for k, v in apps[0][3].items() if k in AppArgs.model_fields}).model_id
        print(f"ExpertMap is serving {model} at {url}/v1 (OpenAI-compatible; Ctrl-C to stop)")
        print("try:")
        print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\")
        print(f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "def fibonacci(n):"}}], "max_tokens": 32}}\'')
        sys.stdout.flush()
        stop.wait()
        print("shutting down", file=sys.stderr)
    finally:
        try:
            if args.address:
                for name in names:  # leave the cluster's other applications alone
                    serve.delete(name)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


#: Entry-point group of subcommands that other packages add (the bench's ``expertmap bench``):
#: each entry point names a ``register(subparsers)`` function. The product imports none of them.
COMMANDS_GROUP = "expertmap.commands"


def _add_registered_commands(sub: argparse._SubParsersAction) -> None:
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # an uninstalled extra must not take the other commands down
            log.warning("the %r subcommand (%s) is unavailable: %s", ep.name, ep.value, exc)
            continue
        register(sub)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="expertmap", description="Serve MoE models with experts offloaded to host memory.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress and engine details")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    policies = "a name of the policy registry (docs/policies.md; an unknown name lists them)"
    budget_help = f"fraction of all expert bytes (0.25, 25%%) or a size (2GiB); default {defaults.BUDGET}"
    miss_help = ("what a miss does: copy (wait for the link), host (compute the expert on the host CPU), auto "
                 f"(whichever the cost model says finishes first); default {defaults.MISS}")
    host_help = ("host profile for misses computed on the host (python -m expertmap.actors.host_profiles lists them) or "
                 f"ratio:R (one expert, one decode token = R decode-layer times); default {defaults.HOST}")

    g = sub.add_parser("generate", help="one generation in-process, printing the text and cache statistics")
    g.add_argument("--prompt", required=True, help="the prompt text (required)")
    g.add_argument("--model", default=str(defaults.BUNDLED_MODEL), help=defaults.MODEL_HELP)
    g.add_argument("--policy", default=defaults.POLICY, help=f"cache policy: {policies}; default {defaults.POLICY}")
    g.add_argument("--budget", default=defaults.BUDGET, help=budget_help)
    g.add_argument("--link", default=defaults.LINK,
                   help="link profile (python -m expertmap.actors.link_profiles lists them), ratio:R (one expert copy = "
                   f"R decode-layer times), instant or cuda; default {defaults.LINK}")
    g.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS,
                   help=f"new tokens to generate (default {defaults.MAX_NEW_TOKENS})")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    g.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="sampling seed with --sample (default 0)")
    g.add_argument("--no-prefetch", action="store_true", help="the policy's eviction rule alone")
    g.add_argument("--store", default=None, help="expert-map store file for finemoe/hybrid (from `expertmap record`)")
    g.add_argument("--miss", default=defaults.MISS, help=miss_help)
    g.add_argument("--host", default=defaults.HOST, help=host_help)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("record", help="run prompts and fill the expert-map store")
    r.add_argument("--workload", required=True, help="JSONL file of {id, category, turns} (required)")
    r.add_argument("--limit", type=int, default=200, help="prompts from the start of the workload (default 200)")
    r.add_argument("--model", default=str(defaults.BUNDLED_MODEL), help=defaults.MODEL_HELP)
    r.add_argument("--store", default="expert_maps.npz", help="in-process store file (default ./expert_maps.npz)")
    r.add_argument("--redis-url", default=None, help="redis://127.0.0.1:6379/0 to use a Redis store instead")
    r.add_argument("--namespace", default="expertmap", help="key prefix of the Redis store (default expertmap)")
    r.add_argument("--capacity", type=int, default=1000, help="maps kept (1..4096; default 1000)")
    r.add_argument("--prefetch-distance", type=int, default=defaults.PREFETCH_DISTANCE,
                   help=f"the store's prefetch distance d, used by its replacement rule (default {defaults.PREFETCH_DISTANCE})")
    r.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS,
                   help=f"new tokens per prompt (default {defaults.MAX_NEW_TOKENS})")
    r.add_argument("--greedy", action="store_true", help="greedy decoding (default: seeded sampling)")
    r.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    r.set_defaults(func=cmd_record)

    s = sub.add_parser("serve", help="start (or join) Ray and serve the OpenAI-compatible endpoint")
    s.add_argument("--config", default=None, help="a Serve config file (configs/serve.yaml); default: built-in defaults")
    s.add_argument("--model", default=None, help=defaults.MODEL_HELP)
    s.add_argument("--gpus", type=int, default=None, help="pipeline stages, one per GPU (default 1; on a CPU machine: declared GPUs)")
    s.add_argument("--address", default=None, help="join a running Ray cluster (ray://... or HOST:PORT) instead of starting one")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    s.add_argument("--policy", default=None, help=f"cache policy (default {defaults.SERVE_POLICY})")
    s.add_argument("--budget", default=None, help=budget_help)
    s.add_argument("--miss", default=None, help=miss_help.replace(f"default {defaults.MISS}", "default: the config's, else " + defaults.MISS))
    s.add_argument("--host", default=None, help=host_help.replace(f"default {defaults.HOST}", "default: the config's, else " + defaults.HOST))
    s.set_defaults(func=cmd_serve)

    _add_registered_commands(sub)  # e.g. `expertmap bench`, from the bench package's entry point
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    verbose = args.verbose or os.environ.get("EXPERTMAP_LOG", "").lower() == "debug"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    args.progress = sys.stderr.isatty()
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"expertmap: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        # configuration errors raised below the CLI carry their own explanation
        print(f"expertmap: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # run the importable module's main, not this __main__ copy: subcommands registered by other
    # packages raise expertmap.cluster.cli.UsageError, which must be the class main() catches
    from expertmap.cluster.cli import main as _main

    sys.exit(_main())
