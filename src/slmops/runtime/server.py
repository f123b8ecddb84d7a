"""The device's local OpenAI-compatible API, on 127.0.0.1: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions`` (both with ``stream``), ``/health``.

Prompts and answers go only to the local caller: nothing here logs them, and errors never quote them.
Generation runs in a thread pool, one worker per request, never on the event loop; the worker holds a lease on the
model (:class:`~slmops.runtime.host.ModelHost`), so a request that started before a model switch finishes on the
old model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmops.errors import InvalidModelError, MissingExtraError, RuntimeBackendError, UnavailableError
from slmops.runtime.backend import Backend
from slmops.runtime.chat import message_text, render_chat
from slmops.runtime.host import ModelHost, ModelInfo
from slmops.runtime.stats import RequestStats

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.responses import Response

__all__ = ["ChatRequest", "CompletionRequest", "create_app"]

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024


class _Request(BaseModel):
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class _ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param


def _bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> _ApiError:
    return _ApiError(400, message, "invalid_request_error", code, param)


@dataclass
class _Done:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class _Generation:
    """One request's generation in a worker thread, reported to the event loop as ("piece"|"done"|"error", value)."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        stats: RequestStats | None,
        lease: ExitStack,
        backend: Backend,
        info: ModelInfo,
        started: float,
    ) -> None:
        self.executor = executor
        self.stats = stats
        self.lease = lease
        self.backend = backend
        self.info = info
        self.started = started
        self.cancel = threading.Event()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def start(self, prompt: str, options: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()

        def put(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop is gone (shutting down)
                loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

        try:
            self.executor.submit(self._work, prompt, options, put)
        except RuntimeError:
            self.lease.close()
            raise _ApiError(503, "the server is shutting down; retry later", "server_error", "shutting_down") from None

    def _work(self, prompt: str, options: dict[str, Any], put: Callable[[str, Any], None]) -> None:
        model_id = self.info.model_id
        first: float | None = None
        prompt_tokens = completion_tokens = 0
        outcome = "error"
        try:
            prompt_tokens = self.backend.count_tokens(prompt)
            if prompt_tokens >= self.info.context_tokens:
                outcome = "rejected"
                put(
                    "error",
                    _bad_request(
                        f"the prompt has {prompt_tokens} tokens; model '{model_id}' has a context of "
                        f"{self.info.context_tokens} tokens: shorten the prompt",
                        "context_length_exceeded",
                        "messages",
                    ),
                )
                return
            with self.backend.stream(prompt, **options) as pieces:
                for piece in pieces:
                    if first is None:
                        first = time.monotonic()
                    if self.cancel.is_set():
                        outcome = "cancelled"
                        break
                    put("piece", piece)
                prompt_tokens, completion_tokens = pieces.prompt_tokens, pieces.completion_tokens
                if outcome != "cancelled":
                    outcome = "ok"
                    put("done", _Done(prompt_tokens, completion_tokens, pieces.finish_reason or "stop"))
        except RuntimeBackendError as exc:
            log.warning("generation with model %s failed: %s", model_id, type(exc).__name__)
            put("error", _ApiError(500, exc.message, "server_error", exc.code))
        except Exception as exc:
            log.error("generation with model %s failed unexpectedly: %s", model_id, type(exc).__name__)
            put(
                "error",
                _ApiError(500, "the model failed to generate; see the device's log", "server_error", "internal"),
            )
        finally:
            self.lease.close()
            if self.stats is not None:
                if outcome == "rejected":
                    self.stats.record_rejected()
                else:
                    end = time.monotonic()
                    self.stats.record(
                        model_id,
                        ok=outcome != "error",
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        latency_s=end - self.started if outcome == "ok" else None,
                        time_to_first_token_s=first - self.started if first is not None else None,
                    )


def create_app(
    host: ModelHost,
    *,
    max_prompt_chars: int = 32_000,
    max_tokens_limit: int = 2048,
    stats: RequestStats | None = None,
    max_workers: int = 8,
) -> FastAPI:
    """The local OpenAI-compatible API over ``host``'s active model.

    Requests may ask for at most ``max_tokens_limit`` new tokens (the default when they do not say) and send at
    most ``max_prompt_chars`` characters of prompt or message text. Errors use OpenAI's shape
    ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request, 503 when no model is active, 500
    when the model fails. At most ``max_workers`` requests are generating or waiting for their model at once;
    more wait in a queue. ``stats`` (if given) counts requests, tokens and latencies: numbers, never text.
    """
    try:
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as exc:
        raise MissingExtraError("server", "the local OpenAI-compatible API", "fastapi") from exc

    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="slmops-generate")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="slmops local model API", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error_response(error: _ApiError) -> Response:
        body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
        return JSONResponse(body, status_code=error.status)

    def reject(error: _ApiError) -> Response:
        if stats is not None:
            stats.record_rejected()
        return error_response(error)

    @app.exception_handler(_ApiError)
    async def _api_error(_request: Any, exc: _ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Any, exc: RequestValidationError) -> Response:
        problems = []
        for item in exc.errors()[:5]:
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            problems.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
        param = ".".join(str(p) for p in exc.errors()[0].get("loc", ())[1:2]) if exc.errors() else None
        return reject(_bad_request("invalid request: " + "; ".join(problems), "invalid_request", param or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Any, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(_ApiError(exc.status_code, str(exc.detail), type_, code))

    def lease() -> tuple[ExitStack, Backend, ModelInfo]:
        stack = ExitStack()
        try:
            backend, info = stack.enter_context(host.lease())
        except UnavailableError as exc:
            raise _ApiError(503, exc.message, "server_error", "model_not_loaded") from exc
        return stack, backend, info

    def options(body: _Request, info: ModelInfo) -> dict[str, Any]:
        requested = body.max_tokens or body.max_completion_tokens or max_tokens_limit
        if requested > max_tokens_limit:
            raise _bad_request(
                f"max_tokens is {requested}; this device allows at most {max_tokens_limit}", "max_tokens", "max_tokens"
            )
        return {
            "max_tokens": requested,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "stop": body.stops(info),
            "seed": body.seed,
        }

    @app.get("/health", response_model=None)
    async def health() -> Any:
        info = host.active
        if info is None:
            return JSONResponse({"status": "unavailable", "model": None}, status_code=503)
        return {"status": "ok", "model": info.model_id, "digest": info.digest}

    @app.get("/v1/models", response_model=None)
    async def models() -> Any:
        info = host.active
        data = [] if info is None else [_model_entry(info)]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> Any:
        started = time.monotonic()
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            size = sum(len(message_text(m.get("content"))) for m in messages)
        except RuntimeBackendError as exc:
            return reject(_bad_request(exc.message, param="messages"))
        if size > max_prompt_chars:
            return reject(_too_long(size, max_prompt_chars, "messages"))
        try:
            stack, backend, info = lease()
        except _ApiError as exc:
            return reject(exc)
        try:
            opts = options(body, info)
            prompt = render_chat(info.chat_template, messages, bos_token=info.bos_token, eos_token=info.eos_token)
        except _ApiError as exc:
            stack.close()
            return reject(exc)
        except InvalidModelError as exc:
            stack.close()
            return reject(_ApiError(500, exc.message, "server_error", "invalid_chat_template"))
        except RuntimeBackendError as exc:
            stack.close()
            return reject(_bad_request(exc.message, "invalid_messages", "messages"))
        generation = _Generation(executor, stats, stack, backend, info, started)
        generation.start(prompt, opts)
        return await _respond(generation, body, "chat")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Any:
        started = time.monotonic()
        prompt = body.text()
        if len(prompt) > max_prompt_chars:
            return reject(_too_long(len(prompt), max_prompt_chars, "prompt"))
        try:
            stack, backend, info = lease()
        except _ApiError as exc:
            return reject(exc)
        try:
            opts = options(body, info)
        except _ApiError as exc:
            stack.close()
            return reject(exc)
        generation = _Generation(executor, stats, stack, backend, info, started)
        generation.start(prompt, opts)
        return await _respond(generation, body, "text")

    async def _respond(generation: _Generation, body: _Request, kind: Literal["chat", "text"]) -> Any:
        info = generation.info
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        first = await generation.queue.get()
        if first[0] == "error":
            return error_response(first[1])
        if not body.stream:
            pieces: list[str] = []
            event = first
            while event[0] == "piece":
                pieces.append(event[1])
                event = await generation.queue.get()
            if event[0] == "error":
                return error_response(event[1])
            done: _Done = event[1]
            return _full_response(kind, ident, created, info.model_id, "".join(pieces), done)

        chunk = _chunker(kind, ident, created, info.model_id, body.include_usage())

        async def events() -> AsyncIterator[str]:
            try:
                if kind == "chat":
                    yield _sse(chunk({"role": "assistant", "content": ""}, None))
                event = first
                while True:
                    if event[0] == "piece":
                        yield _sse(chunk({"content": event[1]} if kind == "chat" else event[1], None))
                    elif event[0] == "done":
                        done = event[1]
                        yield _sse(chunk({} if kind == "chat" else "", done.finish_reason))
                        if body.include_usage():
                            usage = chunk(None, None)
                            usage["choices"] = []
                            usage["usage"] = _usage(done)
                            yield _sse(usage)
                        break
                    else:
                        error: _ApiError = event[1]
                        payload = {"message": error.message, "type": error.type, "param": None, "code": error.code}
                        yield _sse({"error": payload})
                        break
                    event = await generation.queue.get()
                yield "data: [DONE]\n\n"
            finally:
                generation.cancel.set()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def _too_long(size: int, limit: int, param: str) -> _ApiError:
    return _bad_request(
        f"the {param} have {size} characters; this device accepts at most {limit}: shorten them",
        "prompt_too_long",
        param,
    )


def _model_entry(info: ModelInfo) -> dict[str, Any]:
    return {"id": info.model_id, "object": "model", "created": 0, "owned_by": "slmops", "digest": info.digest}


def _usage(done: _Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _full_response(
    kind: Literal["chat", "text"], ident: str, created: int, model_id: str, text: str, done: _Done
) -> dict[str, Any]:
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


def _chunker(
    kind: Literal["chat", "text"], ident: str, created: int, model_id: str, include_usage: bool
) -> Callable[[Any, str | None], dict[str, Any]]:
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


def _sse(value: dict[str, Any]) -> str:
    return "data: " + json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n\n"
