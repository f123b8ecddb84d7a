"""Drift, alerts and the cost report, drawn from the control plane's own functions (the ones the API and the CLI
use), so the dashboard never shows a number the API would not."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response
from markupsafe import Markup

from slmops.control.alerting import list_alerts
from slmops.control.costs import cost_range, parse_time, plane_cost_report, price_table
from slmops.control.drift import DriftEntry, drift_overview, schedule_of
from slmops.errors import SLMOpsError
from slmops.telemetry.drift import DriftConfig
from slmops.ui._render import PageError, page, plane_of
from slmops.ui.auth import Viewer
from slmops.ui.charts import Bar, bars_svg, psi_svg

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


def _charts(entry: DriftEntry, config: DriftConfig) -> list[tuple[str, Markup]]:
    """A PSI chart per signal that warns or alerts now, or whose shift search found a start."""
    levels = {v.signal: v.level for v in entry.report.verdicts}
    charts: list[tuple[str, Markup]] = []
    for shift in entry.report.shifts:
        if levels.get(shift.signal) not in ("warn", "alert") and shift.began is None:
            continue
        values = shift.window_psi
        labels = [f"step {i + 1}" for i in range(len(values))]
        title = f"{shift.signal}: PSI of each step after the reference"
        charts.append((shift.signal, psi_svg(values, labels, title, warn=config.psi_warn, alert=config.psi_alert)))
    return charts


def _now(request: Request) -> datetime:
    return datetime.fromtimestamp(plane_of(request).now_epoch(), UTC)


@router.get("/ui/drift")
def drift(request: Request, session: Viewer) -> Response:
    plane = plane_of(request)
    config = DriftConfig()
    entries = drift_overview(plane, _now(request), config=config, schedule=schedule_of(plane.settings))
    order = {"alert": 0, "warn": 1, "ok": 2, "insufficient": 3}
    entries.sort(key=lambda e: (order[e.level], e.name, e.device_class))
    shown = [(e, _charts(e, config)) for e in entries]
    context = {"entries": shown, "config": config, "schedule": schedule_of(plane.settings)}
    return page(request, "drift.html", context, session=session, active="drift")


@router.get("/ui/alerts")
def alerts(request: Request, session: Viewer, status: str = "") -> Response:
    if status not in ("", "firing", "pending", "resolved"):
        raise PageError(400, "bad filter", "status must be firing, pending or resolved")
    plane = plane_of(request)
    found = list_alerts(plane, status or None)  # type: ignore[arg-type]
    configured = plane.settings.alert_rules_file is not None
    context = {"alerts": found, "status": status, "configured": configured}
    return page(request, "alerts.html", context, session=session, active="alerts")


@router.get("/ui/cost")
def cost(request: Request, session: Viewer, since: str = "", until: str = "") -> Response:
    plane = plane_of(request)
    try:
        start, end = cost_range(
            plane, parse_time(since, "since") if since else None, parse_time(until, "until") if until else None
        )
        table = price_table(plane.settings)
        report = plane_cost_report(plane, table, start, end)
    except SLMOpsError as exc:
        raise PageError(400, "cannot make the cost report", exc.message) from None
    bars = [Bar(f"cloud: {name}", f.value, "cloud", f.source) for name, f in sorted(report.cloud_usd.items())]
    if report.edge_usd is not None:
        bars.append(Bar("edge: these devices", report.edge_usd.value, "edge", report.edge_usd.source))
    chart = bars_svg(bars, "what the tokens served would cost", "USD")
    context = {"report": report, "since": start, "until": end, "chart": chart}
    return page(request, "cost.html", context, session=session, active="cost")
