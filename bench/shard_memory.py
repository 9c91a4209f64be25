"""Peak host memory of pipeline stages while they load their shard.

    python -m expertmap.bench.shard_memory [--stages 6] [--shape medium] [--layers 12] [--out DIR]

Builds a random-weight Mixtral-architecture checkpoint (bf16; real code paths, sizes chosen by
the flags), then starts one fresh process per stage of an even N-way split; each builds the
``ShardRuntime`` of its layers and reports its resident set after its imports and its peak
(VmHWM, reset after the imports) while loading, and the bytes it read. For comparison one more process loads the whole model the
way stages did before (``from_pretrained``). Writes DIR/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from expertmap.bench.random_models import SHAPES, make_random_checkpoint


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM the peak), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from VmRSS


def child(folder: str, stages: int, index: int) -> None:
    """One stage's process: imports first (the baseline), then the shard."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from expertmap.actors.config import EngineConfig, LinkConfig
    from expertmap.actors.shard import ShardRuntime, split_layers

    cfg = json.loads((Path(folder) / "config.json").read_text())
    before = _status_mib("VmRSS")
    _reset_peak()
    config = EngineConfig(model=folder, policy="on-demand", budget=0.25, link=LinkConfig(mode="instant"))
    if index < 0:  # the whole model, as every stage loaded it before
        from expertmap.actors.model_folder import load_plain_model

        load_plain_model(Path(folder))
        read = None
    else:
        spec = split_layers(cfg["num_hidden_layers"], stages)[index]
        stage = ShardRuntime(config, spec)
        read = stage.bytes_read
    print(json.dumps({"index": index, "baseline_mib": before, "peak_mib": _status_mib("VmHWM"), "bytes_read": read}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=6, help="pipeline stages (even split of the layers)")
    ap.add_argument("--shape", default="medium", choices=sorted(SHAPES), help="the random model's shape")
    ap.add_argument("--layers", type=int, default=12, help="decoder layers")
    ap.add_argument("--out", default="bench/results/shard_memory", help="output folder")
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "STAGES", "INDEX"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "random-mixtral"
        size = make_random_checkpoint(folder, args.shape, args.layers)
        rows = []
        for index in [*range(args.stages), -1]:
            out = subprocess.run([sys.executable, "-m", "expertmap.bench.shard_memory", "--child", str(folder),
                                  str(args.stages), str(index)], capture_output=True, text=True, check=True)  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    share = size / args.stages / 2**20
    result = {
        "config": {"shape": args.shape, "layers": args.layers, "stages": args.stages,
                   "checkpoint_mib": size / 2**20, "share_mib": share,
                   "command": "python -m expertmap.bench.shard_memory " + " ".join(sys.argv[1:])},  # fmt: skip
        "stages": [r for r in rows if r["index"] >= 0],
        "whole_model": next(r for r in rows if r["index"] < 0),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"checkpoint {size / 2**20:.0f} MiB, {args.stages} stages: 1/{args.stages} = {share:.0f} MiB",
             "| process | baseline MiB | peak MiB | peak - baseline | MiB read |", "|---|---:|---:|---:|---:|"]
    for r in [*result["stages"], result["whole_model"]]:
        name = f"stage {r['index']}" if r["index"] >= 0 else "whole model (before)"
        read = f"{r['bytes_read'] / 2**20:.0f}" if r["bytes_read"] is not None else "all"
        lines.append(f"| {name} | {r['baseline_mib']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['peak_mib'] - r['baseline_mib']:.0f} | {read} |")  # fmt: skip
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
