"""Operator endpoints for drift: per (version, class) verdicts, and pinning a reference window."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from slmops.control import drift
from slmops.control._deps import READ, READ_ONE, WRITE_ONE, Operator, Plane, Viewer, invalid
from slmops.control.drift_schemas import (
    DriftEntryPublic,
    DriftPin,
    DriftReferencePublic,
    entry_public,
    reference_public,
)
from slmops.errors import ConfigError

__all__ = ["router"]

router = APIRouter(tags=["drift"])

Version = Annotated[str, Path(min_length=1, max_length=200, description="a digest or NAME@REF")]
DeviceClass = Annotated[str, Path(min_length=1, max_length=80)]


@router.get("/drift", response_model=list[DriftEntryPublic], responses=READ, summary="Drift per version and class")
def get_drift(_: Viewer, plane: Plane) -> list[DriftEntryPublic]:
    """Every (model version, device class) with drift summaries in the last days: per signal the verdict of the
    current steps against the reference (PSI, p-value, level) and when a shift began."""
    step_s = drift.schedule_of(plane.settings).step_s
    return [entry_public(e, step_s) for e in drift.drift_overview(plane, plane.clock())]


@router.get(
    "/drift/{version}/{device_class}", response_model=DriftEntryPublic, responses=READ_ONE, summary="Drift of one"
)
def get_drift_entry(version: Version, device_class: DeviceClass, _: Viewer, plane: Plane) -> DriftEntryPublic:
    """The drift of one (model version, device class)."""
    entry = drift.drift_entry(plane, version, device_class, plane.clock())
    return entry_public(entry, drift.schedule_of(plane.settings).step_s)


@router.put(
    "/drift/reference", response_model=DriftReferencePublic, responses=WRITE_ONE, summary="Pin a drift reference"
)
def put_reference(pin: DriftPin, principal: Operator, plane: Plane) -> DriftReferencePublic:
    """Pin the reference of (version, class) to the windows starting in [start, end); replaces an earlier pin."""
    try:
        pinned = drift.pin_reference(plane, pin.version, pin.device_class, pin.start, pin.end, principal.name)
    except ConfigError as exc:
        raise invalid(("body",), exc.message) from None
    return reference_public(pinned)


@router.delete(
    "/drift/reference", response_model=DriftReferencePublic, responses=WRITE_ONE, summary="Unpin a drift reference"
)
def delete_reference(
    principal: Operator,
    plane: Plane,
    version: Annotated[str, Query(min_length=1, max_length=200, description="a digest or NAME@REF")],
    device_class: Annotated[str, Query(min_length=1, max_length=80)],
) -> DriftReferencePublic:
    """Remove the pinned reference: the version's first days are the reference again. Answers the removed pin."""
    return reference_public(drift.unpin_reference(plane, version, device_class))
