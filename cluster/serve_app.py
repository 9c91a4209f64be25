"""The OpenAI-compatible Ray Serve application: the ingress deployment and its builder.

    serve run configs/serve.yaml            # Serve imports expertmap.cluster.serve_app:build_app(args)
    expertmap serve                         # the same, with the bundled defaults

One ingress deployment (FastAPI under ``@serve.ingress``) owns one ``Pipeline``: ``gpus`` stage
actors (one per GPU, each with its shard of layers and its expert cache), the expert-map service
and the continuous-batching scheduler (cluster/pipeline.py). Every admitted request goes straight
to the scheduler, which runs it together with the others in flight; at most ``max_queue``
requests are admitted at once, beyond that they are refused with 429 and ``Retry-After``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events, and log-probabilities: cluster/openai_logprobs.py), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus text
format, written by hand from the replica's own counters), ``GET /openapi.json``. Every error is an
OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``. Optional API keys
(``Authorization: Bearer KEY``), read in the replica from the environment variable named by
``api_keys_env`` (comma-separated), guard every route but ``/health``.

The parts live beside it: the builder's arguments (serve_args), the request bodies and errors
(openai_schemas), text streaming (streaming), counters (serve_metrics), API keys (serve_auth)
and the replica's loopback gRPC binding (local_grpc). Importing this module starts nothing and
changes no global state; the replica binds its gRPC server to loopback in its constructor.
"""

# no `from __future__ import annotations`: FastAPI must see the route parameters' real types
import asyncio
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmap.actors.config import require_model_folder
from expertmap.cluster.local_grpc import bind_replica_grpc_to_loopback, node_is_loopback
from expertmap.cluster.openai_logprobs import TokenText, chat_logprobs, completion_logprobs
from expertmap.cluster.openai_schemas import (DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS, MAX_PROMPTS,
                                              RETRY_AFTER_S, APIError, ChatBody, CompletionBody, GenerationBody,
                                              generation_error, parse_body)  # fmt: skip
from expertmap.cluster.serve_args import AppArgs, check_exposure, make_pipeline, parse_args, read_api_keys
from expertmap.cluster.serve_auth import check_bearer
from expertmap.cluster.serve_metrics import STAGE_METRICS, Metrics
from expertmap.cluster.streaming import DONE, ChoiceDone, ChoiceFailed, ChoiceSpec, Delta, Echo, Job, sse

logger = logging.getLogger("expertmap.serve")

STATS_FIELDS = ("accesses", "hits", "misses", "stall_s", "bytes_moved", "copies", "prefetched", "prefetch_used")


app = FastAPI(title="ExpertMap", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's own errors (unknown route 404, wrong method 405) in the OpenAI error shape too."""
    body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                      "code": "method_not_allowed" if exc.status_code == 405 else "not_found" if exc.status_code == 404 else None}}  # fmt: skip
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _now() -> int:
    return int(time.time())


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


