"""Blueprints: apply one (a new revision only when it changed), plan what applying it would change on each device,
and read them back.

Revisions are kept; exactly one per name is current. Which blueprint wins on a device, and what it then runs, is
decided by the pure :mod:`slmops.core.desired`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.control._candidates import CandidateCache
from slmops.control.db import BlueprintRow
from slmops.control.devices import device_facts
from slmops.control.repository import ControlRepository
from slmops.control.schemas import ApplyResult, BlueprintPublic, PlanEntry, PlanPublic
from slmops.control.sites import load_site_adaptations
from slmops.core.blueprint import Blueprint, blueprint_from_value, parse_blueprint
from slmops.core.candidates import version_label
from slmops.core.desired import AppliedBlueprint, desired_state, ranked_matches
from slmops.core.manifest import canonical_json
from slmops.core.wire import DesiredModel, DesiredState
from slmops.errors import ConflictError, NotFoundError

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = [
    "add_revision",
    "applied_blueprints",
    "apply_blueprint",
    "get_blueprint",
    "list_blueprints",
    "plan_blueprint",
]

log = logging.getLogger(__name__)


def apply_blueprint(plane: ControlPlane, source: str, created_by: str) -> ApplyResult:
    """Create or update a blueprint from its YAML; a new revision only when it changed."""
    blueprint = parse_blueprint(source)
    warnings = _warnings(plane, blueprint)
    with Session(plane.engine) as session:
        repo = ControlRepository(session)
        current = repo.current_blueprint(blueprint.name)
        if current is not None and current.digest == blueprint.digest:
            return ApplyResult(
                name=blueprint.name,
                revision=current.revision,
                created=False,
                digest=blueprint.digest,
                warnings=warnings,
            )
        try:
            revision = add_revision(repo, blueprint, source, created_by, plane.now_iso())
            session.commit()
        except SQLIntegrityError:
            raise ConflictError(
                f"blueprint '{blueprint.name}' was applied concurrently by someone else; plan and apply again"
            ) from None
    plane.world_cache.invalidate()
    log.info("blueprint %s@%d applied by %s", blueprint.name, revision, created_by)
    return ApplyResult(name=blueprint.name, revision=revision, created=True, digest=blueprint.digest, warnings=warnings)


def plan_blueprint(plane: ControlPlane, source: str) -> PlanPublic:
    """What applying ``source`` would change, per approved device, and which blueprint wins where."""
    blueprint = parse_blueprint(source)
    with Session(plane.engine) as session:
        repo = ControlRepository(session)
        rows = repo.current_blueprints()
        current = repo.current_blueprint(blueprint.name)
        changed = current is None or current.digest != blueprint.digest
        revision = repo.latest_blueprint_revision(blueprint.name) + 1 if changed else current.revision  # type: ignore[union-attr]
        devices = [device_facts(row) for row in repo.devices(["approved"])]
        sites = load_site_adaptations(session)
    before = applied_blueprints(rows)
    after = [b for b in before if b.blueprint.name != blueprint.name] + [AppliedBlueprint(blueprint, revision)]
    cache = CandidateCache(plane.registry)
    entries: list[PlanEntry] = []
    for facts in devices:
        matched_before = ranked_matches(facts, before)
        matched_after = ranked_matches(facts, after)
        ours = blueprint.name in {b.blueprint.name for b in matched_after + matched_before}
        old = desired_state(facts, before, cache.for_blueprints(matched_before[:1]), sites)
        new = desired_state(facts, after, cache.for_blueprints(matched_after[:1]), sites)
        change = _change(old, new)
        if not ours and change == "unchanged":
            continue
        entries.append(
            PlanEntry(
                device_id=facts.device_id,
                device_class=facts.device_class,
                labels=dict(facts.labels),
                matched=[b.label for b in matched_after],
                winner=new.blueprint,
                before=_describe(old.model),
                after=_describe(new.model),
                before_digest=old.model.digest if old.model else None,
                after_digest=new.model.digest if new.model else None,
                change=change,
                reason=new.reason,
                local=new.local if new.local.site is not None else None,
            )
        )
    return PlanPublic(
        name=blueprint.name,
        revision=revision,
        spec_changed=changed,
        entries=entries,
        warnings=_warnings(plane, blueprint),
    )


def list_blueprints(plane: ControlPlane) -> list[BlueprintPublic]:
    """The current revision of every blueprint."""
    with Session(plane.engine) as session:
        return [_blueprint_public(row) for row in ControlRepository(session).current_blueprints()]


def get_blueprint(plane: ControlPlane, name: str, revision: int | None = None) -> BlueprintPublic:
    """A blueprint's current revision, or the revision asked for."""
    with Session(plane.engine) as session:
        repo = ControlRepository(session)
        row = repo.current_blueprint(name) if revision is None else repo.blueprint_revision(name, revision)
        if row is None:
            known = [r.revision for r in repo.blueprint_revisions(name)]
            if not known:
                raise NotFoundError(f"no blueprint named '{name}' (list them with `slmops blueprint list`)")
            raise NotFoundError(f"blueprint '{name}' has no revision {revision}; it has {known}")
        return _blueprint_public(row)


def add_revision(repo: ControlRepository, blueprint: Blueprint, source: str, created_by: str, created_at: str) -> int:
    """Add the next revision of ``blueprint`` as the current one, in the caller's unit of work; its number."""
    revision = repo.latest_blueprint_revision(blueprint.name) + 1
    repo.add_blueprint_revision(
        BlueprintRow(
            name=blueprint.name,
            revision=revision,
            spec=canonical_json(blueprint.to_json_value()).decode("utf-8"),
            source=source,
            digest=blueprint.digest,
            created_by=created_by,
            created_at=created_at,
        )
    )
    return revision


def applied_blueprints(rows: Sequence[BlueprintRow]) -> list[AppliedBlueprint]:
    """Stored revisions as the pure matching code takes them."""
    return [AppliedBlueprint(blueprint_from_value(json.loads(row.spec), row.name), row.revision) for row in rows]


def _warnings(plane: ControlPlane, blueprint: Blueprint) -> list[str]:
    found = CandidateCache(plane.registry).get(blueprint.spec.model.reference)
    return [found.problem] if found.problem else []


def _describe(model: DesiredModel | None) -> str | None:
    if model is None:
        return None
    return version_label(model.envelope.manifest)


def _change(old: DesiredState, new: DesiredState) -> str:
    if old.model is None and new.model is None:
        return "unchanged"
    if old.model is None:
        return "install"
    if new.model is None:
        return "remove"
    if old.model.digest != new.model.digest:
        return "update"
    if old.runtime != new.runtime or old.adaptations != new.adaptations or old.local != new.local:
        return "reconfigure"
    return "unchanged"


def _blueprint_public(row: BlueprintRow) -> BlueprintPublic:
    value = json.loads(row.spec)
    blueprint = blueprint_from_value(value, row.name)
    return BlueprintPublic(
        name=row.name,
        revision=row.revision,
        current=row.current,
        digest=row.digest,
        priority=blueprint.spec.priority,
        model=blueprint.spec.model.reference,
        created_at=row.created_at,
        created_by=row.created_by,
        blueprint=value,
        source=row.source,
    )
