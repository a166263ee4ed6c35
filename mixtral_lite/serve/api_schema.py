"""OpenAI request bodies (pydantic, strict types) and OpenAI's error shape.

Validation errors become `{"error": {"message", "type", "param", "code"}}` with status 400 and
`param` naming the offending field ("messages.0.content", "max_tokens"), as OpenAI answers.
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
    """Fields both endpoints take; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)  # an extension (llama-server, vLLM)
    seed: StrictInt | None = None
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


def parse(kind: type[Sampling], raw: bytes) -> Sampling:
    """The request body as `kind`, or an ApiError (400) naming the offending field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_body")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # keep field names and list indices; drop pydantic's union-branch tags ("str", "list[TextPart]")
        param = ".".join(str(x) for x in err["loc"] if isinstance(x, int) or x in _FIELDS)
        raise ApiError(400, f"{param}: {err['msg']}", param, "invalid_value") from None


_FIELDS = set(ChatRequest.model_fields) | set(CompletionRequest.model_fields) | {
    "role", "content", "type", "text", "include_usage"}
