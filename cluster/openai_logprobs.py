"""Log-probabilities in OpenAI's response shapes, from the token ids and floats the last stage returns.

The last stage (``actors.shard.ShardRuntime._finish``) computes them from the model's raw logits
(log-softmax in float32, before temperature, top-k, top-p or the end-of-sequence suppression of
``min_tokens``) and sends back ids and floats only; here they get their text:

- ``/v1/completions``: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; each
  ``top_logprobs`` entry maps token text to log-probability for the N most likely tokens and the
  chosen one (OpenAI's legacy shape: at most N + 1 entries; two tokens with the same text keep the
  more likely one). With ``echo`` the prompt's tokens come first; the first has no log-probability
  (``null``, as OpenAI and vLLM answer). ``text_offset`` is each token's offset in the choice's
  text, counted as the sum of the lengths of the token texts before it.
- ``/v1/chat/completions``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}], "refusal": null}``.

A token's text is its bytes decoded as UTF-8 (a token that holds part of a character shows U+FFFD;
its ``bytes`` are exact). Log-probabilities below ``FLOOR`` are sent as ``FLOOR`` (JSON has no -inf).
"""

from __future__ import annotations

import functools

FLOOR = -9999.0  # OpenAI's floor for log-probabilities too small to show

# one (token id, log-probability, top [(id, logprob)]) per token; logprob None for a prompt's first
Entry = tuple[int, float | None, list[tuple[int, float]] | None]


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE token uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenText:
    """Each token id's bytes and text, cached (a replica decodes the same few thousand ids again and again)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        b = self._bytes.get(token)
        if b is None:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            decoder = _byte_decoder()
            if isinstance(piece, str) and piece and all(c in decoder for c in piece):  # byte-level BPE
                b = bytes(decoder[c] for c in piece)
            else:  # other tokenizers: the id decoded alone
                b = self.tokenizer.decode([token]).encode("utf-8")
            self._bytes[token] = b
        return b

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")


def _lp(value: float) -> float:
    return max(float(value), FLOOR)


def completion_logprobs(text: TokenText, entries: list[Entry], offset: int) -> tuple[dict, int]:
    """The completions shape for ``entries``, their text offsets starting at ``offset``; and the
    offset after them (a stream continues from it)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in entries:
        t = text.text(token)
        out["tokens"].append(t)
        out["text_offset"].append(offset)
        offset += len(t)
        if logprob is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(logprob))
        tops: dict[str, float] = {}
        for tid, value in top or []:  # most likely first: a repeated text keeps the more likely token
            tops.setdefault(text.text(tid), _lp(value))
        tops.setdefault(t, _lp(logprob))
        out["top_logprobs"].append(tops)
    return out, offset


def chat_logprobs(text: TokenText, entries: list[Entry]) -> dict:
    """The chat shape for ``entries`` (generated tokens: each has a log-probability)."""

    def one(token: int, logprob: float) -> dict:
        return {"token": text.text(token), "logprob": _lp(logprob), "bytes": list(text.bytes(token))}

    return {"content": [{**one(token, logprob), "top_logprobs": [one(t, v) for t, v in top or []]}
                        for token, logprob, top in entries], "refusal": None}  # fmt: skip


def prompt_entries(prompt: list[int], prompt_logprobs: list | None) -> list[Entry]:
    """The prompt's tokens as entries: the first without a log-probability, the others with the
    stage's ``(logprob, top)`` of each (None when none were computed: every token without)."""
    if prompt_logprobs is None:
        return [(t, None, None) for t in prompt]
    return [(prompt[0], None, None)] + [(t, lp, top) for t, (lp, top) in zip(prompt[1:], prompt_logprobs, strict=True)]
