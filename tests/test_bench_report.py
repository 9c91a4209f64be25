"""The bench's engine table says what was compared: a policy's text against `resident`'s only
when `resident` ran."""

from __future__ import annotations

from expertmap.bench.report import engine_table


def _row(equal):
    return {"hit_rate": 0.5, "ttft_s": {"p50": 0.1}, "tpot_s": {"mean": 0.02, "p99": 0.03}, "tokens_per_s": 40.0,
            "overhead_frac": 0.004, "texts_equal_resident": equal}  # fmt: skip


def test_text_column_is_yes_no_or_not_compared():
    rows = engine_table({"on-demand": _row(True), "hybrid": _row(False), "fate": _row(None)})
    cells = {r.split("|")[1].strip(): r.rstrip(" |").rsplit("|", 1)[1].strip() for r in rows[2:]}
    assert cells == {"on-demand": "yes", "hybrid": "NO", "fate": "-"}
