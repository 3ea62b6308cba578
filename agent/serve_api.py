"""The request and response shapes of `kagent serve`'s OpenAI-compatible API, and its errors.

Requests are checked strictly: unknown fields, wrong types ("yes" for a boolean, "1" for a number), values out of
range and parameters this server does not implement are a 400 naming the field, in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`. Temperature defaults to 0 (greedy), unlike OpenAI's 1, so an
answer is reproducible: the same prompt under the same committed batch gives the same text.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP = 4  # stop strings per request, as OpenAI allows


class ApiError(Exception):
    """A request answered with an error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it ("developer" is OpenAI's newer name for the system role)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Strict):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
StopText = Annotated[str, Field(min_length=1)]


class _Generation(_Strict):
    """Parameters both endpoints take."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    n: Literal[1] = 1
    seed: int | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Generation):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def requested_tokens(self) -> int | None:
        return self.max_tokens


def _param(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI names a parameter ("messages.0.role"), union branch tags left out."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and not p[:1].isupper()
                                                            and p not in ("str", "int", "float", "bool"))]
    return ".".join(parts) or None


def parse(cls: type[_Strict], body: bytes) -> Any:
    """The request `body` as `cls`; a 400 naming the first bad field otherwise."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        raise ApiError(400, f"the request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}",
                       code="invalid_json")
    param = _param(first["loc"])
    if param is None:
        raise ApiError(400, f"the request body must be a JSON object: {first['msg']}", code="invalid_json")
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(cls.model_fields) if "." not in param else "see the API reference"
        raise ApiError(400, f"unknown field '{param}' (allowed: {allowed})", param=param, code="unknown_field")
    if first["type"] == "missing":
        raise ApiError(400, f"missing required field '{param}'", param=param, code="missing_field")
    same = [e["msg"] for e in errors if (_param(e["loc"]) or "").split(".")[0] == param.split(".")[0]]
    reasons = "; or ".join(dict.fromkeys(same[:3]))
    raise ApiError(400, f"field '{param}': {reasons}", param=param, code="invalid_value")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def fingerprint_of(batch: int) -> str:
    """`system_fingerprint` of a response: the committed batch it was generated with (OpenAI's field for the
    backend configuration that produced an answer)."""
    return f"kagent-b{batch}"


def envelope(kind: str, rid: str, model: str, batch: int, choices: list, created: int | None = None) -> dict:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model,
            "system_fingerprint": fingerprint_of(batch), "choices": choices}


def chat_choice(text: str, finish: str | None) -> dict:
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}


def chat_delta(delta: dict, finish: str | None) -> dict:
    return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}


def text_choice(text: str, finish: str | None) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}


def sse(data: dict | str) -> bytes:
    """One server-sent event (`data: ...` and a blank line)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
