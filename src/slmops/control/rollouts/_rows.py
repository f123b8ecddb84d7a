"""Release rows: finding one, recording its events, and mapping both to the public schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from slmops.control.db import ReleaseEventRow, ReleaseRow
from slmops.control.schemas import ClassProgress, ReleaseEventPublic, ReleasePublic
from slmops.core.manifest import canonical_json
from slmops.core.rollout import RolloutPolicy
from slmops.errors import NotFoundError

__all__ = ["event_public", "record_event", "release_public", "require_release"]


def require_release(session: Session, release_id: str) -> ReleaseRow:
    row = session.get(ReleaseRow, release_id)
    if row is None:
        raise NotFoundError(f"no release '{release_id}' (list them with `slmops rollout list`)")
    return row


def record_event(
    session: Session, row: ReleaseRow, kind: str, actor: str, message: str, numbers: dict[str, Any], now: float
) -> None:
    """Add one event of ``row`` at its current stage (in the caller's unit of work)."""
    clean = json.loads(canonical_json(numbers).decode("utf-8"))
    session.add(
        ReleaseEventRow(
            release_id=row.id,
            time=now,
            kind=kind,
            stage_index=row.stage_index,
            actor=actor,
            message=message,
            numbers=clean,
        )
    )


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def release_public(row: ReleaseRow) -> ReleasePublic:
    policy = RolloutPolicy.model_validate(row.policy)
    evaluation = row.evaluation or {}
    return ReleasePublic(
        id=row.id,
        blueprint=row.blueprint,
        state=row.state,
        from_version=row.from_label,
        from_digest=row.from_digest,
        to_version=row.to_label,
        to_digest=row.to_digest,
        stage=row.stage_index + 1,
        stages=list(policy.stages),
        stage_started_at=_time(row.stage_started_at),
        soak_s=policy.soak_s,
        started_at=_time(row.started_at),
        finished_at=_time(row.finished_at) if row.finished_at is not None else None,
        created_by=row.created_by,
        reason=row.reason,
        evaluated_at=_time(row.evaluated_at) if row.evaluated_at is not None else None,
        classes=[ClassProgress.model_validate(c) for c in evaluation.get("classes", [])],
        policy=row.policy,
    )


def event_public(row: ReleaseEventRow) -> ReleaseEventPublic:
    return ReleaseEventPublic(
        id=row.id,
        release_id=row.release_id,
        time=_time(row.time),
        kind=row.kind,
        stage=row.stage_index + 1,
        actor=row.actor,
        message=row.message,
        numbers=row.numbers,
    )
