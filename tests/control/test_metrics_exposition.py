"""GET /metrics parsed with prometheus_client's parser: every documented family with its type and labels, values
that match the fleet (devices, releases, gates, the controller, telemetry roll-ups), auth, route templates."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from slmops.control.app import create_app
from slmops.control.blueprints import apply_blueprint
from slmops.control.credentials import create_api_token
from slmops.control.desired_state import desired_state_for
from slmops.control.plane import ControlPlane
from slmops.control.rollouts import RolloutController, start_release
from slmops.control.schemas import ReleaseStart
from slmops.core.manifest import SignedManifest
from slmops.core.rollout import GateSpec, RolloutPolicy
from slmops.core.wire import StatusReport, TelemetryBatch, TelemetryWindow
from slmops.telemetry.aggregate import histogram_from_ms
from tests.control.conftest import Device, bearer, register_variants

SCRAPE = "scrape-secret-123"
BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: shops}
spec:
  model: {name: tiny, ref: v1}
"""
POLICY = RolloutPolicy(
    stages=(0.5, 1.0),
    soak_s=60,
    min_reporting_devices=1,
    gates=(
        GateSpec(name="crashes", metric="crashes", min_samples=2, critical=True),
        GateSpec(name="latency", metric="latency", min_samples=50, max_ratio=1.3),
    ),
)

# What the module docstrings promise: name -> (type, label names). Label names of histograms exclude ``le``.
DOCUMENTED: dict[str, tuple[str, set[str]]] = {
    "slmops_http_requests": ("counter", {"route", "method", "status"}),
    "slmops_http_request_duration_seconds": ("histogram", {"route", "method"}),
    "slmops_devices": ("gauge", {"state", "device_class"}),
    "slmops_devices_online": ("gauge", {"device_class"}),
    "slmops_devices_health": ("gauge", {"device_class", "health", "phase"}),
    "slmops_devices_active_version": ("gauge", {"device_class", "version"}),
    "slmops_releases": ("gauge", {"state"}),
    "slmops_release_stage": ("gauge", {"release", "blueprint", "version", "state"}),
    "slmops_release_stage_fraction": ("gauge", {"release", "blueprint", "version", "state"}),
    "slmops_release_stage_started_timestamp_seconds": ("gauge", {"release", "blueprint", "version", "state"}),
    "slmops_release_class_devices": ("gauge", {"release", "device_class", "count"}),
    "slmops_release_gate_verdict": ("gauge", {"release", "device_class", "gate", "verdict"}),
    "slmops_release_events": ("counter", {"kind"}),
    "slmops_controller_ticks": ("counter", set()),
    "slmops_controller_last_tick_timestamp_seconds": ("gauge", set()),
    "slmops_controller_holds_lease": ("gauge", set()),
    "slmops_controller_lease_held": ("gauge", set()),
    "slmops_controller_lease_holder": ("gauge", {"holder"}),
    "slmops_controller_lease_expires_timestamp_seconds": ("gauge", set()),
    "slmops_fleet_telemetry_windows": ("counter", {"version", "device_class"}),
    "slmops_fleet_requests": ("counter", {"version", "device_class"}),
    "slmops_fleet_errors": ("counter", {"version", "device_class"}),
    "slmops_fleet_crashes": ("counter", {"version", "device_class"}),
    "slmops_fleet_tokens": ("counter", {"version", "device_class", "gen_ai_token_type"}),
    "slmops_fleet_request_duration_seconds": ("histogram", {"version", "device_class"}),
    "slmops_fleet_time_to_first_token_seconds": ("histogram", {"version", "device_class"}),
    "slmops_fleet_time_per_output_token_seconds": ("histogram", {"version", "device_class"}),
}


def families(api: TestClient, headers: dict[str, str] | None = None) -> dict[str, Metric]:
    answer = api.get("/metrics", headers=headers or bearer(SCRAPE))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(answer.text)}


def values(family: Metric, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """Sample name ``family.name + suffix`` -> {sorted label items: value}."""
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == family.name + suffix}


