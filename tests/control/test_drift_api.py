"""The drift endpoints through the ASGI app: windows posted by enrolled devices over the telemetry endpoint, drift
read with a viewer token, references pinned and unpinned with an operator token."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from slmops.control.repository import iso
from slmops.core.wire import TelemetryBatch, TelemetryWindow
from tests.control.conftest import Clock, Device, GiB, bearer
from tests.telemetry.synthetic import STEP_S, T0, Shift, series, step_of

DIGEST = "sha256:" + "a" * 64
HOURS = 56


@pytest.fixture
def tokens(plane: ControlPlane) -> dict[str, dict[str, str]]:
    return {role: bearer(create_api_token(plane, role, role, "test").token) for role in ("viewer", "operator")}


@pytest.fixture
def fleet(api: TestClient, plane: ControlPlane, clock: Clock) -> dict[str, dict[str, str]]:
    """Two devices in two classes, each posting HOURS hourly windows; the small one's prompts 50% longer from
    hour 50 on. Returns per class the device's credential header; the clock is at the end of the last hour."""
    clock.now = T0
    admin = bearer(create_api_token(plane, "root", "admin", "test").token)
    token = api.post("/api/v1/enrollment-tokens", json={"auto_approve": True, "max_uses": 2}, headers=admin).json()
    devices: dict[str, dict[str, str]] = {}
    for gib, shift in ((2, Shift(50, prompt_scale=1.5)), (64, None)):
        request = Device(Ed25519PrivateKey.generate(), gib * GiB).enroll_request(token["token"])
        answer = api.post("/api/v1/enroll", json=request.model_dump(mode="json")).json()
        device_class = api.get(f"/api/v1/devices/{answer['device_id']}", headers=admin).json()["device_class"]
        credential = bearer(answer["credential"])
        windows = [
            TelemetryWindow(
                id=f"h{hour}",
                version_digest=DIGEST,
                window_start=iso(point.start),
                window_s=STEP_S,
                latency_ms=point.latency_ms,
                drift=point.summary,
            )
            for hour, point in enumerate(series(HOURS, seed=gib, shift=shift))
        ]
        body = TelemetryBatch(windows=windows).model_dump(mode="json")
        posted = api.post(f"/api/v1/devices/{answer['device_id']}/telemetry", json=body, headers=credential)
        assert posted.status_code == 200, posted.text
        devices[device_class] = {"id": answer["device_id"], **credential}
    clock.now = T0 + timedelta(seconds=HOURS * STEP_S)
    return devices


def test_viewers_read_the_drift_of_each_version_and_class(
    api: TestClient, fleet: dict[str, dict[str, str]], tokens: dict[str, dict[str, str]]
) -> None:
    small, large = sorted(fleet, key=lambda c: "-2gb" not in c)

    answer = api.get("/api/v1/drift", headers=tokens["viewer"])
    one = api.get(f"/api/v1/drift/{DIGEST}/{small}", headers=tokens["viewer"])

    assert answer.status_code == 200, answer.text
    entries = {e["device_class"]: e for e in answer.json()}
    assert set(entries) == {small, large}
    drifting = entries[small]
    assert drifting["version_digest"] == DIGEST and drifting["model"] is None
    assert drifting["level"] == "alert" and drifting["shift_began"] is not None
    began = step_of(datetime.fromisoformat(drifting["shift_began"]))
    assert began is not None and 48 <= began <= 50, began  # the shift began in hour 50
    signals = {s["signal"]: s for s in drifting["signals"]}
    assert set(signals) == {
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
        "empty_output",
        "prompt_nll",
        "latency",
    }
    assert signals["prompt_tokens"]["level"] == "alert" and signals["prompt_tokens"]["psi"] > 0.25
    assert signals["prompt_tokens"]["test"] == "chi2" and signals["prompt_tokens"]["p_value"] < 0.01
    assert drifting["reference"] == {
        "kind": "first",
        "since": "2026-01-01T00:00:00Z",
        "until": "2026-01-03T00:00:00Z",
        "pinned_by": None,
        "pinned_at": None,
    }
    assert (drifting["reference_steps"], drifting["monitored_steps"], drifting["step_s"]) == (48, 8, 3600.0)
    assert entries[large]["level"] == "ok"
    assert one.status_code == 200 and one.json() == drifting


