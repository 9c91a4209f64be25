"""The product (actors/, predictor/, cluster/, models/) never imports the bench package.

Parsed with ``ast`` (not text search), so comments and strings that name the bench do not count
and every form of import does: ``import expertmap.bench...``, ``from expertmap.bench... import``,
``from expertmap import bench``, and ``importlib.import_module("expertmap.bench...")``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("actors", "predictor", "cluster", "models")
BENCH = "expertmap.bench"


def _is_bench(module: str) -> bool:
    return module == BENCH or module.startswith(BENCH + ".")


def bench_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) for every import of the bench package in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _is_bench(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _is_bench(node.module):
                found.append((node.lineno, node.module))
            elif node.module == "expertmap":
                found += [(node.lineno, f"expertmap.{a.name}") for a in node.names if _is_bench(f"expertmap.{a.name}")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and _is_bench(arg):
                found.append((node.lineno, arg))
    return found


def test_no_product_module_imports_the_bench():
    files = [p for folder in PRODUCT for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20, "the product folders were not found"
    offenders = {
        str(p.relative_to(REPO)): hits for p in files if (hits := bench_imports(p.read_text(encoding="utf-8")))
    }
    assert not offenders, f"product modules import {BENCH}: {offenders}"


def test_the_check_sees_every_form_of_import():
    src = (
        "import expertmap.bench.run\n"
        "from expertmap.bench.cli import register\n"
        "from expertmap import bench\n"
        "import importlib\nimportlib.import_module('expertmap.bench.scaling')\n"
        "# import expertmap.bench in a comment\n"
        "x = 'expertmap.bench'\n"
        "from expertmap import benchmarks_elsewhere, actors\n"
        "import expertmap.benchmark_like\n"
    )
    assert [m for _, m in bench_imports(src)] == [
        "expertmap.bench.run", "expertmap.bench.cli", "expertmap.bench", "expertmap.bench.scaling",
    ]  # fmt: skip


# --- the repository stands alone ------------------------------------------------------------------

OUTSIDE = ("../shared", "DESIGN.md")  # folders beside the repository, and the design notes kept there
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".jsonl", ".txt", ".cfg", ""}


def _project_text_files() -> list[Path]:
    import subprocess

    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    if out.returncode != 0:  # not a git checkout (an sdist): every file under the product and docs
        return [p for p in REPO.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES and ".git" not in p.parts]
    files = [REPO / f for f in out.stdout.decode().split("\0") if f]
    return [p for p in files if p.is_file() and p.suffix in TEXT_SUFFIXES and p.stat().st_size < 8 << 20]


def test_nothing_refers_outside_the_repository():
    files = _project_text_files()
    assert any(p.name == "README.md" for p in files)
    hits = {}
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        found = [needle for needle in OUTSIDE if needle in text]
        if found:
            hits[str(p.relative_to(REPO))] = found
    hits.pop("tests/test_layering.py", None)  # this test names what it looks for
    assert not hits, f"files that refer outside the repository: {hits}"
