"""Rendering pages: one Jinja2 environment (autoescaped HTML, templates shipped in the package), the filters the
templates use, and the errors a page can end in (an HTML page, never the API's JSON)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from slmops import __version__
from slmops.core.reconcile import short_digest

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane
    from slmops.ui.session import SessionStore, UiSession

__all__ = ["NAV", "PageError", "environment", "page", "plane_of", "store_of"]

NAV: tuple[tuple[str, str], ...] = (
    ("fleet", "/ui/"),
    ("blueprints", "/ui/blueprints"),
    ("releases", "/ui/releases"),
    ("models", "/ui/models"),
    ("drift", "/ui/drift"),
    ("alerts", "/ui/alerts"),
    ("cost", "/ui/cost"),
)


class PageError(Exception):
    """End a page with an HTML error page: ``status`` and a message for the operator (escaped when shown)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


def _bytes(value: float | int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _number(value: Any, digits: int = 3) -> str:
    """Numbers as an operator reads them: integers whole, floats to ``digits`` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == int(value) and abs(value) < 1e12:
            return str(int(value))
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}" if value >= 0.01 or value == 0 else f"{value:.1%}"


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("slmops.ui", "templates"),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["short"] = short_digest
    env.filters["bytes"] = _bytes
    env.filters["num"] = _number
    env.filters["pct"] = _pct
    env.globals["nav"] = NAV
    env.globals["version"] = __version__
    return env


_ENV: Environment | None = None


def environment() -> Environment:
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV


def plane_of(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


def store_of(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.ui_sessions
    return store


def page(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    session: UiSession | None = None,
    status: int = 200,
    active: str = "",
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """Render ``template`` with the session (for the header and the CSRF field) and the active nav entry."""
    html = (
        environment()
        .get_template(template)
        .render(request=request, session=session, active=active, csrf=session.csrf if session else "", **context)
    )
    response = HTMLResponse(html, status_code=status, headers=headers)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    return response
