"""Operator endpoints: devices, enrollment tokens, API tokens, blueprints."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from slmops.control import blueprints, credentials, devices, enrollment
from slmops.control._deps import READ, READ_ONE, WRITE_ONE, Admin, Operator, Plane, Viewer, errors
from slmops.control.schemas import (
    ApiTokenCreate,
    ApiTokenCreated,
    ApiTokenPublic,
    ApplyResult,
    BlueprintApply,
    BlueprintPublic,
    DeviceEventPublic,
    DeviceLabelsUpdate,
    DevicePublic,
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    EnrollmentTokenPublic,
    PlanPublic,
)

__all__ = ["router"]

router = APIRouter()
DeviceId = Annotated[str, Path(min_length=1, max_length=64)]
Name = Annotated[str, Path(min_length=1, max_length=64)]


@router.get("/devices", response_model=list[DevicePublic], responses=READ, tags=["devices"])
def list_devices(
    _: Viewer,
    plane: Plane,
    state: Annotated[Literal["pending", "approved", "revoked", "decommissioned"] | None, Query()] = None,
) -> list[DevicePublic]:
    """Every device, optionally only those in one state; `online` is computed at request time."""
    return devices.list_devices(plane, state)


@router.get("/devices/{device_id}", response_model=DevicePublic, responses=READ_ONE, tags=["devices"])
def show_device(device_id: DeviceId, _: Viewer, plane: Plane) -> DevicePublic:
    return devices.get_device(plane, device_id)


@router.get("/devices/{device_id}/events", response_model=list[DeviceEventPublic], responses=READ_ONE, tags=["devices"])
def device_events(
    device_id: DeviceId, _: Viewer, plane: Plane, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[DeviceEventPublic]:
    """The device's most recent events, newest first."""
    return devices.device_events(plane, device_id, limit)


@router.post("/devices/{device_id}/approve", response_model=DevicePublic, responses=WRITE_ONE, tags=["devices"])
def approve_device(device_id: DeviceId, _: Operator, plane: Plane) -> DevicePublic:
    """Approve a pending device; it obtains its credential by claiming it with its key."""
    return devices.approve_device(plane, device_id)


@router.post("/devices/{device_id}/revoke", response_model=DevicePublic, responses=WRITE_ONE, tags=["devices"])
def revoke_device(device_id: DeviceId, _: Operator, plane: Plane) -> DevicePublic:
    """Revoke a device: its credential stops working at once."""
    return devices.revoke_device(plane, device_id)


@router.post("/devices/{device_id}/decommission", response_model=DevicePublic, responses=WRITE_ONE, tags=["devices"])
def decommission_device(device_id: DeviceId, _: Operator, plane: Plane) -> DevicePublic:
    return devices.decommission_device(plane, device_id)


@router.post("/devices/{device_id}/labels", response_model=DevicePublic, responses=WRITE_ONE, tags=["devices"])
def label_device(device_id: DeviceId, update: DeviceLabelsUpdate, _: Operator, plane: Plane) -> DevicePublic:
    """Set and remove labels (removals first)."""
    return devices.label_device(plane, device_id, dict(update.set), list(update.remove))


@router.post(
    "/enrollment-tokens",
    response_model=EnrollmentTokenCreated,
    status_code=201,
    responses=READ,
    tags=["enrollment"],
)
def create_enrollment_token(body: EnrollmentTokenCreate, principal: Operator, plane: Plane) -> EnrollmentTokenCreated:
    """A token devices enroll with; the secret is in this answer only."""
    return enrollment.create_enrollment_token(
        plane,
        max_uses=body.max_uses,
        expires_in_s=body.expires_in_s,
        auto_approve=body.auto_approve,
        labels=dict(body.labels),
        created_by=principal.name,
    )


@router.get("/enrollment-tokens", response_model=list[EnrollmentTokenPublic], responses=READ, tags=["enrollment"])
def list_enrollment_tokens(_: Operator, plane: Plane) -> list[EnrollmentTokenPublic]:
    return enrollment.list_enrollment_tokens(plane)


@router.post(
    "/tokens", response_model=ApiTokenCreated, status_code=201, responses=errors(401, 403, 409, 422), tags=["tokens"]
)
def create_token(body: ApiTokenCreate, principal: Admin, plane: Plane) -> ApiTokenCreated:
    """An operator API token; the secret is in this answer only."""
    return credentials.create_api_token(plane, body.name, body.role, principal.name)


@router.get("/tokens", response_model=list[ApiTokenPublic], responses=READ, tags=["tokens"])
def list_tokens(_: Admin, plane: Plane) -> list[ApiTokenPublic]:
    return credentials.list_api_tokens(plane)


@router.post("/tokens/{name}/revoke", response_model=ApiTokenPublic, responses=WRITE_ONE, tags=["tokens"])
def revoke_token(name: Name, _: Admin, plane: Plane) -> ApiTokenPublic:
    return credentials.revoke_api_token(plane, name)


@router.post("/blueprints", response_model=ApplyResult, responses=errors(401, 403, 409, 422), tags=["blueprints"])
def apply_blueprint(body: BlueprintApply, principal: Operator, plane: Plane) -> ApplyResult:
    """Create or update a blueprint from its YAML; a new revision only when it changed."""
    return blueprints.apply_blueprint(plane, body.source, principal.name)


@router.post("/blueprints/plan", response_model=PlanPublic, responses=READ, tags=["blueprints"])
def plan_blueprint(body: BlueprintApply, _: Operator, plane: Plane) -> PlanPublic:
    """What applying this blueprint would change on each device, and which blueprint wins where."""
    return blueprints.plan_blueprint(plane, body.source)


@router.get("/blueprints", response_model=list[BlueprintPublic], responses=READ, tags=["blueprints"])
def list_blueprints(_: Viewer, plane: Plane) -> list[BlueprintPublic]:
    """The current revision of every blueprint."""
    return blueprints.list_blueprints(plane)


@router.get("/blueprints/{name}", response_model=BlueprintPublic, responses=READ_ONE, tags=["blueprints"])
def show_blueprint(
    name: Name, _: Viewer, plane: Plane, revision: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None
) -> BlueprintPublic:
    return blueprints.get_blueprint(plane, name, revision)
