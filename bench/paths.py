"""Where the bench's files are, and how paths are written into results.json.

The bench's default workload ships with the package (``bench/workloads/``, package data), so
``expertmap bench`` runs on a fresh clone or a plain ``pip install`` with nothing beside it.
Paths recorded in results are relative to the project root (the folder holding ``bench/`` and
``models/``: the repository in a checkout, ``site-packages/expertmap`` in a wheel install), so
committed results name no machine's folders.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The folder that holds ``bench/`` (and ``models/``, ``actors/``, ...).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: A seeded 598-prompt sample across the nine categories (bench/workloads/README.md).
DEFAULT_WORKLOAD = Path(__file__).resolve().parent / "workloads" / "mix_600.jsonl"


def recorded(path: str | os.PathLike | None) -> str | None:
    """``path`` as results.json records it: relative to the project root when it lies inside it,
    else its file name alone (a file the user named outside the project: no machine's folders)."""
    if path is None:
        return None
    p = Path(path)
    try:
        return p.resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return p.name
