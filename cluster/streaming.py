"""From the scheduler's tokens to text: incremental detokenizing, stop strings, server-sent events.

``TextTracker`` turns one choice's token ids into text as they arrive, at a cost per token that
does not grow with the output (it decodes only a small window of recent tokens, see the class).
``Job`` is one HTTP request's ``n`` choices in the pipeline: the scheduler thread's callbacks only
hand each token to the replica's event loop, where the trackers decode it, so the thread that
drives every request in flight does no text work. ``sse`` writes one server-sent event.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable

from expertmap.cluster.openai_schemas import GenerationBody

REPLACEMENT = "\ufffd"  # what an unfinished UTF-8 character decodes to


class TextTracker:
    """The text of one choice as its tokens arrive.

    The incremental detokenizer pattern: ``_prefix`` and ``_read`` are offsets into the token ids.
    ``ids[_prefix:_read]`` is a few tokens already turned into text, kept as context (a tokenizer
    may decode a token differently at the start of a text, e.g. SentencePiece's leading space);
    each new token decodes only ``ids[_prefix:]`` and the text beyond the context's is new. Text
    that ends in U+FFFD (an unfinished UTF-8 character split over byte tokens) waits for the next
    token. So each token costs a decode of a handful of tokens, whatever the output's length.

    Stop strings: new text is searched together with the text held back (``_pending``): the
    longest end that could still start a stop string is held back, the rest goes to ``emit``. A
    stop string that straddles token boundaries is found once its last piece arrives; the text is
    cut where it begins (the first stop string, as in ``decode(ids)[:text.find(stop)]``), then
    ``hit_stop`` is set and nothing more is emitted or decoded. ``finish`` emits what is held back
    (an unfinished character too, as the full decode would).
    """

    def __init__(self, tokenizer, stops: list[str], emit: Callable[[str], None]):
        self.tokenizer, self.stops, self.emit = tokenizer, list(stops), emit
        self.ids: list[int] = []  # the tokens taken (up to the one that completed a stop string)
        self.hit_stop = False
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""  # decode(ids[_prefix:_read])
        self._pending = ""  # decoded, not yet emitted: could be the start of a stop string
        self._pieces: list[str] = []
        self._emitted: str | None = ""

    @property
    def emitted(self) -> str:
        """Everything emitted so far."""
        if self._emitted is None:
            self._emitted = "".join(self._pieces)
        return self._emitted

    @property
    def tokens(self) -> int:
        """Tokens this choice's text is made of (those after a stop string are not taken)."""
        return len(self.ids)

    def add(self, token: int) -> None:
        if self.hit_stop:
            return
        self.ids.append(token)
        self._scan(self._decode_new(final=False), final=False)

    def finish(self) -> None:
        if self.hit_stop:
            return
        self._scan(self._decode_new(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self, final: bool) -> str:
        """The text the tokens since ``_read`` add ("" while it ends in an unfinished character)."""
        if self._read == len(self.ids):
            return ""
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or (text.endswith(REPLACEMENT) and not final):
            return ""
        new = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        return new

    def _scan(self, new: str, final: bool) -> None:
        text = self._pending + new
        if not text:
            return
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            safe, self._pending, self.hit_stop = text[: min(cuts)], "", True
        elif final:
            safe, self._pending = text, ""
        else:
            hold = 0
            for s in self.stops:
                for k in range(min(len(s) - 1, len(text)), hold, -1):
                    if text.endswith(s[:k]):
                        hold = k
                        break
            safe, self._pending = text[: len(text) - hold], text[len(text) - hold :]
        if safe:
            self._pieces.append(safe)
            self._emitted = None
            self.emit(safe)


def sse(obj) -> str:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Job:
    """One HTTP request: its ``n`` choices run in the pipeline at once.

    The pipeline calls ``on_token`` and ``on_done`` on its scheduler thread; they only post the
    token (or the finished request) to ``loop`` (``call_soon_threadsafe``, which keeps their
    order). On the loop, each choice's ``TextTracker`` decodes it and the job puts events on
    ``events``: ``("delta", i, text)``, ``("choice", i, text, finish_reason, request, tokens)``,
    ``("error", i, message)`` and, once every choice ended, ``("done",)``. A choice whose text hit
    a stop string is cancelled; tokens the pipeline made after it are not part of its text, nor
    of its ``tokens`` count.
    """

    def __init__(self, pipeline, tokenizer, eos_ids: set[int], ids: list[int], max_tokens: int, body: GenerationBody,
                 loop: asyncio.AbstractEventLoop):  # fmt: skip
        self.pipeline, self.tokenizer, self.eos_ids = pipeline, tokenizer, eos_ids
        self.ids, self.max_tokens, self.body, self.loop = ids, max_tokens, body, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        self.requests: list = []
        self.trackers: list[TextTracker] = []
        self.left = body.n
        self.closed = False  # admission slot given back

    def _send(self, *event) -> None:  # on the loop
        self.events.put_nowait(event)

    def start(self) -> None:
        """Submit the choices (on the loop: their callbacks run there only after this returns)."""
        from expertmap.actors.sampling import SamplingParams

        body = self.body
        for i in range(body.n):
            params = SamplingParams(max_new_tokens=self.max_tokens, do_sample=body.temperature > 0, seed=self.seed + i,
                                    temperature=body.temperature or 1.0, top_p=body.top_p, min_new_tokens=0)  # fmt: skip
            self.trackers.append(TextTracker(self.tokenizer, body.stop or [], lambda d, i=i: self._send("delta", i, d)))
            self.requests.append(self.pipeline.submit(
                self.ids, params,
                on_token=lambda t, i=i: self.loop.call_soon_threadsafe(self._token, i, t),
                on_done=lambda r, i=i: self.loop.call_soon_threadsafe(self._done, i, r),
            ))  # fmt: skip

    def _token(self, i: int, token: int) -> None:
        tracker = self.trackers[i]
        if tracker.hit_stop:
            return
        tracker.add(token)
        if tracker.hit_stop:
            self.requests[i].cancel()  # the text is already cut

    def _done(self, i: int, req) -> None:
        tracker = self.trackers[i]
        if req.error is not None:
            self._send("error", i, str(req.error))
        else:
            tracker.finish()
            stop = tracker.hit_stop or req.finish_reason == "stop" or bool(req.tokens and req.tokens[-1] in self.eos_ids)
            self._send("choice", i, tracker.emitted, "stop" if stop else "length", req, tracker.tokens)
        self.left -= 1
        if self.left == 0:
            self._send("done")

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()
