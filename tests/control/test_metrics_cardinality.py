"""GET /metrics keeps a bounded number of series: the same series for 100 devices and for 10,000, no device id in
any label, and devices that report endless versions or classes folded into ``other``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.db import DeviceRow, TelemetryWindowRow
from slmops.control.metrics import MAX_DEVICE_CLASSES, MAX_VERSIONS
from slmops.control.plane import ControlPlane
from slmops.core.wire import TelemetryWindow
from slmops.telemetry.aggregate import histogram_from_ms
from tests.control.conftest import register_variants

CLASSES = ("x86_64-8gb", "x86_64-16gb", "arm64-4gb", "arm64-2gb")
HEALTH = ("ok", "degraded", "failing")
PHASES = ("serving", "downloading")

Series = set[tuple[str, tuple[tuple[str, str], ...]]]


class BulkFleet:
    """Device rows and telemetry windows inserted in bulk, the way a large fleet's heartbeats leave them."""

    def __init__(self, plane: ControlPlane, digests: list[str | None]) -> None:
        self.plane = plane
        self.digests = digests
        self.ids: list[str] = []

    def add(self, count: int, *, classes: tuple[str, ...] = CLASSES, digests: list[str | None] | None = None) -> None:
        now = self.plane.now_iso()
        devices: list[dict[str, object]] = []
        windows: list[dict[str, object]] = []
        versions = digests or self.digests
        for _ in range(count):
            i = len(self.ids)
            device_id = f"dev-card{uuid.uuid4().hex[:12]}"
            self.ids.append(device_id)
            # Moduli 4, 3, 3, 2 (lcm 12): the first 100 devices already show every combination of labels.
            digest, device_class = versions[i % len(versions)], classes[i % len(classes)]
            devices.append(
                {
                    "id": device_id,
                    "public_key": f"key-{device_id}",
                    "state": "approved",
                    "credential_hash": None,
                    "enrollment_token_id": None,
                    "hostname": device_id,
                    "labels": {},
                    "capabilities": {},
                    "device_class": device_class,
                    "enrolled_at": now,
                    "updated_at": now,
                    "last_seen": now if i % 2 else None,
                    "health": HEALTH[i % 3],
                    "phase": PHASES[i % 2],
                    "active_digest": digest,
                }
            )
            window = TelemetryWindow(
                id=f"w-{i}",
                version_digest=digest,
                window_start="2025-06-01T11:59:00Z",
                window_s=60,
                requests=5,
                errors=i % 2,
                prompt_tokens=50,
                completion_tokens=20,
                latency_ms=histogram_from_ms([40.0] * 5),
            )
            windows.append(
                {
                    "device_id": device_id,
                    "window_id": window.id,
                    "version_digest": digest,
                    "device_class": device_class,
                    "window_start": "2025-06-01T11:59:00Z",
                    "window_s": 60.0,
                    "received_at": now,
                    "body": window.model_dump(mode="json"),
                }
            )
        with Session(self.plane.engine) as session:
            for start in range(0, count, 2000):
                session.execute(insert(DeviceRow), devices[start : start + 2000])
                session.execute(insert(TelemetryWindowRow), windows[start : start + 2000])
            session.commit()


@pytest.fixture
def setup(file_plane: ControlPlane, tmp_path: Path) -> Iterator[tuple[TestClient, BulkFleet, dict[str, str]]]:
    variants = register_variants(file_plane.registry, tmp_path)
    fleet = BulkFleet(file_plane, [variants.base.digest, variants.q8.digest, None])
    settings = file_plane.settings.model_copy(update={"metrics_cache_s": 0.0})
    with TestClient(create_app(settings, file_plane), base_url="http://control") as api:
        viewer = {"Authorization": f"Bearer {create_api_token(file_plane, 'watcher', 'viewer', 'test').token}"}
        yield api, fleet, viewer


def scrape(api: TestClient, headers: dict[str, str]) -> tuple[Series, dict[str, float], str]:
    answer = api.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    series: Series = set()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # a timestamp companion of each counter child, not a series of its own kind
            series.add((sample.name, tuple(sorted(sample.labels.items()))))
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return series, totals, answer.text


def test_the_series_are_the_same_for_100_and_for_10000_devices(
    setup: tuple[TestClient, BulkFleet, dict[str, str]],
) -> None:
    api, fleet, viewer = setup
    # Prepare: 100 devices, two scrapes (the second also sees the first one's request to /metrics).
    fleet.add(100)
    scrape(api, viewer)
    small, small_totals, _ = scrape(api, viewer)

    # Execute: the fleet grows a hundredfold.
    fleet.add(9_900)
    scrape(api, viewer)
    large, large_totals, text = scrape(api, viewer)

    # Assert: the very same series, with values that follow the fleet; no device id anywhere.
    assert large == small
    # 3 versions x 4 classes = 12 roll-up series, each with 3 histograms of 21 bounds (+Inf, _sum, _count: 24
    # samples each) = 864 samples, plus a few dozen gauges and counters: bounded by versions and classes alone.
    pairs = {labels for name, labels in large if name == "slmops_fleet_requests_total"}
    assert len(pairs) == 12
    assert len(large) < 1_000, len(large)
    assert large_totals["slmops_devices"] == 10_000 and small_totals["slmops_devices"] == 100
    assert large_totals["slmops_devices_online"] == 5_000
    assert large_totals["slmops_fleet_requests_total"] == 50_000
    assert large_totals["slmops_fleet_tokens_total"] == 10_000 * 70
    assert large_totals["slmops_fleet_telemetry_windows_total"] == 10_000
    label_values = {value for _, labels in large for _, value in labels}
    assert not {v for v in label_values if v.startswith("dev-")}
    assert "dev-card" not in text
    versions = {value for _, labels in large for name, value in labels if name == "version"}
    assert versions == {"tiny@v1", "tiny@v2 (q8_0)", "none"}


def test_devices_reporting_endless_versions_and_classes_are_folded_into_other(
    setup: tuple[TestClient, BulkFleet, dict[str, str]],
) -> None:
    api, fleet, viewer = setup
    # Prepare: every device reports a version nobody released and a class of its own.
    count = max(MAX_VERSIONS, MAX_DEVICE_CLASSES) + 50
    digests: list[str | None] = [f"sha256:{uuid.uuid4().hex * 2}" for _ in range(count)]
    classes = tuple(f"weird-{i}gb" for i in range(count))
    fleet.add(count, classes=classes, digests=digests)

    # Execute
    series, totals, _ = scrape(api, viewer)

    # Assert: everything is still counted, under bounded labels.
    def distinct(name: str, label: str) -> set[str]:
        return {dict(labels)[label] for sample, labels in series if sample == name}

    assert totals["slmops_devices"] == count
    assert len(distinct("slmops_devices", "device_class")) == MAX_DEVICE_CLASSES + 1
    assert "other" in distinct("slmops_devices", "device_class")
    assert len(distinct("slmops_devices_active_version", "version")) <= MAX_VERSIONS + 1
    assert "other" in distinct("slmops_devices_active_version", "version")
    rollups = {labels for sample, labels in series if sample == "slmops_fleet_requests_total"}
    assert len(rollups) <= 200 + 2  # the roll-up's max_series, then (other, class) and (other, other)
    assert totals["slmops_fleet_requests_total"] == 5 * count
