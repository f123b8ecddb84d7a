"""A release's cohort: the devices its current stage takes, recorded in ``release_members``.

The devices in scope are the approved ones whose winning blueprint is the release's. Each stage takes a stable hash
share of them per device class (:func:`slmops.core.cohorts.members_with_history`); a device is recorded when it
first enters, so membership never shrinks and no device flips back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.control.db import DeviceRow, ReleaseMemberRow
from slmops.control.devices import device_facts
from slmops.control.rollouts._rows import require_release
from slmops.core.cohorts import members_with_history
from slmops.core.desired import ranked_matches
from slmops.core.rollout import RolloutPolicy

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = ["Winners", "recorded_members", "release_scope", "sync_members"]


class Winners:
    """Which blueprint wins for each device, remembered while the device's labels, capabilities and the applied
    blueprints stay the same (comparing two small dicts is much cheaper than parsing capabilities again)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, dict[str, Any], dict[str, Any], str, str | None]] = {}

    def winner(self, world_key: int, applied: Sequence[Any], row: DeviceRow) -> str | None:
        cached = self._seen.get(row.id)
        if (
            cached is not None
            and cached[0] == world_key
            and cached[1] == row.labels
            and cached[2] == row.capabilities
            and cached[3] == row.device_class
        ):
            return cached[4]
        matched = ranked_matches(device_facts(row), applied)
        name = matched[0].blueprint.name if matched else None
        self._seen[row.id] = (world_key, dict(row.labels), dict(row.capabilities), row.device_class, name)
        return name


def release_scope(
    plane: ControlPlane, session: Session, blueprint: str, winners: Winners | None = None
) -> dict[str, DeviceRow]:
    """Approved devices whose winning blueprint is ``blueprint``."""
    world = plane.world_cache.current(plane)
    winners = winners or Winners()
    return {
        row.id: row
        for row in session.scalars(select(DeviceRow).where(DeviceRow.state == "approved"))
        if winners.winner(world.key, world.applied, row) == blueprint
    }


def recorded_members(session: Session, release_id: str) -> dict[str, ReleaseMemberRow]:
    rows = session.scalars(select(ReleaseMemberRow).where(ReleaseMemberRow.release_id == release_id))
    return {r.device_id: r for r in rows}


def sync_members(plane: ControlPlane, release_id: str, winners: Winners | None = None) -> int:
    """Record the devices the current stage of a running release takes; returns how many joined."""
    with Session(plane.engine) as session:
        row = require_release(session, release_id)
        if row.state != "running":
            return 0
        policy = RolloutPolicy.model_validate(row.policy)
        scope = release_scope(plane, session, row.blueprint, winners)
        recorded = recorded_members(session, row.id)
        classes = {device_id: device.device_class for device_id, device in scope.items()}
        members = members_with_history(
            classes, row.id, policy.stages[row.stage_index], set(recorded), min_per_class=policy.min_per_class
        )
        fresh = sorted(members - set(recorded))
        if not fresh:
            return 0
        now = plane.now_epoch()
        joined = [
            {
                "release_id": row.id,
                "device_id": d,
                "device_class": classes[d],
                "stage_index": row.stage_index,
                "joined_at": now,
            }
            for d in fresh
        ]
        try:
            session.execute(insert(ReleaseMemberRow), joined)  # executes at once: a conflict shows here
            session.commit()
        except SQLIntegrityError:
            session.rollback()  # another replica recorded them meanwhile; the next tick looks again
            return 0
    plane.world_cache.invalidate()
    return len(fresh)
