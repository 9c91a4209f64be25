"""The OpenAI-compatible Serve app over real HTTP on loopback: routes, streaming, errors, queueing, auth.

Ray and Serve start once for the module (local-only, docs/cluster-and-deployment.md) with two applications
on one loopback port: ``/`` (no keys, room in the queue) and ``/strict`` (API keys, max_queue 1).
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from expertmap.actors.config import BUNDLED_MODEL, EngineConfig, LinkConfig
from tests.serve_harness import serve_on_loopback

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings(r"ignore::DeprecationWarning")]

MODEL_ID = BUNDLED_MODEL.name
KEYS_ENV = "EXPERTMAP_TEST_API_KEYS"
KEYS = ("key-one", "key-two")
OPEN_ARGS = {"model": "models/expertmap-moe-tiny", "gpus": 1, "budget": 0.25, "policy": "hybrid",
             "prefetch_distance": 3, "max_queue": 8, "link": "instant"}  # fmt: skip
STRICT_ARGS = {**OPEN_ARGS, "policy": "on-demand", "max_queue": 1, "api_keys_env": KEYS_ENV,
               "link": "rtx3090-pcie4-mixtral"}  # fmt: skip
PROMPT = "def fibonacci(n):"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def listening() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening on this machine."""
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


LISTENING_BEFORE: set[tuple[str, int]] = set()


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@pytest.fixture(scope="module")
def server():
    LISTENING_BEFORE.update(listening())
    os.environ[KEYS_ENV] = ",".join(KEYS)  # before ray.init: the replicas inherit it
    try:
        with serve_on_loopback({"open": ("/", OPEN_ARGS), "strict": ("/strict", STRICT_ARGS)}, gpus=2) as url:
            yield url
    finally:
        os.environ.pop(KEYS_ENV, None)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="dummy", max_retries=0, timeout=120)


def post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server + path, data=data, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                         timeout=120, **kw)  # fmt: skip


def sse(response) -> list[dict]:
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
    return events


# --- the happy path -------------------------------------------------------------------------------


def test_chat_completion_and_streaming_agree(client):
    full = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=20, temperature=0)
    (choice,) = full.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stats = full.model_extra["expertmap"]
    assert stats["accesses"] == stats["hits"] + stats["misses"] > 0 and stats["policy"] == "hybrid"

    stream = client.chat.completions.create(
        model=MODEL_ID, messages=CHAT, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sampling_is_seeded_and_n_choices(client):
    kw = dict(model=MODEL_ID, messages=CHAT, max_tokens=12, temperature=0.9, top_p=0.95, seed=7, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]


def test_completion_streaming_and_stop(server, client):
    full = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert full.object == "text_completion" and text
    with requests.post(f"{server}/v1/completions", json={"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 24,
                                                          "temperature": 0, "stream": True}, stream=True, timeout=120) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text
    # a stop string cuts the text before it, in both modes
    stop = text.strip()[3:6]
    cut = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_http_output_equals_the_engine_in_process(client, bundled_model):
    """Lossless through the API: greedy text over HTTP == OffloadEngine.generate in this process."""
    from expertmap.actors.engine import OffloadEngine

    engine = OffloadEngine(EngineConfig(model=BUNDLED_MODEL, policy="on-demand", budget=0.25,
                                        link=LinkConfig(mode="instant", profile="instant")))  # fmt: skip
    try:
        want = engine.generate(PROMPT, max_new_tokens=24, min_new_tokens=0)
        got = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0)
        assert got.choices[0].text == want.text
        assert got.usage.completion_tokens == len(want.token_ids)
        tok = engine.tokenizer
        ids = tok(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
        want = engine.generate(ids, max_new_tokens=20, min_new_tokens=0)
        got = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=20, temperature=0)
        assert got.choices[0].message.content == want.text and got.usage.prompt_tokens == len(ids)
    finally:
        engine.close()


def test_models_health_metrics(server, client):
    (model,) = client.models.list().data
    assert model.id == MODEL_ID and model.object == "model"
    r = requests.get(f"{server}/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = requests.get(f"{server}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("expertmap_requests_total", "expertmap_request_latency_seconds_bucket", "expertmap_ttft_seconds_count",
                 "expertmap_tpot_seconds_sum", "expertmap_queue_depth", "expertmap_cache_hits_total",
                 "expertmap_cache_misses_total", "expertmap_cache_stall_seconds_total", "expertmap_cache_bytes_moved_total"):  # fmt: skip
        assert re.search(rf"^{name}(\{{[^}}]*\}})? ", text, re.M), name
    served = re.search(r'^expertmap_requests_total\{route="/v1/chat/completions",status="200"\} (\d+)', text, re.M)
    assert served and int(served.group(1)) >= 1
    assert float(re.search(r'^expertmap_cache_hits_total\{stage="0"\} (\S+)', text, re.M).group(1)) > 0  # per GPU


# --- errors ---------------------------------------------------------------------------------------

LONG = "word " * 1500


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b"[1, 2]", 400, None),
        ("/v1/chat/completions", {"model": MODEL_ID}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": "hello"}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": ""}]}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "model"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 5000}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "temperature": 2.5}, 400, "temperature"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "n": 9}, 400, "n"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "stream": "yes"}, 400, "stream"),
        ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
        ("/v1/completions", {"model": MODEL_ID, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL_ID, "prompt": LONG}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL_ID, "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/completions", {"model": MODEL_ID, "prompt": [1, 99999]}, 400, "prompt"),
        ("/v1/completions", {"prompt": PROMPT}, 400, "model"),
    ],
    ids=lambda v: None,
)
def test_bad_input_is_a_4xx_with_an_openai_error(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err


def test_openai_client_sees_the_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL_ID, prompt=LONG)


