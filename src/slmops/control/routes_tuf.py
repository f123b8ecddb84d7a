"""TUF metadata endpoints under ``/api/v1/tuf`` (see :mod:`slmops.control.tuf_repository`).

Devices (their credential) and viewers read ``N.root.json``, ``timestamp.json``, ``N.snapshot.json``,
``N.targets.json`` (and the unversioned latest of each), ``targets/manifests/<hex>.json`` and the root pin at
``bootstrap``; admins upload roots and targets signed offline and read the online public keys.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from slmops.control import tuf_repository
from slmops.control._deps import Admin, Caller, Plane, errors
from slmops.control.auth import Principal, require_role
from slmops.errors import NotFoundError
from slmops.tuf.metadata import TufMetadataError
from slmops.tuf.pin import RootPin

__all__ = ["TufPublished", "router"]

router = APIRouter(prefix="/tuf", tags=["tuf"])
_NAME = re.compile(r"^(?:(?P<version>[1-9][0-9]{0,9})\.)?(?P<role>root|timestamp|snapshot|targets)$")
_MAX_UPLOAD_BYTES = 5_000_000
_JSON = {"application/json": {"schema": {"type": "object"}}}


class TufPublished(BaseModel):
    """What an upload published."""

    model_config = ConfigDict(frozen=True)

    role: str
    version: int
    snapshot_version: int | None = None
    timestamp_version: int | None = None


def _reader(principal: Principal) -> None:
    if principal.kind != "device":
        require_role(principal, "viewer")


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


@router.get(
    "/bootstrap",
    response_model=RootPin,
    responses=errors(401, 403, 404, 422),
    summary="The current root, pinned by the manifest signing key (for agents enrolled before TUF)",
)
def bootstrap(principal: Caller, plane: Plane) -> RootPin:
    _reader(principal)
    return tuf_repository.root_pin(plane)


@router.get(
    "/online-keys",
    responses=errors(401, 403, 422),
    summary="The public keys of the snapshot and timestamp roles, for the root ceremony",
)
def online_keys(_: Admin, plane: Plane) -> dict[str, list[dict[str, object]]]:
    return tuf_repository.online_public_keys(plane)


@router.get(
    "/targets/manifests/{name}",
    response_class=Response,
    responses={200: {"content": _JSON, "description": "The manifest's canonical JSON"}, **errors(401, 403, 404, 422)},
    summary="A target: the canonical JSON of a released manifest",
)
def target(name: Annotated[str, Path(pattern=r"^[0-9a-f]{64}\.json$")], principal: Caller, plane: Plane) -> Response:
    _reader(principal)
    return _json(tuf_repository.read_target(plane, name.removesuffix(".json")))


@router.get(
    "/{name}.json",
    response_class=Response,
    responses={200: {"content": _JSON, "description": "Signed TUF metadata"}, **errors(401, 403, 404, 422)},
    summary="TUF metadata: N.root.json, timestamp.json, N.snapshot.json, N.targets.json",
)
def metadata(
    name: Annotated[str, Path(max_length=40, description="e.g. timestamp, 1.root, 3.snapshot, 3.targets")],
    principal: Caller,
    plane: Plane,
) -> Response:
    _reader(principal)
    match = _NAME.match(name)
    if match is None:
        raise NotFoundError(f"{name}.json is not TUF metadata; try timestamp.json or 1.root.json")
    version = int(match["version"]) if match["version"] else None
    return _json(tuf_repository.read_metadata(plane, match["role"], version))


async def _body(request: Request) -> bytes:
    data = await request.body()
    if len(data) > _MAX_UPLOAD_BYTES:
        raise TufMetadataError(f"TUF metadata of {len(data)} bytes is larger than the {_MAX_UPLOAD_BYTES} accepted")
    return data


_UPLOAD = {
    "requestBody": {"content": _JSON, "required": True},
}


@router.put(
    "/root",
    response_model=TufPublished,
    responses=errors(401, 403, 404, 409, 422),
    openapi_extra=_UPLOAD,
    summary="Upload the next root, signed offline by a threshold of the old and the new root keys",
)
async def put_root(request: Request, _: Admin, plane: Plane) -> TufPublished:
    published = await run_in_threadpool(tuf_repository.upload_root, plane, await _body(request))
    return TufPublished(**published.__dict__)


@router.put(
    "/targets",
    response_model=TufPublished,
    responses=errors(401, 403, 404, 409, 422),
    openapi_extra=_UPLOAD,
    summary="Upload targets signed offline by the targets keys; publishes a new snapshot and timestamp",
)
async def put_targets(request: Request, _: Admin, plane: Plane) -> TufPublished:
    published = await run_in_threadpool(tuf_repository.upload_targets, plane, await _body(request))
    return TufPublished(**published.__dict__)
