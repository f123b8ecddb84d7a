"""Devices: the operators' view (list, show, events), their lifecycle (approve, revoke, decommission, labels), and
the heartbeat through which each device keeps its row current.

A device is ``pending`` until approved; ``revoked`` and ``decommissioned`` are final (the key must enroll again)
and drop its credential at once. ``online`` is computed when asked: heard from within ``device_offline_after_s``
plus ``device_offline_grace_s``.

A heartbeat without events (nearly all of them) is :func:`record_heartbeat`: one ``UPDATE`` whose ``WHERE`` is the
credential hash, the device id and ``state = 'approved'``, committed before the answer; it authenticates,
authorizes and writes in one statement. When it matches no row (unknown credential, another device's, a device not
approved, a missing device), the caller takes the general path, which says which it was.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, bindparam, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from slmops.control._unit_of_work import commit_retrying
from slmops.control.db import DeviceEventRow, DeviceRow
from slmops.control.repository import ControlRepository, parse_iso
from slmops.control.schemas import DeviceEventPublic, DevicePublic
from slmops.core.candidates import version_label
from slmops.core.desired import DeviceFacts
from slmops.core.device_class import device_class
from slmops.core.manifest import canonical_json
from slmops.core.wire import Capabilities, StatusAck, StatusReport
from slmops.errors import ConflictError, NotFoundError

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = [
    "approve_device",
    "decommission_device",
    "device_events",
    "device_facts",
    "get_device",
    "is_online",
    "label_device",
    "list_devices",
    "record_heartbeat",
    "report_status",
    "require_device",
    "revoke_device",
]


def list_devices(plane: ControlPlane, state: str | None = None) -> list[DevicePublic]:
    with Session(plane.engine) as session:
        rows = ControlRepository(session).devices([state] if state else None)
        return [_device_public(plane, row) for row in rows]


def get_device(plane: ControlPlane, device_id: str) -> DevicePublic:
    with Session(plane.engine) as session:
        return _device_public(plane, require_device(ControlRepository(session), device_id))


def approve_device(plane: ControlPlane, device_id: str) -> DevicePublic:
    return _transition(plane, device_id, "approved", allowed_from=("pending", "approved"))


def revoke_device(plane: ControlPlane, device_id: str) -> DevicePublic:
    return _transition(plane, device_id, "revoked", allowed_from=("pending", "approved", "revoked"))


def decommission_device(plane: ControlPlane, device_id: str) -> DevicePublic:
    return _transition(
        plane, device_id, "decommissioned", allowed_from=("pending", "approved", "revoked", "decommissioned")
    )


def _transition(plane: ControlPlane, device_id: str, state: str, allowed_from: tuple[str, ...]) -> DevicePublic:
    with Session(plane.engine) as session:
        device = require_device(ControlRepository(session), device_id)
        if device.state not in allowed_from:
            raise ConflictError(
                f"device {device_id} is {device.state} and cannot become {state}; a revoked or decommissioned "
                "device must enroll again with a new key"
            )
        if device.state != state:
            device.state = state
            device.updated_at = plane.now_iso()
            if state in ("revoked", "decommissioned"):
                device.credential_hash = None
            session.commit()
            plane.credential_cache.clear()
        return _device_public(plane, device)


def label_device(plane: ControlPlane, device_id: str, set_labels: dict[str, str], remove: list[str]) -> DevicePublic:
    """Remove the labels ``remove``, then set ``set_labels``."""
    with Session(plane.engine) as session:
        device = require_device(ControlRepository(session), device_id)
        labels = {k: v for k, v in device.labels.items() if k not in remove}
        labels.update(set_labels)
        device.labels = labels
        device.updated_at = plane.now_iso()
        session.commit()
        return _device_public(plane, device)


def device_events(plane: ControlPlane, device_id: str, limit: int = 100) -> list[DeviceEventPublic]:
    """The device's most recent events, newest first."""
    with Session(plane.engine) as session:
        repo = ControlRepository(session)
        require_device(repo, device_id)
        return [
            DeviceEventPublic(
                id=row.event_id,
                time=row.time,
                kind=row.kind,
                version_digest=row.version_digest,
                detail=row.detail,
                received_at=row.received_at,
            )
            for row in repo.events(device_id, limit)
        ]


def report_status(plane: ControlPlane, device_id: str, report: StatusReport) -> StatusAck:
    """Record a heartbeat and its events; events already stored are acknowledged again, never duplicated."""
    ids = list(dict.fromkeys(e.id for e in report.events))

    def work(session: Session) -> StatusAck:
        repo = ControlRepository(session)
        device = require_device(repo, device_id)
        now = plane.now_iso()
        device.last_seen = now
        device.updated_at = now
        device.phase = report.phase
        device.health = report.health
        device.active_digest = report.active_digest
        device.previous_digest = report.previous_digest
        device.last_error = report.last_error.replace("\x00", "") if report.last_error else None
        device.desired_generation = report.desired_generation
        device.agent_version = report.agent_version.replace("\x00", "")[:64] or None
        if report.capabilities is not None:
            device.capabilities = report.capabilities.model_dump(mode="json")
            device.device_class = device_class(report.capabilities)
        seen = repo.known_event_ids(device_id, ids) if ids else set()
        seq = repo.last_event_seq(device_id) if ids else 0
        fresh: list[DeviceEventRow] = []
        for event in report.events:
            if event.id in seen:
                continue
            seen.add(event.id)
            seq += 1
            fresh.append(
                DeviceEventRow(
                    device_id=device_id,
                    event_id=event.id,
                    time=event.time.replace("\x00", ""),
                    kind=event.kind.replace("\x00", ""),
                    version_digest=event.version_digest.replace("\x00", "") if event.version_digest else None,
                    detail=json.loads(canonical_json(event.detail).decode("utf-8").replace("\\u0000", "")),
                    received_at=now,
                    seq=seq,
                )
            )
        repo.add_events(fresh)  # the same events arriving concurrently fail here: then looked at again
        return StatusAck(accepted_event_ids=ids, server_time=now)

    return commit_retrying(
        plane.engine, work, attempts=3, conflict="status reports for this device are arriving concurrently; retry"
    )


