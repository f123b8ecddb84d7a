"""Models: every model in the registry, and one model's versions, aliases, lineage tree and the Pareto plot of size
against perplexity per device class.

A class's plot marks which variants fit its memory budget: the variant's memory (measured peak RSS for the class's
benchmark profile when recorded, else the overall peak RSS, else the manifest's estimate; as the chooser reads them
in :mod:`slmops.core.candidates`) against ``max_memory_fraction`` (the chooser's default, 0.5) of the smallest
device of the class. The frontier is drawn over the variants that fit. Classes are the fleet's own (from the
devices' capabilities) and the benchmark profiles the optimizer measured variants for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response
from markupsafe import Markup
from sqlalchemy.orm import Session

from slmops.control.repository import ControlRepository
from slmops.core.candidates import candidate_from_manifest, version_label
from slmops.core.device_profiles import DEVICE_PROFILES, DeviceProfile
from slmops.core.lineage import LineageNode, step_summary
from slmops.core.manifest import SignedManifest
from slmops.core.selection import VariantPolicy
from slmops.errors import NotFoundError
from slmops.optimize.report import ReportRow, report_rows
from slmops.ui._render import PageError, page, plane_of
from slmops.ui.auth import Viewer
from slmops.ui.charts import ParetoPoint, pareto_svg, statuses

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = ["ClassPlot", "class_plots", "router"]

router = APIRouter(include_in_schema=False)
MEMORY_FRACTION = VariantPolicy().max_memory_fraction


@dataclass(frozen=True)
class ClassPlot:
    device_class: str
    source: str  # "fleet: N devices" or "benchmark profile"
    memory_bytes: int
    budget_bytes: int
    points: list[ParetoPoint]
    statuses: list[str]
    svg: Markup
    unevaluated: list[str]  # variants without a perplexity


def _fleet_classes(plane: ControlPlane) -> dict[str, tuple[int, Counter[str]]]:
    """class -> (the smallest memory of its approved devices, active digest -> devices)."""
    with Session(plane.engine) as session:
        rows = ControlRepository(session).devices(["approved"])
        found: dict[str, tuple[int, Counter[str]]] = {}
        for row in rows:
            memory = int((row.capabilities or {}).get("memory_bytes") or 0)
            if memory <= 0:
                continue
            low, running = found.get(row.device_class, (memory, Counter()))
            if row.active_digest:
                running[row.active_digest] += 1
            found[row.device_class] = (min(low, memory), running)
    return found


def _plot(
    name: str,
    source: str,
    memory: int,
    envelopes: list[SignedManifest],
    profile: DeviceProfile | None,
    running: Counter[str],
) -> ClassPlot:
    budget = int(memory * MEMORY_FRACTION)
    points, unevaluated = [], []
    for envelope in envelopes:
        candidate = candidate_from_manifest(envelope, profile)
        if candidate.perplexity is None:
            unevaluated.append(candidate.label)
            continue
        label = envelope.manifest.variant or f"{envelope.manifest.version} (source)"
        points.append(
            ParetoPoint(
                label=label,
                size_bytes=candidate.size_bytes,
                perplexity=candidate.perplexity,
                fits=candidate.memory_bytes <= budget,
                running=running.get(envelope.digest, 0),
            )
        )
    title = f"{name}: size vs perplexity"
    return ClassPlot(
        name, source, memory, budget, points, list(statuses(points)), pareto_svg(points, title), unevaluated
    )


def class_plots(plane: ControlPlane, envelopes: list[SignedManifest]) -> list[ClassPlot]:
    plots = []
    for device_class, (memory, running) in sorted(_fleet_classes(plane).items()):
        total = sum(running.values())
        plots.append(_plot(device_class, f"fleet class, {total} devices running a version", memory, envelopes, None,
                           running))  # fmt: skip
    measured = {key.split("@", 1)[1] for e in envelopes for key in e.manifest.metrics if "@" in key}
    for profile_name in sorted(measured):
        profile = DEVICE_PROFILES.get(profile_name)
        if profile is not None:
            plots.append(_plot(profile.name, "benchmark profile", profile.memory_bytes, envelopes, profile, Counter()))
    return plots


def _flatten(nodes: list[LineageNode], depth: int = 0) -> list[tuple[int, LineageNode]]:
    out: list[tuple[int, LineageNode]] = []
    for node in nodes:
        out.append((depth, node))
        out.extend(_flatten(node.children, depth + 1))
    return out


@router.get("/ui/models")
def model_list(request: Request, session: Viewer) -> Response:
    found = plane_of(request).registry.models()
    return page(request, "models.html", {"models": found}, session=session, active="models")


@router.get("/ui/models/{name}")
def model_page(request: Request, name: str, session: Viewer) -> Response:
    plane = plane_of(request)
    registry = plane.registry
    try:
        lineage = registry.lineage(name)
    except NotFoundError:
        raise PageError(404, "not found", f"no model named '{name[:200]}'") from None
    rows: list[ReportRow] = report_rows(registry, name, plane.settings.registry_settings())
    tree = _flatten(lineage)
    envelopes = [node.envelope for _, node in tree]
    return page(
        request,
        "model.html",
        {
            "name": name,
            "aliases": registry.aliases(name),
            "rows": rows,
            "tree": tree,
            "label": lambda node: version_label(node.manifest),
            "step": lambda node: step_summary(node.manifest),
            "plots": class_plots(plane, envelopes),
        },
        session=session,
        active="models",
    )
