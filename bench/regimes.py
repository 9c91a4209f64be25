"""Regimes in one run: every policy over a grid of links x budgets in the replay, with attribution.

``expertmap bench --link ratio:1,ratio:3,rtx3090-pcie4-mixtral --budgets 0.125,0.25,0.5`` replays
every policy row at each (link, budget); results.json keeps the main run under ``policies`` (the
first link and ``--budget``) and adds ``grid`` keyed ``"<link>/<budget>"``, each row with its loss
attribution (bench/attribution.py), ``grid_links`` (each link's copy/layer ratio) and
``attribution`` (the main cell's). The report plots the share of the on-demand-to-oracle gap each
policy closes against the link ratio (``gap_vs_ratio.png``).
"""

from __future__ import annotations

from expertmap.actors.config import Budget
from expertmap.actors.link_profiles import link_config
from expertmap.bench.attribution import AttributedCache
from expertmap.bench.simulator import access_trace


def split_names(text: str, what: str) -> list[str]:
    """A comma list (``--link``, ``--budgets``): its non-empty items; ValueError naming an empty list."""
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    if not names:
        raise ValueError(f"{what} {text!r} names nothing")
    return names


def link_ratios(links: list[str]) -> dict[str, float]:
    """Each link's copy/layer ratio for the replay (``link_config`` parses each name)."""
    from expertmap.bench.run import replay_ratio

    return {name: replay_ratio(link_config(name)) for name in links}


def budget_slots(budget: str, total_experts: int, expert_bytes: int) -> int:
    return int(min(total_experts, Budget.parse(budget).resolve(total_experts * expert_bytes) // expert_bytes))


def attributed_row(factory, name, prefetch, traces, slots, ratio, layer_s, expert_bytes, all_keys) -> dict:
    """``run.replay_row`` with an ``AttributedCache``: the same figures plus ``attribution``."""
    from expertmap.bench.run import replay_row

    made: list[AttributedCache] = []
    base = AttributedCache.factory(access_trace(traces))

    def make(policy, n, r):
        made.append(base(policy, n, r))
        return made[-1]

    row = replay_row(factory, name, prefetch, traces, slots, ratio, layer_s, expert_bytes, all_keys, make_cache=make)
    row["attribution"] = made[0].att.to_dict()
    return row


def regime_grid(factory, rows, traces, links: list[str], budgets: list[str], total_experts: int, expert_bytes: int,
                all_keys, layer_s: float, progress=None) -> dict:  # fmt: skip
    """{"<link>/<budget>": {row label: figures with attribution}} for every cell of the grid."""
    ratios = link_ratios(links)
    grid: dict = {}
    cells = [(link, b) for link in links for b in budgets]
    for link, b in progress(cells) if progress else cells:
        slots = budget_slots(b, total_experts, expert_bytes)
        grid[f"{link}/{b}"] = {
            label: attributed_row(factory, name, prefetch, traces, total_experts if name == "resident" else slots,
                                  ratios[link], layer_s, expert_bytes, all_keys)  # fmt: skip
            for label, name, prefetch in rows
        }
    return grid
