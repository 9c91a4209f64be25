"""The OpenAI-compatible Ray Serve application (first version: one engine, one stage).

    serve run configs/serve.yaml            # Serve imports cluster.serve_app:build_app(args)
    expertmap serve                         # the same, with the bundled defaults

One deployment (FastAPI under ``@serve.ingress``) owns one ``OffloadEngine``. The engine is not
thread-safe, so generations run one at a time on a single worker thread; requests wait in an
asyncio queue of at most ``max_queue`` jobs, and beyond that are refused with 429 and
``Retry-After``. The multi-GPU pipeline will replace the engine behind the same routes.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text
format, written by hand from the replica's own counters: see ``Metrics``). Every error is an
OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``. Optional API keys
(``Authorization: Bearer KEY``), read in the replica from the environment variable named by
``api_keys_env`` (comma-separated), guard every route but ``/health``.
"""

# no `from __future__ import annotations`: FastAPI must see the route parameters' real types
import asyncio
import json
import logging
import os
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

# local-only mode unless the caller chose otherwise (DESIGN.md section 9); set before Ray is imported
_LOCAL_ONLY = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0") == "0"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator  # noqa: E402
from ray import serve  # noqa: E402

from actors.config import Budget, require_model_folder  # noqa: E402

logger = logging.getLogger("expertmap.serve")

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_N = 4
MAX_STOPS = 4
RETRY_AFTER_S = 1
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# --- the builder's arguments --------------------------------------------------------------------


