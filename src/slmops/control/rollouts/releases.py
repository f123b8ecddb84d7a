"""Releases and their state machine.

=================  ===========================================  =================================================
from               event                                        to
=================  ===========================================  =================================================
running            promote: the controller's gates passed       the next stage, or ``completed`` from the last one
running, paused    promote: an operator's, without the gates    (the blueprint then gets a revision naming the
                                                                new version)
running, paused    halt: a class failed a gate                  ``halted``: every device returns to the previous
                                                                version
running            pause                                        ``paused``: no promotion, no new canaries
paused             resume                                       ``running``
running, paused    abort                                        ``aborted``: as halted, by an operator
=================  ===========================================  =================================================

Every change is guarded by the release's ``revision`` (optimistic locking), so an operator's pause or abort and a
controller decision never overwrite each other, and each is recorded as an event with the numbers behind it.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.control._candidates import version_family
from slmops.control.blueprints import add_revision
from slmops.control.db import ACTIVE_RELEASE_STATES, ReleaseEventRow, ReleaseMemberRow, ReleaseRow
from slmops.control.repository import ControlRepository, iso
from slmops.control.rollouts._rows import event_public, record_event, release_public, require_release
from slmops.control.rollouts.cohort import sync_members
from slmops.control.schemas import ReleaseEventPublic, ReleaseMember, ReleasePublic, ReleaseStart
from slmops.core.blueprint import blueprint_from_value
from slmops.core.candidates import version_label
from slmops.core.rollout import RolloutPolicy
from slmops.errors import ConflictError, NotFoundError

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = [
    "abort_release",
    "advance",
    "commit_guarded",
    "pause_release",
    "promote_release",
    "release",
    "release_events",
    "release_members",
    "releases",
    "resume_release",
    "start_release",
]

log = logging.getLogger(__name__)

_SQL_INTEGER_MAX = 2**31 - 1  # an INTEGER id column outside SQLite (PostgreSQL's int4); SQLite's rowid is 64-bit


def _family(plane: ControlPlane, reference: str) -> tuple[str, str, list[str]]:
    """(digest, label, the digests of it and every version derived from it) for a model reference."""
    base = plane.registry.resolve(reference)
    return base.digest, version_label(base.manifest), [m.digest for m in version_family(plane.registry, base)]


def start_release(plane: ControlPlane, request: ReleaseStart, created_by: str) -> ReleasePublic:
    """Start moving a blueprint to a new version; the first stage's canaries are chosen at once."""
    with Session(plane.engine) as session:
        repo = ControlRepository(session)
        current = repo.current_blueprint(request.blueprint)
        if current is None:
            raise NotFoundError(
                f"no blueprint named '{request.blueprint}'; apply it first (`slmops apply FILE`), then start a release"
            )
        blueprint = blueprint_from_value(json.loads(current.spec), current.name)
        active = repo.active_releases(request.blueprint)
        if active:
            raise ConflictError(
                f"release {active[0].id} of blueprint '{request.blueprint}' is {active[0].state}; "
                f"finish it first (`slmops rollout abort {active[0].id}` or wait for it)"
            )
    policy = request.policy or blueprint.spec.rollout or RolloutPolicy()
    to_digest, to_label, to_digests = _family(plane, request.to)
    to_name = plane.registry.resolve(to_digest).manifest.name
    try:
        from_digest, from_label, from_digests = _family(plane, blueprint.spec.model.reference)
    except NotFoundError:
        from_digest, from_label, from_digests = None, None, []
    if from_digest == to_digest:
        raise ConflictError(
            f"blueprint '{request.blueprint}' already resolves to {to_label}; a release needs another version"
        )
    now = plane.now_epoch()
    row = ReleaseRow(
        id="rel-" + secrets.token_hex(5),
        blueprint=request.blueprint,
        state="running",
        from_digest=from_digest,
        from_label=from_label,
        from_digests=from_digests,
        to_name=to_name,
        to_digest=to_digest,
        to_label=to_label,
        to_digests=to_digests,
        policy=policy.model_dump(mode="json"),
        stage_index=0,
        stage_started_at=now,
        started_at=now,
        updated_at=now,
        finished_at=None,
        created_by=created_by,
        reason="started",
        revision=1,
        evaluation=None,
        evaluated_at=None,
    )
    stages = " -> ".join(f"{f:.0%}" for f in policy.stages)
    with Session(plane.engine, expire_on_commit=False) as session:
        session.add(row)
        session.flush()
        message = f"release of {request.blueprint}: {from_label or 'nothing'} -> {to_label}, stages {stages}"
        numbers = {"from": from_digest, "to": to_digest, "policy": row.policy}
        record_event(session, row, "started", created_by, message, numbers, now)
        try:
            session.commit()
        except SQLIntegrityError:
            raise ConflictError("a release with this id was created concurrently; start it again") from None
    sync_members(plane, row.id)
    plane.world_cache.invalidate()
    log.info("release %s started by %s: %s", row.id, created_by, message)
    return release(plane, row.id)


