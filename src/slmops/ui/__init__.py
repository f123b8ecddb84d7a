"""The dashboard the control plane serves at ``/ui``.

Server-rendered HTML (Jinja2 templates, one stylesheet and one small script shipped in the package; no CDN, so it
works offline) over the control plane's own library functions, called with the app's plane, never over HTTP:

- :mod:`.session` and :mod:`.auth`: logging in with an API token, the session cookie, CSRF and Origin checks
- :mod:`.pages_fleet`: the fleet overview, the device list, a device (and approving it)
- :mod:`.pages_blueprints`: blueprints and their plan
- :mod:`.pages_releases`: releases, live, with pause / resume / abort / promote
- :mod:`.pages_models`: models, their lineage and the Pareto plot per device class (:mod:`.charts`)
- :mod:`.pages_watch`: drift, alerts and the cost report

Every route is left out of the OpenAPI document, which describes the API only.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from slmops.ui import auth, pages_blueprints, pages_fleet, pages_models, pages_releases, pages_watch
from slmops.ui._render import PageError, page, store_of
from slmops.ui.auth import LoginRequired, login_redirect
from slmops.ui.session import COOKIE_NAME, SessionStore

__all__ = ["install_ui"]


async def _page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    cookie = request.cookies.get(COOKIE_NAME)
    session = await run_in_threadpool(store_of(request).current, request.app.state.plane, cookie)
    context = {"title": exc.title, "message": exc.message, "status": exc.status}
    return page(request, "error.html", context, session=session, status=exc.status)


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    return login_redirect(request, exc)


def install_ui(app: FastAPI) -> None:
    """Mount the dashboard's pages and static files on ``app``."""
    app.state.ui_sessions = SessionStore()
    static = resources.files("slmops.ui") / "static"
    app.mount("/ui/static", StaticFiles(directory=str(static)), name="ui-static")
    for module in (auth, pages_fleet, pages_blueprints, pages_releases, pages_models, pages_watch):
        app.include_router(module.router)
    app.add_exception_handler(PageError, _page_error)
    app.add_exception_handler(LoginRequired, _login_required)

    @app.get("/ui/{rest:path}", include_in_schema=False)
    def not_found(request: Request, rest: str) -> Response:
        raise PageError(404, "not found", f"the dashboard has no page '/ui/{rest[:200]}'")
