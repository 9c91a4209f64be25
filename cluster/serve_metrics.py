"""The replica's own counters and histograms, written by hand in the Prometheus text format.

``Metrics`` counts requests by route and status, latencies, TTFT, TPOT, queue waits and tokens;
``render`` writes them (version 0.0.4) with the gauges and per-stage figures the ``/metrics`` route
passes in. ``STAGE_METRICS`` names the per-stage figures (from ``Pipeline.stats``) it exports.
"""

from __future__ import annotations

import threading


class Histogram:
    """Cumulative bucket counts and sums, per label tuple."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts: dict[tuple, list[int]] = {}
        self.sums: dict[tuple, float] = {}

    def observe(self, value: float, labels: tuple = ()) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        for j, b in enumerate(self.buckets):
            if value <= b:
                counts[j] += 1
        counts[-1] += 1
        self.sums[labels] = self.sums.get(labels, 0.0) + value


_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The replica's counters, written out by hand in the Prometheus text format (version 0.0.4).

    Ray's own metrics (``ray.util.metrics``) go through Ray's metrics agent on another port; the
    endpoint here needs nothing but this replica."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple, int] = {}  # (route, status) -> count
        self.latency = Histogram(_LAT_BUCKETS)  # per route, until the response ends
        self.ttft = Histogram(_LAT_BUCKETS)
        self.tpot = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.queue_wait = Histogram(_LAT_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.rejected = 0

    def count(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, str(status))] = self.requests.get((route, str(status)), 0) + 1
            self.latency.observe(seconds, (route,))

    def render(self, gauges: dict[str, tuple[str, float]], cache: dict[str, tuple[str, float]],
               per_stage: dict[str, tuple[str, str, str]] | None = None, stages: list[dict] | None = None) -> str:  # fmt: skip
        out: list[str] = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in labels)
                out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

        def hist(name, help_, h: Histogram, label_names=()):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} histogram")
            for labels, counts in h.counts.items():
                base = [f'{k}="{v}"' for k, v in zip(label_names, labels)]
                for b, c in zip([*map(str, h.buckets), "+Inf"], counts):
                    le = 'le="' + b + '"'
                    out.append(f"{name}_bucket{{{','.join([*base, le])}}} {c}")
                lab = "{" + ",".join(base) + "}" if base else ""
                out.append(f"{name}_sum{lab} {h.sums[labels]}")
                out.append(f"{name}_count{lab} {counts[-1]}")

        with self.lock:
            metric("expertmap_requests_total", "counter", "HTTP requests by route and status code",
                   [((("route", r), ("status", s)), n) for (r, s), n in sorted(self.requests.items())])  # fmt: skip
            metric("expertmap_requests_rejected_total", "counter", "requests refused with 429 (queue full)", [((), self.rejected)])
            metric("expertmap_requests_cancelled_total", "counter", "generations stopped because the client left", [((), self.cancelled)])
            metric("expertmap_prompt_tokens_total", "counter", "prompt tokens of finished generations", [((), self.prompt_tokens)])
            metric("expertmap_completion_tokens_total", "counter", "tokens generated", [((), self.completion_tokens)])
            hist("expertmap_request_latency_seconds", "time from request to the end of the response", self.latency, ("route",))
            hist("expertmap_ttft_seconds", "time to first token, from arrival (includes queueing)", self.ttft)
            hist("expertmap_tpot_seconds", "time per output token after the first", self.tpot)
            hist("expertmap_queue_wait_seconds", "time a request waited for the engine", self.queue_wait)
        for name, (help_, value) in {**gauges, **cache}.items():
            kind = "gauge" if name in gauges else "counter"
            metric(name, kind, help_, [((), value)])
        for name, (kind, help_, key) in (per_stage or {}).items():  # one sample per stage (GPU)
            metric(name, kind, help_, [((("stage", s["stage"]),), s[key]) for s in stages or []])
        return "\n".join(out) + "\n"


#: Per-stage samples of ``/metrics``: name -> (kind, help, key in a stage's ``stats()``).
STAGE_METRICS: dict[str, tuple[str, str, str]] = {
    "expertmap_cache_slots": ("gauge", "experts the GPU's cache holds", "slots"),
    "expertmap_cache_hit_rate": ("gauge", "hits / accesses on the GPU", "hit_rate"),
    "expertmap_stage_busy_fraction": ("gauge", "share of time the stage computes", "busy_frac"),
    "expertmap_cache_accesses_total": ("counter", "expert accesses", "accesses"),
    "expertmap_cache_hits_total": ("counter", "accesses whose expert was resident", "hits"),
    "expertmap_cache_misses_total": ("counter", "accesses that waited for a copy", "misses"),
    "expertmap_cache_stall_seconds_total": ("counter", "time layers waited for expert copies", "stall_s"),
    "expertmap_cache_bytes_moved_total": ("counter", "bytes copied host to device", "bytes_moved"),
    "expertmap_cache_prefetched_total": ("counter", "copies made by prefetching", "prefetched"),
    "expertmap_cache_prefetch_used_total": ("counter", "prefetched experts used before eviction", "prefetch_used"),
}  # fmt: skip
