"""The OpenAI request bodies the routes parse, and the OpenAI-style errors they answer with.

``parse_body`` turns a raw body into ``ChatBody`` or ``CompletionBody`` (pydantic, strict types) or
raises ``APIError`` 400 naming the parameter; ``APIError.response()`` is the JSON error response.
"""

# no `from __future__ import annotations`: pydantic and FastAPI read these annotations at runtime
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

MAX_N = 4  # choices per request at most
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


class GenerationBody(BaseModel):
    """What both generation routes take (OpenAI's fields; unknown ones are ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v is not None and v < 1:
            raise ValueError("max_tokens must be at least 1")
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
            raise ValueError("seed must be in [0, 2**63)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v not in (None, False):
            raise ValueError("logprobs are not supported by this server")
        return v


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
    max_completion_tokens: int | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("messages must hold at least one message")
        if not any(m.text().strip() for m in v):
            raise ValueError("messages hold no text")
        return v


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("this server takes one prompt per request (a string, [string] or token ids)")
            v = v[0]
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("prompt is empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by this server")
        return v


_UNION_TAGS = {"str", "int", "float", "bool", "none", "TextPart"}


def parse_body(cls: type[BaseModel], raw: bytes):
    """``raw`` as a ``cls`` body, or an ``APIError`` 400 that names the parameter and the reason."""
    try:
        return cls.model_validate_json(raw or b"")
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
        elif param:
            msg = f"Invalid value for {param!r}: {msg}"
        if err["type"] == "model_type":
            msg, param = "the request body must be a JSON object", None
        raise APIError(400, msg, param=param, code="invalid_value" if err["type"] != "missing" else "missing_required_parameter") from None


def generation_error(message: str) -> APIError:
    """A failed generation as an HTTP error: 503 (retry) when a stage failed or the server shuts
    down, 500 otherwise."""
    retry = any(name in message for name in ("pipeline stage failed", "shut down"))
    if retry:
        return APIError(503, f"generation interrupted: {message}", type="server_error", code="unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    return APIError(500, f"generation failed: {message}", type="server_error", code="internal_error")
