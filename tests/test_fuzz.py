"""Property-based tests (hypothesis, fixed seed and budget): whatever a client or a config sends,
the parsers answer with a clear 4xx / ValueError, never an unexpected exception."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.fuzz

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
fields = st.sampled_from(["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                          "n", "stream", "stop", "seed", "stream_options", "logprobs", "suffix", "echo", "role", "content"])  # fmt: skip
bodies = st.dictionaries(fields, json_values, max_size=8)


@pytest.mark.parametrize("body_cls", ["ChatBody", "CompletionBody"])
@FUZZ
@seed(20261128)
@given(raw=st.one_of(st.binary(max_size=200), bodies.map(lambda d: json.dumps(d).encode())))
def test_request_bodies_parse_or_get_a_4xx(body_cls, raw):
    from expertmap.cluster import openai_schemas

    try:
        openai_schemas.parse_body(getattr(openai_schemas, body_cls), raw)
    except openai_schemas.APIError as exc:
        assert 400 <= exc.status < 500 and exc.message
        assert exc.response().status_code == exc.status


@FUZZ
@seed(20261128)
@given(value=st.one_of(st.text(max_size=20), st.floats(), st.integers(), st.booleans(), st.none()))
def test_budgets_parse_or_say_why(value):
    from expertmap.actors.config import Budget

    try:
        b = Budget.parse(value)
    except (ValueError, TypeError) as exc:
        assert str(exc)
    else:  # a fraction of the experts (a too-small one is refused later, with the smallest budget named)
        total = 10**9
        if b.fraction is not None:
            assert 0 < b.fraction <= 1 and 0 <= b.resolve(total) <= total
        else:
            assert b.resolve(total) == b.bytes > 0


@FUZZ
@seed(20261128)
@given(tokens=st.lists(st.integers(0, 8191), max_size=30), stops=st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_streamed_text_is_a_prefix_of_the_decoded_text_and_holds_no_stop(bundled_model, tokens, stops):
    from expertmap.cluster.streaming import TextTracker

    pieces = []
    tracker = TextTracker(bundled_model.tokenizer, stops, pieces.append)
    for t in tokens:
        tracker.add(t)
    tracker.finish()
    text = "".join(pieces)
    full = bundled_model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert full.startswith(text) and text == tracker.emitted
    assert not any(s in text for s in stops)


@FUZZ
@seed(20261128)
@given(
    emb=st.lists(st.floats(width=32), min_size=0, max_size=6),
    rows=st.integers(0, 4),
    cols=st.integers(0, 5),
)
def test_map_store_entries_are_checked(emb, rows, cols):
    from expertmap.predictor.map_store import StoreMismatchError
    from expertmap.predictor.map_store_memory import InMemoryMapStore

    store = InMemoryMapStore(2, 3, 4, 8, prefetch_distance=1)
    expert_map = np.full((rows, cols), 1.0 / max(cols, 1), dtype=np.float32)
    try:
        store.add(np.asarray(emb, dtype=np.float32), expert_map)
    except (StoreMismatchError, ValueError) as exc:
        assert str(exc)
        assert len(store) == 0  # nothing half-written
    else:
        assert len(store) == 1


@FUZZ
@seed(20261128)
@given(
    max_new=st.integers(-3, 50), temp=st.floats(-1, 3, allow_nan=False), top_p=st.floats(-1, 2, allow_nan=False),
    sample=st.booleans(),
)  # fmt: skip
def test_sampling_params_refuse_what_generate_cannot_do(max_new, temp, top_p, sample):
    from expertmap.actors.sampling import SamplingParams

    try:
        p = SamplingParams(max_new_tokens=max_new, do_sample=sample, temperature=temp, top_p=top_p)
    except ValueError as exc:
        assert str(exc)
    else:
        assert p.max_new_tokens >= 1 and 0 < p.top_p <= 1 and (not sample or p.temperature > 0)
