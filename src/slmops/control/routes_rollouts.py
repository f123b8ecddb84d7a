"""Operator endpoints for releases: start, list, show (with events and cohort), pause, resume, abort, promote."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from slmops.control import rollouts
from slmops.control._deps import READ, READ_ONE, WRITE_ONE, Operator, Plane, Viewer
from slmops.control.schemas import ReleaseEventPublic, ReleaseMember, ReleasePublic, ReleaseStart, ReleaseState
from slmops.errors import ConfigError, ConflictError

__all__ = ["router"]

router = APIRouter(tags=["rollouts"])
ReleaseId = Annotated[str, Path(min_length=1, max_length=32)]


@router.post("/rollouts", response_model=ReleasePublic, status_code=201, responses=WRITE_ONE, summary="Start a release")
def post_rollout(request: ReleaseStart, principal: Operator, plane: Plane) -> ReleasePublic:
    try:
        return rollouts.start_release(plane, request, principal.name)
    except ConfigError as exc:
        raise ConflictError(exc.message) from None


@router.get("/rollouts", response_model=list[ReleasePublic], responses=READ, summary="Releases")
def get_rollouts(
    _: Viewer,
    plane: Plane,
    state: Annotated[ReleaseState | None, Query()] = None,
) -> list[ReleasePublic]:
    return rollouts.releases(plane, state)


@router.get("/rollouts/{release_id}", response_model=ReleasePublic, responses=READ_ONE)
def get_rollout(release_id: ReleaseId, _: Viewer, plane: Plane) -> ReleasePublic:
    """A release with its progress and gate results per device class (as of the controller's last evaluation)."""
    return rollouts.release(plane, release_id)


@router.get("/rollouts/{release_id}/events", response_model=list[ReleaseEventPublic], responses=READ_ONE)
def get_rollout_events(
    release_id: ReleaseId,
    _: Viewer,
    plane: Plane,
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="only events with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> list[ReleaseEventPublic]:
    return rollouts.release_events(plane, release_id, after, limit)


@router.get("/rollouts/{release_id}/members", response_model=list[ReleaseMember], responses=READ_ONE)
def get_rollout_members(release_id: ReleaseId, _: Viewer, plane: Plane) -> list[ReleaseMember]:
    """The release's cohort: each device with the stage in which it joined."""
    return rollouts.release_members(plane, release_id)


@router.post("/rollouts/{release_id}/pause", response_model=ReleasePublic, responses=WRITE_ONE)
def post_pause(release_id: ReleaseId, principal: Operator, plane: Plane) -> ReleasePublic:
    """Stop promoting and adding canaries (critical failures still halt)."""
    return rollouts.pause_release(plane, release_id, principal.name)


@router.post("/rollouts/{release_id}/resume", response_model=ReleasePublic, responses=WRITE_ONE)
def post_resume(release_id: ReleaseId, principal: Operator, plane: Plane) -> ReleasePublic:
    return rollouts.resume_release(plane, release_id, principal.name)


@router.post("/rollouts/{release_id}/abort", response_model=ReleasePublic, responses=WRITE_ONE)
def post_abort(release_id: ReleaseId, principal: Operator, plane: Plane) -> ReleasePublic:
    """Roll back: every device returns to the previous version."""
    return rollouts.abort_release(plane, release_id, principal.name)


@router.post("/rollouts/{release_id}/promote", response_model=ReleasePublic, responses=WRITE_ONE)
def post_promote(release_id: ReleaseId, principal: Operator, plane: Plane) -> ReleasePublic:
    """Promote now: the next stage (or completion) without waiting for soak time or gates."""
    return rollouts.promote_release(plane, release_id, principal.name)
