"""FastAPI dependencies: the control plane, the caller, role checks, the documented error responses, and the 422
for a value the schema cannot check.

FastAPI runs a plain ``def`` dependency in AnyIO's thread pool, one hop per dependency per request; the ones here
that do no I/O are ``async def`` so they run on the event loop at no such cost. Only :func:`get_principal` reads the
database (and so runs in the pool).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from slmops.control.auth import Principal, require_role
from slmops.control.credentials import authenticate
from slmops.control.plane import ControlPlane
from slmops.control.schemas import ErrorBody
from slmops.errors import AuthenticationError

__all__ = [
    "READ",
    "READ_ONE",
    "WRITE_ONE",
    "Admin",
    "Bearer",
    "Caller",
    "Operator",
    "Plane",
    "Viewer",
    "errors",
    "invalid",
    "secret_of",
]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An operator API token (slmops_op_...) or a device credential (slmops_dev_...).",
)


async def get_plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


Plane = Annotated[ControlPlane, Depends(get_plane)]


Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def secret_of(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The bearer secret sent, or a 401 when there is none."""
    if credentials is None or not credentials.credentials:
        raise AuthenticationError("no credential; send 'Authorization: Bearer <token>'")
    return credentials.credentials


def get_principal(plane: Plane, credentials: Bearer) -> Principal:
    return authenticate(plane, secret_of(credentials))


Caller = Annotated[Principal, Depends(get_principal)]


async def _viewer(principal: Caller) -> Principal:
    require_role(principal, "viewer")
    return principal


async def _operator(principal: Caller) -> Principal:
    require_role(principal, "operator")
    return principal


async def _admin(principal: Caller) -> Principal:
    require_role(principal, "admin")
    return principal


Viewer = Annotated[Principal, Depends(_viewer)]
Operator = Annotated[Principal, Depends(_operator)]
Admin = Annotated[Principal, Depends(_admin)]

_DESCRIPTIONS = {
    401: "No credential, or an unknown one",
    403: "The credential may not do this",
    404: "Not found",
    409: "Conflict with the current state",
    416: "Range not satisfiable",
    422: "The request does not validate",
    503: "Temporarily unavailable",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses, all with :class:`ErrorBody`."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


READ = errors(401, 403, 422)
READ_ONE = errors(401, 403, 404, 422)
WRITE_ONE = errors(401, 403, 404, 409, 422)


def invalid(loc: tuple[str, ...], message: str) -> RequestValidationError:
    """A 422 for a value the schema cannot check, answered like FastAPI's own validation errors."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])
