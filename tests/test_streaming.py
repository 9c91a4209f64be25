"""Streaming text: the incremental detokenizer gives the one-shot decode's text, cut exactly at
stop strings, at a cost per token that does not grow with the output; the scheduler thread only
hands tokens over (the decoding happens on the event loop)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from expertmap.cluster.streaming import DONE, ChoiceDone, ChoiceSpec, Delta, Job, TextTracker

TEXTS = {
    "ascii": "Hello world, this is a test of streaming text. The quick brown fox jumps over the lazy dog.",
    "accents": "Café crème brûlée — naïve façade, déjà vu; Straße, Ærø, señor.",
    "cjk-emoji": "日本語のテキスト 🙂🚀 mixed ünïcödé 👩\u200d👩\u200d👧 and 한국어 text, Ελληνικά.",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
}


def stream(tokenizer, ids: list[int], stops: list[str]) -> tuple[TextTracker, list[str], list[str]]:
    """Feed ``ids`` one at a time; the pieces emitted, and the emitted text after each token."""
    pieces: list[str] = []
    tracker = TextTracker(tokenizer, stops, pieces.append)
    after: list[str] = []
    for t in ids:
        tracker.add(t)
        after.append("".join(pieces))
    tracker.finish()
    return tracker, pieces, after


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", TEXTS)
def test_streamed_text_is_the_single_decode(bundled_model, name):
    tok = bundled_model.tokenizer
    ids = tok(TEXTS[name], add_special_tokens=False).input_ids
    full = decode(tok, ids)
    tracker, pieces, after = stream(tok, ids, [])
    assert "".join(pieces) == tracker.emitted == full
    assert all(pieces), "empty pieces are not emitted"
    for k, text in enumerate(after, 1):  # never ahead of, never different from, the decode so far
        assert decode(tok, ids[:k]).startswith(text), (k, text)
        assert "\ufffd" not in text or "\ufffd" in full
    if name in ("accents", "cjk-emoji"):  # multi-byte characters really are split over byte tokens here
        assert any(decode(tok, [t]).endswith("\ufffd") for t in ids)


def test_random_tokens_special_ones_too_stream_as_the_single_decode(bundled_model):
    tok = bundled_model.tokenizer
    rng = random.Random(20261201)
    specials = sorted(set(tok.all_special_ids))
    for _ in range(40):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))]
        tracker, pieces, _ = stream(tok, ids, [])
        assert "".join(pieces) == decode(tok, ids), ids


def _first_token_completing(tok, ids: list[int], stop: str) -> int:
    return next(k for k in range(1, len(ids) + 1) if stop in decode(tok, ids[:k]))


@pytest.mark.parametrize("name", TEXTS)
def test_stop_strings_straddling_tokens_cut_exactly(bundled_model, name):
    tok = bundled_model.tokenizer
    ids = tok(TEXTS[name], add_special_tokens=False).input_ids
    full = decode(tok, ids)
    ends = [len(decode(tok, ids[:k])) for k in range(1, len(ids) + 1)]  # where each token's text ends
    checked = 0
    for k in range(1, len(ids) - 2):
        a = ends[k - 1] - 1  # the last character of token k and the first of the next ones
        stop = full[a : a + 4]
        if "\ufffd" in stop or len(stop) < 2 or ends[k - 1] >= ends[k] or full.find(stop) != a:
            continue
        tracker, pieces, _ = stream(tok, ids, [stop])
        assert tracker.hit_stop and "".join(pieces) == tracker.emitted == full[:a], (stop, tracker.emitted)
        first = _first_token_completing(tok, ids, stop)
        if name in ("ascii", "code"):  # one byte a character: found with the token that completes it
            assert tracker.tokens == first, (stop, tracker.tokens, first)
        else:  # at most until the next character is complete
            assert first <= tracker.tokens <= len(ids), (stop, tracker.tokens, first)
        checked += 1
    assert checked >= 5, "too few stop strings across token boundaries were tried"


def test_the_earliest_stop_wins_and_near_misses_are_released(bundled_model):
    tok = bundled_model.tokenizer
    text = TEXTS["accents"]
    ids = tok(text, add_special_tokens=False).input_ids
    full = decode(tok, ids)
    # listed later but occurring earlier: the text is cut at the earliest occurrence
    tracker, pieces, _ = stream(tok, ids, ["Straße", "crème b"])
    assert tracker.hit_stop and tracker.emitted == full[: full.index("crème b")]
    # prefixes of a stop string are held back while they could grow into it, then released
    tracker, pieces, after = stream(tok, ids, ["crème X", "naïve!"])
    assert not tracker.hit_stop and "".join(pieces) == full
    held = [k for k, t in enumerate(after) if decode(tok, ids[: k + 1]).endswith("crè")]
    assert held and not after[held[0]].endswith("crè"), "a possible start of a stop string was emitted early"


def _per_token_s(tok, ids: list[int], stops: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        tracker = TextTracker(tok, stops, lambda piece: None)
        t0 = time.perf_counter()
        for t in ids:
            tracker.add(t)
        tracker.finish()
        best = min(best, time.perf_counter() - t0)
    return best / len(ids)


def test_cost_per_token_does_not_grow_with_the_output(bundled_model):
    """4,096 tokens cost less than twice per token what 256 do (a full re-decode per token would
    make that ratio about 16). Best of several repeats, so a loaded machine does not fail it."""
    tok = bundled_model.tokenizer
    ids: list[int] = []
    while len(ids) < 4096:
        for text in TEXTS.values():
            ids += tok(" " + text, add_special_tokens=False).input_ids
    ids = ids[:4096]
    stops = ["<never seen>", "zzz!"]
    _per_token_s(tok, ids[:256], stops, 2)  # warm up
    ratios = []
    for _ in range(3):
        short = _per_token_s(tok, ids[:256], stops, 7)
        long = _per_token_s(tok, ids, stops, 3)
        ratios.append(long / short)
        if ratios[-1] < 2:
            break
    print(f"per-token cost 4096 vs 256 tokens: {min(ratios):.2f}")
    assert min(ratios) < 2, f"per-token cost ratio {min(ratios):.2f} (4,096 tokens vs 256): decoding is not incremental"


class _FakeRequest:
    def __init__(self):
        self.tokens: list[int] = []
        self.error = None
        self.finish_reason = None
        self._cancel = threading.Event()

    def cancel(self):
        self._cancel.set()


class _FakePipeline:
    """Delivers every token from its own thread, as the scheduler does, ignoring a cancel for a
    few tokens (a cancel reaches the real scheduler only after its current iteration)."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.threads: list[threading.Thread] = []

    def submit(self, ids, params, on_token, on_done):
        req = _FakeRequest()

        def run():
            for t in self.tokens[: params.max_new_tokens]:
                req.tokens.append(t)
                on_token(t)
            req.finish_reason = "cancelled" if req._cancel.is_set() else "length"
            on_done(req)

        th = threading.Thread(target=run, name="fake-scheduler")
        self.threads.append(th)
        th.start()
        return req