def label(envelope: SignedManifest) -> str:
    m = envelope.manifest
    return f"tiny@{m.version} ({m.variant})" if m.variant else f"tiny@{m.version}"


@dataclass
class Fleet:
    api: TestClient
    plane: ControlPlane
    admin: dict[str, str]
    devices: dict[str, tuple[dict[str, str], str]]  # id -> (credential header, device class)
    active: dict[str, str]  # id -> active digest
    labels: dict[str, str]  # digest -> version label
    release_id: str
    controller: RolloutController
    sent: dict[tuple[str, str], dict[str, float]]  # (version label, class) -> summed numbers

    def heartbeat(self, device_id: str, health: str = "ok", phase: str = "serving") -> None:
        report = StatusReport(phase=phase, health=health, active_digest=self.active[device_id])  # type: ignore[arg-type]
        credential = self.devices[device_id][0]
        answer = self.api.post(
            f"/api/v1/devices/{device_id}/status", json=report.model_dump(mode="json"), headers=credential
        )
        assert answer.status_code == 200, answer.text

    def telemetry(self, device_id: str, requests: int, latencies_ms: list[float], errors: int = 0) -> None:
        digest = self.active[device_id]
        window = TelemetryWindow(
            id=uuid.uuid4().hex,
            version_digest=digest,
            window_start="2025-06-01T11:59:00Z",
            window_s=60,
            requests=requests,
            errors=errors,
            prompt_tokens=7 * requests,
            completion_tokens=3 * requests,
            latency_ms=histogram_from_ms(latencies_ms),
            ttft_ms=histogram_from_ms([x / 10 for x in latencies_ms]),
        )
        credential, device_class = self.devices[device_id]
        body = TelemetryBatch(windows=[window]).model_dump(mode="json")
        answer = self.api.post(f"/api/v1/devices/{device_id}/telemetry", json=body, headers=credential)
        assert answer.status_code == 200, answer.text
        into = self.sent.setdefault(
            (self.labels[digest], device_class),
            {"windows": 0, "requests": 0, "errors": 0, "input": 0, "output": 0, "count": 0, "sum_s": 0.0},
        )
        into["windows"] += 1
        into["requests"] += requests
        into["errors"] += errors
        into["input"] += 7 * requests
        into["output"] += 3 * requests
        into["count"] += len(latencies_ms)
        into["sum_s"] += sum(latencies_ms) / 1000


@pytest.fixture
def fleet(plane: ControlPlane, new_device: Callable[..., Device], tmp_path: Path) -> Iterator[Fleet]:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = register_variants(plane.registry, tmp_path / "old")
    new = register_variants(plane.registry, tmp_path / "new")
    labels = {v.digest: label(v) for vs in (old, new) for v in (vs.base, vs.q8, vs.q4)}
    apply_blueprint(plane, BLUEPRINT, "test")
    settings = plane.settings.model_copy(update={"metrics_token": SCRAPE, "metrics_cache_s": 0.0})
    app = create_app(settings, plane)
    with TestClient(app, base_url="http://control") as api:
        admin = bearer(create_api_token(plane, "root", "admin", "test").token)
        token = api.post(
            "/api/v1/enrollment-tokens", json={"auto_approve": True, "max_uses": 100}, headers=admin
        ).json()["token"]
        devices: dict[str, tuple[dict[str, str], str]] = {}
        for i in range(6):  # three of 8 GiB, three of 16 GiB: two device classes
            device = new_device(8 if i % 2 else 16)
            answer = api.post("/api/v1/enroll", json=device.enroll_request(token).model_dump(mode="json"))
            assert answer.status_code == 200, answer.text
            device_id = answer.json()["device_id"]
            shown = api.get(f"/api/v1/devices/{device_id}", headers=admin).json()
            devices[device_id] = (bearer(answer.json()["credential"]), shown["device_class"])
        active = {}
        for device_id in devices:
            desired = desired_state_for(plane, device_id).model
            assert desired is not None
            active[device_id] = desired.digest
        fleet = Fleet(api, plane, admin, devices, active, labels, "", RolloutController(plane, holder="replica-a"), {})
        for device_id in devices:
            fleet.heartbeat(device_id)
        started = start_release(plane, ReleaseStart(blueprint="shops", to="tiny@v4", policy=POLICY), "ops")
        fleet.release_id = started.id
        app.state.controller = fleet.controller
        yield fleet


