"""The telemetry endpoints through the ASGI app: idempotent storage, device scoping, roll-ups per device class."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from slmops.cli import run
from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from slmops.core.wire import Histogram, TelemetryBatch, TelemetryWindow
from slmops.registry.db import make_engine, migrate
from slmops.telemetry import histogram_from_ms, histogram_samples
from tests.agent.simulator import SimServer
from tests.control.conftest import Clock, Device, GiB, make_plane, register_variants

DIGEST = "sha256:" + "c" * 64


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    migrate(engine)
    yield make_plane(engine, tmp_path / "home", Clock())  # the clock: 2025-06-01T12:00:00Z
    engine.dispose()


@pytest.fixture
def api(plane: ControlPlane) -> Iterator[TestClient]:
    with TestClient(create_app(plane.settings, plane), base_url="http://control") as client:
        yield client


@pytest.fixture
def viewer(plane: ControlPlane) -> dict[str, str]:
    return bearer(create_api_token(plane, "watcher", "viewer", "test").token)


@pytest.fixture
def enroll(api: TestClient, plane: ControlPlane) -> Callable[[float], tuple[str, dict[str, str], str]]:
    """An auto-approved device with ``memory_gib``; returns its id, credential header and device class."""
    admin = bearer(create_api_token(plane, "root", "admin", "test").token)

    def go(memory_gib: float) -> tuple[str, dict[str, str], str]:
        token = api.post("/api/v1/enrollment-tokens", json={"auto_approve": True}, headers=admin).json()["token"]
        device = Device(Ed25519PrivateKey.generate(), int(memory_gib * GiB))
        answer = api.post("/api/v1/enroll", json=device.enroll_request(token).model_dump(mode="json"))
        assert answer.status_code == 200, answer.text
        device_id = answer.json()["device_id"]
        shown = api.get(f"/api/v1/devices/{device_id}", headers=admin).json()
        return device_id, bearer(answer.json()["credential"]), str(shown["device_class"])

    return go


def window(wid: str, requests: int, latencies_ms: list[float], start: str = "2025-06-01T11:30:00Z") -> TelemetryWindow:
    return TelemetryWindow(
        id=wid,
        version_digest=DIGEST,
        window_start=start,
        window_s=60,
        requests=requests,
        errors=1,
        crashes=1 if wid.endswith("crash") else 0,
        latency_ms=histogram_from_ms(latencies_ms),
    )


def batch(*windows: TelemetryWindow) -> dict[str, object]:
    return TelemetryBatch(windows=list(windows)).model_dump(mode="json")


def rollup(api: TestClient, viewer: dict[str, str], **params: str) -> dict[str, object]:
    answer = api.get("/api/v1/telemetry/rollup", params={"version": DIGEST, **params}, headers=viewer)
    assert answer.status_code == 200, answer.text
    body: dict[str, object] = answer.json()
    return body


def test_a_batch_is_stored_once_however_often_it_is_sent(
    api: TestClient, enroll: Callable[[float], tuple[str, dict[str, str], str]], viewer: dict[str, str]
) -> None:
    device_id, credential, device_class = enroll(8)
    sent = batch(window("w1", 10, [20, 40]), window("w2-crash", 5, [900]))
    url = f"/api/v1/devices/{device_id}/telemetry"

    first = api.post(url, json=sent, headers=credential)
    again = api.post(url, json=sent, headers=credential)  # the agent lost the first ack
    overlap = api.post(url, json=batch(window("w2-crash", 5, [900]), window("w3", 1, [])), headers=credential)

    assert first.status_code == 200 and first.json() == {"accepted_ids": ["w1", "w2-crash"]}
    assert again.status_code == 200 and again.json() == {"accepted_ids": ["w1", "w2-crash"]}
    assert overlap.json() == {"accepted_ids": ["w2-crash", "w3"]}
    body = rollup(api, viewer)
    assert body["version_digest"] == DIGEST
    [cls] = body["classes"]  # type: ignore[misc]
    assert cls["device_class"] == device_class
    assert (cls["windows"], cls["devices"], cls["requests"], cls["errors"], cls["crashes"]) == (3, 1, 16, 3, 1)
    assert sum(cls["latency_ms"]["counts"]) == 3 and cls["error_rate"] == pytest.approx(3 / 16)


def test_a_device_posts_only_its_own_telemetry(
    api: TestClient, enroll: Callable[[float], tuple[str, dict[str, str], str]], viewer: dict[str, str]
) -> None:
    a_id, a, _ = enroll(8)
    b_id, _, _ = enroll(8)
    sent = batch(window("w1", 1, [10]))
    assert api.post(f"/api/v1/devices/{b_id}/telemetry", json=sent, headers=a).status_code == 403
    assert api.post("/api/v1/devices/dev-nope/telemetry", json=sent, headers=a).status_code == 403
    assert api.post(f"/api/v1/devices/{a_id}/telemetry", json=sent).status_code == 401
    assert api.post(f"/api/v1/devices/{a_id}/telemetry", json=sent, headers=viewer).status_code == 403
    assert api.get("/api/v1/telemetry/rollup", params={"version": DIGEST}, headers=a).status_code == 403
    assert api.get("/api/v1/telemetry/rollup", params={"version": DIGEST}).status_code == 401
    assert rollup(api, viewer)["classes"] == []  # nothing was stored by the refused calls


def test_bad_windows_and_times_are_422(
    api: TestClient, enroll: Callable[[float], tuple[str, dict[str, str], str]], viewer: dict[str, str]
) -> None:
    device_id, credential, _ = enroll(8)
    bad = batch(window("w1", 1, [10], start="yesterday"))
    answer = api.post(f"/api/v1/devices/{device_id}/telemetry", json=bad, headers=credential)
    assert answer.status_code == 422 and "RFC 3339" in answer.json()["message"]
    text = {"windows": [{**window("w2", 1, []).model_dump(mode="json"), "prompt": "hello"}]}
    assert api.post(f"/api/v1/devices/{device_id}/telemetry", json=text, headers=credential).status_code == 422
    since = api.get("/api/v1/telemetry/rollup", params={"version": DIGEST, "since": "soon"}, headers=viewer)
    assert since.status_code == 422


def test_the_rollup_sums_per_device_class_within_the_time_range(
    api: TestClient,
    enroll: Callable[[float], tuple[str, dict[str, str], str]],
    viewer: dict[str, str],
) -> None:
    small_1, c1, small = enroll(2)
    small_2, c2, _ = enroll(2)
    large_1, c3, large = enroll(64)
    assert small != large
    posts = [
        (small_1, c1, batch(window("a", 10, [10] * 10), window("old", 99, [], start="2025-05-01T00:00:00Z"))),
        (small_2, c2, batch(window("a", 20, [10] * 20))),  # the same window id on another device is another window
        (large_1, c3, batch(window("a", 7, [3000] * 7), window("b", 3, [3000] * 3))),
    ]
    for device_id, credential, sent in posts:
        assert api.post(f"/api/v1/devices/{device_id}/telemetry", json=sent, headers=credential).status_code == 200

    body = rollup(api, viewer, since="2025-06-01T00:00:00Z")
    by_class = {c["device_class"]: c for c in body["classes"]}  # type: ignore[attr-defined]
    assert set(by_class) == {small, large}
    assert (by_class[small]["devices"], by_class[small]["windows"], by_class[small]["requests"]) == (2, 2, 30)
    assert (by_class[large]["devices"], by_class[large]["windows"], by_class[large]["requests"]) == (1, 2, 10)
    assert sum(by_class[large]["latency_ms"]["counts"]) == 10
    everything = rollup(api, viewer, since="2025-04-01T00:00:00Z")
    assert {c["device_class"]: c["requests"] for c in everything["classes"]}[small] == 129  # type: ignore[attr-defined]
    samples = histogram_samples(Histogram.model_validate(by_class[small]["latency_ms"]))
    assert len(samples) == 30 and all(5 < v <= 10 for v in samples)  # every one in the bucket (5, 10]


def test_the_rollup_resolves_a_version_reference(
    api: TestClient, plane: ControlPlane, viewer: dict[str, str], tmp_path: Path
) -> None:
    variants = register_variants(plane.registry, tmp_path)
    reference = f"tiny@{variants.q8.manifest.version}"
    answer = api.get("/api/v1/telemetry/rollup", params={"version": reference}, headers=viewer)
    assert answer.status_code == 200 and answer.json()["version_digest"] == variants.q8.digest
    base = api.get("/api/v1/telemetry/rollup", params={"version": variants.base.digest}, headers=viewer)
    assert base.status_code == 200 and base.json()["version_digest"] == variants.base.digest
    missing = api.get("/api/v1/telemetry/rollup", params={"version": "nope@v9"}, headers=viewer)
    assert missing.status_code == 404


def test_the_cli_shows_the_rollup_from_a_running_server(
    plane: ControlPlane,
    enroll: Callable[[float], tuple[str, dict[str, str], str]],
    api: TestClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    device_id, credential, device_class = enroll(8)
    sent = batch(window("w1", 40, [10] * 30 + [3000] * 10))
    assert api.post(f"/api/v1/devices/{device_id}/telemetry", json=sent, headers=credential).status_code == 200
    token = create_api_token(plane, "cli", "viewer", "test").token
    server = SimServer(create_app(plane.settings, plane)).start()
    try:
        argv = ["telemetry", "rollup", DIGEST, "--server", server.url, "--token", token, "--since", "2025-06-01T00:00Z"]
        assert run([*argv, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["classes"][0]["requests"] == 40 and shown["classes"][0]["device_class"] == device_class
        assert run(argv) == 0
        table = capsys.readouterr().out
        p95 = [float(x.replace(",", "")) for x in re.findall(r"\b(2,\d{3}(?:\.\d+)?)\b", table)]
        assert device_class in table and p95 and all(2000 < v <= 3000 for v in p95)  # in the (2000, 3000] bucket
        assert run(["telemetry", "rollup", DIGEST, "--server", server.url, "--token", "slmops_op_wrong"]) != 0
    finally:
        server.stop()
