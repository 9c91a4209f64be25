"""The OpenAI-compatible Ray Serve application.

    serve run configs/serve.yaml            # Serve imports cluster.serve_app:build_app(args)
    expertmap serve                         # the same, with the bundled defaults

One ingress deployment (FastAPI under ``@serve.ingress``) owns one ``Pipeline``: ``gpus`` stage
actors (one per GPU, each with its shard of layers and its expert cache), the expert-map service
and the continuous-batching scheduler (cluster/pipeline.py). Every admitted request goes straight
to the scheduler, which runs it together with the others in flight; at most ``max_queue``
requests are admitted at once, beyond that they are refused with 429 and ``Retry-After``.

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
from pathlib import Path
from typing import Any, Literal

# local-only mode unless the caller chose otherwise (DESIGN.md section 9); set before Ray is imported
_LOCAL_ONLY = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0") == "0"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator  # noqa: E402
from ray import serve  # noqa: E402

from expertmap.actors.config import Budget, require_model_folder  # noqa: E402

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
    gpus: int = Field(default=1, ge=1)  # pipeline stages, one per GPU
    budget: str | float = 0.25
    policy: str = "hybrid"
    prefetch_distance: int = Field(default=3, ge=1)
    redis_url: str | None = None  # None: the embedded in-process expert-map store
    store_capacity: int = Field(default=1000, ge=1, le=4096)  # expert maps the store keeps (FineMoE: 1,000)
    max_queue: int = Field(default=64, ge=1)  # requests admitted at once (generating or waiting); beyond: 429
    max_batch: int = Field(default=8, ge=1)  # requests per pipeline micro-batch at most
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # larger request bodies get 413
    max_tokens_limit: int = Field(default=1024, ge=1)  # most tokens one choice may ask for (400 beyond)
    api_keys_env: str | None = None  # env var holding accepted API keys, comma-separated
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # not in the bundled configs; defaults are the embedded ones
    link: str = "rtx3090-pcie4-mixtral"  # a link profile (expertmap.actors.link_profiles), "instant" or "cuda"
    device: str = "auto"  # auto: cuda when the replica sees one, else cpu
    allow_unauthenticated: bool = False  # serve beyond loopback without API keys (explicit opt-in)

    @field_validator("gpus", "prefetch_distance", "max_queue", "max_batch", "max_body_bytes", "max_tokens_limit", "store_capacity", "port",
                     mode="before")
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
        from expertmap.predictor.policies import POLICIES

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
    from expertmap.actors.config import EngineConfig
    from expertmap.actors.link_profiles import link_config

    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return EngineConfig(model=a.model_path, device=device, policy=a.policy, budget=a.budget, link=link_config(a.link))


def make_pipeline(a: AppArgs):
    """The pipeline of ``a.gpus`` stages; map-based policies ("finemoe", "hybrid") share the expert-map
    service, backed by the Redis store named by ``redis_url`` or, without one, an in-process store
    in the service actor that fills as requests run."""
    from expertmap.cluster.pipeline import Pipeline, PipelineConfig

    return Pipeline(PipelineConfig(engine=engine_config(a), gpus=a.gpus, max_batch=a.max_batch, redis_url=a.redis_url,
                                   prefetch_distance=a.prefetch_distance, store_capacity=a.store_capacity))  # fmt: skip


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


class TextTracker:
    """The text of one choice as its tokens arrive (on the scheduler thread).

    ``add`` decodes the tokens so far and cuts the text at the first stop string; text that could
    still be the start of a stop string (or an unfinished UTF-8 character) is held back, the rest
    goes to ``emit``. Once a stop string is seen, ``hit_stop`` is set and nothing more is emitted.
    """

    def __init__(self, tokenizer, stops: list[str], emit):
        self.tokenizer, self.stops, self.emit = tokenizer, stops, emit
        self.ids: list[int] = []
        self.emitted = ""
        self.hit_stop = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._advance(final=False)

    def finish(self) -> None:
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


STATS_FIELDS = ("accesses", "hits", "misses", "stall_s", "bytes_moved", "copies", "prefetched", "prefetch_used")
_STATUS = {"PipelineClosedError": 503, "StageFailedError": 503}


class Job:
    """One HTTP request: its ``n`` choices run in the pipeline at once; events go to ``events``
    (from the scheduler thread, through the event loop)."""

    def __init__(self, server: "ExpertMapServer", ids: list[int], max_tokens: int, body: _Body, loop):
        self.server, self.ids, self.max_tokens, self.body, self.loop = server, ids, max_tokens, body, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        self.requests: list = []
        self.trackers: list[TextTracker] = []
        self.left = body.n
        self.closed = False  # admission slot given back

    def _send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def start(self) -> None:
        from expertmap.actors.sampling import SamplingParams

        body = self.body
        for i in range(body.n):
            params = SamplingParams(max_new_tokens=self.max_tokens, do_sample=body.temperature > 0, seed=self.seed + i,
                                    temperature=body.temperature or 1.0, top_p=body.top_p, min_new_tokens=0)  # fmt: skip
            tracker = TextTracker(self.server.tokenizer, body.stop or [], lambda d, i=i: self._send("delta", i, d))
            self.trackers.append(tracker)
            self.requests.append(self.server.pipeline.submit(
                self.ids, params, on_token=lambda t, i=i: self._token(i, t), on_done=lambda r, i=i: self._done(i, r)
            ))  # fmt: skip

    def _token(self, i: int, token: int) -> None:
        tracker = self.trackers[i]
        tracker.add(token)
        if tracker.hit_stop:
            self.requests[i].cancel()  # ends after this token; the text is already cut

    def _done(self, i: int, req) -> None:
        tracker = self.trackers[i]
        if req.error is not None:
            self._send("error", i, str(req.error))
        else:
            tracker.finish()
            eos = self.server.eos_ids
            stop = tracker.hit_stop or req.finish_reason == "stop" or bool(req.tokens and req.tokens[-1] in eos)
            self._send("choice", i, tracker.emitted, "stop" if stop else "length", req)
        self.left -= 1
        if self.left == 0:
            self._send("done")

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


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


# --- the deployment -----------------------------------------------------------------------------

app = FastAPI(title="ExpertMap", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's own errors (unknown route 404, wrong method 405) in the OpenAI error shape too."""
    body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                      "code": "method_not_allowed" if exc.status_code == 405 else "not_found" if exc.status_code == 404 else None}}  # fmt: skip
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _now() -> int:
    return int(time.time())


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def openapi_document() -> dict:
    """The app's OpenAPI document: FastAPI's, with the JSON bodies the routes parse themselves."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title="ExpertMap", version="1", routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in (("/v1/chat/completions", ChatBody), ("/v1/completions", CompletionBody)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }  # fmt: skip
    return doc


def _generation_error(message: str) -> "APIError":
    """A failed generation as an HTTP error: 503 (retry) when a stage failed or the server shuts
    down, 500 otherwise."""
    retry = any(name in message for name in ("pipeline stage failed", "shut down"))
    if retry:
        return APIError(503, f"generation interrupted: {message}", type="server_error", code="unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    return APIError(500, f"generation failed: {message}", type="server_error", code="internal_error")


@serve.ingress(app)  # at import time, so every replica that imports this module gets the same routes
class ExpertMapServer:
    def __init__(self, args: dict):
        self.args = a = parse_args(args)
        self.api_keys = read_api_keys(a.api_keys_env)
        if a.api_keys_env and not self.api_keys:
            raise ValueError(f"api_keys_env names {a.api_keys_env!r} but it holds no keys in this replica's environment")
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(a.model_path)  # safetensors folders only (checked)
        hf_config = AutoConfig.from_pretrained(a.model_path, trust_remote_code=False)
        self.pipeline = make_pipeline(a)
        self.model_id = a.model_id
        self.vocab = int(hf_config.vocab_size)
        self.context = int(getattr(hf_config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        self.eos_ids = {e for e in [*self.pipeline.eos_ids, self.tokenizer.eos_token_id] if e is not None}
        self.metrics = Metrics()
        self.admitted = 0  # jobs holding an admission slot (generating, or waiting in the scheduler)
        self.created = _now()
        logger.info("serving %s (context %d) on %d stage(s) with policy %s", self.model_id, self.context, a.gpus, a.policy)

    # --- plumbing ----------------------------------------------------------------------------
    def _submit(self, ids: list[int], max_tokens: int, body: _Body) -> Job:
        if self.admitted >= self.args.max_queue:
            with self.metrics.lock:
                self.metrics.rejected += 1
            raise APIError(429, f"the server is busy: {self.admitted} requests are in progress (max_queue "
                           f"{self.args.max_queue}); retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        job = Job(self, ids, max_tokens, body, asyncio.get_running_loop())
        self.admitted += 1
        try:
            job.start()
        except Exception as exc:  # the pipeline is shut down
            self._release(job)
            raise APIError(503, f"the server cannot take requests now: {exc}", type="server_error",
                           code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        return job

    def _release(self, job: Job) -> None:
        """Give the job's admission slot back (once)."""
        if not job.closed:
            job.closed = True
            self.admitted -= 1

    def _cancel(self, job: Job) -> None:
        if job.closed:
            return
        job.cancel()
        with self.metrics.lock:
            self.metrics.cancelled += 1
        self._release(job)

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

    async def _read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 beyond ``max_body_bytes`` (read in chunks: an oversized
        body is never held in memory whole)."""
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is larger than this server accepts ({limit} bytes)",
                           code="request_too_large")  # fmt: skip
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

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
        cap = self.args.max_tokens_limit
        if max_tokens is None:
            return min(default, cap, self.context - n)
        if max_tokens > cap:
            raise APIError(400, f"max_tokens {max_tokens} is more than this server generates per choice ({cap}).",
                           param="max_tokens", code="invalid_value")  # fmt: skip
        if n + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion).",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip
        return max_tokens

    def _stats(self, reqs: list, job: Job) -> dict:
        """Per-request figures for the response's ``expertmap`` field: cache counters of this
        request's iterations (all stages), TTFT, mean TPOT, time before it entered the pipeline."""
        from expertmap.actors.cache_stats import CacheStats

        total = CacheStats()
        for r in reqs:
            total = total.merge(r.stats)
        tpots = [t for r in reqs for t in r.tpot_s]
        starts = [r.started_at for r in reqs if r.started_at is not None]
        return {
            **{f: getattr(total, f) for f in STATS_FIELDS},
            "hit_rate": total.hit_rate,
            "precision": total.precision,
            "recall": total.recall,
            "ttft_s": reqs[0].ttft_s or 0.0 if reqs else 0.0,
            "tpot_s": sum(tpots) / len(tpots) if tpots else 0.0,
            "queue_s": (min(starts) - job.arrived) if starts else 0.0,
            "policy": self.args.policy,
            "budget": str(self.args.budget),
            "gpus": self.args.gpus,
        }

    def _observe(self, job: Job, reqs: list, prompt_tokens: int) -> None:
        with self.metrics.lock:
            self.metrics.prompt_tokens += prompt_tokens * len(reqs)
            self.metrics.completion_tokens += sum(len(r.tokens) for r in reqs)
            if reqs and reqs[0].token_times:
                self.metrics.ttft.observe(reqs[0].token_times[0] - job.arrived)
            starts = [r.started_at for r in reqs if r.started_at is not None]
            if starts:
                self.metrics.queue_wait.observe(min(starts) - job.arrived)
            for r in reqs:
                for t in r.tpot_s:
                    self.metrics.tpot.observe(t)

    async def _collect(self, job: Job) -> tuple[list, list, list]:
        """The choices in index order (they finish in any order)."""
        found: dict[int, tuple] = {}
        error = None
        try:
            while True:
                ev = await job.events.get()
                if ev[0] == "choice":
                    found[ev[1]] = (ev[2], ev[3], ev[4])
                elif ev[0] == "error":
                    error = error or ev[2]
                elif ev[0] == "done":
                    break
        except asyncio.CancelledError:
            self._cancel(job)
            raise
        self._release(job)
        if error is not None:
            job.cancel()
            raise _generation_error(error)
        ordered = [found[i] for i in sorted(found)]
        return [t for t, _, _ in ordered], [f for _, f, _ in ordered], [r for _, _, r in ordered]

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
            reqs, started = [], set()
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
                        i, req = ev[1], ev[4]
                        if kind == "chat" and i not in started:
                            started.add(i)
                            yield chunk(i, None, None, role=True)
                        reqs.append(req)
                        yield chunk(i, None, ev[3], extra={"expertmap": self._stats([req], job)})
                    elif ev[0] == "error":
                        err = _generation_error(ev[2])
                        status = err.status
                        yield _sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
                    elif ev[0] == "done":
                        break
                self._release(job)
                if include_usage:
                    completion = sum(len(r.tokens) for r in reqs)
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion}  # fmt: skip
                    yield _sse({"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [],
                                "usage": usage, "expertmap": self._stats(reqs, job)})  # fmt: skip
                yield "data: [DONE]\n\n"
                finished = True
                self._observe(job, reqs, prompt_tokens)
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
        texts, finishes, reqs = await self._collect(job)
        self._observe(job, reqs, len(ids))
        completion = sum(len(r.tokens) for r in reqs)
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
                             "usage": usage, "expertmap": self._stats(reqs, job)})  # fmt: skip

    # --- routes --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        t0 = time.perf_counter()

        async def run():
            body = parse_body(ChatBody, await self._read_body(request))
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
            body = parse_body(CompletionBody, await self._read_body(request))
            self._check_model(body.model)
            if isinstance(body.prompt, str):
                ids = self.tokenizer(body.prompt).input_ids
            else:
                vocab = self.vocab
                if any(not 0 <= t < vocab for t in body.prompt):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
                ids = list(body.prompt)
            if not ids:
                raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
            max_tokens = self._budget_tokens(ids, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
            return await self._generate("/v1/completions", "completion", request, ids, body, max_tokens, t0)

        return await self._handle("/v1/completions", request, run)

    @app.get("/openapi.json")
    async def openapi_route(self, request: Request):
        async def run():
            return JSONResponse(openapi_document())

        return await self._handle("/openapi.json", request, run)

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
            sched = self.pipeline.scheduler
            try:  # every stage answers (from its control thread, also while it computes)
                await asyncio.wait_for(asyncio.to_thread(self.pipeline.health, 5.0), timeout=6.0)
                stages = "ok"
            except Exception as exc:  # a stage restarting after a failure
                stages = f"unavailable: {exc.__class__.__name__}"
            body = {"status": "ok" if stages == "ok" else "degraded", "model": self.model_id, "gpus": self.args.gpus,
                    "stages": stages, "admitted": self.admitted, "active": sched.active,
                    "stage_failures": sched.stage_failures}  # fmt: skip
            return JSONResponse(body, status_code=200 if stages == "ok" else 503)

        return await self._handle("/health", request, run, auth=False)

    @app.get("/metrics")
    async def metrics_route(self, request: Request):
        async def run():
            try:
                stages = await asyncio.wait_for(asyncio.to_thread(self.pipeline.stats), timeout=10.0)
            except Exception:  # a stage restarting: the HTTP figures still go out
                stages = []
            sched = self.pipeline.scheduler
            gauges = {
                "expertmap_requests_admitted": ("requests in progress (generating or waiting)", self.admitted),
                "expertmap_queue_depth": ("requests waiting for their next iteration", len(sched._ready)),
                "expertmap_requests_running": ("requests being generated in the pipeline", sched.active),
                "expertmap_queue_capacity": ("max_queue", self.args.max_queue),
                "expertmap_pipeline_stages": ("pipeline stages (GPUs)", self.args.gpus),
            }
            per_stage = {
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
            text = self.metrics.render(gauges, {}, per_stage, stages)
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

        return await self._handle("/metrics", request, run)

    def __del__(self):
        try:
            self.pipeline.close()
        except Exception:
            pass


def build_app(args: dict | None = None):
    """The Serve application for ``args`` (validated here, before any actor starts)."""
    a = parse_args(args)
    require_model_folder(a.model_path)
    check_exposure(a)
    deployment = serve.deployment(
        ExpertMapServer,
        name="ExpertMapServer",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "num_gpus": 0},  # the stage actors hold the GPUs
        max_ongoing_requests=a.max_queue + 32,  # our own queue decides; Serve passes requests through
        graceful_shutdown_timeout_s=5,
    )
    return deployment.bind(a.model_dump())
