"""The OpenAI wire format of the local API: request bodies, errors and the shapes of answers and stream chunks.

Pure values and functions: no FastAPI, no model, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmops.runtime.backend import Sampling
from slmops.runtime.host import ModelInfo

__all__ = [
    "ApiError",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "Done",
    "GenerationRequest",
    "Kind",
    "bad_request",
    "chunker",
    "error_body",
    "full_response",
    "model_entry",
    "model_not_found",
    "sse",
    "too_long",
    "usage_chunk",
]

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024

Kind = Literal["chat", "text"]


class GenerationRequest(BaseModel):
    """Sampling options shared by both endpoints. Unknown OpenAI fields (``user``, ``logprobs``…) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(items)}")
        if any(len(item) > MAX_STOP_CHARS for item in items):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return value

    def stops(self, info: ModelInfo) -> list[str]:
        items = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return list(dict.fromkeys(s for s in [*items, *info.stop_tokens] if s))

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling(self, info: ModelInfo, max_tokens_limit: int) -> Sampling:
        """The backend's options for this request; at most ``max_tokens_limit`` new tokens (also the default)."""
        requested = self.max_tokens or self.max_completion_tokens or max_tokens_limit
        if requested > max_tokens_limit:
            raise bad_request(
                f"max_tokens is {requested}; this device allows at most {max_tokens_limit}", "max_tokens", "max_tokens"
            )
        return Sampling(
            max_tokens=requested, temperature=self.temperature, top_p=self.top_p, stop=self.stops(info), seed=self.seed
        )

    def require_model(self, info: ModelInfo) -> None:
        """Raise a 404 :class:`ApiError` unless the request names ``info``'s model (or names none)."""
        if self.model and self.model not in info.names:
            raise model_not_found(self.model, info)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ApiError(Exception):
    """An error answer: HTTP ``status`` and OpenAI's ``{"message", "type", "param", "code"}``."""

    def __init__(self, status: int, message: str, type_: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param


def error_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def too_long(size: int, limit: int, param: str) -> ApiError:
    return bad_request(
        f"the {param} have {size} characters; this device accepts at most {limit}: shorten them",
        "prompt_too_long",
        param,
    )


def model_not_found(requested: str, info: ModelInfo | None) -> ApiError:
    """404 for a model this device does not serve (OpenAI's, Ollama's and llama.cpp's answer); the requested name
    is the caller's own identifier, not prompt text, so the message may quote it."""
    served = "no model" if info is None else "only " + ", ".join(f"'{name}'" for name in info.names)
    return ApiError(
        404,
        f"the model '{requested}' is not served here; this device serves {served}: "
        "send one of those names (or omit model for the active one), see GET /v1/models",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def model_entry(info: ModelInfo) -> dict[str, Any]:
    return {"id": info.model_id, "object": "model", "created": 0, "owned_by": "slmops", "digest": info.digest}


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def full_response(kind: Kind, ident: str, created: int, model_id: str, text: str, done: Done) -> dict[str, Any]:
    """The body of a non-streamed answer."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": done.finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
    return {
        "id": ident,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model_id,
        "choices": [choice],
        "usage": _usage(done),
    }


def chunker(
    kind: Kind, ident: str, created: int, model_id: str, include_usage: bool
) -> Callable[[Any, str | None], dict[str, Any]]:
    """A function making the stream chunks of one answer from a delta (chat) or text piece and a finish reason."""

    def chunk(delta: Any, finish_reason: str | None) -> dict[str, Any]:
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        value: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": model_id,
            "choices": [choice],
        }
        if include_usage:
            value["usage"] = None
        return value

    return chunk


def usage_chunk(chunk: Callable[[Any, str | None], dict[str, Any]], done: Done) -> dict[str, Any]:
    """The last chunk of a stream that asked for ``stream_options.include_usage``: no choices, the usage."""
    value = chunk(None, None)
    value["choices"] = []
    value["usage"] = _usage(done)
    return value


def sse(value: dict[str, Any]) -> str:
    return "data: " + json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n\n"