def test_only_operators_pin_and_unpin_a_reference(
    api: TestClient, fleet: dict[str, dict[str, str]], tokens: dict[str, dict[str, str]]
) -> None:
    small = next(c for c in fleet if "-2gb" in c)
    pin = {"version": DIGEST, "device_class": small, "start": "2026-01-03T02:00:00Z", "end": "2026-01-03T05:00:00Z"}
    query = {"version": DIGEST, "device_class": small}

    refused = api.put("/api/v1/drift/reference", json=pin, headers=tokens["viewer"])
    as_device = api.put("/api/v1/drift/reference", json=pin, headers={"Authorization": fleet[small]["Authorization"]})
    anonymous = api.put("/api/v1/drift/reference", json=pin)
    pinned = api.put("/api/v1/drift/reference", json=pin, headers=tokens["operator"])
    shown = api.get(f"/api/v1/drift/{DIGEST}/{small}", headers=tokens["viewer"]).json()
    not_viewer = api.delete("/api/v1/drift/reference", params=query, headers=tokens["viewer"])
    removed = api.delete("/api/v1/drift/reference", params=query, headers=tokens["operator"])
    again = api.delete("/api/v1/drift/reference", params=query, headers=tokens["operator"])

    assert (refused.status_code, as_device.status_code, anonymous.status_code) == (403, 403, 401)
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["kind"] == "pinned" and pinned.json()["pinned_by"] == "operator"
    assert shown["reference"] == pinned.json() and shown["reference_steps"] == 3
    assert {s["signal"]: s["level"] for s in shown["signals"]}["prompt_tokens"] == "ok"  # shifted against shifted
    assert not_viewer.status_code == 403
    assert removed.status_code == 200 and removed.json() == pinned.json()
    assert again.status_code == 404 and "no pinned drift reference" in again.json()["message"]


def test_bad_pins_are_answered_clearly(
    api: TestClient, fleet: dict[str, dict[str, str]], tokens: dict[str, dict[str, str]]
) -> None:
    small = next(c for c in fleet if "-2gb" in c)
    good = {"version": DIGEST, "device_class": small, "start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"}

    def put(**change: str) -> tuple[int, str]:
        answer = api.put("/api/v1/drift/reference", json={**good, **change}, headers=tokens["operator"])
        return answer.status_code, answer.json()["message"]

    backwards = put(end="2025-12-31T00:00:00Z")
    empty = put(start="2025-01-01T00:00:00Z", end="2025-02-01T00:00:00Z")
    no_zone = put(start="2026-01-01T00:00:00")
    unknown_version = put(version="sha256:" + "b" * 64)
    unknown_class = put(device_class="nope")
    unknown_name = api.get("/api/v1/drift/nope@v1/" + small, headers=tokens["viewer"])

    assert backwards[0] == 422 and "start < end" in backwards[1]
    assert empty[0] == 422 and "its windows start from 2026-01-01T00:00:00Z" in empty[1]
    assert no_zone[0] == 422
    assert unknown_version[0] == 404 and "is it deployed?" in unknown_version[1]
    assert unknown_class[0] == 404 and small in unknown_class[1]
    assert unknown_name.status_code == 404


def test_reading_drift_needs_a_token(api: TestClient, fleet: dict[str, dict[str, str]]) -> None:
    small = next(c for c in fleet if "-2gb" in c)
    assert api.get("/api/v1/drift").status_code == 401
    assert api.get("/api/v1/drift", headers={"Authorization": fleet[small]["Authorization"]}).status_code == 403
