from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.core.wire import Histogram, TelemetryWindow
from slmops.errors import ConfigError
from slmops.telemetry.cost import (
    CostWindow,
    PriceTable,
    cost_report,
    example_price_table,
    load_price_table,
)

TABLE = """\
source: "test table"
usd_per_kwh: 0.25
energy_source: "test tariff"
cloud_models:
  - {name: m1, input_usd_per_1m: 1.0, output_usd_per_1m: 2.0, source: "m1 page"}
  - {name: m2, input_usd_per_1m: 0.1, output_usd_per_1m: 0.4, source: "m2 page"}
device_classes:
  - {device_class: c1, device_usd: 360, life_months: 36, watts: 20, share: 0.5, source: "c1 quote"}
"""
APRIL = datetime(2026, 4, 1, tzinfo=UTC)


def _window(i: int, start: datetime, *, window_s: float = 86400, busy_ms: float = 3_600_000) -> TelemetryWindow:
    return TelemetryWindow(
        id=f"w{i}-{start.timestamp():.0f}",
        window_start=start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        window_s=window_s,
        requests=100,
        prompt_tokens=10_000,
        completion_tokens=5_000,
        latency_ms=Histogram(sum=busy_ms),
    )


def test_a_month_of_one_device_priced_both_ways() -> None:
    # Prepare: one device serving all of April (30 daily windows, an hour busy each), and one of an unpriced class
    table = load_price_table(TABLE)
    windows = [CostWindow("d1", "s1", "c1", "m@v1", _window(i, APRIL + timedelta(days=i))) for i in range(30)]
    windows.append(CostWindow("d2", "s2", "c9", "m@v1", _window(0, APRIL)))
    windows.append(CostWindow("d1", "s1", "c1", "m@v1", _window(0, APRIL + timedelta(days=30))))  # May 1st

    # Execute
    report = cost_report(windows, table)

    # Assert
    assert [(r.month, r.site, r.device_class) for r in report.rows] == [
        ("2026-04", "s1", "c1"),
        ("2026-04", "s2", "c9"),
        ("2026-05", "s1", "c1"),
    ]
    april = report.rows[0]
    assert (april.devices.value, april.requests.value) == (1, 3000)
    assert (april.input_tokens.value, april.output_tokens.value) == (300_000, 150_000)
    assert april.busy_s.value == pytest.approx(30 * 3600) and april.device_months.value == pytest.approx(1.0)
    assert april.cloud_usd["m1"].value == pytest.approx(0.3 * 1.0 + 0.15 * 2.0)
    assert april.cloud_usd["m2"].value == pytest.approx(0.3 * 0.1 + 0.15 * 0.4)
    assert april.edge_hardware_usd is not None and april.edge_hardware_usd.value == pytest.approx(360 / 36 * 0.5)
    assert april.edge_energy_usd is not None and april.edge_energy_usd.value == pytest.approx(20 * 30 / 1000 * 0.25)
    assert april.edge_usd is not None and april.edge_usd.value == pytest.approx(5.15)
    assert april.savings_usd["m1"].value == pytest.approx(0.6 - 5.15)
    may = report.rows[2]
    assert may.device_months.value == pytest.approx(1 / 31)  # one day of a 31-day month
    unpriced = report.rows[1]
    assert unpriced.edge_usd is None and unpriced.savings_usd == {} and "m1" in unpriced.cloud_usd
    assert report.notes == ["no edge cost for class c9: add it to the price table's device_classes"]
    assert report.cloud_usd["m1"].value == pytest.approx(sum(r.cloud_usd["m1"].value for r in report.rows))
    assert report.edge_usd is not None and report.edge_usd.source == "sum of 2 rows with an edge profile"
    assert report.source == "test table"


def test_every_number_says_where_it_came_from() -> None:
    table = load_price_table(TABLE)
    report = cost_report([CostWindow("d1", "s1", "c1", "m@v1", _window(0, APRIL))], table)
    (row,) = report.rows
    assert row.input_tokens.source == "telemetry: 1 windows of 1 devices, prompt_tokens summed"
    assert "m1 page" in row.cloud_usd["m1"].source and "$1/1M input x 10,000" in row.cloud_usd["m1"].source
    assert row.edge_hardware_usd is not None and "c1 quote" in row.edge_hardware_usd.source
    assert row.edge_energy_usd is not None and "test tariff" in row.edge_energy_usd.source
    figures = [v for v in _walk(dataclasses.asdict(report)) if isinstance(v, dict) and "value" in v]
    assert figures and all(f["source"] and f["unit"] for f in figures)
    json.dumps(dataclasses.asdict(report))  # the CLI's --json


def _walk(value: object) -> list[object]:
    found: list[object] = [value]
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    for child in children:
        found.extend(_walk(child))
    return found


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 86400), min_size=1, max_size=40))
def test_a_device_is_never_charged_more_than_its_month(window_s: list[int]) -> None:
    table = load_price_table(TABLE)
    windows = [
        CostWindow("d1", "s1", "c1", "v", _window(i, APRIL + timedelta(minutes=i), window_s=s))
        for i, s in enumerate(window_s * 30)
    ]
    (row,) = cost_report(windows, table).rows
    assert 0 < row.device_months.value <= 1.0


def test_the_example_table_loads_and_says_it_is_an_example() -> None:
    table = example_price_table()
    assert isinstance(table, PriceTable) and "EXAMPLE" in table.source
    assert table.cloud_models and all("example" in m.source for m in table.cloud_models)
    assert table.device_classes and all("example" in d.source for d in table.device_classes)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TABLE.replace("life_months: 36", "life_months: 0"), r"device_classes\[0\]\.life_months \(line 8\)"),
        (TABLE.replace('source: "m2 page"', ""), r"cloud_models\[1\]\.source \(line 6\): Field required"),
        (TABLE + "  - {device_class: c1, device_usd: 1, life_months: 1, watts: 1, source: x}\n", "once.*: c1"),
        ("usd_per_kwh: [\n", "not valid YAML"),
    ],
)
def test_price_table_errors_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        load_price_table(text, origin="prices.yaml")
    assert str(info.value).startswith("prices.yaml: ") and "a price table has" in str(info.value)
