"""The OpenAI request bodies the routes parse, and the OpenAI-style errors they answer with.

``parse_body`` turns a raw body into ``ChatBody`` or ``CompletionBody`` (pydantic, strict types) or
raises ``APIError`` 400 naming the parameter; ``APIError.response()`` is the JSON error response.
"""

# no `from __future__ import annotations`: pydantic and FastAPI read these annotations at runtime
import json
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

MAX_N = 4  # choices per prompt at most
MAX_PROMPTS = 32  # prompts per /v1/completions request at most (a list of strings or of token-id lists)
MAX_LOGPROBS = 20  # top log-probabilities per position at most (actors.sampling.MAX_LOGPROBS)
MAX_STOPS = 4  # stop sequences per request at most
RETRY_AFTER_S = 1  # the Retry-After of 429 and 503 answers
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error answered as an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # a last chunk with the usage of the whole request
    continuous_usage_stats: bool = False  # vLLM's extension: every chunk carries the usage so far


class GenerationBody(BaseModel):
    """What both generation routes take. A parameter this server does not know is refused (400
    naming it, as OpenAI does), except the few in ``IGNORED_PARAMETERS``; the known ones it cannot
    honour (``REFUSED_PARAMETERS``) are refused unless they hold their neutral value
    (``parse_body``; docs/evaluating.md lists both)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the same limit (OpenAI's newer name); both given must agree
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension (benchmark clients): run to max_tokens whatever the model says
    min_tokens: int = 0  # vLLM's extension: no end-of-sequence before this many tokens

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _max_tokens(cls, v, info: ValidationInfo):
        if v is not None and v < 0:
            raise ValueError(f"{info.field_name} {v} is negative")
        other = info.data.get("max_tokens") if info.field_name == "max_completion_tokens" else None
        if v is not None and other is not None and other != v:
            raise ValueError(f"max_completion_tokens {v} and max_tokens {other} disagree; give one of them")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v):
        if v < 0:
            raise ValueError(f"min_tokens {v} is negative")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if not 0.0 <= v <= 2.0:
            raise ValueError(f"temperature {v} is out of range: it must be in [0, 2]")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"top_p {v} is out of range: it must be in (0, 1]")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if not 1 <= v <= MAX_N:
            raise ValueError(f"n {v} is out of range: this server returns 1 to {MAX_N} choices")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not 0 <= v < 2**63:
            raise ValueError(f"seed {v} is out of range: it must be in [0, 2**63)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"{len(stops)} stop sequences: at most {MAX_STOPS}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def limit(self) -> int | None:
        """The completion's token limit: ``max_completion_tokens`` or ``max_tokens`` (None: the default)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(GenerationBody):
    messages: list[Message]
    logprobs: bool = False  # each new token's log-probability
    top_logprobs: int | None = None  # and the N most likely tokens at its position (needs logprobs)

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("messages must hold at least one message")
        if not any(m.text().strip() for m in v):
            raise ValueError("messages hold no text")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v, info: ValidationInfo):
        if v is None:
            return v
        if not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs {v} is out of range: it must be in [0, {MAX_LOGPROBS}]")
        if not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v


def _describe(v) -> str:
    return type(v).__name__ if v is not None else "null"


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False  # the prompt is part of the choice's text (and of its logprobs)
    suffix: str | None = None
    logprobs: int | None = None  # the log-probabilities of each token and of the N most likely

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        """Say what is wrong in the client's terms (pydantic's union errors name the first member)."""
        shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("prompt is empty")
            return v
        if not isinstance(v, list):
            raise ValueError(f"prompt must be {shapes}; got {_describe(v)}")  # noqa: TRY004 (pydantic: a 400)
        if not v:
            raise ValueError("prompt is empty (an empty list)")
        if len(v) > MAX_PROMPTS and not all(type(x) is int for x in v):
            raise ValueError(f"{len(v)} prompts: this server takes at most {MAX_PROMPTS} per request")
        if all(isinstance(x, str) for x in v):
            for j, x in enumerate(v):
                if not x.strip():
                    raise ValueError(f"prompt[{j}] is empty")
            return v
        if all(type(x) is int for x in v):
            return v
        if all(isinstance(x, list) for x in v):
            for j, x in enumerate(v):
                if not x:
                    raise ValueError(f"prompt[{j}] is an empty list of token ids")
                bad = next((t for t in x if type(t) is not int), "none")
                if bad != "none":
                    raise ValueError(f"prompt[{j}] holds {_describe(bad)} {bad!r}: a token-id list holds integers only")
            return v
        kinds = sorted({_describe(x) for x in v})
        raise ValueError(f"prompt must be {shapes}; got a list of {', '.join(kinds)}")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by this server (no fill-in-the-middle)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"logprobs {v} is out of range: it must be in [0, {MAX_LOGPROBS}] (OpenAI's limit is 5, "
                             f"this server's {MAX_LOGPROBS})")  # fmt: skip
        return v

    def prompts(self) -> list:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and type(p[0]) is int):
            return [p]
        return list(p)


