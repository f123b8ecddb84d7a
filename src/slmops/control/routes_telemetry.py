"""Telemetry endpoints: a device posts its windows; operators read a version's roll-up per device class."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from slmops.control._deps import Caller, Plane, Viewer, errors, invalid
from slmops.control.auth import require_device
from slmops.control.telemetry import store_telemetry, telemetry_rollup
from slmops.core.wire import TelemetryAck, TelemetryBatch
from slmops.errors import ConfigError
from slmops.telemetry.schemas import TelemetryRollup

__all__ = ["router"]

router = APIRouter()


DeviceId = Annotated[str, Path(min_length=1, max_length=64)]


@router.post(
    "/devices/{device_id}/telemetry",
    response_model=TelemetryAck,
    responses=errors(401, 403, 404, 409, 422),
    tags=["agents"],
    summary="Telemetry windows of a device (aggregates only; idempotent by window id)",
)
def post_telemetry(device_id: DeviceId, batch: TelemetryBatch, principal: Caller, plane: Plane) -> TelemetryAck:
    require_device(principal, device_id)
    try:
        return store_telemetry(plane, device_id, batch)
    except ConfigError as exc:
        raise invalid(("body", "windows"), exc.message) from None


@router.get(
    "/telemetry/rollup",
    response_model=TelemetryRollup,
    responses=errors(401, 403, 404, 422),
    tags=["telemetry"],
    summary="A version's telemetry summed per device class",
)
def get_rollup(
    _: Viewer,
    plane: Plane,
    version: Annotated[str, Query(min_length=1, max_length=200, description="a digest or NAME@REF")],
    since: Annotated[str | None, Query(description="RFC 3339; default 24 hours before `until`")] = None,
    until: Annotated[str | None, Query(description="RFC 3339; default now")] = None,
) -> TelemetryRollup:
    try:
        return telemetry_rollup(plane, version, since, until)
    except ConfigError as exc:
        raise invalid(("query",), exc.message) from None
