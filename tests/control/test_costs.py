"""The cost report over telemetry stored in a real plane, checked against numbers computed by hand."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from slmops.control.app import create_app
from slmops.control.costs import NO_SITE, plane_cost_report, price_table
from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from slmops.control.settings import ServerSettings
from slmops.errors import ConfigError
from slmops.telemetry.cost import PriceTable, load_price_table
from tests.control.alerting_support import enroll, send_window
from tests.control.conftest import register_variants

TABLE = """
source: "test table, 2025-06"
usd_per_kwh: 0.25
energy_source: "test tariff"
cloud_models:
  - {name: big-cloud, input_usd_per_1m: 1.0, output_usd_per_1m: 2.0, source: "big-cloud price page"}
  - {name: cheap-cloud, input_usd_per_1m: 0.5, output_usd_per_1m: 4.0, source: "cheap-cloud price page"}
device_classes:
  - {device_class: SMALL, device_usd: 120, life_months: 24, watts: 10, share: 0.5, source: "till spec sheet"}
"""

JUNE_S = 30 * 86400.0


@dataclass
class Served:
    small: str
    large: str
    table: PriceTable


def serve_some(plane: ControlPlane, tmp_path: Path) -> Served:
    """Two devices of the small class at site berlin-3 in June, one large one without a site in May, and a window
    older than the default range."""
    v1 = register_variants(plane.registry, tmp_path).base  # tiny@v1
    d1, small = enroll(plane, 8, site="berlin-3")
    d2, _ = enroll(plane, 8, site="berlin-3")
    d3, large = enroll(plane, 16)
    start = "2025-06-01T10:00:00Z"
    send_window(plane, d1, v1.digest, start, window_s=3600, requests=2, prompt_tokens=300_000,
                completion_tokens=100_000, latencies_ms=[1000, 2000])  # fmt: skip
    send_window(plane, d1, v1.digest, "2025-06-01T11:00:00Z", window_s=3600, requests=1, prompt_tokens=200_000,
                completion_tokens=50_000, latencies_ms=[500])  # fmt: skip
    send_window(plane, d2, v1.digest, start, window_s=1800, requests=1, prompt_tokens=100_000,
                completion_tokens=50_000, latencies_ms=[1500])  # fmt: skip
    send_window(plane, d3, v1.digest, "2025-05-31T23:00:00Z", requests=1, prompt_tokens=1000, completion_tokens=3000,
                latencies_ms=[100])  # fmt: skip
    send_window(plane, d3, v1.digest, "2025-03-31T23:00:00Z", requests=9, prompt_tokens=9, completion_tokens=9)
    return Served(small, large, load_price_table(TABLE.replace("SMALL", small)))


def test_the_report_matches_numbers_computed_by_hand(plane: ControlPlane, tmp_path: Path) -> None:
    served = serve_some(plane, tmp_path)

    report = plane_cost_report(plane, served.table)  # default: April 1st until now (2025-06-01T12:00Z)

    may, june = report.rows
    assert (may.month, may.site, may.device_class, may.version) == ("2025-05", NO_SITE, served.large, "tiny@v1")
    assert (june.month, june.site, june.device_class, june.version) == ("2025-06", "berlin-3", served.small, "tiny@v1")
    assert (june.devices.value, june.requests.value) == (2, 4)
    assert (june.input_tokens.value, june.output_tokens.value, june.busy_s.value) == (600_000, 200_000, 5.0)
    assert june.device_months.value == pytest.approx((3600 + 3600 + 1800) / JUNE_S)
    assert june.cloud_usd["big-cloud"].value == pytest.approx(0.6 * 1.0 + 0.2 * 2.0)
    assert june.cloud_usd["cheap-cloud"].value == pytest.approx(0.6 * 0.5 + 0.2 * 4.0)
    hardware = 120 / 24 * 0.5 * 9000 / JUNE_S
    energy = 10 * 5.0 / 3600 / 1000 * 0.25
    assert june.edge_hardware_usd is not None and june.edge_hardware_usd.value == pytest.approx(hardware)
    assert june.edge_energy_usd is not None and june.edge_energy_usd.value == pytest.approx(energy)
    assert june.edge_usd is not None and june.edge_usd.value == pytest.approx(hardware + energy)
    assert june.savings_usd["big-cloud"].value == pytest.approx(1.0 - hardware - energy)
    assert may.cloud_usd["big-cloud"].value == pytest.approx((1000 * 1.0 + 3000 * 2.0) / 1e6)
    assert may.edge_usd is None and report.notes == [
        f"no edge cost for class {served.large}: add it to the price table's device_classes"
    ]
    assert report.cloud_usd["big-cloud"].value == pytest.approx(1.0 + 0.007)
    assert report.edge_usd is not None and report.edge_usd.value == pytest.approx(hardware + energy)
    # every number says where it came from
    assert "telemetry: 3 windows of 2 devices" in june.input_tokens.source
    assert "big-cloud price page" in june.cloud_usd["big-cloud"].source
    assert "till spec sheet" in june.edge_hardware_usd.source and "test tariff" in june.edge_energy_usd.source
    assert report.source == "test table, 2025-06"


def test_since_and_until_choose_the_windows(plane: ControlPlane, tmp_path: Path) -> None:
    served = serve_some(plane, tmp_path)

    march = plane_cost_report(plane, served.table, datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC))
    assert [(r.month, r.requests.value) for r in march.rows] == [("2025-03", 9)]
    backwards = plane_cost_report(
        plane, served.table, datetime(2025, 4, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)
    )
    assert backwards.rows == [] and backwards.edge_usd is None  # an empty range


def test_the_price_table_comes_from_the_settings_or_the_example(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(TABLE)

    assert price_table(ServerSettings(home=tmp_path, price_table_file=path)).source == "test table, 2025-06"
    assert "EXAMPLE" in price_table(ServerSettings(home=tmp_path)).source
    with pytest.raises(ConfigError, match="cannot read the price table"):
        price_table(ServerSettings(home=tmp_path, price_table_file=tmp_path / "missing.yaml"))
    path.write_text("source: x\n")
    with pytest.raises(ConfigError, match="usd_per_kwh"):
        price_table(ServerSettings(home=tmp_path, price_table_file=path))


def test_get_cost_answers_viewers_with_every_source(plane: ControlPlane, tmp_path: Path) -> None:
    served = serve_some(plane, tmp_path)
    prices = tmp_path / "prices.yaml"
    prices.write_text(TABLE.replace("SMALL", served.small))
    plane.settings = plane.settings.model_copy(update={"price_table_file": prices})
    viewer = {"Authorization": f"Bearer {create_api_token(plane, 'v', 'viewer', 'test').token}"}

    with TestClient(create_app(plane.settings, plane), base_url="http://control") as api:
        answer = api.get("/api/v1/cost", headers=viewer)
        june = api.get("/api/v1/cost", params={"since": "2025-06-01T00:00:00Z"}, headers=viewer)
        bad = api.get("/api/v1/cost", params={"since": "yesterday"}, headers=viewer)
        empty = api.get("/api/v1/cost", params={"until": ""}, headers=viewer)
        backwards = api.get("/api/v1/cost", params={"since": "2025-07-01T00:00:00Z"}, headers=viewer)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["since"], body["until"], body["price_table"]) == ("2025-04-01T00:00:00Z", "2025-06-01T12:00:00Z",
                                                                   str(prices))  # fmt: skip
    assert [r["month"] for r in body["rows"]] == ["2025-05", "2025-06"]
    row = body["rows"][1]
    assert row["input_tokens"] == {
        "value": 600000.0,
        "unit": "tokens",
        "source": "telemetry: 3 windows of 2 devices, prompt_tokens summed",
    }
    assert row["cloud_usd"]["big-cloud"]["value"] == pytest.approx(1.0)
    assert set(body) == {"since", "until", "source", "price_table", "rows", "cloud_usd", "edge_usd", "notes"}
    assert [r["month"] for r in june.json()["rows"]] == ["2025-06"]
    assert bad.status_code == 422 and "RFC 3339" in bad.text
    assert empty.status_code == 422
    assert backwards.status_code == 200 and backwards.json()["rows"] == []
