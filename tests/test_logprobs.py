"""Log-probabilities over real HTTP equal transformers' own, with offloading, on 1 and on 3 stages.

One Ray and Serve for the module with two applications on one loopback port: ``/`` (one stage)
and ``/three`` (three stages), both offloading at budget 25% (the bundled model's experts mostly
in host memory). The reference is the bundled model run whole by transformers
(``AutoModelForCausalLM``, float32): ``log_softmax`` of its logits. The served values must match
it within 1e-4, the top log-probabilities must be its top tokens, and the OpenAI client must
parse every field.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import json

import pytest
import requests

from expertmap.actors.config import BUNDLED_MODEL
from tests.serve_harness import serve_on_loopback

pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings(r"ignore::DeprecationWarning")]

MODEL_ID = BUNDLED_MODEL.name
ARGS = {"model": "models/expertmap-moe-tiny", "gpus": 1, "budget": 0.25, "policy": "on-demand", "link": "instant",
        "max_queue": 8}  # fmt: skip
PREFIXES = {"one stage": "", "three stages": "/three"}
TOL = 1e-4
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
CHAT = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture(scope="module")
def server():
    apps = {"one": ("/", ARGS), "three": ("/three", {**ARGS, "gpus": 3})}
    with serve_on_loopback(apps, gpus=4) as url:
        yield url


@pytest.fixture(scope="module")
def reference():
    """``logprobs(ids)``: transformers' log-softmax [len(ids), V] (float32) of the model run whole."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()

    @torch.no_grad()
    def logprobs(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def text_of():
    from transformers import AutoTokenizer

    from expertmap.cluster.openai_logprobs import TokenText

    return TokenText(AutoTokenizer.from_pretrained(BUNDLED_MODEL))


def post(url: str, body: dict, **kw) -> requests.Response:
    return requests.post(url, json=body, timeout=300, **kw)


def client_for(server: str, prefix: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}{prefix}/v1", api_key="unused", max_retries=0, timeout=300)


def prompt_ids() -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)(PROMPT).input_ids


def check_top(top: dict, ref_row, chosen: int, n: int, text_of) -> None:
    """``top`` (text -> logprob) holds the reference's n most likely tokens with their values, and the chosen one."""
    values, ids = ref_row.topk(n)
    want = {text_of.text(int(t)): float(v) for t, v in zip(ids, values)}
    want.setdefault(text_of.text(chosen), float(ref_row[chosen]))
    assert set(top) == set(want), (top, want)
    assert max(abs(top[k] - want[k]) for k in want) <= TOL


# --- /v1/completions ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES.values(), ids=PREFIXES.keys())
def test_echo_prompt_logprobs_equal_transformers(server, prefix, reference, text_of):
    """lm-eval's loglikelihood request (token ids as [[ids]], echo, max_tokens 1, logprobs 1) and prompt
    scoring (max_tokens 0) answer transformers' log-softmax at every prompt position."""
    ids = prompt_ids()
    ref = reference(ids)
    want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    for max_tokens in (1, 0):
        body = {"model": MODEL_ID, "prompt": [ids], "max_tokens": max_tokens, "logprobs": 5, "echo": True,
                "temperature": 0, "seed": 1234}  # fmt: skip
        r = post(f"{server}{prefix}/v1/completions", body)
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first token has none
        got = lp["token_logprobs"][1 : len(ids)]
        assert max(abs(g - w) for g, w in zip(got, want)) <= TOL
        assert lp["tokens"][: len(ids)] == [text_of.text(t) for t in ids]
        for t in range(1, len(ids)):
            check_top(lp["top_logprobs"][t], ref[t - 1], ids[t], 5, text_of)
        if max_tokens == 1:  # the generated token: greedy, the reference's most likely next token
            nxt = int(ref[-1].argmax())
            assert lp["tokens"][-1] == text_of.text(nxt) and choice["finish_reason"] == "length"
            assert abs(lp["token_logprobs"][-1] - float(ref[-1, nxt])) <= TOL
            check_top(lp["top_logprobs"][-1], ref[-1], nxt, 5, text_of)
        else:
            assert r.json()["usage"]["completion_tokens"] == 0
        assert lp["text_offset"] == [sum(len(x) for x in lp["tokens"][:k]) for k in range(len(lp["tokens"]))]


