"""Prompt workload files: JSONL records ``{"id", "category", "turns": [prompt, ...]}``, read for
``expertmap record`` and the benchmarks, and split deterministically into warm-up and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_workload(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"workload {path}: no such file (a JSONL file of records with turns[0])")
    records = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            prompt = rec["turns"][0]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a workload record with turns[0] ({exc})") from None
        records.append({"id": str(rec.get("id", n)), "category": rec.get("category", ""), "prompt": prompt})
    if not records:
        raise ValueError(f"workload {path} holds no records")
    return records


def split(records: list[dict], warm_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic disjoint warm/eval split (FineMoE used 7:3)."""
    order = np.random.default_rng(seed).permutation(len(records))
    cut = int(round(warm_fraction * len(records)))
    return [records[i] for i in order[:cut]], [records[i] for i in order[cut:]]
