"""OpenAI request bodies (pydantic, strict types) and OpenAI's error shape.

Validation errors become `{"error": {"message", "type", "param", "code"}}` with status 400 and
`param` naming the offending field ("messages.0.content", "max_tokens"), as OpenAI answers. Every field
is checked at the boundary: types and ranges (a seed torch can take), text that is valid Unicode (no
lone surrogates, which JSON's \\ud800 escapes can carry), and OpenAI fields this server does not
implement (logprobs, tools, response_format, penalties, ...) are refused by name unless they hold
their no-op value; fields OpenAI does not define are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

Number = StrictFloat | StrictInt


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """Fields both endpoints take (see the module docstring for the ones refused and ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)  # an extension (llama-server, vLLM)
    seed: StrictInt | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.Generator takes
    stop: StrictStr | list[StrictStr] | None = Field(None)
    n: StrictInt = Field(1, ge=1, le=1)
    ignore_eos: StrictBool = False  # an extension (llama-server): keep going past the end-of-sequence token
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 stop strings", "stop")
        return stops


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictStr]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "prompt: only one prompt per request", "prompt")
        return self.prompt[0]


# OpenAI fields not implemented here, with the values that ask for nothing (accepted: clients send defaults)
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
    "audio": (None,), "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,),
}


def parse(kind: type[Sampling], raw: bytes) -> Sampling:
    """The request body as `kind`, or an ApiError (400) naming the offending field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_body")
    bad = _not_unicode(body)
    if bad is not None:
        raise ApiError(400, f"{bad}: not valid Unicode text (a lone UTF-16 surrogate, e.g. \\ud800)", bad,
                       "invalid_value")
    for name, no_ops in UNSUPPORTED.items():
        if name in body and not any(_same(body[name], v) for v in no_ops):
            raise ApiError(400, f"{name}: not supported by this server (leave it out)", name, "unsupported_parameter")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # keep field names and list indices; drop pydantic's union-branch tags ("str", "list[TextPart]")
        param = ".".join(str(x) for x in err["loc"] if isinstance(x, int) or x in _FIELDS)
        raise ApiError(400, f"{param}: {err['msg']}", param, "invalid_value") from None


def _same(a, b) -> bool:
    """a == b, where a bool only equals a bool (JSON's false is not 0) and 0.0 equals 0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _not_unicode(value, path: str = "") -> str | None:
    """The path ("messages.0.content") of the first string that UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            if (bad := _not_unicode(k, path) or _not_unicode(v, f"{path}.{k}" if path else str(k))) is not None:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (bad := _not_unicode(v, f"{path}.{i}")) is not None:
                return bad
    return None


_FIELDS = set(ChatRequest.model_fields) | set(CompletionRequest.model_fields) | {
    "role", "content", "type", "text", "include_usage"}