def releases(plane: ControlPlane, state: str | None = None) -> list[ReleasePublic]:
    with Session(plane.engine) as session:
        query = select(ReleaseRow).order_by(ReleaseRow.started_at.desc())
        if state is not None:
            query = query.where(ReleaseRow.state == state)
        return [release_public(row) for row in session.scalars(query)]


def release(plane: ControlPlane, release_id: str) -> ReleasePublic:
    with Session(plane.engine) as session:
        return release_public(require_release(session, release_id))


def release_events(plane: ControlPlane, release_id: str, after: int = 0, limit: int = 500) -> list[ReleaseEventPublic]:
    """The release's events with an id above ``after`` (a cursor), oldest first."""
    if plane.engine.dialect.name != "sqlite":
        after = min(after, _SQL_INTEGER_MAX)  # no id is larger: the same empty page, not an out-of-range error
    with Session(plane.engine) as session:
        require_release(session, release_id)
        rows = session.scalars(
            select(ReleaseEventRow)
            .where(ReleaseEventRow.release_id == release_id, ReleaseEventRow.id > after)
            .order_by(ReleaseEventRow.id)
            .limit(limit)
        )
        return [event_public(row) for row in rows]


def release_members(plane: ControlPlane, release_id: str) -> list[ReleaseMember]:
    with Session(plane.engine) as session:
        require_release(session, release_id)
        rows = session.scalars(
            select(ReleaseMemberRow)
            .where(ReleaseMemberRow.release_id == release_id)
            .order_by(ReleaseMemberRow.stage_index, ReleaseMemberRow.device_id)
        )
        return [
            ReleaseMember(device_id=r.device_id, device_class=r.device_class, stage=r.stage_index + 1) for r in rows
        ]


# ---------------------------------------------------------------------------------------------------- transitions

_Change = Callable[[Session, ReleaseRow, float], None]


def pause_release(plane: ControlPlane, release_id: str, actor: str) -> ReleasePublic:
    def apply(session: Session, row: ReleaseRow, now: float) -> None:
        row.state, row.reason = "paused", f"paused by {actor}"
        record_event(session, row, "paused", actor, row.reason, {}, now)

    return _operator_change(plane, release_id, ("running",), "paused", apply)


def resume_release(plane: ControlPlane, release_id: str, actor: str) -> ReleasePublic:
    def apply(session: Session, row: ReleaseRow, now: float) -> None:
        row.state, row.reason = "running", f"resumed by {actor}"
        record_event(session, row, "resumed", actor, row.reason, {}, now)

    return _operator_change(plane, release_id, ("paused",), "resumed", apply)


def abort_release(plane: ControlPlane, release_id: str, actor: str) -> ReleasePublic:
    def apply(session: Session, row: ReleaseRow, now: float) -> None:
        row.state, row.finished_at = "aborted", now
        row.reason = f"aborted by {actor}: every device returns to {row.from_label or 'its previous state'}"
        record_event(session, row, "aborted", actor, row.reason, {"to": row.from_digest}, now)

    return _operator_change(plane, release_id, ACTIVE_RELEASE_STATES, "aborted", apply)


