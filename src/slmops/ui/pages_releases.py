"""Releases: the list, one release live (stage progress per class, canaries, each gate's verdict with its numbers,
events; refreshed by a fragment the page polls) and the operator's actions (pause, resume, abort, promote)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from slmops.control.rollouts import (
    abort_release,
    pause_release,
    promote_release,
    release,
    release_events,
    release_members,
    releases,
    resume_release,
)
from slmops.control.schemas import ReleaseEventPublic, ReleasePublic
from slmops.errors import ConflictError, NotFoundError
from slmops.ui._render import PageError, page, plane_of
from slmops.ui.auth import Operator, Viewer, check_form

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = ["ACTIONS", "ReleaseView", "release_view", "router"]

router = APIRouter(include_in_schema=False)
REFRESH_S = 2
_Action = Callable[["ControlPlane", str, str], ReleasePublic]
ACTIONS: dict[str, tuple[_Action, tuple[str, ...]]] = {  # action -> (function, the states it applies to)
    "pause": (pause_release, ("running",)),
    "resume": (resume_release, ("paused",)),
    "abort": (abort_release, ("running", "paused")),
    "promote": (promote_release, ("running", "paused")),
}
LIVE_STATES = ("running", "paused")


@dataclass(frozen=True)
class ReleaseView:
    release: ReleasePublic
    events: list[ReleaseEventPublic]  # newest first
    canaries: dict[str, list[str]]  # class -> canary device ids (every stage so far)
    actions: list[str]  # the actions its state allows
    halt: ReleaseEventPublic | None  # the event that halted it, with the gate numbers

    @property
    def live(self) -> bool:
        return self.release.state in LIVE_STATES

    @property
    def stage_labels(self) -> list[tuple[int, str, str]]:
        """(number, fraction, "done" / "current" / "todo") for each stage."""
        r = self.release
        done_all = r.state == "completed"
        out = []
        for number, fraction in enumerate(r.stages, start=1):
            status = "done" if done_all or number < r.stage else "current" if number == r.stage else "todo"
            out.append((number, f"{fraction:.0%}", status))
        return out


def release_view(plane: ControlPlane, release_id: str) -> ReleaseView:
    try:
        found = release(plane, release_id)
    except NotFoundError:
        raise PageError(404, "not found", f"no release '{release_id[:200]}'") from None
    events = list(reversed(release_events(plane, release_id, limit=500)))
    canaries: dict[str, list[str]] = defaultdict(list)
    for member in release_members(plane, release_id):
        canaries[member.device_class].append(member.device_id)
    actions = [name for name, (_, states) in ACTIONS.items() if found.state in states]
    halt = next((e for e in events if e.kind in ("halted", "aborted")), None)
    return ReleaseView(found, events, dict(sorted(canaries.items())), actions, halt)


def gate_rows(numbers: dict[str, Any]) -> list[dict[str, Any]]:
    """The failing classes' gates of an event's numbers, flattened for a table."""
    rows = []
    classes = numbers.get("classes")
    for cls in classes if isinstance(classes, list) else []:
        if cls.get("status") != "fail":
            continue
        for gate in cls.get("gates", []):
            rows.append(
                {
                    "device_class": cls.get("device_class", "?"),
                    "status": cls.get("status", "?"),
                    "gate": gate.get("gate", "?"),
                    "verdict": gate.get("verdict", "?"),
                    "reason": gate.get("reason", ""),
                    "numbers": gate.get("numbers", {}),
                }
            )
    return rows


@router.get("/ui/releases")
def release_list(request: Request, session: Viewer) -> Response:
    found = releases(plane_of(request))
    return page(request, "releases.html", {"releases": found}, session=session, active="releases")


@router.get("/ui/releases/{release_id}")
def release_page(request: Request, release_id: str, session: Viewer) -> Response:
    view = release_view(plane_of(request), release_id)
    flash = request.query_params.get("done", "")[:100]
    context = {"view": view, "gate_rows": gate_rows, "refresh_s": REFRESH_S, "flash": flash}
    return page(request, "release.html", context, session=session, active="releases")


@router.get("/ui/releases/{release_id}/live")
def release_live(request: Request, release_id: str, session: Viewer) -> Response:
    """The live part of the release page alone; the page's script swaps it in every few seconds."""
    view = release_view(plane_of(request), release_id)
    context = {"view": view, "gate_rows": gate_rows, "refresh_s": REFRESH_S}
    return page(request, "_release_live.html", context, session=session)


@router.post("/ui/releases/{release_id}/{action}")
async def release_action(request: Request, release_id: str, action: str, session: Operator) -> Response:
    await check_form(request, session)
    if action not in ACTIONS:
        raise PageError(404, "not found", f"no release action '{action[:50]}'; the actions are {', '.join(ACTIONS)}")
    function, _states = ACTIONS[action]
    plane = plane_of(request)
    try:
        await run_in_threadpool(function, plane, release_id, session.name)
    except NotFoundError:
        raise PageError(404, "not found", f"no release '{release_id[:200]}'") from None
    except ConflictError as exc:
        raise PageError(409, "conflict", exc.message) from None
    return RedirectResponse(f"/ui/releases/{quote(release_id, safe='')}?done={action}", status_code=303)
