"""``POST /v1/feedback``: a rating (or score, or correction) of one completion of the local API.

Body: ``{"completion_id": "chatcmpl-…", "rating": "up"|"down", "score": 0..1, "correction": "…"}`` with at least
one of ``rating``, ``score`` and ``correction``. Answers:

- ``201`` with ``{"object": "feedback", "completion_id", "stored": true, "text_kept", "correction_kept",
  "queued_for_upload", "reason"}``: the rating is in the device's local store; ``text_kept`` says whether the
  completion's prompt and answer are kept with it, ``queued_for_upload`` whether a redacted sample waits for the
  control plane, and ``reason`` why (or why not);
- ``404 completion_not_found``: no such completion here, or it is older than the retention;
- ``409 already_rated``: a completion is rated once (a repeated click never counts twice);
- ``422 invalid_feedback``: a body that is not JSON or does not fit the shape above;
- ``503 feedback_unavailable``: this server keeps no feedback (``slmops serve`` without an agent).

Errors use OpenAI's shape like the other routes. Imports FastAPI at the top, like :mod:`slmops.runtime._routes`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.responses import Response

from slmops.core.feedback import MAX_FEEDBACK_TEXT_CHARS
from slmops.errors import ConflictError, NotFoundError
from slmops.runtime._openai import ApiError
from slmops.runtime._routes import ApiState, error_response

__all__ = ["FeedbackRequest", "feedback_router"]

feedback_router = APIRouter()


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=64)
    rating: Literal["up", "down"] | None = None
    score: float | None = Field(default=None, ge=0.0, le=1.0)
    correction: str | None = Field(default=None, max_length=MAX_FEEDBACK_TEXT_CHARS)

    @model_validator(mode="after")
    def _rated(self) -> FeedbackRequest:
        if self.rating is None and self.score is None and self.correction is None:
            raise ValueError("send a rating ('up' or 'down'), a score (0 to 1) or a correction")
        return self


def _invalid(message: str, param: str | None = None) -> Response:
    return error_response(ApiError(422, message, "invalid_request_error", "invalid_feedback", param))


def _parse(raw: bytes) -> FeedbackRequest | Response:
    try:
        value = json.loads(raw)
    except ValueError:
        return _invalid('the body is not JSON; send {"completion_id": "...", "rating": "up"}')
    try:
        return FeedbackRequest.model_validate(value)
    except ValidationError as exc:
        problems = []
        for item in exc.errors()[:5]:
            where = ".".join(str(part) for part in item.get("loc", ()))
            problems.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        return _invalid("invalid feedback: " + "; ".join(problems), str(first[0]) if first else None)


def _rate(api: ApiState, body: FeedbackRequest) -> dict[str, Any]:
    """Store the rating and decide about the upload (in a worker thread: SQLite, and redaction in the hook)."""
    assert api.feedback is not None
    policy = api.policy.current()
    rated = api.feedback.rate(body.completion_id, rating=body.rating, score=body.score, correction=body.correction)
    why_not = policy.why_no_text()
    if why_not is not None:
        queued, reason = False, why_not + ": only the rating is kept, on this device"
    elif not rated.has_text:
        queued = False
        reason = "the completion was made while feedback text was not allowed: only the rating is kept, on this device"
    elif api.on_rated is None:
        queued, reason = False, "this server does not upload feedback: the rating is kept on this device"
    else:
        decision = api.on_rated(rated, policy)
        queued, reason = decision.queued, decision.reason
    return {
        "object": "feedback",
        "completion_id": body.completion_id,
        "stored": True,
        "text_kept": rated.has_text,
        "correction_kept": rated.correction is not None,
        "queued_for_upload": queued,
        "reason": reason,
    }


@feedback_router.post("/v1/feedback", response_model=None, status_code=201)
async def post_feedback(request: Request) -> Response:
    api: ApiState = request.app.state.api
    if api.feedback is None:
        return error_response(
            ApiError(
                503,
                "this server keeps no feedback; the slmops agent's local API does",
                "server_error",
                "feedback_unavailable",
            )
        )
    parsed = _parse(await request.body())
    if isinstance(parsed, Response):
        return parsed
    try:
        answer = await asyncio.to_thread(_rate, api, parsed)
    except NotFoundError as exc:
        return error_response(ApiError(404, str(exc), "invalid_request_error", "completion_not_found", "completion_id"))
    except ConflictError as exc:
        return error_response(ApiError(409, str(exc), "invalid_request_error", "already_rated", "completion_id"))
    return JSONResponse(answer, status_code=201)
