"""What serving on the edge costs against hosted models, from telemetry and a price table. Pure, but for loading.

Per (site, device class, model version, month) the report sums what telemetry counted -- requests, prompt
(input) and completion (output) tokens, busy time -- and prices it twice:

- **cloud**: for each hosted model of the price table, ``input tokens x $/1M input + output tokens x $/1M output``;
- **edge**: the device price amortized over its life (``device_usd / life_months`` per device-month, times the
  ``share`` of the device charged to the model), for the time telemetry windows cover, plus energy: ``watts x busy
  time x $/kWh``. Busy time is the sum of request latencies (the latency histograms' sums), so two requests served
  at once count twice; a month is its calendar length.

Every number is a :class:`Figure` whose ``source`` says where it came from: telemetry (how many windows and
devices), the price table (which entry, and the entry's own ``source``), or arithmetic over both. The example table
shipped in ``data/prices.example.yaml`` is an illustration, not a maintained price list.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops.core.wire import TelemetryWindow
from slmops.telemetry._yaml import load_yaml_model, require_unique

__all__ = [
    "CloudPrice",
    "CostReport",
    "CostRow",
    "CostWindow",
    "EdgeProfile",
    "Figure",
    "PriceTable",
    "cost_report",
    "example_price_table",
    "load_price_table",
]

_TOKENS_PER_PRICE_UNIT = 1_000_000


class CloudPrice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    input_usd_per_1m: float = Field(ge=0)
    output_usd_per_1m: float = Field(ge=0)
    source: str = Field(min_length=1)  # where the price was taken from, and when


class EdgeProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device_class: str = Field(min_length=1)
    device_usd: float = Field(ge=0)
    life_months: float = Field(gt=0)
    watts: float = Field(ge=0)  # drawn while serving
    share: float = Field(default=1.0, gt=0, le=1)  # of the device's price charged to the model
    usd_per_kwh: float | None = Field(default=None, ge=0)  # None: the table's
    source: str = Field(min_length=1)


class PriceTable(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(min_length=1)  # of the table as a whole
    usd_per_kwh: float = Field(ge=0)
    energy_source: str = Field(min_length=1)
    cloud_models: list[CloudPrice] = Field(default_factory=list)
    device_classes: list[EdgeProfile] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> PriceTable:
        require_unique("cloud model", [m.name for m in self.cloud_models])
        require_unique("device class", [d.device_class for d in self.device_classes])
        return self


def load_price_table(text: str, *, origin: str = "price table") -> PriceTable:
    hint = (
        "a price table has source, usd_per_kwh, energy_source, cloud_models (name, input_usd_per_1m, "
        "output_usd_per_1m, source) and device_classes (device_class, device_usd, life_months, watts, source)"
    )
    return load_yaml_model(text, PriceTable, origin=origin, hint=hint)


def example_price_table() -> PriceTable:
    """The illustrative table shipped with the package (its ``source`` says so); not a maintained price list."""
    path = resources.files("slmops.telemetry").joinpath("data/prices.example.yaml")
    return load_price_table(path.read_text(encoding="utf-8"), origin="prices.example.yaml")


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str  # "USD", "tokens", "s", "device-months", "requests", "devices"
    source: str


@dataclass(frozen=True)
class CostWindow:
    """A telemetry window with what the report groups it by (the site from the device's ``site`` label)."""

    device_id: str
    site: str
    device_class: str
    version: str  # a label such as "gemma3-270m@v3"
    window: TelemetryWindow


@dataclass(frozen=True)
class CostRow:
    site: str
    device_class: str
    version: str
    month: str  # YYYY-MM, UTC
    devices: Figure
    requests: Figure
    input_tokens: Figure
    output_tokens: Figure
    busy_s: Figure
    device_months: Figure
    cloud_usd: dict[str, Figure]  # by hosted model
    edge_hardware_usd: Figure | None = None  # None: no edge profile for the class
    edge_energy_usd: Figure | None = None
    edge_usd: Figure | None = None
    savings_usd: dict[str, Figure] = field(default_factory=dict)  # cloud minus edge, by hosted model


@dataclass(frozen=True)
class CostReport:
    source: str  # the price table's
    rows: list[CostRow]
    cloud_usd: dict[str, Figure]  # totals over the rows
    edge_usd: Figure | None  # total over the rows that have an edge profile
    notes: list[str] = field(default_factory=list)


@dataclass
class _Group:
    windows: int = 0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    busy_ms: float = 0.0
    covered_s: dict[str, float] = field(default_factory=dict)  # by device


def _month(window: TelemetryWindow) -> str:
    start = datetime.fromisoformat(window.window_start)
    start = (start if start.tzinfo else start.replace(tzinfo=UTC)).astimezone(UTC)
    return f"{start.year:04d}-{start.month:02d}"


def _month_s(month: str) -> float:
    year, number = (int(part) for part in month.split("-"))
    return calendar.monthrange(year, number)[1] * 86400.0


def _cloud(price: CloudPrice, tokens_in: int, tokens_out: int) -> Figure:
    usd = (tokens_in * price.input_usd_per_1m + tokens_out * price.output_usd_per_1m) / _TOKENS_PER_PRICE_UNIT
    return Figure(
        usd,
        "USD",
        f"price table '{price.name}': ${price.input_usd_per_1m:g}/1M input x {tokens_in:,} + "
        f"${price.output_usd_per_1m:g}/1M output x {tokens_out:,} ({price.source})",
    )


def _edge(profile: EdgeProfile, table: PriceTable, device_months: float, busy_s: float) -> tuple[Figure, Figure]:
    per_month = profile.device_usd / profile.life_months
    hardware = Figure(
        per_month * profile.share * device_months,
        "USD",
        f"price table '{profile.device_class}': ${profile.device_usd:g} over {profile.life_months:g} months x share "
        f"{profile.share:g} x {device_months:.4g} device-months ({profile.source})",
    )
    rate, rate_source = table.usd_per_kwh, table.energy_source
    if profile.usd_per_kwh is not None:
        rate, rate_source = profile.usd_per_kwh, profile.source
    energy = Figure(
        profile.watts * busy_s / 3600.0 / 1000.0 * rate,
        "USD",
        f"{profile.watts:g} W x {busy_s:.6g} s busy x ${rate:g}/kWh (watts: {profile.source}; rate: {rate_source})",
    )
    return hardware, energy


def cost_report(windows: Iterable[CostWindow], table: PriceTable) -> CostReport:
    """The report over the windows, rows sorted by (month, site, class, version)."""
    groups: dict[tuple[str, str, str, str], _Group] = {}
    for item in windows:
        month = _month(item.window)
        group = groups.setdefault((month, item.site, item.device_class, item.version), _Group())
        w = item.window
        group.windows += 1
        group.requests += w.requests
        group.input_tokens += w.prompt_tokens
        group.output_tokens += w.completion_tokens
        group.busy_ms += w.latency_ms.sum
        covered = group.covered_s.get(item.device_id, 0.0) + w.window_s
        group.covered_s[item.device_id] = min(covered, _month_s(month))
    profiles = {p.device_class: p for p in table.device_classes}
    rows = []
    notes = []
    for (month, site, cls, version), g in sorted(groups.items()):
        seen = f"telemetry: {g.windows} windows of {len(g.covered_s)} devices"
        device_months = sum(g.covered_s.values()) / _month_s(month)
        busy_s = g.busy_ms / 1000.0
        cloud = {m.name: _cloud(m, g.input_tokens, g.output_tokens) for m in table.cloud_models}
        row = CostRow(
            site=site,
            device_class=cls,
            version=version,
            month=month,
            devices=Figure(len(g.covered_s), "devices", seen),
            requests=Figure(g.requests, "requests", f"{seen}, requests summed"),
            input_tokens=Figure(g.input_tokens, "tokens", f"{seen}, prompt_tokens summed"),
            output_tokens=Figure(g.output_tokens, "tokens", f"{seen}, completion_tokens summed"),
            busy_s=Figure(busy_s, "s", f"{seen}, latency histogram sums (overlapping requests count twice)"),
            device_months=Figure(device_months, "device-months", f"{seen}, window time over the month's length"),
            cloud_usd=cloud,
        )
        profile = profiles.get(cls)
        if profile is None:
            notes.append(f"no edge cost for class {cls}: add it to the price table's device_classes")
        else:
            hardware, energy = _edge(profile, table, device_months, busy_s)
            edge = Figure(hardware.value + energy.value, "USD", "edge hardware + energy")
            savings = {
                name: Figure(fig.value - edge.value, "USD", f"cloud '{name}' minus edge") for name, fig in cloud.items()
            }
            row = replace(row, edge_hardware_usd=hardware, edge_energy_usd=energy, edge_usd=edge, savings_usd=savings)
        rows.append(row)
    return _totals(table, rows, sorted(set(notes)))


def _totals(table: PriceTable, rows: list[CostRow], notes: list[str]) -> CostReport:
    cloud = {
        m.name: Figure(sum(r.cloud_usd[m.name].value for r in rows), "USD", f"sum of {len(rows)} rows")
        for m in table.cloud_models
    }
    priced = [r.edge_usd.value for r in rows if r.edge_usd is not None]
    edge = Figure(sum(priced), "USD", f"sum of {len(priced)} rows with an edge profile") if priced else None
    return CostReport(source=table.source, rows=rows, cloud_usd=cloud, edge_usd=edge, notes=notes)