class AppArgs(BaseModel):
    """The builder's args (``applications[].args`` in configs/serve*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "models/expertmap-moe-tiny"  # relative paths resolve against the repository root
    gpus: int = Field(default=1, ge=1)  # pipeline stages; > 1 is not built yet
    budget: str | float = 0.25
    policy: str = "hybrid"
    prefetch_distance: int = Field(default=3, ge=1)
    redis_url: str | None = None  # None: the embedded in-process expert-map store
    max_queue: int = Field(default=64, ge=1)  # requests waiting at most; beyond it: 429
    api_keys_env: str | None = None  # env var holding accepted API keys, comma-separated
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # not in the bundled configs; defaults are the embedded ones
    link: str = "rtx3090-pcie4-mixtral"  # a link profile (bench/link_profiles.py), "instant" or "cuda"
    device: str = "auto"  # auto: cuda when the replica sees one, else cpu
    allow_unauthenticated: bool = False  # serve beyond loopback without API keys (explicit opt-in)

    @field_validator("gpus", "prefetch_distance", "max_queue", "port", mode="before")
    @classmethod
    def _strict_int(cls, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be an integer, not {v!r}")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        Budget.parse(v)  # raises ValueError with the reason
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v):
        from predictor.policies import POLICIES

        if v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; choose one of: {', '.join(sorted(POLICIES))}")
        return v

    @field_validator("redis_url")
    @classmethod
    def _expand(cls, v):
        return os.path.expandvars(v) if v else v


    @property
    def model_path(self) -> Path:
        p = Path(self.model).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def model_id(self) -> str:
        return self.model_path.name


def parse_args(args: dict | AppArgs | None) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    return AppArgs.model_validate(dict(args or {}))


def read_api_keys(env_name: str | None) -> frozenset[str]:
    if not env_name:
        return frozenset()
    return frozenset(k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip())


def check_supported(a: AppArgs) -> None:
    """What this version cannot do yet (the args themselves are valid: configs/serve-six-gpu.yaml)."""
    if a.gpus > 1:
        raise ValueError(
            f"gpus={a.gpus}: the multi-GPU pipeline is not built yet; this version serves one stage (gpus: 1)"
        )


def check_exposure(a: AppArgs) -> None:
    """Refuse to build an endpoint beyond loopback without keys, and a keys variable that is empty."""
    keys = read_api_keys(a.api_keys_env)
    if a.api_keys_env and not keys:
        raise ValueError(
            f"api_keys_env names {a.api_keys_env!r}, but that environment variable is unset or holds no keys "
            "(set it to comma-separated keys, or set api_keys_env to null)"
        )
    if a.host not in LOOPBACK and not keys and not a.allow_unauthenticated:
        raise ValueError(
            f"host {a.host!r} is reachable beyond this machine but no API keys are configured: set api_keys_env "
            "to an environment variable holding comma-separated keys (or pass allow_unauthenticated: true)"
        )


def engine_config(a: AppArgs):
    from actors.config import EngineConfig
    from cluster.cli import _link_config

    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return EngineConfig(model=a.model_path, device=device, policy=a.policy, budget=a.budget, link=_link_config(a.link))


def make_engine(a: AppArgs):
    """The engine; map-based policies ("finemoe", "hybrid") read a replica of the Redis store named by
    ``redis_url`` or, without one, of an empty in-process store that fills as requests run."""
    from actors.engine import OffloadEngine

    config = engine_config(a)
    if a.policy not in ("finemoe", "hybrid"):
        return OffloadEngine(config)
    from predictor.replica import StoreReplica

    # the store's shape (MoE layers, experts, embedding width) is known once the model is loaded;
    # the policy reads its replica only while generating, so the store is attached right after
    replica = StoreReplica(None)
    options = {"replica": replica, "prefetch_distance": a.prefetch_distance, "synchronous": False}
    engine = OffloadEngine(config, extra_policy_options=options)
    shape = dict(
        num_layers=len(engine.layers), num_experts=engine.num_experts,
        embed_dim=engine.model.get_input_embeddings().weight.shape[1], prefetch_distance=a.prefetch_distance,
    )  # fmt: skip
    if a.redis_url:
        from predictor.map_store_redis import RedisMapStore

        replica.store = RedisMapStore(a.redis_url, **shape)
    else:
        from predictor.map_store_memory import InMemoryMapStore

        replica.store = InMemoryMapStore(**shape)
    return engine


def _loopback_replica_grpc() -> None:
    """Ray 2.60's replicas open their inter-deployment gRPC server on ``[::]:0`` (every interface),
    with no setting for it. In local-only mode everything is on 127.0.0.1, so bind it there."""
    try:
        from ray.serve._private import replica as _replica
    except ImportError:  # pragma: no cover - another Ray layout: leave it alone
        return
    original = getattr(_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_expertmap_loopback", False):
        return

    def add_port(server, address):
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    add_port._expertmap_loopback = True
    _replica.add_port_to_grpc_server = add_port


if _LOCAL_ONLY:
    _loopback_replica_grpc()


# --- OpenAI request bodies ------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v is not None and v < 1:
            raise ValueError("max_tokens must be at least 1")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if not 0.0 <= v <= 2.0:
            raise ValueError(f"temperature {v} is out of range: it must be in [0, 2]")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"top_p {v} is out of range: it must be in (0, 1]")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if not 1 <= v <= MAX_N:
            raise ValueError(f"n {v} is out of range: this server returns 1 to {MAX_N} choices")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not 0 <= v < 2**63:
            raise ValueError("seed must be in [0, 2**63)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v not in (None, False):
            raise ValueError("logprobs are not supported by this server")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: int | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("messages must hold at least one message")
        if not any(m.text().strip() for m in v):
            raise ValueError("messages hold no text")
        return v


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("this server takes one prompt per request (a string, [string] or token ids)")
            v = v[0]
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("prompt is empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by this server")
        return v


_UNION_TAGS = {"str", "int", "float", "bool", "none", "TextPart"}


def parse_body(cls: type[BaseModel], raw: bytes):
    try:
        return cls.model_validate_json(raw or b"")
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"We could not parse the JSON body of your request: {err['msg']}", code="invalid_json") from None
        # drop pydantic's union-member tags ("str", "list[str]", ...) from the location
        loc = [str(p) for j, p in enumerate(err.get("loc", ()))
               if j == 0 or not (str(p) in _UNION_TAGS or str(p).startswith(("list[", "dict[", "function-")))]  # fmt: skip
        param = ".".join(loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = f"Missing required parameter: {param!r}."
        elif param:
            msg = f"Invalid value for {param!r}: {msg}"
        if err["type"] == "model_type":
            msg, param = "the request body must be a JSON object", None
        raise APIError(400, msg, param=param, code="invalid_value" if err["type"] != "missing" else "missing_required_parameter") from None


# --- streaming, stop strings and cancellation ----------------------------------------------------


def _make_tracker_cls():
    import torch
    from transformers import StoppingCriteria
    from transformers.generation.streamers import BaseStreamer

    class TextTracker(BaseStreamer, StoppingCriteria):
        """Streamer and stopping criterion for one choice, run on the engine's worker thread.

        ``put`` gets the prompt ids once, then each new token: the decoded text is cut at the first
        stop string; text that could still be the start of a stop string (or an unfinished UTF-8
        character) is held back, the rest goes to ``emit``. As a stopping criterion it ends the
        generation once a stop string is seen or the request's cancel flag is set.
        """

        def __init__(self, tokenizer, stops: list[str], emit, cancel: threading.Event):
            self.tokenizer, self.stops, self.emit, self.cancel = tokenizer, stops, emit, cancel
            self.ids: list[int] = []
            self.emitted = ""
            self.hit_stop = False
            self._prompt_seen = False
            self.token_times: list[float] = []

        def put(self, value):
            if not self._prompt_seen:
                self._prompt_seen = True
                return
            self.token_times.append(time.perf_counter())
            self.ids.extend(int(t) for t in value.reshape(-1).tolist())
            self._advance(final=False)

        def end(self):
            self._advance(final=True)

        def _advance(self, final: bool) -> None:
            if self.hit_stop:
                return
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
            if cuts:
                safe = text[: min(cuts)]
                self.hit_stop = True
            elif final:
                safe = text
            else:
                hold = 0
                for s in self.stops:
                    for k in range(min(len(s) - 1, len(text)), hold, -1):
                        if text.endswith(s[:k]):
                            hold = k
                            break
                safe = text[: len(text) - hold]
                while safe.endswith("\ufffd"):
                    safe = safe[:-1]
            if len(safe) > len(self.emitted) and safe.startswith(self.emitted):
                self.emit(safe[len(self.emitted) :])
                self.emitted = safe

        def __call__(self, input_ids, scores, **kwargs):
            stop = self.hit_stop or self.cancel.is_set()
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return TextTracker


STATS_FIELDS = ("accesses", "hits", "misses", "stall_s", "bytes_moved", "copies", "prefetched", "prefetch_used")


class Job:
    """One request: its choices run one after another on the worker thread; events go to ``events``."""

    def __init__(self, server: "ExpertMapServer", ids: list[int], max_tokens: int, body: _Body, loop):
        self.server, self.ids, self.max_tokens, self.body, self.loop = server, ids, max_tokens, body, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.state = "queued"  # queued -> running -> done, or cancelled
        self.arrived = time.perf_counter()
        self.started: float | None = None
        self.seed = body.seed if body.seed is not None else secrets.randbelow(2**31)

    def _send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def run(self) -> None:  # on the worker thread
        from transformers import StoppingCriteriaList

        engine, body = self.server.engine, self.body
        try:
            for i in range(body.n):
                if self.cancel.is_set():
                    break
                tracker = self.server.tracker_cls(
                    engine.tokenizer, body.stop or [], lambda d, i=i: self._send("delta", i, d), self.cancel
                )
                gen = engine.generate(
                    self.ids, max_new_tokens=self.max_tokens, do_sample=body.temperature > 0, seed=self.seed + i,
                    temperature=body.temperature or 1.0, top_p=body.top_p, streamer=tracker,
                    stopping_criteria=StoppingCriteriaList([tracker]), min_new_tokens=0,
                )  # fmt: skip
                eos = self.server.eos_ids
                finish = "stop" if tracker.hit_stop or (gen.token_ids and gen.token_ids[-1] in eos) else "length"
                self._send("choice", i, tracker.emitted, finish, gen, tracker.token_times)
        except Exception as exc:  # reported to the client as a 500 body / an error event
            logger.exception("generation failed")
            self._send("error", repr(exc))
        finally:
            self._send("done")


# --- metrics ------------------------------------------------------------------------------------


class Histogram:
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

    def render(self, gauges: dict[str, tuple[str, float]], cache: dict[str, tuple[str, float]]) -> str:
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
        return "\n".join(out) + "\n"


# --- the deployment -----------------------------------------------------------------------------

app = FastAPI(title="ExpertMap", docs_url=None, redoc_url=None, openapi_url=None)


def _now() -> int:
    return int(time.time())


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@serve.ingress(app)  # at import time, so every replica that imports this module gets the same routes
class ExpertMapServer:
    def __init__(self, args: dict):
        self.args = a = parse_args(args)
        self.api_keys = read_api_keys(a.api_keys_env)
        if a.api_keys_env and not self.api_keys:
            raise ValueError(f"api_keys_env names {a.api_keys_env!r} but it holds no keys in this replica's environment")
        self.engine = make_engine(a)
        if self.engine.tokenizer is None:
            raise ValueError(f"model at {a.model_path} has no tokenizer; the HTTP API needs one")
        self.tokenizer = self.engine.tokenizer
        self.model_id = a.model_id
        self.context = int(getattr(self.engine.model.config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        eos = self.engine.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in [*eos, self.tokenizer.eos_token_id] if e is not None}
        self.tracker_cls = _make_tracker_cls()
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expertmap-engine")
        self.queue: asyncio.Queue | None = None
        self.waiting = 0  # queued jobs not cancelled
        self.running = 0
        self.created = _now()
        logger.info("serving %s (context %d) with policy %s", self.model_id, self.context, a.policy)

    # --- plumbing ----------------------------------------------------------------------------
    def _ensure_consumer(self) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue()  # bounded by the admission check in _submit (cancelled jobs leave at once)
            self._consumer = asyncio.get_running_loop().create_task(self._consume())

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job: Job = await self.queue.get()
            if job.state == "cancelled":
                continue
            self.waiting -= 1
            job.state, job.started = "running", time.perf_counter()
            with self.metrics.lock:
                self.metrics.queue_wait.observe(job.started - job.arrived)
            self.running = 1
            try:
                await loop.run_in_executor(self.executor, job.run)
            except Exception:  # pragma: no cover - job.run reports its own errors
                logger.exception("worker failed")
            finally:
                self.running = 0
                job.state = "done"

    def _submit(self, ids: list[int], max_tokens: int, body: _Body) -> Job:
        self._ensure_consumer()
        if self.waiting >= self.args.max_queue:
            with self.metrics.lock:
                self.metrics.rejected += 1
            raise APIError(429, f"the server is busy: {self.waiting} requests are waiting (max_queue "
                           f"{self.args.max_queue}); retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        job = Job(self, ids, max_tokens, body, asyncio.get_running_loop())
        self.waiting += 1
        self.queue.put_nowait(job)
        return job

    def _cancel(self, job: Job) -> None:
        if job.state in ("done", "cancelled") or job.cancel.is_set():
            return
        job.cancel.set()
        with self.metrics.lock:
            self.metrics.cancelled += 1
        if job.state == "queued":
            job.state = "cancelled"
            self.waiting -= 1

    def _auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not any(secrets.compare_digest(key.strip(), k) for k in self.api_keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _handle(self, route: str, request: Request, fn, auth: bool = True):
        t0 = time.perf_counter()
        try:
            if auth:
                self._auth(request)
            response = await fn()
        except APIError as exc:
            response = exc.response()
        if isinstance(response, StreamingResponse):
            response.background = None  # counted when the stream ends (see _stream)
            return response
        self.metrics.count(route, response.status_code, time.perf_counter() - t0)
        return response

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_id!r}.",
                           param="model", code="model_not_found")  # fmt: skip

    def _budget_tokens(self, ids: list[int], max_tokens: int | None, default: int, param: str) -> int:
        n = len(ids)
        if n >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; your prompt has "
                           f"{n} tokens, which leaves no room for a completion.", param=param,
                           code="context_length_exceeded")  # fmt: skip
        if max_tokens is None:
            return min(default, self.context - n)
        if n + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion).",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip
        return max_tokens

    def _stats(self, gens: list, token_times: list[list[float]], job: Job) -> dict:
        total = {f: 0 for f in STATS_FIELDS}
        for g in gens:
            for f in STATS_FIELDS:
                total[f] += getattr(g.stats, f)
        acc, pref, used = total["accesses"], total["prefetched"], total["prefetch_used"]
        tpots = [t for g in gens for t in g.tpot_s]
        return {
            **total,
            "hit_rate": total["hits"] / acc if acc else 0.0,
            "precision": used / pref if pref else 0.0,
            "recall": used / (used + total["misses"]) if used + total["misses"] else 0.0,
            "ttft_s": gens[0].ttft_s if gens else 0.0,
            "tpot_s": sum(tpots) / len(tpots) if tpots else 0.0,
            "queue_s": (job.started or job.arrived) - job.arrived,
            "policy": self.args.policy,
            "budget": str(self.engine.config.budget),
        }

    def _observe(self, job: Job, gens: list, token_times: list[list[float]], prompt_tokens: int) -> None:
        with self.metrics.lock:
            self.metrics.prompt_tokens += prompt_tokens * len(gens)
            self.metrics.completion_tokens += sum(len(g.token_ids) for g in gens)
            if token_times and token_times[0]:
                self.metrics.ttft.observe(token_times[0][0] - job.arrived)
            for times in token_times:
                for a, b in zip(times, times[1:]):
                    self.metrics.tpot.observe(b - a)

    async def _collect(self, job: Job) -> tuple[list, list, list, list]:
        texts, finishes, gens, times = [], [], [], []
        try:
            while True:
                ev = await job.events.get()
                if ev[0] == "choice":
                    texts.append(ev[2])
                    finishes.append(ev[3])
                    gens.append(ev[4])
                    times.append(ev[5])
                elif ev[0] == "error":
                    raise APIError(500, f"generation failed: {ev[1]}", type="server_error", code="internal_error")
                elif ev[0] == "done":
                    return texts, finishes, gens, times
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    def _stream(self, route: str, job: Job, kind: str, created: int, rid: str, prompt_tokens: int, t0: float):
        include_usage = bool((job.body.stream_options or {}).get("include_usage"))
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index: int, delta: str | None, finish: str | None, role: bool = False, extra: dict | None = None):
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            out.update(extra or {})
            return _sse(out)

        async def events():
            finished, status = False, 200
            gens, times, started = [], [], set()
            try:
                while True:
                    ev = await job.events.get()
                    if ev[0] == "delta":
                        i = ev[1]
                        if kind == "chat" and i not in started:
                            started.add(i)
                            yield chunk(i, None, None, role=True)
                        yield chunk(i, ev[2], None)
                    elif ev[0] == "choice":
                        i, gen = ev[1], ev[4]
                        if kind == "chat" and i not in started:
                            started.add(i)
                            yield chunk(i, None, None, role=True)
                        gens.append(gen)
                        times.append(ev[5])
                        yield chunk(i, None, ev[3], extra={"expertmap": self._stats([gen], [ev[5]], job)})
                    elif ev[0] == "error":
                        status = 500
                        yield _sse({"error": {"message": f"generation failed: {ev[1]}", "type": "server_error",
                                              "param": None, "code": "internal_error"}})  # fmt: skip
                    elif ev[0] == "done":
                        break
                if include_usage:
                    completion = sum(len(g.token_ids) for g in gens)
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion}  # fmt: skip
                    yield _sse({"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [],
                                "usage": usage, "expertmap": self._stats(gens, times, job)})  # fmt: skip
                yield "data: [DONE]\n\n"
                finished = True
                self._observe(job, gens, times, prompt_tokens)
            finally:
                if not finished:
                    self._cancel(job)
                    status = 499  # client closed the request
                self.metrics.count(route, status, time.perf_counter() - t0)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    async def _generate(self, route: str, kind: str, request: Request, ids: list[int], body: _Body,
                        max_tokens: int, t0: float):  # fmt: skip
        job = self._submit(ids, max_tokens, body)
        created, rid = _now(), ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            return self._stream(route, job, kind, created, rid, len(ids), t0)
        texts, finishes, gens, times = await self._collect(job)
        self._observe(job, gens, times, len(ids))
        completion = sum(len(g.token_ids) for g in gens)
        usage = {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finishes))]  # fmt: skip
            obj = "chat.completion"
        else:
            prefix = self.tokenizer.decode(ids, skip_special_tokens=True) if getattr(body, "echo", False) else ""
            choices = [{"index": i, "text": prefix + t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finishes))]  # fmt: skip
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": choices,
                             "usage": usage, "expertmap": self._stats(gens, times, job)})  # fmt: skip

    # --- routes --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        t0 = time.perf_counter()

        async def run():
            body = parse_body(ChatBody, await request.body())
            self._check_model(body.model)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            if limit is not None and limit < 1:
                raise APIError(400, "max_completion_tokens must be at least 1", param="max_completion_tokens",
                               code="invalid_value")  # fmt: skip
            max_tokens = self._budget_tokens(ids, limit, DEFAULT_CHAT_MAX_TOKENS, "messages")
            return await self._generate("/v1/chat/completions", "chat", request, ids, body, max_tokens, t0)

        return await self._handle("/v1/chat/completions", request, run)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        t0 = time.perf_counter()

        async def run():
            body = parse_body(CompletionBody, await request.body())
            self._check_model(body.model)
            if isinstance(body.prompt, str):
                ids = self.tokenizer(body.prompt).input_ids
            else:
                vocab = self.engine.model.config.vocab_size
                if any(not 0 <= t < vocab for t in body.prompt):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
                ids = list(body.prompt)
            if not ids:
                raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
            max_tokens = self._budget_tokens(ids, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
            return await self._generate("/v1/completions", "completion", request, ids, body, max_tokens, t0)

        return await self._handle("/v1/completions", request, run)

    @app.get("/v1/models")
    async def models(self, request: Request):
        async def run():
            return JSONResponse({"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "expertmap",
                 "max_model_len": self.context}]})  # fmt: skip

        return await self._handle("/v1/models", request, run)

    @app.get("/health")
    async def health(self, request: Request):
        async def run():
            return JSONResponse({"status": "ok", "model": self.model_id, "waiting": self.waiting, "running": self.running})

        return await self._handle("/health", request, run, auth=False)

    @app.get("/metrics")
    async def metrics_route(self, request: Request):
        async def run():
            s = self.engine.stats
            gauges = {
                "expertmap_queue_depth": ("requests waiting for the engine", self.waiting),
                "expertmap_requests_running": ("requests generating now (0 or 1)", self.running),
                "expertmap_queue_capacity": ("max_queue", self.args.max_queue),
                "expertmap_cache_slots": ("experts the device cache holds", self.engine.num_slots),
            }
            cache = {
                "expertmap_cache_accesses_total": ("expert accesses", s.accesses),
                "expertmap_cache_hits_total": ("accesses whose expert was resident", s.hits),
                "expertmap_cache_misses_total": ("accesses that waited for a copy", s.misses),
                "expertmap_cache_stall_seconds_total": ("time layers waited for expert copies", s.stall_s),
                "expertmap_cache_bytes_moved_total": ("bytes copied host to device", s.bytes_moved),
                "expertmap_cache_copies_total": ("expert copies", s.copies),
                "expertmap_cache_prefetched_total": ("copies made by prefetching", s.prefetched),
                "expertmap_cache_prefetch_used_total": ("prefetched experts used before eviction", s.prefetch_used),
            }
            return PlainTextResponse(self.metrics.render(gauges, cache), media_type="text/plain; version=0.0.4")

        return await self._handle("/metrics", request, run)

    def __del__(self):
        try:
            self.engine.close()
        except Exception:
            pass


def build_app(args: dict | None = None):
    """The Serve application for ``args`` (validated here, before any actor starts)."""
    a = parse_args(args)
    require_model_folder(a.model_path)
    check_supported(a)
    check_exposure(a)
    deployment = serve.deployment(
        ExpertMapServer,
        name="ExpertMapServer",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "num_gpus": a.gpus},
        max_ongoing_requests=a.max_queue + 32,  # our own queue decides; Serve passes requests through
        graceful_shutdown_timeout_s=5,
    )
    return deployment.bind(a.model_dump())
