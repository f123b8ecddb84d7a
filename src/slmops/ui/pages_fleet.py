"""The fleet: the overview (devices per class, state, phase, version, online; which version runs on which class),
the device list, one device (capabilities, slots, events, last error) and approving a pending device."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from slmops.control.devices import approve_device, device_events, get_device, is_online
from slmops.control.repository import ControlRepository
from slmops.control.rollouts.releases import releases
from slmops.core.candidates import version_label
from slmops.errors import ConflictError, NotFoundError
from slmops.ui._render import PageError, page, plane_of
from slmops.ui.auth import Operator, Viewer, check_form

if TYPE_CHECKING:
    from slmops.control.db import DeviceRow
    from slmops.control.plane import ControlPlane

__all__ = ["FleetView", "fleet_view", "router"]

router = APIRouter(include_in_schema=False)
MAX_LISTED = 500
NO_VERSION = "(none)"


@dataclass(frozen=True)
class DeviceLine:
    id: str
    hostname: str
    state: str
    device_class: str
    phase: str | None
    health: str | None
    version: str
    online: bool
    last_seen: str | None
    last_error: str | None


@dataclass(frozen=True)
class FleetView:
    total: int
    online: int
    by_state: list[tuple[str, int]]
    by_phase: list[tuple[str, int]]
    by_health: list[tuple[str, int]]
    classes: list[tuple[str, int, int]]  # (class, devices, online)
    versions: list[str]  # the map's columns
    grid: dict[tuple[str, str], int]  # (class, version) -> approved devices running it
    grid_max: int
    pending: list[DeviceLine]
    devices: list[DeviceLine]  # the filtered list, at most MAX_LISTED
    matched: int  # how many matched the filter

    def level(self, count: int) -> int:
        """The heat map's shade for a cell, 0 (none) to 5 (the fullest cell)."""
        return 0 if count <= 0 or self.grid_max <= 0 else min(5, 1 + 4 * count // self.grid_max)


def _labels(plane: ControlPlane, rows: list[DeviceRow]) -> dict[str, str]:
    """A version label per distinct active digest (one registry lookup per version, not per device)."""
    labels: dict[str, str] = {}
    for digest in {r.active_digest for r in rows if r.active_digest}:
        try:
            labels[digest] = version_label(plane.registry.resolve(digest).manifest)
        except NotFoundError:
            labels[digest] = f"unknown {digest.removeprefix('sha256:')[:12]}"
    return labels


def fleet_view(plane: ControlPlane, filters: dict[str, str]) -> FleetView:
    with Session(plane.engine) as session:
        rows = list(ControlRepository(session).devices(None))
    labels = _labels(plane, rows)
    lines = [
        DeviceLine(
            id=r.id,
            hostname=r.hostname,
            state=r.state,
            device_class=r.device_class,
            phase=r.phase,
            health=r.health,
            version=labels.get(r.active_digest, NO_VERSION) if r.active_digest else NO_VERSION,
            online=r.state == "approved" and is_online(plane, r.last_seen),
            last_seen=r.last_seen,
            last_error=r.last_error,
        )
        for r in rows
    ]
    approved = [d for d in lines if d.state == "approved"]
    grid = Counter((d.device_class, d.version) for d in approved)
    per_class = Counter(d.device_class for d in approved)
    online_class = Counter(d.device_class for d in approved if d.online)
    matched = [d for d in lines if all(getattr(d, key) == value for key, value in filters.items())]
    return FleetView(
        total=len(lines),
        online=sum(1 for d in lines if d.online),
        by_state=sorted(Counter(d.state for d in lines).items()),
        by_phase=sorted(Counter(d.phase or "-" for d in approved).items()),
        by_health=sorted(Counter(d.health or "-" for d in approved).items()),
        classes=[(c, n, online_class[c]) for c, n in sorted(per_class.items())],
        versions=sorted({d.version for d in approved}),
        grid=dict(grid),
        grid_max=max(grid.values(), default=0),
        pending=[d for d in lines if d.state == "pending"],
        devices=matched[:MAX_LISTED],
        matched=len(matched),
    )


_FILTERS = ("device_class", "state", "version", "phase", "health")


def _filters(request: Request) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key in _FILTERS:
        value = request.query_params.get(key)
        if value:
            found[key] = value[:200]
    online = request.query_params.get("online")
    if online in ("yes", "no"):
        found["online"] = online == "yes"
    return found


@router.get("/ui/")
def overview(request: Request, session: Viewer) -> Response:
    plane = plane_of(request)
    view = fleet_view(plane, {})
    active = [r for r in releases(plane) if r.state in ("running", "paused")]
    return page(request, "fleet.html", {"view": view, "active_releases": active}, session=session, active="fleet")


@router.get("/ui")
def ui_root() -> Response:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/devices")
def devices(request: Request, session: Viewer) -> Response:
    filters = _filters(request)
    view = fleet_view(plane_of(request), filters)
    return page(
        request,
        "devices.html",
        {"view": view, "filters": filters, "limit": MAX_LISTED},
        session=session,
        active="fleet",
    )


def _device_or_404(plane: ControlPlane, device_id: str) -> Any:
    try:
        return get_device(plane, device_id)
    except NotFoundError:
        raise PageError(404, "not found", f"no device '{device_id[:200]}'") from None


@router.get("/ui/devices/{device_id}")
def device(request: Request, device_id: str, session: Viewer) -> Response:
    plane = plane_of(request)
    found = _device_or_404(plane, device_id)
    events = device_events(plane, device_id, limit=100)
    previous = None
    if found.previous_digest:
        try:
            previous = version_label(plane.registry.resolve(found.previous_digest).manifest)
        except NotFoundError:
            previous = None
    flash = request.query_params.get("done", "")
    return page(
        request,
        "device.html",
        {"device": found, "events": events, "previous": previous, "flash": flash[:100]},
        session=session,
        active="fleet",
    )


@router.post("/ui/devices/{device_id}/approve")
async def approve(request: Request, device_id: str, session: Operator) -> Response:
    await check_form(request, session)
    plane = plane_of(request)
    await run_in_threadpool(_device_or_404, plane, device_id)
    try:
        await run_in_threadpool(approve_device, plane, device_id)
    except ConflictError as exc:
        raise PageError(409, "conflict", exc.message) from None
    return RedirectResponse(f"/ui/devices/{_quote(device_id)}?done=approved", status_code=303)


def _quote(value: str) -> str:
    return quote(value, safe="")
