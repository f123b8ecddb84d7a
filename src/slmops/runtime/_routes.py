"""The routes of the local API and its error handlers, as module-level functions over :class:`ApiState`.

Imports FastAPI at the top: import this module only where the ``server`` extra is known to be installed
(:func:`slmops.runtime.server.create_app` does).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from slmops.core.feedback import MAX_FEEDBACK_TEXT_CHARS
from slmops.errors import InvalidModelError, RuntimeBackendError, UnavailableError
from slmops.runtime._generation import Generation
from slmops.runtime._openai import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Done,
    GenerationRequest,
    Kind,
    bad_request,
    chunker,
    error_body,
    full_response,
    model_entry,
    model_not_found,
    sse,
    too_long,
    usage_chunk,
)
from slmops.runtime.backend import Backend
from slmops.runtime.chat import message_text, render_chat
from slmops.runtime.host import ModelHost, ModelInfo
from slmops.runtime.metrics import Operation, ServerMetrics
from slmops.runtime.policy import CLAMPED_HEADER, LocalPolicy, PolicySnapshot, adapt_request, with_system_prompt
from slmops.runtime.stats import RequestStats

if TYPE_CHECKING:
    from slmops.feedback.store import FeedbackStore, RatedCompletion, UploadDecision

__all__ = ["ApiState", "OnRated", "install_error_handlers", "router"]

log = logging.getLogger(__name__)

OnRated = Callable[["RatedCompletion", PolicySnapshot], "UploadDecision"]
"""What the agent does with a rating beyond the local store (sample, redact, queue for upload)."""
MAX_FEEDBACK_MESSAGES = 64


@dataclass(frozen=True)
class ApiState:
    """What the routes share, kept on ``app.state.api``."""

    host: ModelHost
    executor: ThreadPoolExecutor
    stats: RequestStats | None
    max_prompt_chars: int
    max_tokens_limit: int
    metrics: ServerMetrics
    policy: LocalPolicy
    feedback: FeedbackStore | None = None
    on_rated: OnRated | None = None

    def reject(self, error: ApiError) -> Response:
        """The error answer to a request refused before it reached a model (counted as rejected)."""
        if self.stats is not None:
            self.stats.record_rejected()
        return error_response(error)

    def lease(self) -> tuple[ExitStack, Backend, ModelInfo]:
        stack = ExitStack()
        try:
            backend, info = stack.enter_context(self.host.lease())
        except UnavailableError as exc:
            raise ApiError(503, exc.message, "server_error", "model_not_loaded") from exc
        return stack, backend, info

    def record(self, recording: Recording, completion_id: str, info: ModelInfo, answer: str) -> None:
        """Keep the completion in the local feedback store (its text only when the policy allows; see
        :mod:`slmops.feedback.store`). A failing store never fails the answer."""
        if self.feedback is None:
            return
        policy = recording.policy
        keep = policy.collect_text and recording.messages
        try:
            self.feedback.record(
                completion_id,
                info.digest,
                retention_days=policy.feedback.retention_days,
                messages=recording.messages if keep else None,
                answer=answer[:MAX_FEEDBACK_TEXT_CHARS] if keep else None,
            )
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            log.warning("the local feedback store failed to record a completion: %s", type(exc).__name__)


@dataclass(frozen=True)
class Recording:
    """What the feedback store may keep of one request: the policy when it started and the client's own prompt."""

    policy: PolicySnapshot
    messages: list[dict[str, str]]


def feedback_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The client's messages as feedback keeps them: roles system/user/assistant (``developer`` counts as system,
    tool messages are left out), text only, each at most ``MAX_FEEDBACK_TEXT_CHARS``, the last 64."""
    kept: list[dict[str, str]] = []
    for message in messages:
        role = "system" if message.get("role") == "developer" else str(message.get("role"))
        if role in ("system", "user", "assistant"):
            kept.append({"role": role, "content": message_text(message.get("content"))[:MAX_FEEDBACK_TEXT_CHARS]})
    return kept[-MAX_FEEDBACK_MESSAGES:]


def _api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


Api = Annotated[ApiState, Depends(_api_state)]

router = APIRouter()


def error_response(error: ApiError) -> Response:
    return JSONResponse(error_body(error), status_code=error.status)


@router.get("/health", response_model=None)
async def health(api: Api) -> Any:
    info = api.host.active
    if info is None:
        return JSONResponse({"status": "unavailable", "model": None}, status_code=503)
    return {"status": "ok", "model": info.model_id, "digest": info.digest}


@router.get("/metrics", response_model=None, include_in_schema=False)
async def metrics(api: Api) -> Response:
    """Prometheus text format, unauthenticated like llama.cpp server's (the API listens on 127.0.0.1 only)."""
    body, content_type = api.metrics.exposition()
    return Response(body, media_type=content_type)


