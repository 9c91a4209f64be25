"""A bounded load run against a running `expertmap serve` on loopback.

    expertmap serve &                 # or any ExpertMap endpoint on 127.0.0.1
    python -m expertmap.bench.load_test --clients 32 --seconds 60 [--url http://127.0.0.1:8000]

``clients`` threads each send streaming chat completions back to back until ``seconds`` have
passed (then finish the request in flight). Counts every response by status, and reports tokens/s,
TTFT and TPOT (p50/p99) from the streamed chunks; any 5xx or unanswered accepted request is a
failure (exit status 1). Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests

PROMPTS = [
    "Write a short poem about the sea.",
    "def quicksort(items):",
    "Question: A farmer has 12 cows and buys 7 more. How many cows?",
    "Summarise the history of the printing press.",
]


def one_request(url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    t0 = time.perf_counter()
    arrivals = []
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=timeout) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        done = False
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    return {"status": 200 if done else 599, "t0": t0, "arrivals": arrivals}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="expertmap-moe-tiny")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/results/load/results.json")
    args = ap.parse_args()
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"load_test: {args.url} is not a loopback address; refusing", file=sys.stderr)
        return 2
    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + args.seconds

    def client(i: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            try:
                res = one_request(args.url, args.model, PROMPTS[(i + n) % len(PROMPTS)], args.max_tokens, 600)
            except requests.RequestException as exc:
                res = {"status": f"error: {type(exc).__name__}"}
            with lock:
                results.append(res)
            n += 1
            if res["status"] == 429:
                time.sleep(1.0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["arrivals"][0] - r["t0"] for r in ok if r["arrivals"]]
    tpot = [b - a for r in ok for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(len(r["arrivals"]) for r in ok)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    report = {
        "clients": args.clients, "seconds": args.seconds, "wall_s": wall, "requests": len(results),
        "status": dict(Counter(str(r["status"]) for r in results)), "tokens": tokens,
        "tokens_per_s": tokens / wall, "ttft_s": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "tpot_s": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    failed = [r for r in results if r["status"] not in (200, 429)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