# Known parameters this server cannot honour: refused with a 400 naming them unless they hold
# their neutral value (the one that changes nothing). Why, in the client's terms.
_NO_CONSTRAINED = ("this server does not constrain decoding (JSON mode, JSON schemas and grammars are not "
                   "implemented); leave it out or send {\"type\": \"text\"}")  # fmt: skip
_NO_TOOLS = "tool and function calling is not supported by this server; leave it out"
REFUSED_PARAMETERS: dict[str, tuple[tuple, str]] = {
    "response_format": ((None, {"type": "text"}), _NO_CONSTRAINED),
    "tools": ((None, []), _NO_TOOLS),
    "tool_choice": ((None, "none"), _NO_TOOLS),
    "functions": ((None, []), _NO_TOOLS),
    "function_call": ((None, "none"), _NO_TOOLS),
    "guided_json": ((None,), _NO_CONSTRAINED),
    "guided_regex": ((None,), _NO_CONSTRAINED),
    "guided_choice": ((None,), _NO_CONSTRAINED),
    "guided_grammar": ((None,), _NO_CONSTRAINED),
    "structured_outputs": ((None,), _NO_CONSTRAINED),
    "presence_penalty": ((None, 0), "penalties are not implemented; leave it out or send 0"),
    "frequency_penalty": ((None, 0), "penalties are not implemented; leave it out or send 0"),
    "repetition_penalty": ((None, 1), "penalties are not implemented; leave it out or send 1"),
    "logit_bias": ((None, {}), "logit_bias is not implemented; leave it out"),
    "best_of": ((None, 1), "best_of is not implemented; use n"),
    "top_k": ((None,), "top_k is the model's own (generation_config.json); leave it out"),
    "min_p": ((None, 0), "min_p is not implemented; leave it out or send 0"),
    "modalities": ((None, ["text"]), "this server produces text only"),
    "audio": ((None,), "this server produces text only"),
    "prediction": ((None,), "predicted outputs are not implemented; leave it out"),
    "reasoning_effort": ((None,), "the served model has no reasoning setting; leave it out"),
    "web_search_options": ((None,), "web search is not available; leave it out"),
}
# Accepted and without effect (docs/evaluating.md says so): bookkeeping fields of OpenAI's API.
IGNORED_PARAMETERS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


def _neutral(value, neutral: tuple) -> bool:
    return any(value == n and type(value) is not bool for n in neutral if n is not None) or value is None


def _check_extra(body: GenerationBody) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in IGNORED_PARAMETERS:
            continue
        if name in REFUSED_PARAMETERS:
            neutral, why = REFUSED_PARAMETERS[name]
            if _neutral(value, neutral):
                continue
            raise APIError(400, f"{name} {json.dumps(value)[:80]} is not supported: {why}.", param=name,
                           code="unsupported_parameter")  # fmt: skip
        raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options",
                       code="invalid_value")  # fmt: skip


_UNION_TAGS = {"str", "int", "float", "bool", "none", "TextPart"}


def parse_body(cls: type[BaseModel], raw: bytes):
    """``raw`` as a ``cls`` body, or an ``APIError`` 400 that names the parameter and the reason."""
    try:
        body = cls.model_validate_json(raw or b"")
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"We could not parse the JSON body of your request: {err['msg']}", code="invalid_json") from None
        # drop pydantic's union-member tags ("str", "list[str]", ...) from the location
        loc = [str(p) for j, p in enumerate(err.get("loc", ()))
               if j == 0 or not (str(p) in _UNION_TAGS or str(p).startswith(("list[", "dict[", "function-")))]  # fmt: skip
        param = ".".join(loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = f"Missing required parameter: {param!r}."
        elif err["type"] == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        elif param:
            msg = f"Invalid value for {param!r}: {msg}"
        if err["type"] == "model_type":
            msg, param = "the request body must be a JSON object", None
        raise APIError(400, msg, param=param, code="invalid_value" if err["type"] != "missing" else "missing_required_parameter") from None
    _check_extra(body)
    return body


def generation_error(message: str) -> APIError:
    """A failed generation as an HTTP error: 503 (retry) when a stage failed or the server shuts
    down, 500 otherwise."""
    retry = any(name in message for name in ("pipeline stage failed", "shut down"))
    if retry:
        return APIError(503, f"generation interrupted: {message}", type="server_error", code="unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    return APIError(500, f"generation failed: {message}", type="server_error", code="internal_error")