@router.get("/v1/models", response_model=None)
async def list_models(api: Api) -> Any:
    info = api.host.active
    return {"object": "list", "data": [] if info is None else [model_entry(info)]}


@router.get("/v1/models/{model:path}", response_model=None)
async def retrieve_model(model: str, api: Api) -> Any:
    info = api.host.active
    if info is None or model not in info.names:
        return error_response(model_not_found(model, info))
    return model_entry(info)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, api: Api) -> Any:
    started = time.monotonic()
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        size = sum(len(message_text(m.get("content"))) for m in messages)
    except RuntimeBackendError as exc:
        return api.reject(bad_request(exc.message, param="messages"))
    if size > api.max_prompt_chars:
        return api.reject(too_long(size, api.max_prompt_chars, "messages"))
    policy = api.policy.current()
    recording = Recording(policy, feedback_messages(messages))
    prompt_messages = with_system_prompt(messages, policy.local.system_prompt)

    def render(info: ModelInfo) -> str:
        try:
            return render_chat(info.chat_template, prompt_messages, bos_token=info.bos_token, eos_token=info.eos_token)
        except InvalidModelError as exc:
            raise ApiError(500, exc.message, "server_error", "invalid_chat_template") from exc
        except RuntimeBackendError as exc:
            raise bad_request(exc.message, "invalid_messages", "messages") from exc

    return await _generate(api, body, "chat", started, render, recording)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, api: Api) -> Any:
    started = time.monotonic()
    prompt = body.text()
    if len(prompt) > api.max_prompt_chars:
        return api.reject(too_long(len(prompt), api.max_prompt_chars, "prompt"))
    recording = Recording(api.policy.current(), [{"role": "user", "content": prompt[:MAX_FEEDBACK_TEXT_CHARS]}])
    return await _generate(api, body, "text", started, lambda _info: prompt, recording)


async def _generate(
    api: ApiState,
    body: GenerationRequest,
    kind: Kind,
    started: float,
    prompt_for: Callable[[ModelInfo], str],
    recording: Recording,
) -> Any:
    """Lease the active model, check the request against it (adapted to the site's sampling defaults and bounds),
    generate in a worker and answer."""
    try:
        stack, backend, info = api.lease()
    except ApiError as exc:
        return api.reject(exc)
    body, clamped = adapt_request(body, recording.policy.local, api.max_tokens_limit)
    try:
        body.require_model(info)
        sampling = body.sampling(info, api.max_tokens_limit)
        prompt = prompt_for(info)
    except ApiError as exc:
        stack.close()
        return api.reject(exc)
    operation: Operation = "chat" if kind == "chat" else "text_completion"
    generation = Generation(api.executor, api.stats, stack, backend, info, started, api.metrics, operation)
    generation.start(prompt, sampling, stream=body.stream)
    headers = {CLAMPED_HEADER: ",".join(clamped)} if clamped else {}
    return await _respond(api, generation, body, kind, recording, headers)


async def _respond(
    api: ApiState,
    generation: Generation,
    body: GenerationRequest,
    kind: Kind,
    recording: Recording,
    headers: dict[str, str],
) -> Any:
    model_id = generation.info.model_id
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
        text = "".join(pieces)
        if api.feedback is not None:  # recorded before the answer, so its id can be rated as soon as it arrives
            await asyncio.to_thread(api.record, recording, ident, generation.info, text)
        return JSONResponse(full_response(kind, ident, created, model_id, text, event[1]), headers=headers)

    chunk = chunker(kind, ident, created, model_id, body.include_usage())

    async def events() -> AsyncIterator[str]:
        pieces: list[str] = []
        try:
            if kind == "chat":
                yield sse(chunk({"role": "assistant", "content": ""}, None))
            event = first
            while True:
                if event[0] == "piece":
                    pieces.append(event[1])
                    yield sse(chunk({"content": event[1]} if kind == "chat" else event[1], None))
                elif event[0] == "done":
                    done: Done = event[1]
                    yield sse(chunk({} if kind == "chat" else "", done.finish_reason))
                    if body.include_usage():
                        yield sse(usage_chunk(chunk, done))
                    if api.feedback is not None:
                        await asyncio.to_thread(api.record, recording, ident, generation.info, "".join(pieces))
                    break
                else:
                    yield sse(error_body(event[1]))
                    break
                event = await generation.queue.get()
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel.set()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    problems = []
    for item in errors[:5]:
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        problems.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
    param = ".".join(str(p) for p in errors[0].get("loc", ())[1:2]) if errors else None
    return _api_state(request).reject(
        bad_request("invalid request: " + "; ".join(problems), "invalid_request", param or None)
    )


async def _http(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(ApiError(exc.status_code, str(exc.detail), type_, code))


def install_error_handlers(app: FastAPI) -> None:
    """Every error answer in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
