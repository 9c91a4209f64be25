"""The OpenAI parameters over real HTTP: every prompt shape, ``n``, ``echo``, ``ignore_eos``,
``min_tokens``, ``max_completion_tokens``, ``seed``, ``GET /v1/models/{id}``, and the refusals.

One Ray and Serve for the module with two applications: ``/`` (the bundled model) and ``/tiny``
(a random tiny Mixtral with the bundled tokenizer: unlike the bundled model, which practically never
predicts its end-of-sequence token, it samples one often, so ``ignore_eos`` and ``min_tokens``
can be seen to act).
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
A, B = "def fibonacci(n):", "The river ran through the old town"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
EOS = 2
TINY_ID = "tiny-mixtral"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """tests/tiny_models.py's random Mixtral (a 128-token vocabulary) with a character tokenizer of its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import save_tiny

    folder = save_tiny("mixtral", tmp_path_factory.mktemp("tiny") / TINY_ID)
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2: the tiny config's pad, bos and eos
    vocab = {**{s: i for i, s in enumerate(specials)}, **{chr(i): i for i in range(len(specials), 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], bos_token=specials[1],
                            eos_token=specials[2]).save_pretrained(folder)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def server(tiny_folder):
    tiny = {**ARGS, "model": str(tiny_folder), "budget": 0.5}
    with serve_on_loopback({"bundled": ("/", ARGS), "tiny": ("/tiny", tiny)}, gpus=2) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


def post(server: str, path: str, body: dict) -> requests.Response:
    return requests.post(server + path, json=body, timeout=300)


def completion(server: str, path: str = "/v1/completions", **body) -> dict:
    r = post(server, path, {"model": MODEL_ID, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(server: str, path: str, body: dict) -> list[dict]:
    with requests.post(server + path, json={**body, "stream": True}, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        return [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip


# --- prompts in every shape -----------------------------------------------------------------------


def test_every_prompt_shape_with_n_and_echo(server, client, tokenizer):
    greedy = {"max_tokens": 6, "temperature": 0}
    text = {p: completion(server, prompt=p, **greedy)["choices"][0]["text"] for p in (A, B)}
    ids = {p: tokenizer(p).input_ids for p in (A, B)}
    assert text[A] != text[B]
    for prompt in ([A, B], [ids[A], ids[B]]):
        out = completion(server, prompt=prompt, n=2, **greedy)
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]  # prompt p, choice j: index p * n + j
        assert [c["text"] for c in out["choices"]] == [text[A], text[A], text[B], text[B]]
        assert out["usage"]["prompt_tokens"] == len(ids[A]) + len(ids[B])
    assert completion(server, prompt=ids[B], **greedy)["choices"][0]["text"] == text[B]  # token ids
    assert completion(server, prompt=[B], **greedy)["choices"][0]["text"] == text[B]  # [string]
    assert completion(server, prompt=[ids[B]], **greedy)["choices"][0]["text"] == text[B]  # [[ids]]
    # echo, plain and streamed, with several prompts
    echoed = completion(server, prompt=[A, B], echo=True, **greedy)["choices"]
    assert [c["text"] for c in echoed] == [A + text[A], B + text[B]]
    events = stream_events(server, "/v1/completions", {"model": MODEL_ID, "prompt": [ids[A], ids[B]], "echo": True, **greedy})
    streamed = {0: "", 1: ""}
    for e in events:
        (c,) = e["choices"]
        streamed[c["index"]] += c["text"]
    assert streamed == {0: A + text[A], 1: B + text[B]}
    # max_tokens 0 with echo scores the prompt: no new token
    scored = completion(server, prompt=A, echo=True, max_tokens=0)
    assert scored["choices"][0]["text"] == A and scored["usage"]["completion_tokens"] == 0
    # the OpenAI client sends lists of prompts too
    out = client.completions.create(model=MODEL_ID, prompt=[A, B], **greedy)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [text[A], text[B]]


@pytest.mark.parametrize(
    "prompt, says",
    [
        ([[1, "a"]], "prompt[0] holds str 'a'"),
        ([1, "a"], "got a list of int, str"),
        ([], "prompt is empty"),
        ([[]], "prompt[0] is an empty list"),
        ({"text": "hi"}, "got dict"),
        (["a", ""], "prompt[1] is empty"),
        (["x"] * 33, "at most 32"),
        ([[5, 6], [1, 99999]], "prompt[1][1] is token id 99999, outside the vocabulary [0, 8192)"),
        ([True, 2], "got a list of bool, int"),
    ],
    ids=lambda v: None,
)
def test_bad_prompts_say_what_is_wrong(server, prompt, says):
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": prompt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and says in err["message"], err
    assert "valid string" not in err["message"]


# --- refusals -------------------------------------------------------------------------------------

CHAT_BODY = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 2}
COMPLETION_BODY = {"model": MODEL_ID, "prompt": A, "max_tokens": 2}


@pytest.mark.parametrize(
    "base, extra, param",
    [
        (CHAT_BODY, {"response_format": {"type": "json_object"}}, "response_format"),
        (CHAT_BODY, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        (COMPLETION_BODY, {"response_format": {"type": "json_object"}}, "response_format"),
        (CHAT_BODY, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        (CHAT_BODY, {"tool_choice": "auto"}, "tool_choice"),
        (CHAT_BODY, {"functions": [{"name": "f"}]}, "functions"),
        (CHAT_BODY, {"logit_bias": {"5": 10}}, "logit_bias"),
        (CHAT_BODY, {"presence_penalty": 0.5}, "presence_penalty"),
        (COMPLETION_BODY, {"frequency_penalty": 1.0}, "frequency_penalty"),
        (COMPLETION_BODY, {"best_of": 3}, "best_of"),
        (COMPLETION_BODY, {"top_k": 5}, "top_k"),
        (COMPLETION_BODY, {"guided_json": {}}, "guided_json"),
        (COMPLETION_BODY, {"frobnicate": 1}, "frobnicate"),
        (CHAT_BODY, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        (CHAT_BODY, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT_BODY, {"logprobs": 3}, "logprobs"),  # chat's is a boolean
        (COMPLETION_BODY, {"logprobs": 21}, "logprobs"),
        (COMPLETION_BODY, {"suffix": "x"}, "suffix"),
        (COMPLETION_BODY, {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
        (COMPLETION_BODY, {"min_tokens": 3}, "min_tokens"),  # more than max_tokens
        (COMPLETION_BODY, {"max_completion_tokens": 3}, "max_completion_tokens"),  # disagrees with max_tokens
        (COMPLETION_BODY, {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        (COMPLETION_BODY, {"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
        (COMPLETION_BODY, {"n": 4, "prompt": [A] * 9}, "n"),  # 36 choices
        (CHAT_BODY, {"echo": True}, "echo"),  # a completions parameter
    ],
    ids=lambda v: None,
)
def test_refused_parameters_are_a_400_naming_them(server, base, extra, param):
    path = "/v1/chat/completions" if "messages" in base else "/v1/completions"
    r = post(server, path, {**base, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[-1] in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_neutral_values_of_refused_parameters_are_accepted(server):
    neutral = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "presence_penalty": 0,
               "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "user": "someone", "metadata": {"k": "v"}}  # fmt: skip
    r = post(server, "/v1/chat/completions", {**CHAT_BODY, **neutral})
    assert r.status_code == 200, r.text


def test_the_openai_client_sees_the_refusals(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=MODEL_ID, messages=CHAT, response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="tool"):
        client.chat.completions.create(model=MODEL_ID, messages=CHAT,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])  # fmt: skip


# --- models ---------------------------------------------------------------------------------------


def test_models_retrieve(server, client):
    import openai

    model = client.models.retrieve(MODEL_ID)
    assert model.id == MODEL_ID and model.object == "model" and model.owned_by == "expertmap"
    assert model.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = requests.get(f"{server}/v1/models/org/some-model", timeout=30)
    assert r.status_code == 404
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                 "param": "model", "code": "model_not_found"}  # fmt: skip
    assert "org/some-model" in r.json()["error"]["message"]


# --- ignore_eos, min_tokens, max_completion_tokens, seed ------------------------------------------


def _tiny(server: str, **body) -> dict:
    r = post(server, "/tiny/v1/completions", {"model": TINY_ID, "prompt": "abcd", "temperature": 1.0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_ignore_eos_gives_exactly_max_tokens_and_min_tokens_holds_eos_back(server):
    """On the tiny random model, find seeded samples that end early on EOS; the same seeds with
    ``ignore_eos`` make exactly ``max_tokens`` tokens (the same ones up to the EOS, which stays in
    the text's tokens), and ``min_tokens`` delays the end."""
    max_tokens = 24
    early = []
    for seed in range(24):
        out = _tiny(server, max_tokens=max_tokens, seed=seed, logprobs=0)
        (c,) = out["choices"]
        if c["finish_reason"] == "stop":
            early.append((seed, out["usage"]["completion_tokens"], c["logprobs"]["tokens"]))
        if len(early) == 3:
            break
    assert early, "no seed ended on EOS: the test cannot see ignore_eos act"
    for seed, n, tokens in early:
        assert n < max_tokens
        out = _tiny(server, max_tokens=max_tokens, seed=seed, logprobs=0, ignore_eos=True)
        (c,) = out["choices"]
        assert out["usage"]["completion_tokens"] == max_tokens and c["finish_reason"] == "length"
        assert c["logprobs"]["tokens"][:n] == tokens  # the same samples up to the EOS, and on past it
        held = _tiny(server, max_tokens=max_tokens, seed=seed, min_tokens=n + 1)
        assert held["usage"]["completion_tokens"] > n
    # streamed, with vLLM's continuous usage: every chunk says the usage so far
    seed = early[0][0]
    events = stream_events(server, "/tiny/v1/completions", {
        "model": TINY_ID, "prompt": "abcd", "temperature": 1.0, "seed": seed, "max_tokens": max_tokens,
        "max_completion_tokens": max_tokens, "ignore_eos": True, "stop": None,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})  # fmt: skip
    assert all(e["usage"] is not None for e in events)
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == max_tokens


def test_ignore_eos_and_max_completion_tokens_on_the_bundled_model(server, client):
    out = client.completions.create(model=MODEL_ID, prompt=A, max_tokens=7, temperature=0.8, seed=3,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_completion_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
    assert chat.usage.completion_tokens == 5
    again = client.completions.create(model=MODEL_ID, prompt=A, max_tokens=7, temperature=0.8, seed=3)
    assert again.choices[0].text == out.choices[0].text  # seeded
    other = client.completions.create(model=MODEL_ID, prompt=A, max_tokens=7, temperature=0.8, seed=4)
    assert other.choices[0].text != out.choices[0].text


# --- the stop rule without a server ---------------------------------------------------------------


@pytest.mark.parametrize("ignore_eos, min_tokens, ends_at", [(False, 0, 2), (True, 0, 6), (False, 4, 5)])
def test_the_stop_rule(ignore_eos, min_tokens, ends_at):
    from expertmap.actors.sampling import SamplingParams
    from expertmap.cluster.pipeline import PipelineRequest

    req = PipelineRequest("r", [1, 2], SamplingParams(max_new_tokens=6, min_new_tokens=min_tokens, ignore_eos=ignore_eos),
                          {EOS})  # fmt: skip
    tokens = [5, EOS, 7, 8, EOS, 9, 9]
    for k, t in enumerate(tokens, 1):
        if req.deliver(t):
            break
    assert k == ends_at and req.finish_reason == ("length" if k == 6 else "stop")
