"""Soak: mixed traffic at a fixed rate for a bounded time against the Serve app on loopback,
recording every actor's memory, the map store's size and latency percentiles over time.

    python -m expertmap.bench.soak --minutes 20 --out bench/results/soak

Traffic: requests arrive at ``--rate`` per second (open loop, Poisson), each one of: streaming
chat, non-streaming chat, completion, completion with a stop string, a client that leaves
mid-stream, and a malformed body; max_tokens 4..24. Every ``--window`` seconds: the resident
memory (RSS) of every Ray actor process (stages, map service, Serve replica, controller, proxy),
the store's entry count, and p50/p99 of TTFT and request latency in the window. Writes
soak.json and soak.png; the summary compares the first and last fifth of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from expertmap.actors import defaults
from expertmap.bench.plotting import pyplot, save

MODEL = "expertmap-moe-tiny"


def one_request(url: str, kind: str, rng: random.Random) -> tuple[str, float, float | None]:
    """(outcome, latency s, TTFT s or None)."""
    max_tokens = rng.randint(4, 24)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": rng.choice(
        ["Tell me about rivers", "def add(a, b):", "Bonjour", "What is 2 + 2?", "Write a haiku"])}],
        "max_tokens": max_tokens}  # fmt: skip
    t0 = time.perf_counter()
    try:
        if kind == "bad":
            r = requests.post(f"{url}/v1/chat/completions", data=b'{"model": 3, "messages": "x"', timeout=60,
                              headers={"Content-Type": "application/json"})  # fmt: skip
            return ("ok" if r.status_code == 400 else f"bad:{r.status_code}"), time.perf_counter() - t0, None
        if kind in ("stream", "leave"):
            ttft = None
            with requests.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}, stream=True, timeout=120) as r:
                if r.status_code != 200:
                    return f"status:{r.status_code}", time.perf_counter() - t0, None
                for line in r.iter_lines(decode_unicode=True):
                    if line.startswith("data: ") and ttft is None:
                        ttft = time.perf_counter() - t0
                        if kind == "leave":
                            return "left", time.perf_counter() - t0, ttft
                    if line == "data: [DONE]":
                        break
            return "ok", time.perf_counter() - t0, ttft
        if kind == "chat":
            r = requests.post(f"{url}/v1/chat/completions", json=chat, timeout=120)
        else:
            body = {"model": MODEL, "prompt": "def fibonacci(n):", "max_tokens": max_tokens}
            if kind == "stop":
                body["stop"] = ["\n\n"]
            r = requests.post(f"{url}/v1/completions", json=body, timeout=120)
        return ("ok" if r.status_code == 200 else f"status:{r.status_code}"), time.perf_counter() - t0, None
    except requests.RequestException as exc:
        return f"error:{exc.__class__.__name__}", time.perf_counter() - t0, None


def actor_memory() -> dict[str, float]:
    """RSS in MiB of every Ray actor process (Ray titles them ``ray::Class...``), keyed class:pid."""
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::") and p.info["memory_info"] is not None:
            name = cmd[0].removeprefix("ray::").split(".")[0].split(":")[0].strip() or "worker"
            out[f"{name}:{p.pid}"] = p.info["memory_info"].rss / 2**20
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second (open loop)")
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from expertmap.cluster.map_service_actor import SERVICE_NAME
    from expertmap.cluster.serve_app import build_app

    ray.init(num_gpus=args.gpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app({"gpus": args.gpus, "policy": defaults.SERVE_POLICY, "max_queue": 32, "link": defaults.LINK}),
              name="soak", route_prefix="/")  # fmt: skip
    url = f"http://127.0.0.1:{args.port}"
    service = ray.get_actor(SERVICE_NAME)
    rng = random.Random(0)
    kinds = ["stream", "stream", "chat", "completion", "stop", "leave", "bad"]
    results: list[tuple[float, str, float, float | None]] = []
    lock = threading.Lock()
    windows = []
    t_start = time.perf_counter()
    end = t_start + 60 * args.minutes
    next_window = t_start + args.window

    def run(kind, seed):
        outcome, latency, ttft = one_request(url, kind, random.Random(seed))
        with lock:
            results.append((time.perf_counter() - t_start, outcome, latency, ttft))

    with ThreadPoolExecutor(64) as pool:
        n = 0
        while time.perf_counter() < end:
            pool.submit(run, rng.choice(kinds), n)
            n += 1
            time.sleep(rng.expovariate(args.rate))
            if time.perf_counter() >= next_window:
                now = time.perf_counter() - t_start
                with lock:
                    recent = [r for r in results if r[0] >= now - args.window]
                lat = [r[2] for r in recent if r[1] == "ok"]
                ttft = [r[3] for r in recent if r[3] is not None]
                status = ray.get(service.status.remote())
                windows.append({
                    "t_s": now, "requests": len(recent), "ok": sum(r[1] in ("ok", "left") for r in recent),
                    "latency_p50": float(np.percentile(lat, 50)) if lat else None,
                    "latency_p99": float(np.percentile(lat, 99)) if lat else None,
                    "ttft_p50": float(np.percentile(ttft, 50)) if ttft else None,
                    "ttft_p99": float(np.percentile(ttft, 99)) if ttft else None,
                    "store_entries": status["entries"], "store_pending": status["pending"],
                    "memory_mib": actor_memory(),
                })  # fmt: skip
                print(f"t={now:6.0f}s requests={len(recent)} store={status['entries']} "
                      f"latency p50={windows[-1]['latency_p50']} mem={sum(windows[-1]['memory_mib'].values()):.0f} MiB",
                      flush=True)  # fmt: skip
                next_window += args.window
    serve.shutdown()
    ray.shutdown()
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r[1]] = outcomes.get(r[1], 0) + 1
    summary = summarize(windows, outcomes, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps({"summary": summary, "windows": windows}, indent=1))
    plot(windows, args.out / "soak.png")
    print(json.dumps(summary, indent=1))
    return 0


def summarize(windows: list[dict], outcomes: dict, args) -> dict:
    k = max(1, len(windows) // 5)
    first, last = windows[:k], windows[-k:]

    def mean(ws, key):
        vals = [w[key] for w in ws if w[key] is not None]
        return float(np.mean(vals)) if vals else None

    def mem(ws):
        return float(np.mean([sum(w["memory_mib"].values()) for w in ws]))

    return {
        "minutes": args.minutes, "rate_per_s": args.rate, "gpus": args.gpus, "outcomes": outcomes,
        "memory_mib_first_fifth": mem(first), "memory_mib_last_fifth": mem(last),
        "latency_p50_first": mean(first, "latency_p50"), "latency_p50_last": mean(last, "latency_p50"),
        "latency_p99_first": mean(first, "latency_p99"), "latency_p99_last": mean(last, "latency_p99"),
        "store_entries_last": windows[-1]["store_entries"] if windows else None,
    }  # fmt: skip


def plot(windows: list[dict], path: Path) -> None:
    plt = pyplot()

    t = [w["t_s"] / 60 for w in windows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = sorted({k for w in windows for k in w["memory_mib"]})
    by_class: dict[str, list[float]] = {}
    for w in windows:
        totals: dict[str, float] = {}
        for k, v in w["memory_mib"].items():
            cls = k.split(":")[0]
            totals[cls] = totals.get(cls, 0.0) + v
        for cls in {n.split(":")[0] for n in names}:
            by_class.setdefault(cls, []).append(totals.get(cls, 0.0))
    for cls, vals in sorted(by_class.items()):
        axes[0].plot(t, vals, label=cls)
    axes[0].set_title("actor memory (RSS, MiB, summed per class)")
    axes[0].legend(fontsize=6)
    axes[1].plot(t, [w["store_entries"] for w in windows])
    axes[1].set_title("expert-map store entries")
    for key in ("latency_p50", "latency_p99", "ttft_p50"):
        axes[2].plot(t, [w[key] for w in windows], label=key)
    axes[2].set_title("latency (s) per window")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("minutes")
    save(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