def test_every_documented_family_has_its_type_and_labels(fleet: Fleet) -> None:
    # Prepare: telemetry from every device, one controller tick.
    for device_id in fleet.devices:
        fleet.telemetry(device_id, 10, [20.0] * 10)
    fleet.controller.tick()

    # Execute
    found = families(fleet.api)

    # Assert: each documented family is there with its type, and each of its samples has exactly its labels.
    for name, (kind, label_names) in DOCUMENTED.items():
        assert name in found, f"{name} missing from /metrics"
        family = found[name]
        assert family.type == kind, (name, family.type)
        assert family.samples, f"{name} has no samples"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == label_names, (name, sample)
    # prometheus_client adds a ``_created`` gauge next to each counter and histogram it keeps itself.
    companions = {f"{name}_created" for name, (kind, _) in DOCUMENTED.items() if kind in ("counter", "histogram")}
    undocumented = {n for n in found if n.startswith("slmops_")} - set(DOCUMENTED) - companions
    assert not undocumented, f"families missing from the docstrings' tables: {undocumented}"


def test_device_gauges_match_the_fleet(fleet: Fleet) -> None:
    # Prepare: one device reports degraded while downloading; one goes silent past the offline TTL.
    ids = list(fleet.devices)
    fleet.heartbeat(ids[0], health="degraded", phase="downloading")
    classes = {cls for _, cls in fleet.devices.values()}
    assert len(classes) == 2

    # Execute
    found = families(fleet.api)

    # Assert
    listed = {d["id"]: d for d in fleet.api.get("/api/v1/devices", headers=fleet.admin).json()}
    per_class = {c: sum(1 for _, cls in fleet.devices.values() if cls == c) for c in classes}
    assert values(found["slmops_devices"]) == {
        (("device_class", c), ("state", "approved")): float(n) for c, n in per_class.items()
    }
    online = values(found["slmops_devices_online"])
    assert online == {
        (("device_class", c),): float(sum(1 for d in listed.values() if d["online"] and d["device_class"] == c))
        for c in classes
    }
    assert sum(online.values()) == 6
    health = values(found["slmops_devices_health"])
    first_class = fleet.devices[ids[0]][1]
    assert health[(("device_class", first_class), ("health", "degraded"), ("phase", "downloading"))] == 1
    assert sum(health.values()) == 6
    expected_versions: dict[tuple[tuple[str, str], ...], float] = {}
    for device_id, digest in fleet.active.items():
        key = (("device_class", fleet.devices[device_id][1]), ("version", fleet.labels[digest]))
        expected_versions[key] = expected_versions.get(key, 0) + 1
    assert values(found["slmops_devices_active_version"]) == expected_versions
    assert all(v.startswith("tiny@v") for (_, (_, v)) in expected_versions)


