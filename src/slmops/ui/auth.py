"""Logging in and out of the dashboard, the page dependencies, and the checks every state-changing form passes.

- ``GET /ui/login`` shows the form and sets a short-lived pre-session cookie whose value the form repeats
  (double submit, so a foreign page cannot log a browser into *its* session); ``POST /ui/login`` checks it and the
  ``Origin``, takes the token, and sets the session cookie: ``HttpOnly``, ``SameSite=Strict``, ``Path=/ui``,
  ``Secure`` when the request came over https.
- Every other POST carries the session's CSRF token (synchronizer token, compared in constant time) and must come
  from this origin: ``Origin`` (or, without it, ``Referer``) must name the host the request was sent to; a POST with
  neither is refused. GET never changes state.
- A page without a live session redirects to the login page (``303``), remembering where it was going (only a
  ``/ui/`` path is accepted, so the login cannot be turned into an open redirect).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from typing import Annotated
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from slmops.control.schemas import Role
from slmops.ui._render import PageError, page, plane_of, store_of
from slmops.ui.session import COOKIE_NAME, LoginError, UiSession

__all__ = ["LoginRequired", "Operator", "Viewer", "check_form", "form_fields", "router", "safe_next"]

LOGIN_COOKIE = "slmops_ui_login"
router = APIRouter(include_in_schema=False)


class LoginRequired(Exception):
    """No live session: the handler redirects to the login page."""

    def __init__(self, next_path: str, reason: str = "") -> None:
        super().__init__(reason)
        self.next_path = next_path
        self.reason = reason


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def safe_next(value: str | None) -> str:
    """Where to go after logging in: a path under ``/ui/`` of this site, else the overview."""
    if not value or not value.startswith("/ui") or value.startswith("//") or "\\" in value:
        return "/ui/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or ".." in parts.path or not (parts.path == "/ui" or parts.path.startswith("/ui/")):
        return "/ui/"
    return value


def same_origin(request: Request) -> bool:
    """Whether the POST's ``Origin`` (else ``Referer``) names the host it was sent to."""
    host = request.headers.get("host", "").lower()
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null" or not host:
        return False
    return urlsplit(origin).netloc.lower() == host


async def check_form(request: Request, session: UiSession) -> dict[str, str]:
    """The checks of every state-changing form (see the module docstring); the form's fields."""
    if not same_origin(request):
        raise PageError(403, "refused", "this form must be sent from the dashboard's own pages (Origin check)")
    fields = await form_fields(request)
    check_csrf(session, fields.get("csrf", ""))
    return fields


def check_csrf(session: UiSession, csrf: str) -> None:
    if not csrf or not hmac.compare_digest(csrf.encode("utf-8"), session.csrf.encode("utf-8")):
        raise PageError(403, "refused", "the form's CSRF token is missing or stale; reload the page and try again")


def _session(request: Request) -> UiSession:
    store = store_of(request)
    session = store.current(plane_of(request), request.cookies.get(COOKIE_NAME))
    if session is None:
        had_cookie = COOKIE_NAME in request.cookies
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target, "your session ended; log in again" if had_cookie else "")
    return session


def _needs(role: Role) -> Callable[[UiSession], UiSession]:
    def dependency(session: Annotated[UiSession, Depends(_session)]) -> UiSession:
        if not session.has_role(role):
            raise PageError(
                403, "forbidden", f"token '{session.name}' has role '{session.role}'; this needs '{role}' or higher"
            )
        return session

    return dependency


Viewer = Annotated[UiSession, Depends(_needs("viewer"))]
Operator = Annotated[UiSession, Depends(_needs("operator"))]


def login_redirect(request: Request, exc: LoginRequired) -> RedirectResponse:
    query = f"?next={quote(safe_next(exc.next_path), safe='/')}"
    if exc.reason:
        query += "&ended=1"
    response = RedirectResponse(f"/ui/login{query}", status_code=303)
    if exc.reason:
        response.delete_cookie(COOKIE_NAME, path="/ui")
    return response


def _login_page(request: Request, next_path: str, error: str = "", status: int = 200) -> Response:
    nonce = secrets.token_urlsafe(24)
    message = error or ("your session ended; log in again" if request.query_params.get("ended") else "")
    response = page(
        request,
        "login.html",
        {"next_path": safe_next(next_path), "error": message, "login_csrf": nonce},
        status=status,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        store_of(request).sign_value(nonce),
        max_age=600,
        path="/ui/login",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


@router.get("/ui/login")
def login_form(request: Request, next: str = "/ui/") -> Response:
    return _login_page(request, next)


async def form_fields(request: Request, max_bytes: int = 16 * 1024) -> dict[str, str]:
    """The fields of a urlencoded form (the first value of each); a body too large or of another type is refused."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise PageError(415, "unsupported form", "send the form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PageError(413, "form too large", f"a dashboard form is at most {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PageError(400, "bad form", "the form is not UTF-8 text") from None
    return {key: values[0] for key, values in parse_qs(text, max_num_fields=20).items()}


@router.post("/ui/login")
async def login(request: Request) -> Response:
    fields = await form_fields(request)
    token, csrf, next = fields.get("token", ""), fields.get("csrf", ""), fields.get("next", "/ui/")
    store = store_of(request)
    signed = request.cookies.get(LOGIN_COOKIE, "")
    if (
        not same_origin(request)
        or not csrf
        or not hmac.compare_digest(signed.encode("utf-8"), store.sign_value(csrf).encode("utf-8"))
    ):
        return _login_page(request, next, "the login form expired or came from another site; try again", 403)
    try:
        session = store.login(plane_of(request), token)
    except LoginError as exc:
        return _login_page(request, next, str(exc), 401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        store.cookie_value(session),
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


@router.post("/ui/logout")
async def logout(request: Request, session: Viewer) -> Response:
    await check_form(request, session)
    store_of(request).logout(session.id)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/ui")
    return response
