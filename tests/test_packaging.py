"""The wheel holds one package, `expertmap`, with the bundled model and the bench's workload as
package data and the `expertmap` console script.

The wheel is built from a copy of the working tree's files (``git ls-files``: tracked and
untracked-but-not-ignored), so that a stale ``build/`` or ``*.egg-info`` left in the checkout can
neither leak into the wheel nor be written there by the test.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "README.md")  # fmt: skip


def _project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                         check=True).stdout.decode()  # fmt: skip
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the project's files")
    src = tmp_path_factory.mktemp("src")
    for f in _project_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("expertmap-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_one_top_level_package(wheel):
    tops = {n.split("/", 1)[0] for n in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert tops - dist_info == {"expertmap"}, sorted(tops)  # no cluster/, actors/, predictor/, bench/ beside it
    top_level = [n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt")]
    if top_level:
        assert wheel.read(top_level[0]).decode().split() == ["expertmap"]


def test_subpackages_are_under_expertmap(wheel):
    names = set(wheel.namelist())
    for module in ("cluster/cli.py", "cluster/serve_app.py", "actors/config.py", "actors/defaults.py",
                   "actors/link_profiles.py", "predictor/map_store.py", "bench/cli.py", "bench/run.py",
                   "models/__init__.py"):  # fmt: skip
        assert f"expertmap/{module}" in names, module


@pytest.mark.parametrize("model", ["expertmap-moe-tiny", "expertmap-moe-fine"])
def test_the_bundled_models_are_package_data(wheel, model):
    names = set(wheel.namelist())
    folder = f"expertmap/models/{model}/"
    for f in MODEL_FILES:
        assert folder + f in names, f
    info = wheel.getinfo(folder + "model.safetensors")
    assert info.file_size == (REPO / f"models/{model}/model.safetensors").stat().st_size


def test_the_installed_package_stays_under_100_mb(wheel):
    installed = sum(info.file_size for info in wheel.infolist())  # uncompressed: what pip writes
    assert installed < 100e6, f"{installed / 1e6:.1f} MB"


def test_the_bench_workload_and_its_licenses_are_package_data(wheel):
    names = set(wheel.namelist())
    assert "expertmap/bench/workloads/mix_600.jsonl" in names
    assert "expertmap/bench/workloads/README.md" in names
    licenses = [n for n in names if n.startswith("expertmap/bench/workloads/licenses/")]
    assert len(licenses) == len(list((REPO / "bench/workloads/licenses").glob("*.txt"))) > 0
    data = wheel.read("expertmap/bench/workloads/mix_600.jsonl")
    assert data == (REPO / "bench/workloads/mix_600.jsonl").read_bytes() and len(data) < 1 << 20


def test_console_script_and_the_bench_subcommand_entry_point(wheel):
    (ep_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    eps = configparser.ConfigParser()
    eps.read_string(wheel.read(ep_name).decode())
    assert eps["console_scripts"]["expertmap"].strip() == "expertmap.cluster.cli:main"
    assert eps["expertmap.commands"]["bench"].strip() == "expertmap.bench.cli:register"


def test_no_tests_build_output_or_caches_in_the_wheel(wheel):
    bad = [n for n in wheel.namelist() if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("tests/", "build/"))]
    assert not bad, bad[:10]
