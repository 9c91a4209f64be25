"""Search latency: brute-force NumPy against FAISS, at the store sizes that matter.

    python -m expertmap.bench.search_speed [--sizes 256,1000,4096] [--repeats 2000]

Semantic search (cosine over [N, D] embeddings) and one trajectory step (prefix cosine update
over [N, J] + argmax) for the bundled model's shape (D = hidden size, L = 8, J = 16). Prints
p50/p99 in microseconds; writes bench/results/search_speed.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from expertmap.predictor.search import SearchIndex


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e6
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99))}


def time_calls(fn, repeats: int) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return percentiles(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1000,4096")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2000)
    ap.add_argument("--out", default="bench/results/search_speed.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    report = {}
    for n in (int(s) for s in args.sizes.split(",")):
        emb = rng.standard_normal((n, args.dim)).astype(np.float32)
        maps = rng.dirichlet(np.ones(args.experts), size=(n, args.layers)).astype(np.float32)
        index = SearchIndex(emb, maps, semantic_backend="numpy")
        q = rng.standard_normal(args.dim).astype(np.float32)
        dist = maps[0, 0]
        row = {"semantic_numpy": time_calls(lambda: index.semantic(q), args.repeats)}

        def trajectory_step():
            t = index.trajectory()
            t.observe(0, dist)
            t.best()

        row["trajectory_step_numpy"] = time_calls(trajectory_step, args.repeats)
        try:
            import faiss

            fi = faiss.IndexFlatIP(args.dim)
            fi.add(index.unit_embeddings)
            qn = (q / np.linalg.norm(q))[None]
            row["semantic_faiss_flat"] = time_calls(lambda: fi.search(qn, 1), args.repeats)
        except ImportError:
            row["semantic_faiss_flat"] = None
        report[str(n)] = row
        print(n, json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
