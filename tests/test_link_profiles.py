"""Link names parse in one place (expertmap.actors.link_profiles.link_config), for every command;
the profiles' ratios follow from their public figures; ``ratio:R`` names a ratio directly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from expertmap.actors import defaults
from expertmap.actors.link_profiles import PROFILES, UnknownProfileError, link_config

GB = 1e9


def expertmap(*args: str, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expertmap.cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize("name, ratio", [("ratio:2.5", 2.5), ("ratio:13", 13.0), ("ratio: 0.01", 0.01), ("ratio:1e2", 100.0)])
def test_ratio_links(name, ratio):
    link = link_config(name)
    assert link.mode == "auto" and link.copy_layer_ratio == pytest.approx(ratio) and link.profile == name


@pytest.mark.parametrize("name", ["ratio:abc", "ratio:0", "ratio:-1", "ratio:", "ratio:nan", "ratio:inf", "ratio:1,5"])
def test_bad_ratio_links_name_the_bad_value(name):
    with pytest.raises(UnknownProfileError) as err:
        link_config(name)
    assert repr(name) in str(err.value) and "ratio" in str(err.value)


def test_unknown_names_list_the_choices():
    with pytest.raises(UnknownProfileError, match="unknown link profile 'carrier-pigeon'.*instant, cuda or ratio:R"):
        link_config("carrier-pigeon")


def test_special_links_and_every_profile_parse():
    assert link_config("instant").mode == "instant" and link_config("cuda").mode == "cuda"
    assert defaults.LINK in PROFILES
    for name, profile in PROFILES.items():
        link = link_config(name)
        assert link.profile == name and link.copy_layer_ratio == pytest.approx(profile.ratio) and profile.ratio > 0


def _ratio(expert_params: float, layer_params: float, link_gbs: float, hbm_gbs: float) -> float:
    """copy time / decode-layer time for bf16 weights, from the figures alone."""
    return (expert_params * 2 / (link_gbs * GB)) / (layer_params * 2 / (hbm_gbs * GB))


@pytest.mark.parametrize(
    "name, expert_params, layer_params, link_gbs, hbm_gbs",
    [
        # Qwen3-30B-A3B: 3 x 2048 x 768 per expert; attention 2 x 2048 x 4096 + 2 x 2048 x 512; top-8
        ("rtx4090-pcie4-qwen3-30b-a3b", 3 * 2048 * 768, 18_874_368 + 8 * 3 * 2048 * 768, 32, 1008),
        # GPT-OSS-20B (bf16): 3 x 2880 x 2880; attention 2 x 2880 x 4096 + 2 x 2880 x 512; top-4
        ("rtx4090-pcie4-gpt-oss-20b", 3 * 2880 * 2880, 26_542_080 + 4 * 3 * 2880 * 2880, 32, 1008),
        # DeepSeek-V2-Lite: 3 x 2048 x 1408; MLA 13,762,560 + 2 shared experts; top-6
        ("rtx3090-pcie4-deepseek-v2-lite", 3 * 2048 * 1408, 13_762_560 + 8 * 3 * 2048 * 1408, 32, 936),
        # Mixtral-8x7B on a GH200: NVLink-C2C host-to-device ~350 GB/s, HBM3 4 TB/s
        ("gh200-c2c-mixtral", 3 * 4096 * 14336, 41_943_040 + 2 * 3 * 4096 * 14336, 350, 4000),
        ("rtx3090-pcie4-mixtral", 3 * 4096 * 14336, 41_943_040 + 2 * 3 * 4096 * 14336, 32, 936),
    ],
)
def test_profile_arithmetic(name, expert_params, layer_params, link_gbs, hbm_gbs):
    assert PROFILES[name].ratio == pytest.approx(_ratio(expert_params, layer_params, link_gbs, hbm_gbs), rel=1e-9)


def test_the_default_link_is_the_papers_testbed():
    assert PROFILES[defaults.LINK].ratio == pytest.approx(13.1, abs=0.05)


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["bench"]])
@pytest.mark.parametrize("link, needle", [("ratio:abc", "'ratio:abc'"), ("ratio:0", "'ratio:0'"), ("nope", "unknown link profile")])
def test_bad_links_are_one_line_for_every_command(command, link, needle):
    r = expertmap(*command, "--link", link)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("expertmap: error:") and needle in lines[0], r.stderr


def test_bench_replay_refuses_real_copies_with_a_reason():
    r = expertmap("bench", "--link", "cuda")
    assert r.returncode == 2 and "--link cuda has no copy/layer ratio for the replay" in r.stderr, r.stderr


@pytest.mark.timeout(900)
def test_bench_runs_on_its_defaults_with_an_instant_link(tmp_path):
    """`expertmap bench --link instant` works as `generate --link instant` does, from any folder, on
    the bundled workload; results.json names no machine's folders."""
    out = tmp_path / "out"
    r = expertmap("bench", "--link", "instant", "--limit", "2", "--warm-limit", "3", "--engine-prompts", "1",
                  "--max-new-tokens", "3", "--policies", "resident,on-demand", "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert cfg["link"] == "instant" and cfg["copy_layer_ratio"] == 0.0
    assert cfg["workload"] == "bench/workloads/mix_600.jsonl" and cfg["model"] == "models/expertmap-moe-tiny"
    assert (cfg["warm_prompts"], cfg["eval_prompts"]) == (3, 2)
    assert results["policies"]["on-demand"]["stall_s"] == 0.0  # an instant link never stalls the replay
    assert results["engine"]["on-demand"]["texts_equal_resident"] is True
    # every policy's engine runs on the link of one layer-time measurement, the replay's
    assert {row["layer_time_s"] for row in results["engine"].values()} == {cfg["layer_time_s"]}
