"""The device's local OpenAI-compatible API, on 127.0.0.1: ``/v1/models`` (and ``/v1/models/{model}``),
``/v1/chat/completions``, ``/v1/completions`` (both with ``stream``), ``/v1/feedback``, ``/health``, ``/metrics``.

This module assembles the app; the routes live in :mod:`slmops.runtime._routes`, the wire format in
:mod:`slmops.runtime._openai`, the worker-thread generation in :mod:`slmops.runtime._generation`.

Prompts and answers go only to the local caller: nothing here logs them, and errors never quote them. Each request
reads the :class:`~slmops.runtime.policy.LocalPolicy` in effect when it starts: the site's system prompt, sampling
defaults and bounds are applied to it, and the feedback policy decides what the local feedback store keeps of it
(:mod:`slmops.feedback.store`; ratings arrive at ``POST /v1/feedback``, :mod:`slmops.runtime.feedback_routes`).
Generation runs in a thread pool, one worker per request, never on the event loop; the worker holds a lease on the
model (:class:`~slmops.runtime.host.ModelHost`), so a request that started before a model switch finishes on the
old model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from slmops.errors import MissingExtraError
from slmops.runtime._openai import ChatRequest, CompletionRequest
from slmops.runtime.host import ModelHost
from slmops.runtime.metrics import ServerMetrics
from slmops.runtime.policy import LocalPolicy
from slmops.runtime.stats import RequestStats

if TYPE_CHECKING:
    from fastapi import FastAPI

    from slmops.feedback.store import FeedbackStore
    from slmops.runtime._routes import OnRated

__all__ = ["ChatRequest", "CompletionRequest", "create_app"]


def create_app(
    host: ModelHost,
    *,
    max_prompt_chars: int = 32_000,
    max_tokens_limit: int = 2048,
    stats: RequestStats | None = None,
    max_workers: int = 8,
    metrics: ServerMetrics | None = None,
    policy: LocalPolicy | None = None,
    feedback: FeedbackStore | None = None,
    on_rated: OnRated | None = None,
) -> FastAPI:
    """The local OpenAI-compatible API over ``host``'s active model.

    Requests may ask for at most ``max_tokens_limit`` new tokens (the default when they do not say) and send at
    most ``max_prompt_chars`` characters of prompt or message text. A request's ``model`` must be one of the active
    model's names (:attr:`~slmops.runtime.host.ModelInfo.names`) or be left out. Errors use OpenAI's shape
    ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request, 404 ``model_not_found`` for a
    model this device does not serve, 503 when no model is active, 500 when the model fails. At most
    ``max_workers`` requests are generating or waiting for their model at once; more wait in a queue. ``stats``
    (if given) counts requests, tokens and latencies: numbers, never text. ``GET /metrics`` serves ``metrics``
    (a fresh :class:`~slmops.runtime.metrics.ServerMetrics` when not given) in Prometheus text format; it is left out
    of the OpenAPI schema and, like llama.cpp server's, not authenticated.

    ``policy`` (a default :class:`~slmops.runtime.policy.LocalPolicy` when not given: no adaptation, feedback off)
    is read per request. ``feedback`` (an opened store) records every completion and serves ``POST /v1/feedback``
    (503 without one); ``on_rated`` decides what happens to a rating beyond the store (the agent's upload queue).
    """
    try:
        from fastapi import FastAPI

        from slmops.runtime._routes import ApiState, install_error_handlers, router
        from slmops.runtime.feedback_routes import feedback_router
    except ImportError as exc:
        raise MissingExtraError("server", "the local OpenAI-compatible API", "fastapi") from exc
    if metrics is None:
        metrics = ServerMetrics()

    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="slmops-generate")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="slmops local model API", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.api = ApiState(
        host,
        executor,
        stats,
        max_prompt_chars,
        max_tokens_limit,
        metrics,
        policy if policy is not None else LocalPolicy(),
        feedback,
        on_rated,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(feedback_router)
    return app
