"""The wire endpoints agents call (see ``slmops.core.wire``): enroll, claim, desired state, status, blobs.

The desired-state poll and the heartbeat are the hot path: every device calls them every poll interval. Each is an
``async def`` whose database work (the credential check included) is one indexed statement: on SQLite it runs on
the event loop (see :func:`_on_loop`), elsewhere in one hop to AnyIO's thread pool rather than one hop per
dependency; either way the answer is bytes it serialised itself. A device credential is checked on
every request against the database (:func:`~slmops.control.credentials.authenticate_device`; a heartbeat's check is
the ``WHERE`` of its own ``UPDATE``), and the heartbeat is committed before the 200.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Header, Path, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from slmops.control._deps import Bearer, Caller, Plane, errors, invalid, secret_of
from slmops.control.auth import DEVICE_PREFIX, hash_secret, require_device, require_role
from slmops.control.credentials import authenticate, authenticate_device
from slmops.control.desired_state import blob_allowed, desired_state_for, desired_state_of
from slmops.control.devices import record_heartbeat, report_status
from slmops.control.enrollment import claim_credential, enroll_device
from slmops.control.plane import ControlPlane
from slmops.control.ranges import RangeNotSatisfiable, etag_matches, parse_range
from slmops.control.schemas import ErrorBody, Labels
from slmops.core.wire import ClaimRequest, DesiredState, EnrollRequest, EnrollResponse, StatusAck, StatusReport
from slmops.errors import NotFoundError, PermissionDeniedError, SignatureError

__all__ = ["router"]

router = APIRouter(tags=["agents"])
LOOP_LOCK_WAIT_MS = 20  # the longest a heartbeat on the event loop waits for another writer's SQLite lock
DeviceId = Annotated[str, Path(min_length=1, max_length=64)]
Digest = Annotated[str, Path(pattern=r"^sha256:[0-9a-f]{64}$")]
_LABELS = TypeAdapter(Labels)


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    responses={
        202: {"model": EnrollResponse, "description": "Enrolled; waiting for approval"},
        **errors(401, 403, 409, 422),
    },
    summary="Enroll a device with an enrollment token",
)
def enroll(request: EnrollRequest, plane: Plane) -> JSONResponse:
    """200 with a credential when the token auto-approves, 202 (pending) otherwise; then poll `/enroll/claim`."""
    try:
        _LABELS.validate_python(request.labels)
    except ValidationError as exc:
        raise invalid(("body", "labels"), str(exc.errors()[0]["msg"])) from None
    try:
        answer = enroll_device(plane, request)
    except SignatureError as exc:
        raise invalid(("body", "public_key"), str(exc)) from None
    status = 200 if answer.state == "approved" else 202
    return JSONResponse(answer.model_dump(mode="json"), status_code=status)


@router.post(
    "/enroll/claim",
    response_model=EnrollResponse,
    responses={202: {"model": EnrollResponse, "description": "Still pending approval"}, **errors(401, 403, 409, 422)},
    summary="Claim the credential of an approved device, signed by the device key",
)
def claim(request: ClaimRequest, plane: Plane) -> JSONResponse:
    """200 with a new credential once approved, 202 while pending; 409 for a claim that is not newer than the last
    one that obtained a credential (a replay): sign a new claim with the current time."""
    answer = claim_credential(plane, request)
    return JSONResponse(answer.model_dump(mode="json"), status_code=200 if answer.state == "approved" else 202)


@router.get(
    "/devices/{device_id}/desired",
    response_model=DesiredState,
    responses={
        200: {"headers": {"ETag": {"description": "the generation, quoted", "schema": {"type": "string"}}}},
        304: {"description": "Not modified: the If-None-Match generation is current"},
        **errors(401, 403, 404, 422),
    },
    summary="The state a device should reach; 304 when unchanged",
)
async def desired(
    device_id: DeviceId,
    plane: Plane,
    credentials: Bearer,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    secret = secret_of(credentials)
    if secret.startswith(DEVICE_PREFIX) and _on_loop(plane):
        world = plane.world_cache.fresh(plane)
        if world is not None:  # else it is loaded in a worker thread, never on the event loop
            return _answer(desired_state_of(plane, authenticate_device(plane, secret, device_id), world), if_none_match)
    return await run_in_threadpool(_desired, plane, secret, device_id, if_none_match)


def _desired(plane: ControlPlane, secret: str, device_id: str, if_none_match: str | None) -> Response:
    if secret.startswith(DEVICE_PREFIX):
        state = desired_state_of(plane, authenticate_device(plane, secret, device_id))
    else:
        require_role(authenticate(plane, secret), "viewer")
        state = desired_state_for(plane, device_id)
    return _answer(state, if_none_match)


def _answer(state: DesiredState, if_none_match: str | None) -> Response:
    etag = f'"{state.generation}"'
    if etag_matches(if_none_match, etag, weak=True):
        return Response(status_code=304, headers={"ETag": etag})
    return Response(state.model_dump_json(), media_type="application/json", headers={"ETag": etag})


@router.post(
    "/devices/{device_id}/status",
    response_model=StatusAck,
    responses={**errors(401, 403, 404, 409, 422)},
    summary="Heartbeat: what the device runs, its phase and health, and its events (idempotent by event id)",
)
async def status(device_id: DeviceId, report: StatusReport, plane: Plane, credentials: Bearer) -> Response:
    secret = secret_of(credentials)
    if secret.startswith(DEVICE_PREFIX) and not report.events and _on_loop(plane):
        ack = record_heartbeat(plane, hash_secret(secret), device_id, report, lock_wait_ms=LOOP_LOCK_WAIT_MS)
        if ack is not None:
            return Response(ack.model_dump_json(), media_type="application/json")
    return await run_in_threadpool(_status, plane, secret, device_id, report)


def _status(plane: ControlPlane, secret: str, device_id: str, report: StatusReport) -> Response:
    if secret.startswith(DEVICE_PREFIX):
        if not report.events:
            ack = record_heartbeat(plane, hash_secret(secret), device_id, report)
            if ack is not None:
                return Response(ack.model_dump_json(), media_type="application/json")
        authenticate_device(plane, secret, device_id)  # events to store, or no row matched: this says why
    else:
        require_device(authenticate(plane, secret), device_id)  # an operator token: 403
    return Response(report_status(plane, device_id, report).model_dump_json(), media_type="application/json")


def _on_loop(plane: ControlPlane) -> bool:
    """Whether the hot path's one query runs on the event loop: on SQLite (a WAL read never waits for a writer,
    a one-row write waits at most ``LOOP_LOCK_WAIT_MS``), where it costs less than the hop to a worker thread;
    other databases are a network round trip away, so there it runs in a worker thread."""
    return plane.engine.dialect.name == "sqlite"


_BYTES = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@router.get(
    "/blobs/{digest}",
    response_class=Response,
    responses={
        200: {"content": _BYTES, "description": "The whole blob"},
        206: {"content": _BYTES, "description": "The requested range"},
        304: {"description": "Not modified"},
        307: {"description": "Fetch the blob (Range included) from this short-lived presigned object-storage URL"},
        416: {"model": ErrorBody, "description": "Range not satisfiable"},
        **errors(401, 403, 404, 422),
    },
    summary="Blob bytes by digest, with Range / If-Range / ETag, or a redirect to object storage",
)
def blob(
    digest: Digest,
    principal: Caller,
    plane: Plane,
    range: Annotated[str | None, Header()] = None,
    if_range: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    if principal.kind == "device":
        if not blob_allowed(plane, principal.name, digest):
            raise PermissionDeniedError(
                f"blob {digest} is not a file of the model version this device's desired state names"
            )
    else:
        require_role(principal, "viewer")
    blobs = plane.registry.blobs
    try:
        size = blobs.size(digest)
    except NotFoundError:
        raise NotFoundError(f"blob {digest} is not on this server") from None
    etag = f'"{digest.removeprefix("sha256:")}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=31536000, immutable"}
    if etag_matches(if_none_match, etag, weak=True):
        return Response(status_code=304, headers=headers)
    url = blobs.presigned_url(digest, plane.settings.blob_url_expires_s)
    if url is not None:
        # Object storage serves the bytes (Range included); the URL is short-lived, so the answer is not cached.
        # httpx and curl drop the Authorization header when they follow a redirect to another origin.
        return Response(status_code=307, headers={"Location": url, "Cache-Control": "no-store", "ETag": etag})
    path = blobs.local_path(digest)
    start, length, status_code = 0, size, 200
    if range is not None and (if_range is None or etag_matches(if_range, etag, weak=False)):
        try:
            wanted = parse_range(range, size)
        except RangeNotSatisfiable as exc:
            body = ErrorBody(code="range_not_satisfiable", message=str(exc)).model_dump_json()
            return Response(
                body, status_code=416, media_type="application/json", headers={"Content-Range": f"bytes */{size}"}
            )
        start, length, status_code = wanted.start, wanted.length, 206
        headers["Content-Range"] = wanted.content_range(size)
    headers["Content-Length"] = str(length)
    chunk = plane.settings.blob_chunk_bytes
    return StreamingResponse(
        _read(path, start, length, chunk),
        status_code=status_code,
        media_type="application/octet-stream",
        headers=headers,
    )


def _read(path: FilePath, start: int, length: int, chunk_bytes: int) -> Iterator[bytes]:
    """Chunks of a file; each chunk opens and closes the file, so an abandoned download leaks no handle."""
    offset, remaining = start, length
    while remaining > 0:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(min(chunk_bytes, remaining))
        if not data:
            return
        offset += len(data)
        remaining -= len(data)
        yield data