def promote_release(plane: ControlPlane, release_id: str, actor: str) -> ReleasePublic:
    """Promote now: the next stage at once (or completion from the last), without waiting for soak or gates."""

    def apply(session: Session, row: ReleaseRow, now: float) -> None:
        advance(session, row, now, actor, f"promoted by {actor} without waiting for the gates", {})

    _operator_change(plane, release_id, ACTIVE_RELEASE_STATES, "promoted", apply)
    sync_members(plane, release_id)
    plane.world_cache.invalidate()
    return release(plane, release_id)


def _operator_change(
    plane: ControlPlane, release_id: str, allowed: Sequence[str], verb: str, apply: _Change
) -> ReleasePublic:
    for _attempt in range(5):
        with Session(plane.engine) as session:
            row = require_release(session, release_id)
            if row.state not in allowed:
                raise ConflictError(
                    f"release {release_id} is {row.state}; only a {' or '.join(allowed)} release can be {verb}"
                )
            revision = row.revision
            now = plane.now_epoch()
            apply(session, row, now)
            if commit_guarded(session, row, revision, now):
                plane.world_cache.invalidate()
                return release(plane, release_id)
    raise ConflictError(f"release {release_id} is changing concurrently; try again")


def commit_guarded(
    session: Session, row: ReleaseRow, revision: int, now: float, fence: ColumnElement[bool] | None = None
) -> bool:
    """Write ``row``'s changes (and the events added to ``session``) only if nobody changed the release since it
    was read (optimistic locking) and, with a ``fence`` (:func:`slmops.control.lease.holds`), only while the
    writer still holds its lease; False, with nothing written, otherwise."""
    values = {
        "state": row.state,
        "stage_index": row.stage_index,
        "stage_started_at": row.stage_started_at,
        "updated_at": now,
        "finished_at": row.finished_at,
        "reason": row.reason,
        "evaluation": row.evaluation,
        "evaluated_at": row.evaluated_at,
        "revision": revision + 1,
    }
    session.expunge(row)
    result = session.execute(
        update(ReleaseRow)
        .where(ReleaseRow.id == row.id, ReleaseRow.revision == revision, *([fence] if fence is not None else []))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        session.rollback()
        return False
    session.commit()
    return True


def advance(session: Session, row: ReleaseRow, now: float, actor: str, why: str, numbers: dict[str, Any]) -> None:
    """Move to the next stage, or complete the release from the last one (in the caller's transaction)."""
    policy = RolloutPolicy.model_validate(row.policy)
    if row.stage_index + 1 < len(policy.stages):
        row.stage_index += 1
        row.stage_started_at = now
        row.reason = f"stage {row.stage_index + 1} ({policy.stages[row.stage_index]:.0%}): {why}"
        record_event(session, row, "promoted", actor, row.reason, numbers, now)
        return
    row.state, row.finished_at = "completed", now
    row.reason = f"completed: every device of {row.blueprint} runs {row.to_label}; {why}"
    _write_blueprint_revision(session, row, actor, now)
    record_event(session, row, "completed", actor, row.reason, numbers, now)


def _write_blueprint_revision(session: Session, row: ReleaseRow, actor: str, now: float) -> None:
    """A completed release leaves the blueprint naming the new version, so what is applied is what runs."""
    repo = ControlRepository(session)
    current = repo.current_blueprint(row.blueprint)
    if current is None:
        return
    value = json.loads(current.spec)
    label = row.to_label.split("@", 1)[1].split(" ", 1)[0] if "@" in row.to_label else row.to_digest
    value["spec"]["model"] = {"name": row.to_name, "ref": label}
    blueprint = blueprint_from_value(value, row.blueprint)
    source = f"# written by release {row.id} when it completed\n" + yaml.safe_dump(
        blueprint.to_json_value(), sort_keys=False
    )
    add_revision(repo, blueprint, source, f"release:{row.id}"[:64], iso(datetime.fromtimestamp(now, UTC)))