def test_releases_gates_and_the_controller_match_the_release(fleet: Fleet) -> None:
    # Prepare: the controller ticks once with telemetry from every device; it takes the lease.
    for device_id in fleet.devices:
        fleet.telemetry(device_id, 10, [20.0] * 10)
    fleet.controller.tick()
    shown = fleet.api.get(f"/api/v1/rollouts/{fleet.release_id}", headers=fleet.admin).json()

    # Execute
    found = families(fleet.api)

    # Assert: one running release, labelled with its id, blueprint and target version.
    states = values(found["slmops_releases"])
    assert states[(("state", "running"),)] == 1 and sum(states.values()) == 1
    assert (("state", "completed"),) in states  # every state is exported, at 0
    key = (("blueprint", "shops"), ("release", fleet.release_id), ("state", "running"), ("version", "tiny@v4"))
    assert values(found["slmops_release_stage"]) == {key: float(shown["stage"] - 1)}
    assert values(found["slmops_release_stage_fraction"]) == {key: shown["stages"][shown["stage"] - 1]}
    [started] = values(found["slmops_release_stage_started_timestamp_seconds"]).values()
    assert started > 1.7e9
    counts = values(found["slmops_release_class_devices"])
    assert shown["classes"], shown
    for cls in shown["classes"]:
        for count in ("devices", "members", "online_members", "switched", "reporting", "rolled_back"):
            labels = (("count", count), ("device_class", cls["device_class"]), ("release", fleet.release_id))
            assert counts[labels] == cls[count], (labels, cls)
    verdicts = values(found["slmops_release_gate_verdict"])
    expected = {
        (
            ("device_class", c["device_class"]),
            ("gate", g["gate"]),
            ("release", fleet.release_id),
            ("verdict", g["verdict"]),
        )
        for c in shown["classes"]
        for g in c["gates"]
    }
    assert expected and set(verdicts) == expected and set(verdicts.values()) == {1.0}
    events = fleet.api.get(f"/api/v1/rollouts/{fleet.release_id}/events", headers=fleet.admin).json()
    kinds = values(found["slmops_release_events"], "_total")
    assert kinds[(("kind", "started"),)] == 1
    assert kinds == {(("kind", k),): float(sum(e["kind"] == k for e in events)) for k in {e["kind"] for e in events}}
    # The controller: one tick, holding the lease under its holder name.
    assert values(found["slmops_controller_ticks"], "_total") == {(): 1.0}
    assert values(found["slmops_controller_holds_lease"]) == {(): 1.0}
    assert values(found["slmops_controller_lease_held"]) == {(): 1.0}
    assert values(found["slmops_controller_lease_holder"]) == {(("holder", "replica-a"),): 1.0}
    [expires] = values(found["slmops_controller_lease_expires_timestamp_seconds"]).values()
    assert expires > fleet.plane.now_epoch()
    [last_tick] = values(found["slmops_controller_last_tick_timestamp_seconds"]).values()
    assert last_tick == pytest.approx(fleet.plane.now_epoch())