_DEVICES = cast(Table, DeviceRow.__table__)
_HEARTBEAT = (
    update(_DEVICES)
    .where(_DEVICES.c.credential_hash == bindparam("b_credential_hash"))
    .where(_DEVICES.c.id == bindparam("b_device_id"))
    .where(_DEVICES.c.state == "approved")
)  # the SET clause: the columns named in the parameters (SQLAlchemy compiles and caches one per set of names)


def record_heartbeat(
    plane: ControlPlane, credential_hash: str, device_id: str, report: StatusReport, *, lock_wait_ms: int | None = None
) -> StatusAck | None:
    """Store a heartbeat without events in one committed ``UPDATE`` guarded by credential, id and approval; None
    (nothing written) when no such device holds that credential: then :func:`report_status` after
    :func:`~slmops.control.credentials.authenticate_device` answers with the reason.

    ``lock_wait_ms`` (SQLite only): wait at most this long for another writer's lock, else return None too (the
    caller on the event loop then retries in a worker thread, with the engine's usual wait)."""
    if report.events:
        raise ValueError("record_heartbeat takes reports without events; use report_status")
    now = plane.now_iso()
    values: dict[str, object] = {
        "last_seen": now,
        "updated_at": now,
        "phase": report.phase,
        "health": report.health,
        "active_digest": report.active_digest,
        "previous_digest": report.previous_digest,
        "last_error": report.last_error.replace("\x00", "") if report.last_error else None,
        "desired_generation": report.desired_generation,
        "agent_version": report.agent_version.replace("\x00", "")[:64] or None,
        "b_credential_hash": credential_hash,
        "b_device_id": device_id,
    }
    if report.capabilities is not None:
        values["capabilities"] = report.capabilities.model_dump(mode="json")
        values["device_class"] = device_class(report.capabilities)
    with plane.engine.connect() as connection:
        waits, usual = lock_wait_ms is not None and connection.dialect.name == "sqlite", 0
        driver: Any = connection.connection.driver_connection  # sqlite3.Connection: pragmas outside any transaction
        if waits:
            info = connection.connection.info  # lives as long as the database connection
            if "slmops_busy_timeout" not in info:
                info["slmops_busy_timeout"] = int(driver.execute("PRAGMA busy_timeout").fetchone()[0])
            usual = info["slmops_busy_timeout"]
            driver.execute(f"PRAGMA busy_timeout = {int(lock_wait_ms or 0)}")
        try:
            with connection.begin():  # committed before returning: the heartbeat is stored when it is acked
                rows = getattr(connection.execute(_HEARTBEAT, values), "rowcount", 0)
        except OperationalError:
            if not waits:
                raise
            return None  # locked by another writer for longer than lock_wait_ms
        finally:
            if waits:
                driver.execute(f"PRAGMA busy_timeout = {usual}")
    return StatusAck(accepted_event_ids=[], server_time=now) if rows == 1 else None


# ---------------------------------------------------------------------------------------------------- helpers


def require_device(repo: ControlRepository, device_id: str) -> DeviceRow:
    device = repo.device(device_id)
    if device is None:
        raise NotFoundError(f"no device '{device_id}' (list them with `slmops device list`)")
    return device


def device_facts(row: DeviceRow) -> DeviceFacts:
    """What blueprint matching and desired state need of a device row."""
    caps = Capabilities.model_validate(row.capabilities) if row.capabilities else None
    return DeviceFacts(device_id=row.id, labels=dict(row.labels), capabilities=caps, device_class=row.device_class)


def is_online(plane: ControlPlane, last_seen: str | None) -> bool:
    if last_seen is None:
        return False
    age = (plane.clock() - parse_iso(last_seen)).total_seconds()
    return age <= plane.settings.device_offline_after_s + plane.settings.device_offline_grace_s


def _version_label(plane: ControlPlane, digest: str | None) -> str | None:
    if digest is None:
        return None
    try:
        return version_label(plane.registry.resolve(digest).manifest)
    except NotFoundError:
        return None


def _device_public(plane: ControlPlane, row: DeviceRow) -> DevicePublic:
    return DevicePublic(
        id=row.id,
        state=row.state,
        device_class=row.device_class,
        hostname=row.hostname,
        labels=dict(row.labels),
        capabilities=Capabilities.model_validate(row.capabilities) if row.capabilities else None,
        enrolled_at=row.enrolled_at,
        last_seen=row.last_seen,
        online=row.state == "approved" and is_online(plane, row.last_seen),
        phase=row.phase,
        health=row.health,
        active_digest=row.active_digest,
        active_version=_version_label(plane, row.active_digest),
        previous_digest=row.previous_digest,
        last_error=row.last_error,
        desired_generation=row.desired_generation,
        agent_version=row.agent_version,
    )
