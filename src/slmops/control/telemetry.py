"""Telemetry in the control plane: storing a device's batch of windows idempotently, and roll-ups for operators.

A batch (``POST /api/v1/devices/{id}/telemetry``, see :mod:`slmops.control.routes_telemetry`) stores each window
once per (device, window id): a retried batch is acknowledged again and never counted twice. The device's class is
stored with each window as it was when the window arrived, so a roll-up groups a device that changed class
correctly. A roll-up sums a version's windows per device class; the sums themselves are the pure
:func:`slmops.telemetry.rollup`. Windows carry numbers only, never text.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.control._unit_of_work import commit_retrying
from slmops.control.db import DeviceRow, TelemetryWindowRow
from slmops.control.repository import iso
from slmops.core.wire import TelemetryAck, TelemetryBatch, TelemetryWindow
from slmops.errors import ConfigError, NotFoundError
from slmops.telemetry import rollup
from slmops.telemetry.schemas import ClassRollup, TelemetryRollup

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = ["parse_time", "store_telemetry", "telemetry_rollup"]

DEFAULT_ROLLUP_S = 86400.0


def parse_time(text: str, what: str) -> datetime:
    """An RFC 3339 time with a zone, in UTC (one beyond the calendar's ends is clamped to it)."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what} must be an RFC 3339 time like 2025-01-31T12:00:00Z; got {text[:64]!r}") from None
    if moment.tzinfo is None:
        raise ConfigError(f"{what} must carry a time zone (e.g. a trailing Z); got {text[:64]!r}")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC) if moment.year > 1 else datetime.min.replace(tzinfo=UTC)


def store_telemetry(plane: ControlPlane, device_id: str, batch: TelemetryBatch) -> TelemetryAck:
    """Store the windows not stored yet (one unit of work); acknowledge every id of the batch."""
    starts = {w.id: iso(parse_time(w.window_start, f"window {w.id[:64]}: window_start")) for w in batch.windows}
    ids = list(dict.fromkeys(w.id for w in batch.windows))

    def work(session: Session) -> TelemetryAck:
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
        now = plane.now_iso()
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
        # the same batch stored concurrently fails the commit: then looked at again
        return TelemetryAck(accepted_ids=ids)

    return commit_retrying(
        plane.engine, work, attempts=3, conflict="telemetry from this device is being stored concurrently; retry"
    )


def telemetry_rollup(
    plane: ControlPlane, version: str, since: str | None = None, until: str | None = None
) -> TelemetryRollup:
    """Totals and merged histograms of one version per device class, over windows starting in [since, until)."""
    digest = version if version.startswith("sha256:") else plane.registry.resolve(version).digest
    end = parse_time(until, "until") if until else plane.clock()
    start = parse_time(since, "since") if since else end - timedelta(seconds=DEFAULT_ROLLUP_S)
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
