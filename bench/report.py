"""results.md and the PNG plots of a bench run (from the results dict that results.json holds)."""

from __future__ import annotations

from pathlib import Path


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def gap_closed(hit: float, base: float, oracle: float) -> float | None:
    return (hit - base) / (oracle - base) if oracle > base else None


def policy_table(policies: dict) -> list[str]:
    base = policies.get("on-demand")
    oracle = policies.get("oracle")
    rows = [
        "| policy | hit rate | vs on-demand | vs oracle | gap closed | precision | recall | TPOT mean ms | TPOT vs on-demand | TPOT p99 ms | moved MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in policies.items():
        gap = gap_closed(r["hit_rate"], base["hit_rate"], oracle["hit_rate"]) if base and oracle else None
        rows.append(
            f"| {name} | {r['hit_rate']:.3f} | {_ratio(r['hit_rate'], base['hit_rate']) if base else ''} | "
            f"{_ratio(r['hit_rate'], oracle['hit_rate']) if oracle else ''} | "
            f"{'' if gap is None else f'{gap:.0%}'} | {r['precision']:.2f} | {r['recall']:.2f} | "
            f"{r['tpot_s']['mean'] * 1e3:.1f} | {_ratio(r['tpot_s']['mean'], base['tpot_s']['mean']) if base else ''} | "
            f"{r['tpot_s']['p99'] * 1e3:.1f} | {r['bytes_moved'] / 2**20:.0f} |"
        )
    return rows


def engine_table(engine: dict) -> list[str]:
    rows = [
        "| policy | hit rate | TTFT p50 ms | TPOT mean ms | TPOT p99 ms | tokens/s | critical-path overhead | text = resident |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for name, r in engine.items():
        rows.append(
            f"| {name} | {r['hit_rate']:.3f} | {r['ttft_s']['p50'] * 1e3:.0f} | {r['tpot_s']['mean'] * 1e3:.1f} | "
            f"{r['tpot_s']['p99'] * 1e3:.1f} | {r['tokens_per_s']:.1f} | {r['overhead_frac']:.2%} | "
            f"{'yes' if r['texts_equal_resident'] else 'NO'} |"
        )
    return rows


def embedding_lines(cfg: dict) -> list[str]:
    """One line on the semantic embedding, when the run used the MiniLM one (older results: none)."""
    if cfg.get("embedding", "token") == "token":
        return []
    line = f"Semantic embedding: `{cfg['embedding']}` ({cfg.get('embedding_dim')} dims)"
    cost = cfg.get("embedding_cost")
    if cost:
        line += f", {cost['per_iteration_s'] * 1e3:.2f} ms per iteration on this machine ({cost['iterations']} iterations)"
    return [line + ".", ""]


def write_report(results: dict, out: Path) -> None:
    cfg = results["config"]
    lines = [
        "# ExpertMap benchmark",
        "",
        f"Model `{Path(cfg['model']).name}`, workload `{Path(cfg['workload']).name}` (store warmed from "
        f"{cfg['warm_prompts']} prompts, {cfg['store_entries']} maps kept of capacity {cfg['store_capacity']}; "
        f"evaluated on {cfg['eval_prompts']} disjoint prompts), {cfg['max_new_tokens']} new tokens, "
        f"{cfg['decoding']}, budget {cfg['budget']} ({cfg['budget_slots']} of {cfg['total_experts']} experts), "
        f"link `{cfg['link']}` (one copy = {cfg['copy_layer_ratio']:.1f} layer times; measured layer time "
        f"{cfg['layer_time_s'] * 1e3:.2f} ms), prefetch distance {cfg['prefetch_distance']}.",
        "",
        *embedding_lines(cfg),
        "## All evaluation prompts (trace-driven replay)",
        "",
        *policy_table(results["policies"]),
        "",
    ]
    if results.get("engine"):
        lines += [
            f"## Real engine, real-time emulated link ({cfg['engine_prompts']} prompts)",
            "",
            *engine_table(results["engine"]),
            "",
        ]
    lines += [
        "![hit rate vs budget](hit_rate_vs_budget.png) ![hit rate vs distance](hit_rate_vs_distance.png) "
        "![TPOT vs budget](tpot_vs_budget.png)",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    plot_all(results, out)


def plot_all(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def sweep(key: str, metric, xlabel: str, ylabel: str, name: str):
        data = results[key]
        xs = sorted(data, key=float)
        policies = sorted({p for x in xs for p in data[x]})
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for p in policies:
            pts = [(float(x), metric(data[x][p])) for x in xs if p in data[x]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    sweep("budget_sweep", lambda r: r["hit_rate"], "budget (fraction of expert bytes)", "hit rate", "hit_rate_vs_budget.png")
    sweep("budget_sweep", lambda r: r["tpot_s"]["mean"] * 1e3, "budget (fraction of expert bytes)", "TPOT mean (ms)", "tpot_vs_budget.png")
    sweep("distance_sweep", lambda r: r["hit_rate"], "prefetch distance d (layers)", "hit rate", "hit_rate_vs_distance.png")
