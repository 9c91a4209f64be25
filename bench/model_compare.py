"""Two models' regime grids side by side: the prediction targets on each, and where they differ.

    python -m expertmap.bench.model_compare bench/results/models/expertmap-moe-tiny \\
        bench/results/models/expertmap-moe-fine --out bench/results/models

Each argument is the ``--out`` folder of an ``expertmap bench ... --budgets ... --link ...`` run
(its results.json holds the grid). Writes ``comparison.md`` (per link and budget, each policy's hit
rate / share of the on-demand-to-oracle gap closed / TPOT against on-demand, one column per model)
and ``comparison.png`` (gap closed and TPOT against on-demand over the budget, one panel per link,
one line per model and policy). Both runs should share links, budgets, prompts and tokens: the
table says which cells only one of them has.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from expertmap.bench.plotting import pyplot, save
from expertmap.bench.report import gap_closed

#: The rows of the side-by-side table and plot (no-prefetch ablations stay in each run's results.md).
POLICIES = ("on-demand", "lfu", "oracle", "finemoe", "fate", "moe-infinity", "mixtral-offloading", "hybrid")
PLOTTED = ("hybrid", "moe-infinity", "finemoe", "fate")


def load(folder: Path) -> dict:
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"model_compare: {path} does not exist (the --out folder of an `expertmap bench` run)")
    results = json.loads(path.read_text())
    if not results.get("grid"):
        raise SystemExit(f"model_compare: {path} has no regime grid (run the bench with --budgets and --link lists)")
    return results


def model_name(results: dict) -> str:
    return Path(results["config"]["model"]).name


def cell_figures(cell: dict, label: str) -> tuple[float, float | None, float] | None:
    """(hit rate, gap closed, TPOT / on-demand's) of one row of a grid cell, None if absent."""
    r, base, orc = cell.get(label), cell.get("on-demand"), cell.get("oracle")
    if r is None or base is None:
        return None
    gap = gap_closed(r["hit_rate"], base["hit_rate"], orc["hit_rate"]) if orc else None
    return r["hit_rate"], gap, r["tpot_s"]["mean"] / base["tpot_s"]["mean"]


def _fmt(fig) -> str:
    if fig is None:
        return "-"
    hit, gap, tpot = fig
    return f"{hit:.3f} / {'-' if gap is None else f'{gap:+.2f}'} / {tpot:.2f}x"


def cells_of(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(c for r in runs for c in r["grid"]))


def describe(r: dict) -> str:
    c = r["config"]
    return (f"`{model_name(r)}`: {c['total_experts']} routed experts, {c['eval_prompts']} evaluation prompts, "
            f"{c['warm_prompts']} warm-up, {c['max_new_tokens']} new tokens, {c['decoding']}")  # fmt: skip


def comparison_lines(runs: list[dict], budget: str | None = None) -> list[str]:
    """The table: one block of rows per grid cell (or only ``budget``'s cells), a column per model."""
    names = [model_name(r) for r in runs]
    ratios = {k: v for r in runs for k, v in r["config"].get("grid_links", {}).items()}
    lines = ["| link (ratio) | budget | policy | " + " | ".join(names) + " |",
             "| --- | ---: | --- |" + " ---: |" * len(names)]  # fmt: skip
    for cell in cells_of(runs):
        link, b = cell.rsplit("/", 1)
        if budget is not None and b != budget:
            continue
        for label in POLICIES:
            figs = [cell_figures(r["grid"].get(cell, {}), label) for r in runs]
            if all(f is None for f in figs):
                continue
            lines.append(f"| {link} ({ratios.get(link, float('nan')):.1f}) | {b} | {label} | "
                         + " | ".join(_fmt(f) for f in figs) + " |")  # fmt: skip
    return lines


def write_markdown(runs: list[dict], out: Path) -> None:
    text = [
        "# The regime grid on both bundled models",
        "",
        "Replay (bench/simulator.py). Each cell: hit rate / share of the on-demand-to-oracle hit-rate gap",
        "closed / TPOT against `on-demand` at the same link and budget. Runs:",
        "",
        *[f"- {describe(r)}" for r in runs],
        "",
        "![gap closed and TPOT against the budget, both models](comparison.png)",
        "",
        *comparison_lines(runs),
        "",
    ]
    (out / "comparison.md").write_text("\n".join(text))


def plot(runs: list[dict], out: Path) -> None:
    plt = pyplot()

    links = list(dict.fromkeys(c.rsplit("/", 1)[0] for c in cells_of(runs)))
    ratios = {k: v for r in runs for k, v in r["config"].get("grid_links", {}).items()}
    fig, axes = plt.subplots(2, len(links), figsize=(5.2 * len(links), 7.5), squeeze=False)
    styles = ["-", "--", ":"]
    for col, link in enumerate(links):
        for r, style in zip(runs, styles):
            cells = sorted((c for c in r["grid"] if c.rsplit("/", 1)[0] == link), key=lambda c: float(c.rsplit("/", 1)[1]))
            for i, label in enumerate(PLOTTED):
                pts = [(float(c.rsplit("/", 1)[1]), cell_figures(r["grid"][c], label)) for c in cells]
                pts = [(b, f) for b, f in pts if f is not None]
                if not pts:
                    continue
                kw = dict(color=f"C{i}", linestyle=style, marker="o", label=f"{label}, {model_name(r)}")
                gaps = [(b, f[1]) for b, f in pts if f[1] is not None]
                if gaps:
                    axes[0][col].plot(*zip(*gaps), **kw)
                axes[1][col].plot([b for b, _ in pts], [f[2] for _, f in pts], **kw)
        axes[0][col].set_title(f"{link} (ratio {ratios.get(link, float('nan')):.1f})")
        axes[0][col].set_ylabel("share of the on-demand-to-oracle gap closed")
        axes[1][col].set_ylabel("TPOT / on-demand's")
        for ax in (axes[0][col], axes[1][col]):
            ax.axhline(0 if ax is axes[0][col] else 1, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("budget (fraction of expert bytes)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    save(fig, out / "comparison.png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="--out folders of `expertmap bench` runs with a regime grid")
    ap.add_argument("--out", type=Path, required=True, help="folder for comparison.md and comparison.png")
    args = ap.parse_args(argv)
    runs = [load(folder) for folder in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(runs, args.out)
    plot(runs, args.out)
    print(f"wrote {args.out / 'comparison.md'} and {args.out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
