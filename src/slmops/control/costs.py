"""The cost report on the control plane: telemetry windows from the database, priced by the pure
:func:`slmops.telemetry.cost.cost_report` against the price table of the settings (or the shipped example).

Windows are grouped by the device's ``site`` label (as it is now), the device class the window arrived with, the
version (``NAME@LABEL``) and the calendar month (UTC) the window started in. Every number of the report carries
its source; :class:`CostReportPublic` is the same report as an API schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.control.db import DeviceRow, TelemetryWindowRow
from slmops.control.repository import UNVERSIONED, iso, version_labels
from slmops.control.telemetry import parse_time
from slmops.core.wire import TelemetryWindow
from slmops.errors import ConfigError
from slmops.telemetry.cost import (
    CostReport,
    CostWindow,
    Figure,
    PriceTable,
    cost_report,
    example_price_table,
    load_price_table,
)

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane
    from slmops.control.settings import ServerSettings

__all__ = [
    "DEFAULT_MONTHS",
    "NO_SITE",
    "CostReportPublic",
    "CostRowPublic",
    "FigurePublic",
    "cost_range",
    "parse_time",
    "plane_cost_report",
    "price_table",
    "report_public",
]

DEFAULT_MONTHS = 3  # without `since`: this many calendar months, the one `until` falls in included
NO_SITE = "(no site)"  # the site of a device without a `site` label


def price_table(settings: ServerSettings) -> PriceTable:
    """The table of ``settings.price_table_file``, or the illustrative example shipped with the package."""
    path = settings.price_table_file
    if path is None:
        return example_price_table()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read the price table {path}: {exc.strerror or exc}; fix SLMOPS_PRICE_TABLE_FILE or unset it to "
            "use the example table"
        ) from None
    return load_price_table(text, origin=str(path))


def _default_since(until: datetime) -> datetime:
    index = until.year * 12 + (until.month - 1) - (DEFAULT_MONTHS - 1)
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _windows(session: Session, start: datetime, end: datetime) -> Iterator[CostWindow]:
    rows = session.execute(
        select(
            TelemetryWindowRow.device_id,
            TelemetryWindowRow.device_class,
            TelemetryWindowRow.version_digest,
            TelemetryWindowRow.body,
            DeviceRow.labels,
        )
        .join(DeviceRow, DeviceRow.id == TelemetryWindowRow.device_id)
        .where(TelemetryWindowRow.window_start >= iso(start), TelemetryWindowRow.window_start < iso(end))
    ).all()
    labels = version_labels(session, (row[2] for row in rows))
    for device_id, cls, digest, body, device_labels in rows:
        site = str((device_labels or {}).get("site") or NO_SITE)
        version = labels.get(digest, digest) if digest else UNVERSIONED
        yield CostWindow(device_id, site, cls, version, TelemetryWindow.model_validate(body))


def cost_range(plane: ControlPlane, since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    """The range a report covers: until ``until`` (default now), from ``since`` (default the first day of the month
    ``DEFAULT_MONTHS - 1`` months before)."""
    end = until or plane.clock()
    return since or _default_since(end), end  # since >= until: an empty range, an empty report


def plane_cost_report(
    plane: ControlPlane, table: PriceTable, since: datetime | None = None, until: datetime | None = None
) -> CostReport:
    """The report over the telemetry windows that started in the :func:`cost_range` of ``since`` and ``until``."""
    start, end = cost_range(plane, since, until)
    with Session(plane.engine) as session:
        windows = list(_windows(session, start, end))
    return cost_report(windows, table)


# ------------------------------------------------------------------ the API's view


class FigurePublic(BaseModel):
    value: float
    unit: str  # USD, tokens, s, device-months, requests, devices
    source: str  # where the number came from


class CostRowPublic(BaseModel):
    site: str
    device_class: str
    version: str  # NAME@LABEL
    month: str  # YYYY-MM, UTC
    devices: FigurePublic
    requests: FigurePublic
    input_tokens: FigurePublic
    output_tokens: FigurePublic
    busy_s: FigurePublic
    device_months: FigurePublic
    cloud_usd: dict[str, FigurePublic]  # by hosted model of the price table
    edge_hardware_usd: FigurePublic | None  # None: the price table has no profile for the class
    edge_energy_usd: FigurePublic | None
    edge_usd: FigurePublic | None
    savings_usd: dict[str, FigurePublic]  # cloud minus edge, by hosted model


class CostReportPublic(BaseModel):
    since: str  # RFC 3339 UTC, inclusive (window starts)
    until: str  # RFC 3339 UTC, exclusive
    source: str  # the price table's own source
    price_table: str  # the file it was read from, or "example"
    rows: list[CostRowPublic]  # sorted by (month, site, class, version)
    cloud_usd: dict[str, FigurePublic]  # totals over the rows
    edge_usd: FigurePublic | None  # total over the rows with an edge profile
    notes: list[str]


def _figure(figure: Figure) -> FigurePublic:
    return FigurePublic(value=figure.value, unit=figure.unit, source=figure.source)


def _maybe(figure: Figure | None) -> FigurePublic | None:
    return _figure(figure) if figure is not None else None


def report_public(report: CostReport, since: datetime, until: datetime, table_origin: str) -> CostReportPublic:
    rows = [
        CostRowPublic(
            site=r.site,
            device_class=r.device_class,
            version=r.version,
            month=r.month,
            devices=_figure(r.devices),
            requests=_figure(r.requests),
            input_tokens=_figure(r.input_tokens),
            output_tokens=_figure(r.output_tokens),
            busy_s=_figure(r.busy_s),
            device_months=_figure(r.device_months),
            cloud_usd={name: _figure(f) for name, f in r.cloud_usd.items()},
            edge_hardware_usd=_maybe(r.edge_hardware_usd),
            edge_energy_usd=_maybe(r.edge_energy_usd),
            edge_usd=_maybe(r.edge_usd),
            savings_usd={name: _figure(f) for name, f in r.savings_usd.items()},
        )
        for r in report.rows
    ]
    return CostReportPublic(
        since=iso(since),
        until=iso(until),
        source=report.source,
        price_table=table_origin,
        rows=rows,
        cloud_usd={name: _figure(f) for name, f in report.cloud_usd.items()},
        edge_usd=_maybe(report.edge_usd),
        notes=list(report.notes),
    )
