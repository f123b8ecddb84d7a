"""Operator endpoints for alerts and the cost report."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from slmops.control._deps import READ, Plane, Viewer, invalid
from slmops.control.alerting import AlertPublic, list_alerts
from slmops.control.costs import CostReportPublic, cost_range, parse_time, plane_cost_report, price_table, report_public
from slmops.errors import ConfigError

__all__ = ["router"]

router = APIRouter()


@router.get(
    "/alerts",
    response_model=list[AlertPublic],
    responses=READ,
    tags=["alerts"],
    summary="Alerts evaluated by the controller: firing, pending and recently resolved, with their deliveries",
)
def get_alerts(
    _: Viewer,
    plane: Plane,
    status: Annotated[
        Literal["pending", "firing", "resolved"] | None, Query(description="only alerts in this status")
    ] = None,
) -> list[AlertPublic]:
    return list_alerts(plane, status)


@router.get(
    "/cost",
    response_model=CostReportPublic,
    responses=READ,
    tags=["cost"],
    summary="Tokens served on the edge priced against hosted models, beside the edge's own cost",
)
def get_cost(
    _: Viewer,
    plane: Plane,
    since: Annotated[
        str | None,
        Query(
            max_length=64,
            description="RFC 3339 (inclusive); default the first day of the month two months before `until`",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            max_length=64, description="RFC 3339 (exclusive); default now", json_schema_extra={"format": "date-time"}
        ),
    ] = None,
) -> CostReportPublic:
    try:
        start, end = cost_range(
            plane,
            parse_time(since, "since") if since is not None else None,
            parse_time(until, "until") if until is not None else None,
        )
    except ConfigError as exc:
        raise invalid(("query",), exc.message) from None
    table = price_table(plane.settings)
    origin = str(plane.settings.price_table_file) if plane.settings.price_table_file else "example"
    return report_public(plane_cost_report(plane, table, start, end), start, end, origin)
