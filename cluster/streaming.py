"""From the scheduler's tokens to text: incremental detokenizing, stop strings, server-sent events.

``TextTracker`` turns one choice's token ids into text as they arrive, at a cost per token that
does not grow with the output (it decodes only a small window of recent tokens, see the class).
``Job`` is one HTTP request's choices in the pipeline: the scheduler thread's callbacks only
hand each token to the replica's event loop, where the trackers decode it, so the thread that
drives every request in flight does no text work. ``sse`` writes one server-sent event.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from expertmap.cluster.openai_logprobs import Entry
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


@dataclass
class ChoiceSpec:
    """One choice of a request: its index in the response, its prompt and its token limit."""

    index: int
    prompt: list[int]
    max_tokens: int  # 0: no new token (the prompt is scored: ``echo`` with ``logprobs``)
    prompt_index: int = 0


@dataclass
class Echo:  # the choice's prompt, first, when the request asks for echo
    index: int
    text: str
    logprobs: list[Entry]  # with log-probabilities from position 1 when they were asked for


@dataclass
class Delta:  # new text of a choice, and the tokens (count, and entries when logprobs are on) since the last
    index: int
    text: str
    tokens: int
    logprobs: list[Entry]


@dataclass
class ChoiceDone:  # every delta of the choice was sent before
    index: int
    text: str
    finish_reason: str
    request: object  # the PipelineRequest
    tokens: int  # tokens of its text (a stop string's tail not counted), = len(logprobs) when they are on
    logprobs: list[Entry]
    pending: list[Entry]  # entries not yet sent with a Delta (their text was held back)


@dataclass
class ChoiceFailed:
    index: int
    message: str


DONE = "done"


class Job:
    """One HTTP request: its choices (``n`` per prompt) run in the pipeline at once.

    The pipeline calls ``on_token`` and ``on_done`` on its scheduler thread; they only post the
    token (or the finished request) to ``loop`` (``call_soon_threadsafe``, which keeps their
    order). On the loop, each choice's ``TextTracker`` decodes it and the job puts events on
    ``events``: per choice ``Echo`` (with ``echo``), ``Delta``s, then ``ChoiceDone`` or
    ``ChoiceFailed``; once every choice ended, ``DONE``. A choice whose text hit a stop string is
    cancelled; tokens the pipeline made after it are not part of its text, nor of its ``tokens``
    count. ``logprobs`` (None: off) is the top N the last stage adds to each new token;
    ``prompt_logprobs`` the same for the prompt's tokens (``echo``).
    """

    def __init__(self, pipeline, tokenizer, eos_ids: set[int], choices: list[ChoiceSpec], body: GenerationBody,
                 loop: asyncio.AbstractEventLoop, logprobs: int | None = None, prompt_logprobs: int | None = None,
                 echo: bool = False):  # fmt: skip
        self.pipeline, self.tokenizer, self.eos_ids = pipeline, tokenizer, eos_ids
        self.choices, self.body, self.loop = choices, body, loop
        self.logprobs, self.prompt_logprobs, self.echo = logprobs, prompt_logprobs, echo
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        self.requests: list = []
        self.trackers: list[TextTracker] = []
        self.left = len(choices)
        self.closed = False  # admission slot given back
        self._seen = [0] * len(choices)  # tokens delivered per choice
        self._echoed = [False] * len(choices)
        self._text: list[list[str]] = [[] for _ in choices]  # emitted, not yet sent
        self._pending: list[list[Entry]] = [[] for _ in choices]  # entries not yet sent
        self._sent_tokens = [0] * len(choices)
        self._entries: list[list[Entry]] = [[] for _ in choices]

    def _send(self, event) -> None:  # on the loop
        self.events.put_nowait(event)

    def start(self) -> None:
        """Submit the choices (on the loop: their callbacks run there only after this returns)."""
        from expertmap.actors.sampling import SamplingParams

        body = self.body
        for k, spec in enumerate(self.choices):
            new = max(1, spec.max_tokens)  # max_tokens 0: one token is made and dropped (the prompt is scored)
            params = SamplingParams(max_new_tokens=new, do_sample=body.temperature > 0, seed=self.seed + spec.index,
                                    temperature=body.temperature or 1.0, top_p=body.top_p,
                                    min_new_tokens=min(body.min_tokens, new), ignore_eos=body.ignore_eos,
                                    logprobs=self.logprobs if spec.max_tokens > 0 else None,
                                    prompt_logprobs=self.prompt_logprobs)  # fmt: skip
            self.trackers.append(TextTracker(self.tokenizer, body.stop or [], self._text[k].append))
            self.requests.append(self.pipeline.submit(
                spec.prompt, params,
                on_token=lambda t, k=k: self.loop.call_soon_threadsafe(self._token, k, t),
                on_done=lambda r, k=k: self.loop.call_soon_threadsafe(self._done, k, r),
            ))  # fmt: skip

    def _send_echo(self, k: int) -> None:
        if not self.echo or self._echoed[k]:
            return
        from expertmap.cluster.openai_logprobs import prompt_entries

        self._echoed[k] = True
        spec, req = self.choices[k], self.requests[k]
        entries = prompt_entries(spec.prompt, req.prompt_logprobs if self.prompt_logprobs is not None else None)
        self._send(Echo(spec.index, self.tokenizer.decode(spec.prompt, skip_special_tokens=True), entries))

    def _flush(self, k: int) -> None:
        if self._text[k]:
            tracker = self.trackers[k]
            text = "".join(self._text[k])
            self._text[k].clear()
            pending, self._pending[k] = self._pending[k], []
            self._send(Delta(self.choices[k].index, text, tracker.tokens - self._sent_tokens[k], pending))
            self._sent_tokens[k] = tracker.tokens

    def _token(self, k: int, token: int) -> None:
        tracker, req = self.trackers[k], self.requests[k]
        seen = self._seen[k]
        self._seen[k] += 1
        self._send_echo(k)
        if tracker.hit_stop or self.choices[k].max_tokens == 0:
            return
        tracker.add(token)
        if self.logprobs is not None and len(tracker.ids) > len(self._entries[k]):
            logprob, top = req.logprobs[seen]
            entry = (token, logprob, top)
            self._entries[k].append(entry)
            self._pending[k].append(entry)
        self._flush(k)
        if tracker.hit_stop:
            req.cancel()  # the text is already cut

    def _done(self, k: int, req) -> None:
        tracker, spec = self.trackers[k], self.choices[k]
        if req.error is not None:
            self._send(ChoiceFailed(spec.index, str(req.error)))
        else:
            self._send_echo(k)
            tracker.finish()
            self._flush(k)
            eos = bool(req.tokens and req.tokens[-1] in self.eos_ids) and not self.body.ignore_eos
            stop = spec.max_tokens > 0 and (tracker.hit_stop or req.finish_reason == "stop" or eos)
            pending, self._pending[k] = self._pending[k], []
            self._send(ChoiceDone(spec.index, tracker.emitted, "stop" if stop else "length", req, tracker.tokens,
                                  self._entries[k], pending))  # fmt: skip
        self.left -= 1
        if self.left == 0:
            self._send(DONE)

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()
