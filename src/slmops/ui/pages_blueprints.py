"""Blueprints: the current revision of each, and one blueprint with its spec, its source, its releases and its
plan (what the applied revision means on each matching device: which blueprint wins, what it runs, what changes)."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Request
from fastapi.responses import Response

from slmops.control.blueprints import get_blueprint, list_blueprints, plan_blueprint
from slmops.control.rollouts.releases import releases
from slmops.errors import NotFoundError, SLMOpsError
from slmops.ui._render import PageError, page, plane_of
from slmops.ui.auth import Viewer

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


@router.get("/ui/blueprints")
def blueprint_list(request: Request, session: Viewer) -> Response:
    found = list_blueprints(plane_of(request))
    return page(request, "blueprints.html", {"blueprints": found}, session=session, active="blueprints")


@router.get("/ui/blueprints/{name}")
def blueprint_page(request: Request, name: str, session: Viewer) -> Response:
    plane = plane_of(request)
    try:
        found = get_blueprint(plane, name)
    except NotFoundError:
        raise PageError(404, "not found", f"no blueprint named '{name[:200]}'") from None
    plan_error = ""
    try:
        plan = plan_blueprint(plane, found.source)
    except SLMOpsError as exc:  # e.g. its model was removed from the registry since it was applied
        plan, plan_error = None, exc.message
    changes = Counter(e.change for e in plan.entries) if plan else Counter()
    history = [r for r in releases(plane) if r.blueprint == name]
    return page(
        request,
        "blueprint.html",
        {"blueprint": found, "plan": plan, "plan_error": plan_error, "changes": sorted(changes.items()),
         "history": history},
        session=session,
        active="blueprints",
    )  # fmt: skip