class _ThreadRecordingTokenizer:
    def __init__(self, tok):
        self.tok, self.threads = tok, set()

    def decode(self, ids, **kw):
        self.threads.add(threading.current_thread().name)
        return self.tok.decode(ids, **kw)


def test_job_decodes_on_the_event_loop_and_counts_tokens_up_to_the_stop(bundled_model):
    from expertmap.cluster.openai_schemas import CompletionBody

    tok = _ThreadRecordingTokenizer(bundled_model.tokenizer)
    ids = bundled_model.tokenizer(TEXTS["ascii"], add_special_tokens=False).input_ids
    full = decode(bundled_model.tokenizer, ids)
    stop = "brown"
    first = _first_token_completing(bundled_model.tokenizer, ids, stop)
    body = CompletionBody.model_validate({"model": "m", "prompt": "x", "n": 2, "stop": [stop], "seed": 1})

    async def run():
        pipeline = _FakePipeline(ids)
        choices = [ChoiceSpec(i, [1, 2], len(ids)) for i in range(body.n)]
        job = Job(pipeline, tok, set(), choices, body, asyncio.get_running_loop())
        job.start()
        events = []
        while True:
            ev = await asyncio.wait_for(job.events.get(), 60)
            events.append(ev)
            if ev == DONE:
                break
        for th in pipeline.threads:
            th.join()
        return events, threading.current_thread().name

    events, loop_thread = asyncio.run(run())
    assert tok.threads == {loop_thread}, f"decoded on {tok.threads}, the loop runs on {loop_thread!r}"
    choices = {ev.index: ev for ev in events if isinstance(ev, ChoiceDone)}
    assert sorted(choices) == [0, 1]
    for i, done in choices.items():
        assert done.text == full[: full.index(stop)] and done.finish_reason == "stop"
        assert done.tokens == first < len(done.request.tokens), (done.tokens, first, len(done.request.tokens))  # the extra ones are not counted
        assert done.request._cancel.is_set()
        deltas = [ev for ev in events if isinstance(ev, Delta) and ev.index == i]
        assert "".join(ev.text for ev in deltas) == done.text
        assert sum(ev.tokens for ev in deltas) <= done.tokens
    assert events[-1] == DONE
