"""results.md and the PNG plots of a bench run (from the results dict that results.json holds)."""

from __future__ import annotations

from pathlib import Path

from expertmap.bench.plotting import pyplot, save


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
        "| policy | hit rate | TTFT p50 ms | TPOT mean ms | TPOT p99 ms | tokens/s | callbacks | callbacks + policy threads | cache decisions | planner process | compute thread waiting | not stalled, ms an iteration | text = resident |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for name, r in engine.items():
        rows.append(
            f"| {name} | {r['hit_rate']:.3f} | {r['ttft_s']['p50'] * 1e3:.0f} | {r['tpot_s']['mean'] * 1e3:.1f} | "
            f"{r['tpot_s']['p99'] * 1e3:.1f} | {r['tokens_per_s']:.1f} | {r['overhead_frac']:.2%} | "
            f"{_share(r.get('prediction_frac'))} | {_share(r.get('decision_frac'))} | {_share(r.get('process_frac'))} | "
            f"{_share(r.get('waiting_frac'))} | {_ms(r.get('unstalled_s'))} | {_text_check(r['texts_equal_resident'])} |"
        )
    return rows


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _share(frac: float | None) -> str:
    """A fraction as a percentage, or "-" for results written before the figure existed."""
    return "-" if frac is None else f"{frac:.2%}"


def _text_check(equal: bool | None) -> str:
    """yes / NO, or "-" when `resident` was not among the policies run (nothing to compare)."""
    return "-" if equal is None else ("yes" if equal else "NO")


def embedding_lines(cfg: dict) -> list[str]:
    """One line on the semantic embedding, when the run used the MiniLM one (older results: none)."""
    if cfg.get("embedding", "token") == "token":
        return []
    line = f"Semantic embedding: `{cfg['embedding']}` ({cfg.get('embedding_dim')} dims)"
    cost = cfg.get("embedding_cost")
    if cost:
        line += f", {cost['per_iteration_s'] * 1e3:.2f} ms per iteration on this machine ({cost['iterations']} iterations)"
    return [line + ".", ""]


def grid_lines(results: dict) -> list[str]:
    """The regime grid (bench/regimes.py): per cell, each policy's hit rate, gap closed and TPOT vs
    on-demand; then the main cell's loss attribution and its predictors' recall / precision."""
    from expertmap.bench.attribution import attribution_table, predictor_table

    grid = results.get("grid")
    if not grid:
        return []
    ratios = results["config"].get("grid_links", {})
    lines = ["## Regimes (replay): hit rate / gap to the oracle closed / TPOT vs on-demand", ""]
    cells = list(grid)
    labels = list(dict.fromkeys(label for cell in cells for label in grid[cell]))
    head = [f"{c} (ratio {ratios.get(c.rsplit('/', 1)[0], float('nan')):.1f})" for c in cells]
    lines += ["| policy | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(cells)]
    for label in labels:
        row = []
        for c in cells:
            r, base, orc = grid[c].get(label), grid[c].get("on-demand"), grid[c].get("oracle")
            if r is None:
                row.append("")
                continue
            gap = gap_closed(r["hit_rate"], base["hit_rate"], orc["hit_rate"]) if base and orc else None
            tpot = _ratio(r["tpot_s"]["mean"], base["tpot_s"]["mean"]) if base else ""
            row.append(f"{r['hit_rate']:.3f} / {'' if gap is None else f'{gap:+.2f}'} / {tpot}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "![gap closed vs link ratio](gap_vs_ratio.png)", ""]
    att = results.get("attribution")
    if att:
        cfg = results["config"]
        lines += [f"## Loss attribution (replay, link `{cfg['link']}`, budget {cfg['budget']}; shares of all accesses)",
                  "", *attribution_table(att), "", "Each policy's prefetch plan as a predictor (all layers pooled):",
                  "", *predictor_table(att), ""]  # fmt: skip
    return lines


def plot_grid(results: dict, out: Path) -> None:
    """gap_vs_ratio.png: share of the on-demand-to-oracle gap closed against the link ratio, per
    policy, at each budget of the grid."""
    grid = results.get("grid")
    if not grid:
        return
    plt = pyplot()

    ratios = results["config"].get("grid_links", {})
    budgets = list(dict.fromkeys(c.rsplit("/", 1)[1] for c in grid))
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.2), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        cells = sorted((c for c in grid if c.rsplit("/", 1)[1] == b), key=lambda c: ratios.get(c.rsplit("/", 1)[0], 0))
        labels = dict.fromkeys(l for c in cells for l in grid[c] if l not in ("resident", "on-demand", "oracle"))
        for label in labels:
            pts = []
            for c in cells:
                r, base, orc = grid[c].get(label), grid[c].get("on-demand"), grid[c].get("oracle")
                gap = gap_closed(r["hit_rate"], base["hit_rate"], orc["hit_rate"]) if r and base and orc else None
                if gap is not None:
                    pts.append((ratios.get(c.rsplit("/", 1)[0], 0.0), gap))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if "no prefetch" in label else "-")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("link ratio (one expert copy / one decode-layer time)")
        ax.set_ylabel("share of the on-demand-to-oracle hit-rate gap closed")
        ax.set_title(f"budget {b}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    save(fig, out / "gap_vs_ratio.png")


def host_lines(results: dict) -> list[str]:
    """With ``--miss host|auto``: each replay row's misses computed on the host and the host's busy
    fraction (none for copy-only runs)."""
    cfg = results["config"]
    rows = {k: r for k, r in results["policies"].items() if r.get("miss", "copy") != "copy"}
    if not rows:
        return []
    lines = [f"## Misses on the host (replay; `--miss {cfg.get('miss')}`, host `{cfg.get('host')}`: one expert, one "
             f"decode token = {cfg.get('host_decode_ratio', float('nan')):.2f} layer times)", "",
             "| row | miss | accesses on host | host busy | link busy | TPOT mean ms | TTFT p50 ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for label, r in rows.items():
        share = r["host_computed"] / r["accesses"] if r["accesses"] else 0.0
        lines.append(f"| {label} | {r['miss']} | {share:.0%} | {r['host_busy_frac']:.0%} | {r['link_busy_frac']:.0%} | "
                     f"{r['tpot_s']['mean'] * 1e3:.1f} | {r['ttft_s']['p50'] * 1e3:.0f} |")  # fmt: skip
    return lines + [""]


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
    lines += host_lines(results)
    lines += grid_lines(results)
    if results.get("budget_sweep") or results.get("distance_sweep"):  # none with --grid-only
        lines += [
            "![hit rate vs budget](hit_rate_vs_budget.png) ![hit rate vs distance](hit_rate_vs_distance.png) "
            "![TPOT vs budget](tpot_vs_budget.png)",
            "",
        ]
    (out / "results.md").write_text("\n".join(lines))
    plot_all(results, out)


def plot_all(results: dict, out: Path) -> None:
    plt = pyplot()

    def sweep(key: str, metric, xlabel: str, ylabel: str, name: str):
        data = results[key]
        if not data:  # --grid-only: no sweep was run
            return
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
        save(fig, out / name)

    sweep("budget_sweep", lambda r: r["hit_rate"], "budget (fraction of expert bytes)", "hit rate", "hit_rate_vs_budget.png")
    sweep("budget_sweep", lambda r: r["tpot_s"]["mean"] * 1e3, "budget (fraction of expert bytes)", "TPOT mean (ms)", "tpot_vs_budget.png")
    sweep("distance_sweep", lambda r: r["hit_rate"], "prefetch distance d (layers)", "hit rate", "hit_rate_vs_distance.png")
    plot_grid(results, out)