@pytest.mark.parametrize("prefix", PREFIXES.values(), ids=PREFIXES.keys())
def test_generated_logprobs_equal_transformers_and_the_client_parses_them(server, prefix, reference, text_of):
    client = client_for(server, prefix)
    out = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    (choice,) = out.choices
    ids = prompt_ids()
    lp = choice.logprobs  # the client's Logprobs object
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == out.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    gen = _ids_of(lp.tokens, text_of)
    ref = reference(ids + gen)
    for k, g in enumerate(gen):
        row = ref[len(ids) + k - 1]
        assert abs(lp.token_logprobs[k] - float(row[g])) <= TOL
        assert g == int(row.argmax())  # greedy
        check_top(lp.top_logprobs[k], row, g, 3, text_of)


def _ids_of(tokens: list[str], text_of) -> list[int]:
    """The token ids of token texts (the bundled tokenizer's texts are unique for its ordinary tokens)."""
    tok = text_of.tokenizer
    by_text = {}
    for i in range(len(tok)):
        by_text.setdefault(text_of.text(i), i)
    return [by_text[t] for t in tokens]


@pytest.mark.parametrize("prefix", PREFIXES.values(), ids=PREFIXES.keys())
def test_streamed_logprobs_with_echo_equal_the_plain_answer(server, prefix):
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 2, "echo": True}
    plain = post(f"{server}{prefix}/v1/completions", body).json()["choices"][0]
    with requests.post(f"{server}{prefix}/v1/completions", json={**body, "stream": True}, stream=True, timeout=300) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == plain["text"] and text.startswith(PROMPT)  # echo is honoured when streaming
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        for key, values in (e["choices"][0]["logprobs"] or {}).items():
            merged[key] += values
    assert merged["tokens"] == plain["logprobs"]["tokens"]
    assert merged["text_offset"] == plain["logprobs"]["text_offset"]
    assert merged["token_logprobs"][0] is None
    assert max(abs(a - b) for a, b in zip(merged["token_logprobs"][1:], plain["logprobs"]["token_logprobs"][1:])) <= TOL


# --- /v1/chat/completions -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES.values(), ids=PREFIXES.keys())
def test_chat_logprobs_equal_transformers_streaming_and_not(server, prefix, reference, text_of):
    client = client_for(server, prefix)
    out = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                         top_logprobs=4)  # fmt: skip
    (choice,) = out.choices
    content = choice.logprobs.content  # ChatCompletionTokenLogprob objects
    assert len(content) == out.usage.completion_tokens >= 1
    tok = text_of.tokenizer
    ids = tok(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
    gen = _ids_of([c.token for c in content], text_of)
    ref = reference(ids + gen)
    for k, (entry, g) in enumerate(zip(content, gen)):
        row = ref[len(ids) + k - 1]
        assert g == int(row.argmax()) and abs(entry.logprob - float(row[g])) <= TOL
        assert bytes(entry.bytes) == text_of.bytes(g)
        values, top_ids = row.topk(4)
        assert [t.token for t in entry.top_logprobs] == [text_of.text(int(t)) for t in top_ids]
        assert max(abs(t.logprob - float(v)) for t, v in zip(entry.top_logprobs, values)) <= TOL
        assert all(isinstance(t.bytes, list) for t in entry.top_logprobs)
    stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                            top_logprobs=4, stream=True)  # fmt: skip
    streamed = [c for chunk in stream for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, content)) <= TOL
    # without logprobs there are none
    plain = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
