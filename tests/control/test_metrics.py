"""GET /metrics: HTTP traffic per route template, fleet gauges with bounded labels, viewer or scrape token."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.testclient import TestClient

from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from tests.control.conftest import Device, bearer

SCRAPE = "scrape-secret-123"


@pytest.fixture
def api(plane: ControlPlane) -> Iterator[TestClient]:
    settings = plane.settings.model_copy(update={"metrics_token": SCRAPE, "metrics_cache_s": 0.0})
    with TestClient(create_app(settings, plane), base_url="http://control") as client:
        yield client


def enroll(api: TestClient, admin: dict[str, str], device: Device) -> tuple[str, dict[str, str]]:
    token = api.post("/api/v1/enrollment-tokens", json={"auto_approve": True}, headers=admin).json()["token"]
    answer = api.post("/api/v1/enroll", json=device.enroll_request(token).model_dump(mode="json"))
    assert answer.status_code == 200, answer.text
    return answer.json()["device_id"], bearer(answer.json()["credential"])


def scrape(api: TestClient, headers: dict[str, str]) -> list[Sample]:
    answer = api.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return [sample for family in text_string_to_metric_families(answer.text) for sample in family.samples]


def named(samples: list[Sample], name: str) -> list[Sample]:
    return [sample for sample in samples if sample.name == name]


def test_metrics_needs_a_viewer_or_the_scrape_token(api: TestClient, plane: ControlPlane) -> None:
    assert api.get("/metrics").status_code == 401
    assert api.get("/metrics", headers=bearer("wrong")).status_code == 401
    assert api.get("/metrics", headers=bearer(SCRAPE)).status_code == 200
    viewer = bearer(create_api_token(plane, "watcher", "viewer", "test").token)
    assert api.get("/metrics", headers=viewer).status_code == 200
    assert "/metrics" not in api.get("/openapi.json").json()["paths"]


def test_requests_are_counted_per_route_template(
    api: TestClient, admin: dict[str, str], new_device: Callable[..., Device]
) -> None:
    device_id, _ = enroll(api, admin, new_device())
    assert api.get(f"/api/v1/devices/{device_id}", headers=admin).status_code == 200
    assert api.get("/api/v1/devices/no-such-device", headers=admin).status_code == 404
    api.get("/no/such/path")
    samples = scrape(api, bearer(SCRAPE))
    requests = {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for s in named(samples, "slmops_http_requests_total")
    }
    assert requests[("/api/v1/devices/{device_id}", "GET", "2xx")] == 1
    assert requests[("/api/v1/devices/{device_id}", "GET", "4xx")] == 1
    assert requests[("/api/v1/enroll", "POST", "2xx")] == 1
    assert requests[("unmatched", "GET", "4xx")] == 1
    assert not any(device_id in route for route, _, _ in requests)
    counts = named(samples, "slmops_http_request_duration_seconds_count")
    assert {"route": "/api/v1/devices/{device_id}", "method": "GET"} in [s.labels for s in counts]


def test_fleet_gauges_count_devices_with_labels_that_do_not_grow_with_the_fleet(
    api: TestClient, admin: dict[str, str], new_device: Callable[..., Device]
) -> None:
    enroll(api, admin, new_device())
    first = [s for s in scrape(api, bearer(SCRAPE)) if s.name.startswith("slmops_devices")]
    for _ in range(4):
        enroll(api, admin, new_device())
    samples = [s for s in scrape(api, bearer(SCRAPE)) if s.name.startswith("slmops_devices")]
    assert [(s.name, s.labels) for s in samples] == [(s.name, s.labels) for s in first]
    devices = named(samples, "slmops_devices")
    assert len(devices) == 1
    assert devices[0].labels["state"] == "approved"
    assert devices[0].value == 5
    listed = api.get("/api/v1/devices", headers=admin).json()
    online = named(samples, "slmops_devices_online")
    assert len(online) == 1  # none has sent a heartbeat yet: one series at 0, as the device list says
    assert online[0].value == sum(device["online"] for device in listed) == 0
    assert sum(s.value for s in named(samples, "slmops_devices_active_version")) == 5
    assert named(samples, "slmops_devices_active_version")[0].labels["version"] == "none"
