"""The HTTP API through the ASGI app: enrollment, auth and scoping, desired state, status, blobs, blueprints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from slmops.control.credentials import create_api_token
from slmops.control.enrollment import trusted_keys
from slmops.control.plane import ControlPlane
from tests.control.conftest import Clock, Device, Variants, bearer, register_variants

BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {{name: {name}}}
spec:
  priority: {priority}
  selector: {selector}
  model: {{name: tiny, ref: v1}}
  variant: {variant}
"""


def blueprint(name: str = "all", priority: int = 0, selector: str = "{}", variant: str = "{}") -> str:
    return BLUEPRINT.format(name=name, priority=priority, selector=selector, variant=variant)


@pytest.fixture
def variants(plane: ControlPlane, tmp_path: Path) -> Variants:
    return register_variants(plane.registry, tmp_path)


@pytest.fixture
def enroll(api: TestClient, admin: dict[str, str]) -> Callable[..., tuple[str, dict[str, str]]]:
    """Enroll an auto-approved device; returns its id and credential header."""

    def go(device: Device, labels: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
        token = api.post("/api/v1/enrollment-tokens", json={"auto_approve": True}, headers=admin).json()["token"]
        answer = api.post("/api/v1/enroll", json=device.enroll_request(token, labels).model_dump(mode="json"))
        assert answer.status_code == 200, answer.text
        return answer.json()["device_id"], bearer(answer.json()["credential"])

    return go


def test_no_credential_is_401_and_a_viewer_cannot_apply(api: TestClient, plane: ControlPlane) -> None:
    viewer = bearer(create_api_token(plane, "v", "viewer", "t").token)

    anonymous = api.get("/api/v1/devices")
    unknown = api.get("/api/v1/devices", headers=bearer("slmops_op_nope"))
    refused = api.post("/api/v1/blueprints", json={"source": blueprint()}, headers=viewer)

    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.json()["code"] == "unauthenticated"
    assert unknown.status_code == 401
    assert refused.status_code == 403 and "needs 'operator'" in refused.json()["message"]
    assert api.get("/api/v1/devices", headers=viewer).status_code == 200
    assert api.get("/api/v1/tokens", headers=viewer).status_code == 403


def test_enroll_wait_for_approval_then_claim_with_the_device_key(
    api: TestClient, admin: dict[str, str], new_device: Callable[..., Device], clock: Clock, plane: ControlPlane
) -> None:
    device = new_device()
    created = api.post("/api/v1/enrollment-tokens", json={"labels": {"site": "b3"}}, headers=admin)
    token = created.json()["token"]
    assert created.status_code == 201

    pending = api.post("/api/v1/enroll", json=device.enroll_request(token, {"ring": "canary"}).model_dump(mode="json"))
    device_id = pending.json()["device_id"]
    now = int(clock().timestamp())
    still_pending = api.post("/api/v1/enroll/claim", json=device.claim_body(device_id, now))
    forged = api.post("/api/v1/enroll/claim", json=new_device().claim_body(device_id, now))
    stale = api.post("/api/v1/enroll/claim", json=device.claim_body(device_id, now - 3600))
    approved = api.post(f"/api/v1/devices/{device_id}/approve", headers=admin)
    clock.advance(1)
    claimed = api.post("/api/v1/enroll/claim", json=device.claim_body(device_id, now + 1))  # newer than the pending one
    credential = bearer(claimed.json()["credential"])

    assert pending.status_code == 202 and pending.json()["credential"] is None
    assert pending.json()["trusted_keys"] == trusted_keys(plane) and pending.json()["trusted_keys"]
    assert still_pending.status_code == 202
    assert forged.status_code == 401 and stale.status_code == 401 and "clock" in stale.json()["message"]
    assert approved.json()["state"] == "approved" and approved.json()["labels"] == {"ring": "canary", "site": "b3"}
    assert claimed.status_code == 200 and claimed.json()["credential"].startswith("slmops_dev_")
    assert api.get(f"/api/v1/devices/{device_id}/desired", headers=credential).status_code == 200

    api.post(f"/api/v1/devices/{device_id}/revoke", headers=admin)
    assert api.get(f"/api/v1/devices/{device_id}/desired", headers=credential).status_code == 401


def test_enrollment_tokens_expire_and_run_out(
    api: TestClient, admin: dict[str, str], new_device: Callable[..., Device], clock: Clock
) -> None:
    body = {"max_uses": 1, "expires_in_s": 60}
    once = api.post("/api/v1/enrollment-tokens", json=body, headers=admin).json()["token"]
    short = api.post("/api/v1/enrollment-tokens", json=body, headers=admin).json()["token"]
    first, second = new_device(), new_device()

    assert api.post("/api/v1/enroll", json=first.enroll_request(once).model_dump(mode="json")).status_code == 202
    # the same device retrying is answered without using the token again
    assert api.post("/api/v1/enroll", json=first.enroll_request(once).model_dump(mode="json")).status_code == 202
    used_up = api.post("/api/v1/enroll", json=second.enroll_request(once).model_dump(mode="json"))
    clock.advance(61)
    expired = api.post("/api/v1/enroll", json=second.enroll_request(short).model_dump(mode="json"))
    unknown = api.post("/api/v1/enroll", json=second.enroll_request("slmops_enr_x").model_dump(mode="json"))

    assert used_up.status_code == 403 and "used up" in used_up.json()["message"]
    assert expired.status_code == 403 and "expired" in expired.json()["message"]
    assert unknown.status_code == 401


def test_a_device_reads_and_writes_only_its_own_records(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
) -> None:
    api.post("/api/v1/blueprints", json={"source": blueprint()}, headers=admin)
    a_id, a = enroll(new_device(2))
    b_id, b = enroll(new_device(16))
    a_blob = variants.q4.manifest.files[0].digest
    b_blob = variants.base.manifest.files[0].digest
    report = {"phase": "serving"}

    assert api.get(f"/api/v1/devices/{b_id}/desired", headers=a).status_code == 403
    assert api.get("/api/v1/devices/dev-doesnotexist/desired", headers=a).status_code == 403
    assert api.post(f"/api/v1/devices/{b_id}/status", json=report, headers=a).status_code == 403
    assert api.get(f"/api/v1/blobs/{b_blob}", headers=a).status_code == 403
    assert api.get(f"/api/v1/blobs/{a_blob}", headers=a).status_code == 200
    assert api.get(f"/api/v1/blobs/{b_blob}", headers=b).status_code == 200
    assert api.get("/api/v1/devices", headers=a).status_code == 403
    assert api.post(f"/api/v1/devices/{a_id}/status", json=report, headers=admin).status_code == 403


def test_desired_state_picks_the_variant_that_fits_and_answers_304_when_unchanged(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
) -> None:
    api.post(
        "/api/v1/blueprints", json={"source": blueprint(variant="{policy: {max_memory_fraction: 0.5}}")}, headers=admin
    )
    expected = {2: variants.q4, 8: variants.q8, 16: variants.base}
    for memory_gib, envelope in expected.items():
        device_id, credential = enroll(new_device(memory_gib))
        first = api.get(f"/api/v1/devices/{device_id}/desired", headers=credential)
        etag = first.headers["etag"]
        unchanged = api.get(f"/api/v1/devices/{device_id}/desired", headers={**credential, "If-None-Match": etag})

        assert first.json()["model"]["digest"] == envelope.digest, (memory_gib, first.json()["reason"])
        assert etag == f'"{first.json()["generation"]}"'
        assert unchanged.status_code == 304 and unchanged.headers["etag"] == etag

    api.post("/api/v1/blueprints", json={"source": blueprint(variant="{pin: q8_0}")}, headers=admin)
    changed = api.get(f"/api/v1/devices/{device_id}/desired", headers={**credential, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["model"]["digest"] == variants.q8.digest


def test_blobs_resume_with_range_and_never_splice(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
    plane: ControlPlane,
) -> None:
    api.post("/api/v1/blueprints", json={"source": blueprint(variant="{pin: q4_k_m}")}, headers=admin)
    _, credential = enroll(new_device())
    digest = variants.q4.manifest.files[0].digest
    data = plane.registry.blob_path(digest).read_bytes()
    url = f"/api/v1/blobs/{digest}"
    etag = f'"{digest.removeprefix("sha256:")}"'

    whole = api.get(url, headers=credential)
    resumed = api.get(url, headers={**credential, "Range": "bytes=1000-", "If-Range": etag})
    middle = api.get(url, headers={**credential, "Range": "bytes=10-19"})
    suffix = api.get(url, headers={**credential, "Range": "bytes=-5"})
    other_file = api.get(url, headers={**credential, "Range": "bytes=1000-", "If-Range": '"0000"'})
    beyond = api.get(url, headers={**credential, "Range": f"bytes={len(data)}-"})
    several = api.get(url, headers={**credential, "Range": "bytes=0-1,5-6"})
    cached = api.get(url, headers={**credential, "If-None-Match": etag})

    assert whole.status_code == 200 and whole.content == data and whole.headers["etag"] == etag
    assert whole.headers["content-length"] == str(len(data)) and whole.headers["accept-ranges"] == "bytes"
    assert resumed.status_code == 206 and resumed.content == data[1000:]
    assert resumed.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert middle.status_code == 206 and middle.content == data[10:20]
    assert suffix.content == data[-5:]
    assert other_file.status_code == 200 and other_file.content == data
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert several.status_code == 416
    assert cached.status_code == 304
    missing = api.get("/api/v1/blobs/sha256:" + "0" * 64, headers=admin)
    assert missing.status_code == 404 and "/" not in missing.json()["message"].replace("sha256:", "")


def test_status_is_idempotent_and_devices_go_offline_after_ttl_and_grace(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    clock: Clock,
) -> None:
    device_id, credential = enroll(new_device())
    event = {"id": "e-1", "time": "2025-06-01T12:00:00Z", "kind": "activated", "detail": {"tokens_per_s": 12.5}}
    report = {"phase": "serving", "health": "ok", "events": [event], "agent_version": "0.1.0"}

    acks = [api.post(f"/api/v1/devices/{device_id}/status", json=report, headers=credential) for _ in range(2)]
    shown = api.get(f"/api/v1/devices/{device_id}", headers=admin).json()
    events = api.get(f"/api/v1/devices/{device_id}/events", headers=admin).json()
    clock.advance(91)
    later = api.get("/api/v1/devices", headers=admin).json()

    assert [a.json()["accepted_event_ids"] for a in acks] == [["e-1"], ["e-1"]]
    assert shown["online"] is True and shown["phase"] == "serving" and shown["health"] == "ok"
    assert len(events) == 1 and events[0]["detail"] == {"tokens_per_s": 12.5}
    assert later[0]["online"] is False


def test_plan_shows_changes_and_the_winning_blueprint(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
) -> None:
    api.post("/api/v1/blueprints", json={"source": blueprint("all", 0, variant="{pin: v1}")}, headers=admin)
    canary, _ = enroll(new_device(16), {"ring": "canary"})
    stable, _ = enroll(new_device(16), {"ring": "stable"})
    canary_bp = blueprint("canary", 10, selector="{labels: {ring: canary}}", variant="{pin: q8_0}")
    weak_bp = blueprint("weak", -1, variant="{pin: q4_k_m}")

    plan = api.post("/api/v1/blueprints/plan", json={"source": canary_bp}, headers=admin).json()
    weak = api.post("/api/v1/blueprints/plan", json={"source": weak_bp}, headers=admin).json()

    assert plan["spec_changed"] is True and plan["revision"] == 1
    [entry] = plan["entries"]
    assert entry["device_id"] == canary and entry["winner"] == "canary@1" and entry["matched"] == ["canary@1", "all@1"]
    assert entry["change"] == "update" and entry["before"] == "tiny@v1" and entry["after"] == "tiny@v2 (q8_0)"
    assert {e["device_id"] for e in weak["entries"]} == {canary, stable}
    assert all(e["winner"] == "all@1" and e["change"] == "unchanged" for e in weak["entries"])
    assert api.get("/api/v1/blueprints", headers=admin).json()[0]["name"] == "all"  # plan applied nothing


def test_errors_are_one_json_shape(api: TestClient, admin: dict[str, str]) -> None:
    bad_yaml = api.post("/api/v1/blueprints", json={"source": "spec: ["}, headers=admin)
    bad_body = api.post("/api/v1/enrollment-tokens", json={"max_uses": 0}, headers=admin)
    missing = api.get("/api/v1/blueprints/nope", headers=admin)

    assert bad_yaml.status_code == 422 and bad_yaml.json()["code"] == "invalid_blueprint"
    assert bad_body.status_code == 422 and bad_body.json()["code"] == "invalid_request"
    assert "max_uses" in bad_body.json()["message"]
    assert missing.status_code == 404 and set(missing.json()) == {"code", "message"}


def test_the_openapi_document_declares_auth_and_responses(api: TestClient) -> None:
    doc = api.get("/openapi.json").json()

    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"], (method, path)
            if path not in ("/api/v1/health", "/api/v1/enroll", "/api/v1/enroll/claim"):
                assert operation.get("security") == [{"bearer": []}], (method, path)
                assert "401" in operation["responses"], (method, path)


def _enroll_pending(api: TestClient, admin: dict[str, str], device: Device) -> str:
    """Enroll ``device`` with a token that does not auto-approve; its device id."""
    token = api.post("/api/v1/enrollment-tokens", json={}, headers=admin).json()["token"]
    device_id: str = api.post("/api/v1/enroll", json=device.enroll_request(token).model_dump(mode="json")).json()[
        "device_id"
    ]
    return device_id


def test_a_replayed_claim_is_refused_and_the_device_keeps_its_credential(
    api: TestClient, admin: dict[str, str], new_device: Callable[..., Device], clock: Clock
) -> None:
    device = new_device()
    device_id = _enroll_pending(api, admin, device)
    api.post(f"/api/v1/devices/{device_id}/approve", headers=admin)
    now = int(clock().timestamp())
    signed = device.claim_body(device_id, now)

    claimed = api.post("/api/v1/enroll/claim", json=signed)
    replayed = api.post("/api/v1/enroll/claim", json=signed)
    older = api.post("/api/v1/enroll/claim", json=device.claim_body(device_id, now - 1))
    credential = bearer(claimed.json()["credential"])

    assert claimed.status_code == 200
    assert replayed.status_code == 409 and replayed.json()["code"] == "conflict"
    assert "sign a new claim with the current time" in replayed.json()["message"].lower()
    assert older.status_code == 409
    assert api.get(f"/api/v1/devices/{device_id}/desired", headers=credential).status_code == 200

    clock.advance(1)
    fresh = api.post("/api/v1/enroll/claim", json=device.claim_body(device_id, now + 1))
    assert fresh.status_code == 200 and fresh.json()["credential"] != claimed.json()["credential"]
    assert (
        api.get(f"/api/v1/devices/{device_id}/desired", headers=bearer(fresh.json()["credential"])).status_code == 200
    )
    assert api.get(f"/api/v1/devices/{device_id}/desired", headers=credential).status_code == 401  # replaced


def test_a_claim_made_while_pending_cannot_be_replayed_after_approval(
    api: TestClient, admin: dict[str, str], new_device: Callable[..., Device], clock: Clock
) -> None:
    device = new_device()
    device_id = _enroll_pending(api, admin, device)
    now = int(clock().timestamp())
    signed_while_pending = device.claim_body(device_id, now)  # seen on the way by someone else
    pending = api.post("/api/v1/enroll/claim", json=signed_while_pending)
    pending_again = api.post("/api/v1/enroll/claim", json=signed_while_pending)  # a pending poll may repeat it
    older = api.post("/api/v1/enroll/claim", json=device.claim_body(device_id, now - 1))
    api.post(f"/api/v1/devices/{device_id}/approve", headers=admin)

    replayed = api.post("/api/v1/enroll/claim", json=signed_while_pending)
    clock.advance(1)
    fresh = api.post("/api/v1/enroll/claim", json=device.claim_body(device_id, now + 1))

    assert (pending.status_code, pending_again.status_code) == (202, 202)
    assert older.status_code == 409 and "sign a new claim with the current time" in older.json()["message"].lower()
    assert replayed.status_code == 409 and replayed.json()["code"] == "conflict"
    assert "credential" not in replayed.json()
    assert fresh.status_code == 200 and fresh.json()["credential"].startswith("slmops_dev_")
    credential = bearer(fresh.json()["credential"])
    assert api.get(f"/api/v1/devices/{device_id}/desired", headers=credential).status_code == 200


def test_the_last_active_admin_token_cannot_be_revoked(api: TestClient, admin: dict[str, str]) -> None:
    viewer = api.post("/api/v1/tokens", json={"name": "watcher", "role": "viewer"}, headers=admin)
    assert api.post("/api/v1/tokens/watcher/revoke", headers=admin).json()["revoked"] is True

    refused = api.post("/api/v1/tokens/root/revoke", headers=admin)

    assert viewer.status_code == 201
    assert refused.status_code == 409 and refused.json()["code"] == "conflict"
    assert "create another admin token first" in refused.json()["message"].lower()
    assert api.get("/api/v1/tokens", headers=admin).status_code == 200  # still an admin

    second = bearer(api.post("/api/v1/tokens", json={"name": "second", "role": "admin"}, headers=admin).json()["token"])
    revoked = api.post("/api/v1/tokens/root/revoke", headers=second)
    last = api.post("/api/v1/tokens/second/revoke", headers=second)

    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert api.get("/api/v1/tokens", headers=admin).status_code == 401
    assert last.status_code == 409
    tokens = {t["name"]: t["revoked"] for t in api.get("/api/v1/tokens", headers=second).json()}
    assert tokens == {"root": True, "second": False, "watcher": True}
