"""Releases and the rollout controller.

A release (``slmops rollout start BLUEPRINT --to REF``) moves one blueprint from the version it resolves to now to a
new one, stage by stage. Everything about it lives in the database: the release row (state, stage, policy), its
cohort (``release_members``: each device recorded when it first entered, so membership never shrinks and no device
flips back) and its events (every decision, with the numbers that led to it). Desired state reads the active
releases: a recorded canary gets the new version, every other device the blueprint as applied.

The controller is a loop in the server. Each tick it takes or renews a lease row in the database (only the replica
holding ``rollout-controller`` acts, so several replicas are safe), and for each running release:

1. records the devices the current stage takes (:func:`slmops.core.cohorts.members_with_history`, per class);
2. gathers per class the canaries' telemetry on the new version since the stage began, the baseline's on the old
   version since the release began, how many canaries are online, switched, reporting and rolled back;
3. asks :func:`slmops.core.rollout.evaluate_stage`, and acts: promote (next stage, or complete: a new blueprint
   revision naming the new version), hold (nothing; an event when the reason changes), or halt (state ``halted``:
   desired state returns to the previous version and agents switch back from the slot they kept).

Each tick is idempotent and uses only database state, so a restarted or replaced controller resumes where the last
one stopped. Updates are guarded by the release's ``revision`` (optimistic locking), so an operator's pause or abort
and a controller decision never overwrite each other. Operators can pause (no promotion, no new canaries; critical
failures still halt), resume, abort (roll back) and promote now.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Path, Query
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.control._deps import Operator, Plane, Viewer, errors
from slmops.control.db import (
    BlueprintRow,
    DeviceEventRow,
    DeviceRow,
    LeaseRow,
    ReleaseEventRow,
    ReleaseMemberRow,
    ReleaseRow,
)
from slmops.control.repository import ControlRepository, iso, parse_iso
from slmops.control.schemas import (
    ClassProgress,
    ReleaseEventPublic,
    ReleaseMember,
    ReleasePublic,
    ReleaseStart,
    ReleaseState,
)
from slmops.control.service import ACTIVE_RELEASE_STATES, ControlPlane, device_facts
from slmops.control.telemetry import TelemetryWindowRow
from slmops.core.blueprint import blueprint_from_value
from slmops.core.candidates import version_label
from slmops.core.cohorts import members_with_history
from slmops.core.desired import ranked_matches
from slmops.core.manifest import canonical_json
from slmops.core.rollout import (
    ClassEvidence,
    GroupTotals,
    RolloutPolicy,
    StageEvaluation,
    evaluate_stage,
)
from slmops.core.wire import LATENCY_BUCKETS_MS, Histogram
from slmops.errors import ConfigError, ConflictError, NotFoundError
from slmops.telemetry.aggregate import histogram_samples

__all__ = [
    "CONTROLLER_LEASE",
    "ClassProgress",
    "ReleaseEventPublic",
    "ReleasePublic",
    "ReleaseStart",
    "RolloutController",
    "abort_release",
    "acquire_lease",
    "pause_release",
    "promote_release",
    "release",
    "release_events",
    "release_members",
    "releases",
    "resume_release",
    "router",
    "start_release",
]

log = logging.getLogger(__name__)

CONTROLLER_LEASE = "rollout-controller"
_HISTOGRAMS = {"latency": "latency_ms", "ttft": "ttft_ms", "per_token": "per_token_ms"}


# ---------------------------------------------------------------------------------------------------- schemas


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _public(row: ReleaseRow) -> ReleasePublic:
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


def _event_public(row: ReleaseEventRow) -> ReleaseEventPublic:
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


# ---------------------------------------------------------------------------------------------------- operations


def _epoch(plane: ControlPlane) -> float:
    return plane.clock().timestamp()


def _event(
    session: Session, row: ReleaseRow, kind: str, actor: str, message: str, numbers: dict[str, Any], now: float
) -> None:
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


def _require(session: Session, release_id: str) -> ReleaseRow:
    row = session.get(ReleaseRow, release_id)
    if row is None:
        raise NotFoundError(f"no release '{release_id}' (list them with `slmops rollout list`)")
    return row


def _family(plane: ControlPlane, reference: str) -> tuple[str, str, list[str]]:
    """(digest, label, the digests of it and every version derived from it) for a model reference."""
    base = plane.registry.resolve(reference)
    digests = [base.digest]
    frontier = [base.digest]
    while frontier:
        for child in plane.registry.children(frontier.pop()):
            if child.digest not in digests:
                digests.append(child.digest)
                frontier.append(child.digest)
    return base.digest, version_label(base.manifest), digests


def start_release(plane: ControlPlane, request: ReleaseStart, created_by: str) -> ReleasePublic:
    """Start moving a blueprint to a new version; the first stage's canaries are chosen at once."""
    with Session(plane.engine) as session:
        current = ControlRepository(session).current_blueprint(request.blueprint)
        if current is None:
            raise NotFoundError(
                f"no blueprint named '{request.blueprint}'; apply it first (`slmops apply FILE`), then start a release"
            )
        blueprint = blueprint_from_value(json.loads(current.spec), current.name)
        active = session.scalar(
            select(ReleaseRow).where(
                ReleaseRow.blueprint == request.blueprint, ReleaseRow.state.in_(ACTIVE_RELEASE_STATES)
            )
        )
        if active is not None:
            raise ConflictError(
                f"release {active.id} of blueprint '{request.blueprint}' is {active.state}; "
                f"finish it first (`slmops rollout abort {active.id}` or wait for it)"
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
    now = _epoch(plane)
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
        _event(session, row, "started", created_by, message, numbers, now)
        try:
            session.commit()
        except SQLIntegrityError:
            raise ConflictError("a release with this id was created concurrently; start it again") from None
    _sync_members(plane, row.id)
    plane.invalidate()
    log.info("release %s started by %s: %s", row.id, created_by, message)
    return release(plane, row.id)


def releases(plane: ControlPlane, state: str | None = None) -> list[ReleasePublic]:
    with Session(plane.engine) as session:
        query = select(ReleaseRow).order_by(ReleaseRow.started_at.desc())
        if state is not None:
            query = query.where(ReleaseRow.state == state)
        return [_public(row) for row in session.scalars(query)]


def release(plane: ControlPlane, release_id: str) -> ReleasePublic:
    with Session(plane.engine) as session:
        return _public(_require(session, release_id))


def release_events(plane: ControlPlane, release_id: str, after: int = 0, limit: int = 500) -> list[ReleaseEventPublic]:
    with Session(plane.engine) as session:
        _require(session, release_id)
        rows = session.scalars(
            select(ReleaseEventRow)
            .where(ReleaseEventRow.release_id == release_id, ReleaseEventRow.id > after)
            .order_by(ReleaseEventRow.id)
            .limit(limit)
        )
        return [_event_public(row) for row in rows]


def release_members(plane: ControlPlane, release_id: str) -> list[ReleaseMember]:
    with Session(plane.engine) as session:
        _require(session, release_id)
        rows = session.scalars(
            select(ReleaseMemberRow)
            .where(ReleaseMemberRow.release_id == release_id)
            .order_by(ReleaseMemberRow.stage_index, ReleaseMemberRow.device_id)
        )
        return [
            ReleaseMember(device_id=r.device_id, device_class=r.device_class, stage=r.stage_index + 1) for r in rows
        ]


def _operator_change(
    plane: ControlPlane, release_id: str, actor: str, allowed: Sequence[str], verb: str, apply: Any
) -> ReleasePublic:
    for _attempt in range(5):
        with Session(plane.engine) as session:
            row = _require(session, release_id)
            if row.state not in allowed:
                raise ConflictError(
                    f"release {release_id} is {row.state}; only a {' or '.join(allowed)} release can be {verb}"
                )
            revision = row.revision
            now = _epoch(plane)
            apply(session, row, now)
            if _commit_guarded(session, row, revision, now):
                plane.invalidate()
                return release(plane, release_id)
    raise ConflictError(f"release {release_id} is changing concurrently; try again")


def _commit_guarded(session: Session, row: ReleaseRow, revision: int, now: float) -> bool:
    """Write ``row``'s changes only if nobody changed the release since it was read (optimistic locking)."""
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
        .where(ReleaseRow.id == row.id, ReleaseRow.revision == revision)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        session.rollback()
        return False
    session.commit()
    return True


def pause_release(plane: ControlPlane, release_id: str, actor: str) -> ReleasePublic:
    def apply(session: Session, row: ReleaseRow, now: float) -> None:
        row.state, row.reason = "paused", f"paused by {actor}"
        _event(session, row, "paused", actor, row.reason, {}, now)

    return _operator_change(plane, release_id, actor, ("running",), "paused", apply)


def resume_release(plane: ControlPlane, release_id: str, actor: str) -> ReleasePublic:
    def apply(session: Session, row: ReleaseRow, now: float) -> None:
        row.state, row.reason = "running", f"resumed by {actor}"
        _event(session, row, "resumed", actor, row.reason, {}, now)

    return _operator_change(plane, release_id, actor, ("paused",), "resumed", apply)


def abort_release(plane: ControlPlane, release_id: str, actor: str) -> ReleasePublic:
    def apply(session: Session, row: ReleaseRow, now: float) -> None:
        row.state, row.finished_at = "aborted", now
        row.reason = f"aborted by {actor}: every device returns to {row.from_label or 'its previous state'}"
        _event(session, row, "aborted", actor, row.reason, {"to": row.from_digest}, now)

    return _operator_change(plane, release_id, actor, ACTIVE_RELEASE_STATES, "aborted", apply)


def promote_release(plane: ControlPlane, release_id: str, actor: str) -> ReleasePublic:
    """Promote now: the next stage at once (or completion from the last), without waiting for soak or gates."""

    def apply(session: Session, row: ReleaseRow, now: float) -> None:
        _advance(session, row, now, actor, f"promoted by {actor} without waiting for the gates", {})

    _operator_change(plane, release_id, actor, ACTIVE_RELEASE_STATES, "promoted", apply)
    _sync_members(plane, release_id)
    plane.invalidate()
    return release(plane, release_id)


def _advance(session: Session, row: ReleaseRow, now: float, actor: str, why: str, numbers: dict[str, Any]) -> None:
    """Move to the next stage, or complete the release from the last one (in the caller's transaction)."""
    policy = RolloutPolicy.model_validate(row.policy)
    if row.stage_index + 1 < len(policy.stages):
        row.stage_index += 1
        row.stage_started_at = now
        row.reason = f"stage {row.stage_index + 1} ({policy.stages[row.stage_index]:.0%}): {why}"
        _event(session, row, "promoted", actor, row.reason, numbers, now)
        return
    row.state, row.finished_at = "completed", now
    row.reason = f"completed: every device of {row.blueprint} runs {row.to_label}; {why}"
    _write_blueprint_revision(session, row, actor, now)
    _event(session, row, "completed", actor, row.reason, numbers, now)


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
    revision = repo.latest_blueprint_revision(row.blueprint) + 1
    repo.add_blueprint_revision(
        BlueprintRow(
            name=row.blueprint,
            revision=revision,
            spec=canonical_json(blueprint.to_json_value()).decode("utf-8"),
            source=f"# written by release {row.id} when it completed\n"
            + yaml.safe_dump(blueprint.to_json_value(), sort_keys=False),
            digest=blueprint.digest,
            created_by=f"release:{row.id}"[:64],
            created_at=iso(datetime.fromtimestamp(now, UTC)),
        )
    )


# ---------------------------------------------------------------------------------------------------- membership


class _Winners:
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


def _scope(
    plane: ControlPlane, session: Session, blueprint: str, winners: _Winners | None = None
) -> dict[str, DeviceRow]:
    """Approved devices whose winning blueprint is ``blueprint``."""
    world = plane.world()
    winners = winners or _Winners()
    return {
        row.id: row
        for row in session.scalars(select(DeviceRow).where(DeviceRow.state == "approved"))
        if winners.winner(world.key, world.applied, row) == blueprint
    }


def _recorded(session: Session, release_id: str) -> dict[str, ReleaseMemberRow]:
    rows = session.scalars(select(ReleaseMemberRow).where(ReleaseMemberRow.release_id == release_id))
    return {r.device_id: r for r in rows}


def _sync_members(plane: ControlPlane, release_id: str, winners: _Winners | None = None) -> int:
    """Record the devices the current stage takes; returns how many joined."""
    with Session(plane.engine) as session:
        row = _require(session, release_id)
        if row.state != "running":
            return 0
        policy = RolloutPolicy.model_validate(row.policy)
        scope = _scope(plane, session, row.blueprint, winners)
        recorded = _recorded(session, row.id)
        classes = {device_id: device.device_class for device_id, device in scope.items()}
        members = members_with_history(
            classes, row.id, policy.stages[row.stage_index], set(recorded), min_per_class=policy.min_per_class
        )
        fresh = sorted(members - set(recorded))
        if not fresh:
            return 0
        now = _epoch(plane)
        session.execute(
            insert(ReleaseMemberRow),
            [
                {
                    "release_id": row.id,
                    "device_id": d,
                    "device_class": classes[d],
                    "stage_index": row.stage_index,
                    "joined_at": now,
                }
                for d in fresh
            ],
        )
        try:
            session.commit()
        except SQLIntegrityError:
            session.rollback()  # another replica recorded them meanwhile; the next tick looks again
            return 0
    plane.invalidate()
    return len(fresh)


# ---------------------------------------------------------------------------------------------------- evidence


class _Group:
    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.windows = 0
        self.requests = 0
        self.errors = 0
        self.crashes = 0
        self.counts: dict[str, list[int]] = {}

    def add(self, device_id: str, body: dict[str, Any]) -> None:
        self.devices.add(device_id)
        self.windows += 1
        self.requests += int(body.get("requests", 0))
        self.errors += int(body.get("errors", 0))
        self.crashes += int(body.get("crashes", 0))
        for metric, key in _HISTOGRAMS.items():
            counts = (body.get(key) or {}).get("counts") or []
            if len(counts) != len(LATENCY_BUCKETS_MS) + 1:
                continue  # another bucket layout: not comparable, left out
            into = self.counts.setdefault(metric, [0] * len(counts))
            for i, count in enumerate(counts):
                into[i] += int(count)

    def totals(self) -> GroupTotals:
        samples: dict[str, Sequence[float]] = {
            metric: histogram_samples(Histogram(bounds=list(LATENCY_BUCKETS_MS), counts=counts))
            for metric, counts in self.counts.items()
        }
        return GroupTotals(
            devices=len(self.devices),
            windows=self.windows,
            requests=self.requests,
            errors=self.errors,
            crashes=self.crashes,
            samples_ms=samples,
        )


class _Accumulator:
    """Telemetry of some versions received since a moment, summed per device class, read incrementally.

    Each read asks only for rows received at or after ``cursor - OVERLAP_S`` (the newest ``received_at`` seen,
    less an overlap for rows whose transaction took its time stamp before a concurrent read but committed after
    it), and skips the rows of the overlap it already counted, so a controller tick costs the new windows, not
    all of them.
    """

    OVERLAP_S = 30.0

    def __init__(self, digests: Sequence[str], since: float) -> None:
        self.digests = list(digests)
        self.since = since
        self.cursor = since
        self.seen: dict[tuple[str, str], float] = {}
        self.by_class: dict[str, _Group] = {}

    def read(self, session: Session, scope: dict[str, str], only: set[str] | None = None) -> dict[str, _Group]:
        if not self.digests:
            return self.by_class
        low = max(self.since, self.cursor - self.OVERLAP_S)
        rows = session.execute(
            select(
                TelemetryWindowRow.device_id,
                TelemetryWindowRow.window_id,
                TelemetryWindowRow.received_at,
                TelemetryWindowRow.body,
            ).where(
                TelemetryWindowRow.version_digest.in_(self.digests),
                TelemetryWindowRow.received_at >= iso(datetime.fromtimestamp(low, UTC)),
            )
        )
        for device_id, window_id, received_at, body in rows:
            key = (device_id, window_id)
            if key in self.seen:
                continue
            moment = parse_iso(received_at).timestamp()
            self.seen[key] = moment
            self.cursor = max(self.cursor, moment)
            device_class = scope.get(device_id)
            if device_class is None or (only is not None and device_id not in only):
                continue  # another blueprint's device, or (for canaries) not in the cohort
            self.by_class.setdefault(device_class, _Group()).add(device_id, body)
        horizon = self.cursor - self.OVERLAP_S
        self.seen = {k: t for k, t in self.seen.items() if t >= horizon}
        return self.by_class


FAILED_ACTIVATION_EVENTS = ("rolled_back", "probe_failed")


def gather_evidence(
    plane: ControlPlane,
    session: Session,
    row: ReleaseRow,
    *,
    winners: _Winners | None = None,
    accumulators: dict[tuple[str, str, float], _Accumulator] | None = None,
) -> list[ClassEvidence]:
    """Per class: cohort counts and the canaries' and baseline's telemetry (see the module docstring).

    Canaries: windows on the new versions received since the stage began, from devices in the cohort. Baseline:
    windows on the old versions received since the release began, from the blueprint's devices. Failed
    activations: canaries that rolled the new version back or failed its probe on the device.
    """
    scope_rows = _scope(plane, session, row.blueprint, winners)
    scope = {d: r.device_class for d, r in scope_rows.items()}
    members = {d for d in _recorded(session, row.id) if d in scope}
    to_digests = set(row.to_digests)
    accumulators = accumulators if accumulators is not None else {}
    canary_key = (row.id, "canary", row.stage_started_at)
    baseline_key = (row.id, "baseline", row.started_at)
    canary_acc = accumulators.setdefault(canary_key, _Accumulator(row.to_digests, row.stage_started_at))
    baseline_acc = accumulators.setdefault(baseline_key, _Accumulator(row.from_digests, row.started_at))
    for stale in [k for k in accumulators if k[0] == row.id and k not in (canary_key, baseline_key)]:
        del accumulators[stale]  # an earlier stage's canaries
    canary = canary_acc.read(session, scope, members)
    baseline = baseline_acc.read(session, scope)
    rolled: dict[str, set[str]] = defaultdict(set)
    started = iso(datetime.fromtimestamp(row.started_at, UTC))
    for device_id, digest in session.execute(
        select(DeviceEventRow.device_id, DeviceEventRow.version_digest).where(
            DeviceEventRow.kind.in_(FAILED_ACTIVATION_EVENTS),
            DeviceEventRow.version_digest.in_(list(to_digests)),
            DeviceEventRow.received_at >= started,
        )
    ):
        if device_id in members and digest in to_digests:
            rolled[scope[device_id]].add(device_id)
    by_class: dict[str, list[str]] = defaultdict(list)
    for device_id, device_class in scope.items():
        by_class[device_class].append(device_id)
    evidence: list[ClassEvidence] = []
    for device_class in sorted(by_class):
        in_class = by_class[device_class]
        class_members = [d for d in in_class if d in members]
        online = sum(1 for d in class_members if plane.is_online(scope_rows[d].last_seen))
        switched = sum(1 for d in class_members if scope_rows[d].active_digest in to_digests)
        canary_group = canary.get(device_class, _Group())
        evidence.append(
            ClassEvidence(
                device_class=device_class,
                devices=len(in_class),
                members=len(class_members),
                online_members=online,
                switched=switched,
                reporting=len(canary_group.devices & members),
                rolled_back=len(rolled.get(device_class, set())),
                canary=canary_group.totals(),
                baseline=baseline.get(device_class, _Group()).totals(),
            )
        )
    return evidence


def _progress(evidence: Iterable[ClassEvidence], evaluation: StageEvaluation) -> list[dict[str, Any]]:
    verdicts = {v.device_class: v for v in evaluation.classes}
    rendered = {c["device_class"]: c for c in evaluation.numbers()["classes"]}  # type: ignore[attr-defined]
    out = []
    for ev in evidence:
        verdict = verdicts.get(ev.device_class)
        out.append(
            {
                "device_class": ev.device_class,
                "devices": ev.devices,
                "members": ev.members,
                "online_members": ev.online_members,
                "switched": ev.switched,
                "reporting": ev.reporting,
                "rolled_back": ev.rolled_back,
                "status": verdict.status if verdict else "not judged",
                "reason": verdict.reason if verdict else "",
                "gates": rendered.get(ev.device_class, {}).get("gates", []),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------- controller


def acquire_lease(engine: Engine, name: str, holder: str, ttl_s: float, now: float) -> bool:
    """Take or renew the lease ``name`` for ``ttl_s``; True when ``holder`` holds it afterwards.

    One conditional UPDATE (held by us, or expired) then, if no row exists yet, one INSERT: atomic on SQLite and
    PostgreSQL alike, so two replicas never both believe they hold it.
    """
    with Session(engine) as session:
        result = session.execute(
            update(LeaseRow)
            .where(LeaseRow.name == name, (LeaseRow.holder == holder) | (LeaseRow.expires_at < now))
            .values(holder=holder, expires_at=now + ttl_s)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) == 1:
            session.commit()
            return True
        if session.get(LeaseRow, name) is not None:
            session.rollback()
            return False
        session.add(LeaseRow(name=name, holder=holder, expires_at=now + ttl_s, acquired_at=now))
        try:
            session.commit()
        except SQLIntegrityError:
            return False
        return True


def release_lease(engine: Engine, name: str, holder: str) -> None:
    with Session(engine) as session:
        session.execute(
            update(LeaseRow)
            .where(LeaseRow.name == name, LeaseRow.holder == holder)
            .values(expires_at=0.0)
            .execution_options(synchronize_session=False)
        )
        session.commit()


class RolloutController:
    """The loop that moves releases. ``tick()`` is one idempotent pass; ``start()`` runs it in a thread."""

    def __init__(self, plane: ControlPlane, holder: str | None = None) -> None:
        self.plane = plane
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holds_lease = False
        self._winners = _Winners()
        self._accumulators: dict[tuple[str, str, float], _Accumulator] = {}

    def tick(self) -> list[str]:
        """Evaluate every running or paused release once (if this replica holds the lease); their ids."""
        settings = self.plane.settings
        now = _epoch(self.plane)
        self.holds_lease = acquire_lease(
            self.plane.engine, CONTROLLER_LEASE, self.holder, settings.rollout_lease_s, now
        )
        if not self.holds_lease:
            return []
        with Session(self.plane.engine) as session:
            ids = list(
                session.scalars(
                    select(ReleaseRow.id)
                    .where(ReleaseRow.state.in_(ACTIVE_RELEASE_STATES))
                    .order_by(ReleaseRow.started_at)
                )
            )
        for release_id in ids:
            try:
                self.step(release_id)
            except Exception:
                log.exception("rollout controller: release %s could not be evaluated; it stays as it is", release_id)
        for key in [k for k in self._accumulators if k[0] not in ids]:
            del self._accumulators[key]  # finished releases
        return ids

    def step(self, release_id: str) -> None:
        plane = self.plane
        _sync_members(plane, release_id, self._winners)
        with Session(plane.engine) as session:
            row = _require(session, release_id)
            if row.state not in ACTIVE_RELEASE_STATES:
                return
            revision, state_before, stage_before = row.revision, row.state, row.stage_index
            policy = RolloutPolicy.model_validate(row.policy)
            now = _epoch(plane)
            evidence = gather_evidence(plane, session, row, winners=self._winners, accumulators=self._accumulators)
            evaluation = evaluate_stage(policy, row.stage_index, now - row.stage_started_at, evidence)
            numbers = evaluation.numbers()
            previous_key = (row.evaluation or {}).get("key")
            key = [row.state, row.stage_index, evaluation.decision] + [
                [c.device_class, c.status] for c in evaluation.classes
            ]
            row.evaluation = {"key": key, "classes": _progress(evidence, evaluation), "reason": evaluation.reason}
            row.evaluated_at = now
            if evaluation.decision == "halt":
                row.state, row.finished_at = "halted", now
                row.reason = f"halted and rolled back: {evaluation.reason}"
                _event(session, row, "halted", "controller", row.reason, numbers, now)
            elif evaluation.decision == "promote" and row.state == "running":
                _advance(session, row, now, "controller", evaluation.reason, numbers)
            else:
                if row.state == "running":
                    row.reason = evaluation.reason
                if key != previous_key:
                    _event(session, row, "hold", "controller", evaluation.reason, numbers, now)
            changed = row.state != state_before or row.stage_index != stage_before
            if not _commit_guarded(session, row, revision, now):
                return  # an operator changed it meanwhile; the next tick sees the new state
        if changed:
            plane.invalidate()
            _sync_members(plane, release_id, self._winners)
            log.info("release %s: %s", release_id, row.reason)

    # -------------------------------------------------------------- the loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.plane.settings.rollout_tick_s
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("rollout controller tick failed; retrying in %.1f s", interval)
            self._stop.wait(interval)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.holds_lease:
            try:
                release_lease(self.plane.engine, CONTROLLER_LEASE, self.holder)
            except Exception:  # the lease then simply expires
                log.warning("could not hand back the rollout controller lease; it expires by itself")


# ---------------------------------------------------------------------------------------------------- routes

router = APIRouter(tags=["rollouts"])
ReleaseId = Annotated[str, Path(min_length=1, max_length=32)]
WRITE = errors(401, 403, 404, 409, 422)


@router.post("/rollouts", response_model=ReleasePublic, status_code=201, responses=WRITE, summary="Start a release")
def post_rollout(request: ReleaseStart, principal: Operator, plane: Plane) -> ReleasePublic:
    try:
        return start_release(plane, request, principal.name)
    except ConfigError as exc:
        raise ConflictError(exc.message) from None


@router.get("/rollouts", response_model=list[ReleasePublic], responses=errors(401, 403, 422), summary="Releases")
def get_rollouts(
    _: Viewer,
    plane: Plane,
    state: Annotated[ReleaseState | None, Query()] = None,
) -> list[ReleasePublic]:
    return releases(plane, state)


@router.get("/rollouts/{release_id}", response_model=ReleasePublic, responses=errors(401, 403, 404, 422))
def get_rollout(release_id: ReleaseId, _: Viewer, plane: Plane) -> ReleasePublic:
    """A release with its progress and gate results per device class (as of the controller's last evaluation)."""
    return release(plane, release_id)


@router.get(
    "/rollouts/{release_id}/events", response_model=list[ReleaseEventPublic], responses=errors(401, 403, 404, 422)
)
def get_rollout_events(
    release_id: ReleaseId,
    _: Viewer,
    plane: Plane,
    after: Annotated[int, Query(ge=0, description="only events with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> list[ReleaseEventPublic]:
    return release_events(plane, release_id, after, limit)


@router.get("/rollouts/{release_id}/members", response_model=list[ReleaseMember], responses=errors(401, 403, 404, 422))
def get_rollout_members(release_id: ReleaseId, _: Viewer, plane: Plane) -> list[ReleaseMember]:
    """The release's cohort: each device with the stage in which it joined."""
    return release_members(plane, release_id)


@router.post("/rollouts/{release_id}/pause", response_model=ReleasePublic, responses=WRITE)
def post_pause(release_id: ReleaseId, principal: Operator, plane: Plane) -> ReleasePublic:
    """Stop promoting and adding canaries (critical failures still halt)."""
    return pause_release(plane, release_id, principal.name)


@router.post("/rollouts/{release_id}/resume", response_model=ReleasePublic, responses=WRITE)
def post_resume(release_id: ReleaseId, principal: Operator, plane: Plane) -> ReleasePublic:
    return resume_release(plane, release_id, principal.name)


@router.post("/rollouts/{release_id}/abort", response_model=ReleasePublic, responses=WRITE)
def post_abort(release_id: ReleaseId, principal: Operator, plane: Plane) -> ReleasePublic:
    """Roll back: every device returns to the previous version."""
    return abort_release(plane, release_id, principal.name)


@router.post("/rollouts/{release_id}/promote", response_model=ReleasePublic, responses=WRITE)
def post_promote(release_id: ReleaseId, principal: Operator, plane: Plane) -> ReleasePublic:
    """Promote now: the next stage (or completion) without waiting for soak time or gates."""
    return promote_release(plane, release_id, principal.name)
