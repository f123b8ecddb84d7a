"""The control plane's FastAPI application.

``create_app(settings)`` builds the app; the control plane (database, registry) is opened when the app starts
(its lifespan), or passed in ready-made by tests. Every :class:`~slmops.errors.SLMOpsError` becomes one JSON
:class:`~slmops.control.schemas.ErrorBody` through one handler: client errors carry their message, server errors
only a generic one (the details go to the server log), so internal text never leaks. A body that is not JSON is a
``400`` (``invalid_json``), a repeated query parameter a ``422``, and a ``405`` names every method of the path in
``Allow``; the OpenAPI document says so (:mod:`slmops.control.openapi`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from slmops import __version__
from slmops.control import (
    rollouts,
    routes_agent,
    routes_alerts,
    routes_drift,
    routes_feedback,
    routes_operator,
    routes_rollouts,
    routes_sites,
    routes_telemetry,
)
from slmops.control.metrics import install_metrics
from slmops.control.openapi import install_openapi
from slmops.control.plane import ControlPlane
from slmops.control.schemas import ErrorBody, ServerHealth
from slmops.control.settings import ServerSettings
from slmops.control.shedding import install_shedding
from slmops.core.wire import API_PREFIX
from slmops.errors import SLMOpsError

__all__ = ["STATUS_BY_CODE", "create_app", "status_for"]

log = logging.getLogger(__name__)

STATUS_BY_CODE: dict[str, int] = {
    "not_found": 404,
    "conflict": 409,
    "invalid_blueprint": 422,
    "invalid_request": 422,
    "unauthenticated": 401,
    "signature": 401,
    "forbidden": 403,
    "unavailable": 503,
    "invalid_model": 422,
    "invalid_gguf": 422,
    "invalid_safetensors": 422,
    "invalid_onnx": 422,
    "unsafe_format": 422,
    "unsafe_path": 422,
    "bundle": 422,
}


def status_for(code: str) -> int:
    return STATUS_BY_CODE.get(code, 500)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(code=code, message=message).model_dump(), status_code=status, headers=headers)


async def _slmops_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SLMOpsError)
    status = status_for(exc.code)
    if status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        return _error(status, exc.code, f"the server failed ({exc.code}); the details are in its log")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _error(status, exc.code, exc.message, headers)


def _bad_json(reason: str) -> JSONResponse:
    return _error(
        400,
        "invalid_json",
        f"the request body is not valid JSON ({reason}); send one JSON document with 'Content-Type: application/json'",
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    for error in exc.errors():
        if error.get("type") == "json_invalid":  # FastAPI's json.JSONDecodeError; loc holds a character offset
            where = error.get("loc", ("body", "?"))[-1]
            return _bad_json(f"{error.get('ctx', {}).get('error', 'it does not parse')} at character {where}")
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}"[:300])
    return _error(422, "invalid_request", "the request does not validate: " + "; ".join(problems))


async def _single_query_values(request: Request) -> None:
    """Refuse a repeated query parameter: each of this API's takes one value (FastAPI would read the last). An
    ``async def``: as a plain ``def`` FastAPI would run it in the thread pool, a hop on every request."""
    params = request.query_params
    repeated = sorted({key for key in params if len(params.getlist(key)) > 1})
    if repeated:
        raise RequestValidationError(
            [
                {"loc": ("query", key), "msg": "given more than once; give it once", "type": "value_error"}
                for key in repeated
            ]
        )


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's 405 names only the first matching route's)."""
    path, root_path = request.scope["path"], request.scope.get("root_path", "")
    allowed = []
    for method in _METHODS:  # a fresh scope each time: routing leaves its state in a used one
        probe = {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": []}
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not read the body as JSON at all
        cause = exc.__cause__
        return _bad_json("it is not UTF-8 text" if isinstance(cause, UnicodeDecodeError) else "it could not be parsed")
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return _error(exc.status_code, "http", str(exc.detail), headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal", "the server failed unexpectedly; the details are in its log")


def create_app(settings: ServerSettings | None = None, plane: ControlPlane | None = None) -> FastAPI:
    """The control-plane app. Without ``plane``, one is opened from ``settings`` when the app starts; with one and
    no ``settings``, the plane's settings are the app's."""
    settings = settings or (plane.settings if plane is not None else ServerSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if plane is not None:
            app.state.plane = plane
            yield
            return
        opened = ControlPlane.open(settings)
        app.state.plane = opened
        controller = rollouts.RolloutController(opened) if settings.rollout_controller else None
        app.state.controller = controller
        if controller is not None:
            controller.start()
        from slmops.control.nudge import start_nudger

        nudger = app.state.nudger = start_nudger(opened, settings)  # None unless SLMOPS_MQTT_URL is set
        try:
            yield
        finally:
            if nudger is not None:
                nudger.stop()
            if controller is not None:
                controller.stop()
            opened.close()

    app = FastAPI(
        title="slmops control plane",
        version=__version__,
        description="Devices, blueprints and desired state for fleets of edge devices running small language models.",
        lifespan=lifespan,
        dependencies=[Depends(_single_query_values)],
    )
    app.state.controller = None
    if plane is not None:
        app.state.plane = plane
    app.add_exception_handler(SLMOpsError, _slmops_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

    @app.get(
        f"{API_PREFIX}/health",
        response_model=ServerHealth,
        responses={422: {"model": ErrorBody, "description": "A query parameter given twice"}},
        tags=["server"],
    )
    def health() -> ServerHealth:
        """Liveness: the server answers (no credential needed)."""
        return ServerHealth(status="ok", version=__version__)

    app.include_router(routes_agent.router, prefix=API_PREFIX)
    app.include_router(routes_operator.router, prefix=API_PREFIX)
    app.include_router(routes_telemetry.router, prefix=API_PREFIX)
    app.include_router(routes_rollouts.router, prefix=API_PREFIX)
    app.include_router(routes_alerts.router, prefix=API_PREFIX)
    app.include_router(routes_drift.router, prefix=API_PREFIX)
    app.include_router(routes_feedback.router, prefix=API_PREFIX)
    app.include_router(routes_sites.router, prefix=API_PREFIX)
    from slmops.control import routes_tuf  # TUF metadata (off until a root is uploaded)

    app.include_router(routes_tuf.router, prefix=API_PREFIX)
    if settings.ui:
        from slmops.ui import install_ui

        install_ui(app)
    install_metrics(app, settings.metrics_token, settings.metrics_cache_s, enabled=settings.metrics)
    install_openapi(app)
    install_shedding(app, settings)  # outermost: a shed request costs no other middleware
    return app
