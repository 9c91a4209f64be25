"""The prepared GPU script's CPU form runs end to end, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json

from expertmap.bench import cuda_check


def test_cuda_check_cpu_form(tmp_path):
    assert cuda_check.main(["--device", "cpu", "--shape", "tiny", "--layers", "2", "--new-tokens", "3",
                            "--out", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "results.json").read_text())
    assert all(row["tokens_identical"] for row in report["bundled"].values())
    assert report["bandwidth"]["bytes_per_s"] > 0 and report["bandwidth"]["copies"] > 0
    policies = report["policies"]
    assert {"resident", "on-demand", "oracle", "finemoe", "hybrid", "fate"} <= set(policies)
    assert "fate-lossy" not in policies and "lru" not in policies
    for name, row in policies.items():
        assert row["tokens_identical"], name
    assert policies["resident"]["hit_rate"] == 1.0 and policies["resident"]["copies"] == 0
    assert policies["on-demand"]["copies"] > 0
