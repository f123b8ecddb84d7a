"""Telemetry in the control plane: the stored windows, storing a batch idempotently, and roll-ups for operators.

``POST /api/v1/devices/{id}/telemetry`` (device credential, own device only) stores each window once per
(device, window id): a retried batch is acknowledged again and never counted twice. The device's class is stored
with each window as it was when the window arrived, so a roll-up groups a device that changed class correctly.
``GET /api/v1/telemetry/rollup`` (viewer) sums a version's windows per device class; the sums themselves are the
pure :func:`slmops.telemetry.rollup`. Windows carry numbers only, never text.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.exceptions import RequestValidationError
from sqlalchemy import JSON, Float, ForeignKey, Index, String, select
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from slmops.control._deps import Caller, Plane, Viewer, errors
from slmops.control.auth import require_device
from slmops.control.db import DeviceRow
from slmops.control.repository import iso
from slmops.control.service import ControlPlane
from slmops.core.wire import TelemetryAck, TelemetryBatch, TelemetryWindow
from slmops.errors import ConfigError, ConflictError, NotFoundError
from slmops.registry.db import Base
from slmops.telemetry import rollup
from slmops.telemetry.schemas import ClassRollup, TelemetryRollup

__all__ = [
    "TelemetryWindowRow",
    "router",
    "store_telemetry",
    "telemetry_rollup",
]

DEFAULT_ROLLUP_S = 86400.0


class TelemetryWindowRow(Base):
    __tablename__ = "telemetry_windows"

    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    window_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_digest: Mapped[str | None] = mapped_column(String(71))
    device_class: Mapped[str] = mapped_column(String(80))
    window_start: Mapped[str] = mapped_column(String(40))  # normalized RFC 3339 UTC, second precision
    window_s: Mapped[float] = mapped_column(Float)
    received_at: Mapped[str] = mapped_column(String(40))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)  # the TelemetryWindow as sent

    __table_args__ = (
        Index("ix_telemetry_windows_version_start", "version_digest", "window_start"),
        Index("ix_telemetry_windows_received", "version_digest", "received_at"),
    )


def _parse_time(text: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what} must be an RFC 3339 time like 2025-01-31T12:00:00Z; got {text[:64]!r}") from None
    if moment.tzinfo is None:
        raise ConfigError(f"{what} must carry a time zone (e.g. a trailing Z); got {text[:64]!r}")
    return moment


def store_telemetry(plane: ControlPlane, device_id: str, batch: TelemetryBatch) -> TelemetryAck:
    """Store the windows not stored yet (one unit of work); acknowledge every id of the batch."""
    starts = {w.id: iso(_parse_time(w.window_start, f"window {w.id[:64]}: window_start")) for w in batch.windows}
    ids = list(dict.fromkeys(w.id for w in batch.windows))
    for _attempt in range(3):
        with Session(plane.engine) as session:
            device = session.get(DeviceRow, device_id)
            if device is None:
                raise NotFoundError(f"no device {device_id}")
            known = set(
                session.scalars(
                    select(TelemetryWindowRow.window_id).where(
                        TelemetryWindowRow.device_id == device_id, TelemetryWindowRow.window_id.in_(ids)
                    )
                )
            )
            now = iso(plane.clock())
            for window in batch.windows:
                if window.id in known:
                    continue
                known.add(window.id)
                session.add(
                    TelemetryWindowRow(
                        device_id=device_id,
                        window_id=window.id,
                        version_digest=window.version_digest,
                        device_class=device.device_class,
                        window_start=starts[window.id],
                        window_s=window.window_s,
                        received_at=now,
                        body=window.model_dump(mode="json"),
                    )
                )
            try:
                session.commit()
            except SQLIntegrityError:
                session.rollback()
                continue  # the same batch arrived concurrently: look again
            return TelemetryAck(accepted_ids=ids)
    raise ConflictError("telemetry from this device is being stored concurrently; retry")


def telemetry_rollup(
    plane: ControlPlane, version: str, since: str | None = None, until: str | None = None
) -> TelemetryRollup:
    """Totals and merged histograms of one version per device class, over windows starting in [since, until)."""
    digest = version if version.startswith("sha256:") else plane.registry.resolve(version).digest
    end = _parse_time(until, "until") if until else plane.clock()
    start = _parse_time(since, "since") if since else end - timedelta(seconds=DEFAULT_ROLLUP_S)
    with Session(plane.engine) as session:
        rows = session.execute(
            select(TelemetryWindowRow.device_id, TelemetryWindowRow.device_class, TelemetryWindowRow.body).where(
                TelemetryWindowRow.version_digest == digest,
                TelemetryWindowRow.window_start >= iso(start),
                TelemetryWindowRow.window_start < iso(end),
            )
        ).all()
    totals = rollup((device_id, cls, TelemetryWindow.model_validate(body)) for device_id, cls, body in rows)
    classes = [
        ClassRollup(
            device_class=r.device_class,
            devices=r.devices,
            windows=r.windows,
            requests=r.requests,
            errors=r.errors,
            crashes=r.crashes,
            restarts=r.restarts,
            rollbacks=r.rollbacks,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            error_rate=r.errors / r.requests if r.requests else None,
            latency_ms=r.latency_ms,
            ttft_ms=r.ttft_ms,
            per_token_ms=r.per_token_ms,
        )
        for _, r in sorted(totals.items(), key=lambda item: item[0][1])
    ]
    return TelemetryRollup(version_digest=digest, since=iso(start), until=iso(end), classes=classes)


# ---------------------------------------------------------------------------------------------------- routes

router = APIRouter()


def _invalid(loc: tuple[str, ...], exc: ConfigError) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": exc.message, "type": "value_error"}])


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
        raise _invalid(("body", "windows"), exc) from None


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
        raise _invalid(("query",), exc) from None