@serve.ingress(app)  # at import time, so every replica that imports this module gets the same routes
class ExpertMapServer:
    """The ingress deployment: one per application, in its own Ray worker process (the replica).

    The constructor runs in that process before Serve opens the replica's inter-deployment gRPC
    server; on a local-only node (loopback address) it first binds that server to 127.0.0.1
    (``local_grpc.bind_replica_grpc_to_loopback``), since Serve offers no setting for it.
    """

    def __init__(self, args: dict):
        self.args = a = parse_args(args)
        if node_is_loopback():  # a local-only cluster: this replica's gRPC server stays on loopback too
            bind_replica_grpc_to_loopback()
        self.api_keys = read_api_keys(a.api_keys_env)
        if a.api_keys_env and not self.api_keys:
            raise ValueError(f"api_keys_env names {a.api_keys_env!r} but it holds no keys in this replica's environment")
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(a.model_path)  # safetensors folders only (checked)
        self.token_text = TokenText(self.tokenizer)
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
    def _submit(self, choices: list[ChoiceSpec], body: GenerationBody, logprobs: int | None = None,
                prompt_logprobs: int | None = None, echo: bool = False) -> Job:  # fmt: skip
        if self.admitted >= self.args.max_queue:
            with self.metrics.lock:
                self.metrics.rejected += 1
            raise APIError(429, f"the server is busy: {self.admitted} requests are in progress (max_queue "
                           f"{self.args.max_queue}); retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        job = Job(self.pipeline, self.tokenizer, self.eos_ids, choices, body, asyncio.get_running_loop(),
                  logprobs, prompt_logprobs, echo)  # fmt: skip
        self.admitted += 1
        try:
            job.start()
        except Exception as exc:  # the pipeline is shut down
            job.cancel()
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

    async def _handle(self, route: str, request: Request, fn, auth: bool = True):
        t0 = time.perf_counter()
        try:
            if auth:
                check_bearer(self.api_keys, request.headers.get("authorization", ""))
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

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "expertmap",
                "max_model_len": self.context}  # fmt: skip

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_id!r}.",
                           param="model", code="model_not_found")  # fmt: skip

    def _budget_tokens(self, ids: list[int], body: GenerationBody, default: int, param: str,
                       allow_zero: bool = False) -> int:  # fmt: skip
        """The prompt ``ids``' completion limit: the body's, checked against the context and the
        server's cap, or ``default`` within them; 0 only where ``allow_zero`` (prompt scoring)."""
        n, max_tokens, limit_param = len(ids), body.limit, body.limit_param
        if n >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; your prompt has "
                           f"{n} tokens, which leaves no room for a completion.", param=param,
                           code="context_length_exceeded")  # fmt: skip
        cap = self.args.max_tokens_limit
        if max_tokens is None:
            max_tokens = min(default, cap, self.context - n)
        elif max_tokens == 0 and not allow_zero:
            raise APIError(400, f"{limit_param} 0: it must be at least 1"
                           + (" (0 scores the prompt, with echo: true)" if param == "prompt" else ""),
                           param=limit_param, code="invalid_value")  # fmt: skip
        elif max_tokens > cap:
            raise APIError(400, f"{limit_param} {max_tokens} is more than this server generates per choice ({cap}).",
                           param=limit_param, code="invalid_value")  # fmt: skip
        elif n + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion).",
                           param=limit_param, code="context_length_exceeded")  # fmt: skip
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens {body.min_tokens} is more than the completion's limit of {max_tokens} "
                           "tokens", param="min_tokens", code="invalid_value")  # fmt: skip
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

    def _observe(self, job: Job, reqs: list, prompt_tokens: int, completion_tokens: int) -> None:
        with self.metrics.lock:
            self.metrics.prompt_tokens += prompt_tokens
            self.metrics.completion_tokens += completion_tokens
            firsts = [r.token_times[0] for r in reqs if r.token_times]
            if firsts:
                self.metrics.ttft.observe(min(firsts) - job.arrived)
            starts = [r.started_at for r in reqs if r.started_at is not None]
            if starts:
                self.metrics.queue_wait.observe(min(starts) - job.arrived)
            for r in reqs:
                for t in r.tpot_s:
                    self.metrics.tpot.observe(t)

    async def _collect(self, job: Job) -> tuple[list[ChoiceDone], dict[int, Echo]]:
        """The finished choices in index order (they finish in any order) and their echoes."""
        found: dict[int, ChoiceDone] = {}
        echoes: dict[int, Echo] = {}
        error = None
        try:
            while True:
                ev = await job.events.get()
                if isinstance(ev, ChoiceDone):
                    found[ev.index] = ev
                elif isinstance(ev, Echo):
                    echoes[ev.index] = ev
                elif isinstance(ev, ChoiceFailed):
                    error = error or ev.message
                elif ev == DONE:
                    break
        except asyncio.CancelledError:
            self._cancel(job)
            raise
        self._release(job)
        if error is not None:
            job.cancel()
            raise generation_error(error)
        return [found[i] for i in sorted(found)], echoes

    def _logprobs(self, kind: str, entries: list, offset: int = 0) -> tuple[dict, int]:
        if kind == "chat":
            return chat_logprobs(self.token_text, entries), offset
        return completion_logprobs(self.token_text, entries, offset)

    def _stream(self, route: str, job: Job, kind: str, created: int, rid: str, prompt_tokens: int, t0: float):
        options = job.body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)
        with_logprobs = job.logprobs is not None
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        state = {"completion": 0}

        def usage() -> dict:
            c = state["completion"]
            return {"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c}

        def chunk(index: int, delta: str | None, finish: str | None, role: bool = False, logprobs: dict | None = None,
                  extra: dict | None = None):  # fmt: skip
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
            out = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [choice]}
            if continuous:
                out["usage"] = usage()
            elif include_usage:
                out["usage"] = None
            out.update(extra or {})
            return sse(out)

        async def events():
            finished, status = False, 200
            reqs, started = [], set()
            offsets: dict[int, int] = {}  # completions: each choice's text offset so far
            sent: dict[int, int] = {}  # each choice's tokens counted so far
            try:
                while True:
                    ev = await job.events.get()
                    if isinstance(ev, Echo):  # completions only
                        lp, offsets[ev.index] = self._logprobs(kind, ev.logprobs) if with_logprobs else (None, len(ev.text))
                        yield chunk(ev.index, ev.text, None, logprobs=lp)
                    elif isinstance(ev, Delta):
                        i = ev.index
                        if kind == "chat" and i not in started:
                            started.add(i)
                            yield chunk(i, None, None, role=True)
                        state["completion"] += ev.tokens
                        sent[i] = sent.get(i, 0) + ev.tokens
                        lp = None
                        if with_logprobs:
                            lp, offsets[i] = self._logprobs(kind, ev.logprobs, offsets.get(i, 0))
                        yield chunk(i, ev.text, None, logprobs=lp)
                    elif isinstance(ev, ChoiceDone):
                        i = ev.index
                        state["completion"] += ev.tokens - sent.get(i, 0)  # tokens after the last delta
                        if kind == "chat" and i not in started:
                            started.add(i)
                            yield chunk(i, None, None, role=True)
                        reqs.append(ev.request)
                        lp = None
                        if with_logprobs:
                            lp, offsets[i] = self._logprobs(kind, ev.pending, offsets.get(i, 0))
                        yield chunk(i, None, ev.finish_reason, logprobs=lp, extra={"expertmap": self._stats([ev.request], job)})
                    elif isinstance(ev, ChoiceFailed):
                        err = generation_error(ev.message)
                        status = err.status
                        yield sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
                    elif ev == DONE:
                        break
                self._release(job)
                if include_usage:
                    yield sse({"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [],
                                "usage": usage(), "expertmap": self._stats(reqs, job)})  # fmt: skip
                yield "data: [DONE]\n\n"
                finished = True
                self._observe(job, reqs, prompt_tokens, state["completion"])
            finally:
                if not finished:
                    self._cancel(job)
                    status = 499  # client closed the request
                self.metrics.count(route, status, time.perf_counter() - t0)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    async def _generate(self, route: str, kind: str, choices: list[ChoiceSpec], body: GenerationBody, t0: float,
                        logprobs: int | None = None, echo: bool = False):  # fmt: skip
        prompt_logprobs = logprobs if echo and logprobs is not None else None
        job = self._submit(choices, body, logprobs, prompt_logprobs, echo)
        created, rid = _now(), ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        prompt_tokens = sum(len(p) for p in {c.prompt_index: c.prompt for c in choices}.values())
        if body.stream:
            return self._stream(route, job, kind, created, rid, prompt_tokens, t0)
        done, echoes = await self._collect(job)
        completion = sum(c.tokens for c in done)
        self._observe(job, [c.request for c in done], prompt_tokens, completion)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
        out = []
        for c in done:
            lp = None
            if kind == "chat":
                if logprobs is not None:
                    lp, _ = self._logprobs(kind, c.logprobs)
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                            "finish_reason": c.finish_reason})  # fmt: skip
                continue
            e = echoes.get(c.index)
            prefix = e.text if e is not None else ""
            if logprobs is not None:
                lp, offset = self._logprobs(kind, e.logprobs) if e is not None else (None, 0)
                gen, _ = self._logprobs(kind, c.logprobs, len(prefix) if e is None else offset)
                lp = gen if lp is None else {key: lp[key] + gen[key] for key in lp}
            out.append({"index": c.index, "text": prefix + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": out,
                             "usage": usage, "expertmap": self._stats([c.request for c in done], job)})  # fmt: skip

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
            max_tokens = self._budget_tokens(ids, body, DEFAULT_CHAT_MAX_TOKENS, "messages")
            choices = [ChoiceSpec(j, ids, max_tokens) for j in range(body.n)]
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            return await self._generate("/v1/chat/completions", "chat", choices, body, t0, logprobs)

        return await self._handle("/v1/chat/completions", request, run)

    def _prompt_ids(self, prompt, where: str) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        bad = next(((j, t) for j, t in enumerate(prompt) if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise APIError(400, f"{where}[{bad[0]}] is token id {bad[1]}, outside the vocabulary [0, {self.vocab})",
                           param="prompt", code="invalid_value")  # fmt: skip
        return list(prompt)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        t0 = time.perf_counter()

        async def run():
            body = parse_body(CompletionBody, await self._read_body(request))
            self._check_model(body.model)
            prompts = body.prompts()
            if len(prompts) * body.n > MAX_PROMPTS:
                raise APIError(400, f"{len(prompts)} prompts x n {body.n} = {len(prompts) * body.n} choices: this "
                               f"server makes at most {MAX_PROMPTS} per request", param="n", code="invalid_value")  # fmt: skip
            choices = []
            for p, prompt in enumerate(prompts):
                ids = self._prompt_ids(prompt, "prompt" if len(prompts) == 1 else f"prompt[{p}]")
                if not ids:
                    raise APIError(400, "prompt is empty" if len(prompts) == 1 else f"prompt[{p}] is empty",
                                   param="prompt", code="invalid_value")  # fmt: skip
                max_tokens = self._budget_tokens(ids, body, DEFAULT_COMPLETION_MAX_TOKENS, "prompt", allow_zero=body.echo)
                choices += [ChoiceSpec(p * body.n + j, ids, max_tokens, p) for j in range(body.n)]
            return await self._generate("/v1/completions", "completion", choices, body, t0, body.logprobs, body.echo)

        return await self._handle("/v1/completions", request, run)

    @app.get("/openapi.json")
    async def openapi_route(self, request: Request):
        async def run():
            return JSONResponse(openapi_document())

        return await self._handle("/openapi.json", request, run)

    @app.get("/v1/models")
    async def models(self, request: Request):
        async def run():
            return JSONResponse({"object": "list", "data": [self._model_card()]})

        return await self._handle("/v1/models", request, run)

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request):
        async def run():
            self._check_model(model_id)
            return JSONResponse(self._model_card())

        return await self._handle("/v1/models/{id}", request, run)

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
            text = self.metrics.render(gauges, {}, STAGE_METRICS, stages)
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

        return await self._handle("/metrics", request, run)

    def __del__(self):
        try:
            self.pipeline.close()
        except Exception:
            pass


def build_app(args: dict | AppArgs | None = None) -> serve.Application:
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
