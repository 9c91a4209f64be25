"""bench/model_compare.py: two runs' regime grids side by side (figures, missing cells, files)."""

from __future__ import annotations

import json

import pytest

from expertmap.bench import model_compare


def _row(hit: float, tpot_ms: float) -> dict:
    return {"hit_rate": hit, "tpot_s": {"mean": tpot_ms / 1e3}}


def _results(model: str, cells: dict) -> dict:
    return {
        "config": {"model": f"/somewhere/{model}", "total_experts": 128, "eval_prompts": 4, "warm_prompts": 8,
                   "max_new_tokens": 16, "decoding": "seeded sampling", "grid_links": {"ratio:1": 1.0, "ratio:4": 4.0}},
        "grid": cells,
    }  # fmt: skip


def test_table_has_one_column_per_model_with_gap_and_tpot(tmp_path):
    a = _results("tiny", {"ratio:1/0.25": {"on-demand": _row(0.4, 100), "oracle": _row(0.8, 50), "hybrid": _row(0.5, 80)}})
    b = _results("fine", {
        "ratio:1/0.25": {"on-demand": _row(0.2, 200), "oracle": _row(0.6, 100), "hybrid": _row(0.4, 150)},
        "ratio:4/0.25": {"on-demand": _row(0.2, 300), "oracle": _row(0.5, 150), "hybrid": _row(0.2, 330)},
    })  # fmt: skip
    lines = model_compare.comparison_lines([a, b])
    assert lines[0] == "| link (ratio) | budget | policy | tiny | fine |"
    hybrid = [l for l in lines if "| hybrid |" in l]
    # gap closed (0.5-0.4)/(0.8-0.4) = 0.25 and TPOT 80/100; fine: (0.4-0.2)/(0.6-0.2) = 0.5, 150/200
    assert hybrid[0] == "| ratio:1 (1.0) | 0.25 | hybrid | 0.500 / +0.25 / 0.80x | 0.400 / +0.50 / 0.75x |"
    assert hybrid[1] == "| ratio:4 (4.0) | 0.25 | hybrid | - | 0.200 / +0.00 / 1.10x |"  # a cell only one run has

    for name, r in (("tiny", a), ("fine", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    assert model_compare.main([str(tmp_path / "tiny"), str(tmp_path / "fine"), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert hybrid[0] in text and "`fine`: 128 routed experts" in text
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0


def test_a_run_without_a_grid_is_refused_with_the_reason(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"config": {}, "policies": {}}))
    with pytest.raises(SystemExit, match="has no regime grid"):
        model_compare.load(tmp_path)
    with pytest.raises(SystemExit, match="does not exist"):
        model_compare.load(tmp_path / "nothing")