# --- queueing, disconnects, auth ------------------------------------------------------------------

STRICT = {"Authorization": f"Bearer {KEYS[0]}"}


def test_full_queue_answers_429_and_accepted_requests_finish(server):
    body = {"model": MODEL_ID, "prompt": "The river ran through the old town", "max_tokens": 48, "temperature": 0}
    start = threading.Barrier(6)

    def one(_):
        start.wait()
        return post(server, "/strict/v1/completions", body, headers=STRICT)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    codes = sorted(r.status_code for r in results)
    assert 429 in codes and 200 in codes, codes
    assert set(codes) <= {200, 429}, [r.text for r in results]
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["choices"][0]["text"] is not None and r.json()["usage"]["completion_tokens"] >= 1
    # afterwards the queue is empty again
    assert post(server, "/strict/v1/completions", body, headers=STRICT).status_code == 200


def _metric(server, name, prefix=""):
    text = requests.get(f"{server}{prefix}/metrics", timeout=30, headers=STRICT if prefix else {}).text
    m = re.search(rf"^{name} (\S+)", text, re.M)
    return float(m.group(1))


def test_client_disconnect_mid_stream_frees_the_slot(server):
    before = _metric(server, "expertmap_requests_cancelled_total", "/strict")
    tokens_before = _metric(server, "expertmap_completion_tokens_total", "/strict")
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0.8, "seed": 1,
            "stream": True}  # fmt: skip
    r = requests.post(f"{server}/strict/v1/completions", json=body, headers=STRICT, stream=True, timeout=60)
    assert r.status_code == 200
    lines = r.iter_lines()
    got = [line for line in (next(lines) for _ in range(4)) if line]
    assert got
    r.close()  # the client goes away
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _metric(server, "expertmap_requests_cancelled_total", "/strict") > before and \
                _metric(server, "expertmap_requests_running", "/strict") == 0:  # fmt: skip
            break
        time.sleep(0.2)
    else:
        pytest.fail("the generation went on after the client disconnected")
    assert _metric(server, "expertmap_completion_tokens_total", "/strict") - tokens_before < 900
    ok = post(server, "/strict/v1/completions", {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 4}, headers=STRICT)
    assert ok.status_code == 200


def test_api_keys(server):
    from openai import AuthenticationError, OpenAI

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]}):
        for method, path in (("get", "/v1/models"), ("get", "/metrics"), ("post", "/v1/completions")):
            r = requests.request(method, f"{server}/strict{path}", headers=headers, json={"model": MODEL_ID, "prompt": "x"},
                                 timeout=30)  # fmt: skip
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{server}/strict/health", timeout=30).status_code == 200
    for key in KEYS:
        assert requests.get(f"{server}/strict/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server}/strict/v1", api_key="wrong", max_retries=0).models.list()
    good = OpenAI(base_url=f"{server}/strict/v1", api_key=KEYS[1], max_retries=0)
    assert good.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3).choices[0].text is not None
    # the open app needs no key
    assert requests.get(f"{server}/v1/models", timeout=30).status_code == 200


def test_unknown_routes_and_methods_get_openai_shaped_errors(server):
    """Regression (found by schemathesis): FastAPI's own 404/405 came as {"detail": ...}."""
    r = requests.put(f"{server}/v1/chat/completions", json={}, timeout=30)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = requests.get(f"{server}/v1/nope", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]
    doc = requests.get(f"{server}/openapi.json", timeout=30).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(doc["paths"])


def test_openapi_document_needs_the_key_when_keys_are_on(server):
    assert requests.get(f"{server}/strict/openapi.json", timeout=30).status_code == 401
    ok = requests.get(f"{server}/strict/openapi.json", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30)
    assert ok.status_code == 200 and "paths" in ok.json()


def test_nothing_listens_beyond_loopback(server, client):
    client.models.list()  # everything is up: Ray, Serve's proxy, the replicas, the stage actors
    new = listening() - LISTENING_BEFORE
    assert new, "the app should listen somewhere"
    exposed = sorted(a for a in new if not _loopback(a[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"


# --- the builder's arguments (no Ray needed) ------------------------------------------------------


def test_builder_args(monkeypatch):
    from expertmap.cluster.serve_app import build_app
    from expertmap.cluster.serve_args import AppArgs

    assert AppArgs.model_validate({"gpus": 6}).gpus == 6  # configs/serve-six-gpu.yaml
    assert build_app({"gpus": 2}) is not None  # validated here; the stages start in the replica
    with pytest.raises(ValueError, match="gpus"):
        AppArgs.model_validate({"gpus": 0})
    with pytest.raises(ValueError, match="no API keys"):
        build_app({"host": "0.0.0.0"})
    monkeypatch.delenv("EXPERTMAP_NOPE", raising=False)
    with pytest.raises(ValueError, match="EXPERTMAP_NOPE"):
        build_app({"host": "0.0.0.0", "api_keys_env": "EXPERTMAP_NOPE"})
    with pytest.raises(ValueError, match="hots"):
        AppArgs.model_validate({"hots": "x"})
    monkeypatch.setenv("EXPERTMAP_PW", "s3cret")
    a = AppArgs.model_validate({"redis_url": "redis://:${EXPERTMAP_PW}@127.0.0.1:6379/0", "model": "models/expertmap-moe-tiny"})
    assert a.redis_url == "redis://:s3cret@127.0.0.1:6379/0" and a.model_path == BUNDLED_MODEL
    assert build_app({"host": "0.0.0.0", "allow_unauthenticated": True}) is not None