def test_fleet_rollups_sum_the_telemetry_per_version_and_class(fleet: Fleet) -> None:
    # Prepare: windows with different numbers from different devices, then a second scrape after more windows.
    for n, device_id in enumerate(fleet.devices):
        fleet.telemetry(device_id, 5 + n, [10.0 * (n + 1)] * (5 + n), errors=n % 2)
    families(fleet.api)  # the first scrape starts the roll-up; windows after it are added incrementally
    first = next(iter(fleet.devices))
    fleet.telemetry(first, 4, [3000.0] * 4, errors=2)

    # Execute
    found = families(fleet.api)

    # Assert: every (version, class) pair counts exactly what its devices sent, windows counted once.
    def key(series: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (("device_class", series[1]), ("version", series[0]))

    assert values(found["slmops_fleet_telemetry_windows"], "_total") == {
        key(s): n["windows"] for s, n in fleet.sent.items()
    }
    assert values(found["slmops_fleet_requests"], "_total") == {key(s): n["requests"] for s, n in fleet.sent.items()}
    assert values(found["slmops_fleet_errors"], "_total") == {key(s): n["errors"] for s, n in fleet.sent.items()}
    assert set(values(found["slmops_fleet_crashes"], "_total").values()) == {0.0}
    tokens = values(found["slmops_fleet_tokens"], "_total")
    for series, n in fleet.sent.items():
        for kind in ("input", "output"):
            labels = (("device_class", series[1]), ("gen_ai_token_type", kind), ("version", series[0]))
            assert tokens[labels] == n[kind]
    duration = found["slmops_fleet_request_duration_seconds"]
    assert values(duration, "_count") == {key(s): n["count"] for s, n in fleet.sent.items()}
    for series, n in fleet.sent.items():
        assert values(duration, "_sum")[key(series)] == pytest.approx(n["sum_s"])
    buckets = values(duration, "_bucket")
    series = next(
        s for s in fleet.sent if s[1] == fleet.devices[first][1] and s[0] == fleet.labels[fleet.active[first]]
    )

    # The four 3 s requests sit above the 2 s bucket; every other request of that series sits below it.
    def bucket(le: str) -> float:
        return buckets[(("device_class", series[1]), ("le", le), ("version", series[0]))]

    assert bucket("2.0") == fleet.sent[series]["count"] - 4
    assert bucket("+Inf") == fleet.sent[series]["count"]
    ttft = values(found["slmops_fleet_time_to_first_token_seconds"], "_count")
    assert ttft == {key(s): n["count"] for s, n in fleet.sent.items()}


def test_metrics_auth_viewer_operator_or_scrape_token_and_never_a_device(fleet: Fleet) -> None:
    device_id = next(iter(fleet.devices))
    credential = fleet.devices[device_id][0]
    viewer = bearer(create_api_token(fleet.plane, "watcher", "viewer", "test").token)
    operator = bearer(create_api_token(fleet.plane, "ops", "operator", "test").token)

    assert fleet.api.get("/metrics").status_code == 401
    assert fleet.api.get("/metrics", headers=bearer("not-a-token")).status_code == 401
    refused = fleet.api.get("/metrics", headers=credential)
    assert refused.status_code == 403 and "device credential" in refused.json()["message"]
    for headers in (viewer, operator, fleet.admin, bearer(SCRAPE)):
        assert fleet.api.get("/metrics", headers=headers).status_code == 200


def test_requests_are_labelled_with_route_templates_never_raw_paths(fleet: Fleet) -> None:
    # Prepare: device calls on several devices' own paths, an unknown path with a device id in it.
    for device_id in fleet.devices:
        fleet.heartbeat(device_id)
        credential = fleet.devices[device_id][0]
        assert fleet.api.get(f"/api/v1/devices/{device_id}/desired", headers=credential).status_code == 200
    some_id = next(iter(fleet.devices))
    assert fleet.api.get(f"/nowhere/{some_id}").status_code == 404

    # Execute
    found = families(fleet.api)

    # Assert
    requests = values(found["slmops_http_requests"], "_total")
    routes = {dict(labels)["route"] for labels in requests}
    status = (("method", "POST"), ("route", "/api/v1/devices/{device_id}/status"), ("status", "2xx"))
    assert requests[status] == 12  # six at setup, six now
    desired = (("method", "GET"), ("route", "/api/v1/devices/{device_id}/desired"), ("status", "2xx"))
    assert requests[desired] == 6
    assert (("method", "GET"), ("route", "unmatched"), ("status", "4xx")) in requests
    assert not any(device_id in route for route in routes for device_id in fleet.devices)
    assert all(route.startswith("/") or route == "unmatched" for route in routes)
    latency = values(found["slmops_http_request_duration_seconds"], "_count")
    assert latency[(("method", "POST"), ("route", "/api/v1/devices/{device_id}/status"))] == 12


def test_with_metrics_off_there_is_no_endpoint_and_nothing_is_counted(
    plane: ControlPlane, new_device: Callable[..., Device]
) -> None:
    settings = plane.settings.model_copy(update={"metrics": False, "metrics_token": SCRAPE})
    plane.settings = settings  # the wrapper and /metrics follow the plane's settings, as `slmops server` opens it
    with TestClient(create_app(settings, plane), base_url="http://control") as api:
        assert api.get("/api/v1/health").status_code == 200
        answer = api.get("/metrics", headers=bearer(SCRAPE))
        assert answer.status_code == 404 and "SLMOPS_METRICS" in answer.json()["message"]
        registry = next(
            m.kwargs["registry"]
            for m in api.app.user_middleware
            if "registry" in m.kwargs  # type: ignore[attr-defined]
        )
        assert (
            registry.get_sample_value(
                "slmops_http_requests_total", {"route": "/api/v1/health", "method": "GET", "status": "2xx"}
            )
            is None
        )
