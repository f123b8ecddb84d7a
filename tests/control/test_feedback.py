"""Feedback through the HTTP API: device auth, idempotent retries, rejections (off, version, daily limit, size),
the operator listing without device ids, and curation into a dataset version."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from slmops.control.credentials import create_api_token
from slmops.control.feedback_tables import FeedbackSampleRow
from slmops.control.plane import ControlPlane
from slmops.registry.datasets import DatasetRegistry
from tests.control.conftest import Clock, Device, Variants, bearer, register_variants

BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {{name: all}}
spec:
  selector: {{}}
  model: {{name: tiny, ref: v1}}
  variant: {{pin: q8_0}}
{feedback}
"""
OPT_IN = "  feedback: {mode: opt_in, max_samples_per_day: 5}"


@pytest.fixture
def variants(plane: ControlPlane, tmp_path: Path) -> Variants:
    return register_variants(plane.registry, tmp_path)


def apply(api: TestClient, admin: dict[str, str], feedback: str = OPT_IN) -> None:
    answer = api.post("/api/v1/blueprints", json={"source": BLUEPRINT.format(feedback=feedback)}, headers=admin)
    assert answer.status_code in (200, 201), answer.text


@pytest.fixture
def enroll(api: TestClient, admin: dict[str, str]) -> Callable[..., tuple[str, dict[str, str]]]:
    def go(device: Device) -> tuple[str, dict[str, str]]:
        token = api.post("/api/v1/enrollment-tokens", json={"auto_approve": True}, headers=admin).json()["token"]
        answer = api.post("/api/v1/enroll", json=device.enroll_request(token).model_dump(mode="json"))
        assert answer.status_code == 200, answer.text
        return answer.json()["device_id"], bearer(answer.json()["credential"])

    return go


def sample(version: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "completion_id": uuid.uuid4().hex,
        "version_digest": version,
        "time": "2025-06-01T11:59:00Z",
        "rating": "up",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "answer": "Paris.",
    }
    return body | changes


def post(api: TestClient, device_id: str, credential: dict[str, str], *samples: dict[str, Any]) -> Any:
    return api.post(f"/api/v1/devices/{device_id}/feedback", json={"samples": list(samples)}, headers=credential)


def test_a_device_posts_only_its_own_feedback_and_operators_need_the_operator_role(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
    plane: ControlPlane,
) -> None:
    apply(api, admin)
    first, first_credential = enroll(new_device())
    second, _ = enroll(new_device())
    viewer = bearer(create_api_token(plane, "v", "viewer", "t").token)

    other = post(api, second, first_credential, sample(variants.q8.digest))
    anonymous = api.post(f"/api/v1/devices/{first}/feedback", json={"samples": []})
    as_operator = post(api, first, admin, sample(variants.q8.digest))
    listed_by_viewer = api.get("/api/v1/feedback", headers=viewer)
    listed_by_device = api.get("/api/v1/feedback", headers=first_credential)

    assert other.status_code == 403
    assert anonymous.status_code == 401
    assert as_operator.status_code == 403
    assert listed_by_viewer.status_code == 403 and listed_by_device.status_code == 403
    assert api.get("/api/v1/datasets", headers=viewer).status_code == 200


def test_retries_never_duplicate_and_the_listing_carries_no_device_id(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
    plane: ControlPlane,
) -> None:
    apply(api, admin)
    device_id, credential = enroll(new_device())
    other_id, other_credential = enroll(new_device())
    shared = sample(variants.q8.digest, rating="down", correction="Paris is the capital.")

    first = post(api, device_id, credential, shared)
    again = post(api, device_id, credential, shared, shared)
    same_id_elsewhere = post(api, other_id, other_credential, shared)  # another device may reuse an id
    listed = api.get("/api/v1/feedback", headers=admin)

    assert first.status_code == 200, first.text
    assert first.json() == {"accepted_ids": [shared["id"]], "rejected": {}}
    assert again.json() == {"accepted_ids": [shared["id"]], "rejected": {}}
    assert same_id_elsewhere.json()["accepted_ids"] == [shared["id"]]
    samples = listed.json()["samples"]
    assert len(samples) == 2
    text = json.dumps(listed.json())
    assert device_id not in text and other_id not in text and shared["id"] not in text
    assert len({s["device_class"] for s in samples}) == 1 and samples[0]["release_id"] is None
    assert samples[0]["correction"] == "Paris is the capital." and samples[0]["version_digest"] == variants.q8.digest
    with Session(plane.engine) as session:
        stored = session.scalars(select(FeedbackSampleRow)).all()
    assert len(stored) == 2 and all(device_id not in json.dumps(row.__dict__, default=str) for row in stored)


def test_samples_are_rejected_when_feedback_is_off_or_the_version_was_never_run(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
) -> None:
    apply(api, admin, feedback="")  # the default: off
    device_id, credential = enroll(new_device())
    while_off = post(api, device_id, credential, sample(variants.q8.digest))
    apply(api, admin)
    api.post(
        f"/api/v1/devices/{device_id}/status",
        json={"phase": "serving", "health": "ok", "active_digest": variants.base.digest},
        headers=credential,
    )
    never_ran = sample(variants.q4.digest)
    desired = sample(variants.q8.digest)  # what its desired state names
    active = sample(variants.base.digest)  # what it reported running
    huge = sample(variants.q8.digest, messages=[{"role": "user", "content": "x" * 16_000}] * 5)
    mixed = post(api, device_id, credential, never_ran, desired, active, huge)

    assert while_off.status_code == 200
    assert while_off.json()["accepted_ids"] == []
    assert "feedback is off" in next(iter(while_off.json()["rejected"].values()))
    assert sorted(mixed.json()["accepted_ids"]) == sorted([desired["id"], active["id"]])
    assert "not one this device runs or ran" in mixed.json()["rejected"][never_ran["id"]]
    assert "characters" in mixed.json()["rejected"][huge["id"]]
    assert len(api.get("/api/v1/feedback", headers=admin).json()["samples"]) == 2


def test_the_daily_limit_holds_per_device_and_resets_the_next_day(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
    clock: Clock,
) -> None:
    apply(api, admin)  # max_samples_per_day: 5
    device_id, credential = enroll(new_device())
    other_id, other_credential = enroll(new_device())
    batch = [sample(variants.q8.digest) for _ in range(4)]
    post(api, device_id, credential, *batch[:3])

    second = post(api, device_id, credential, *batch)  # 3 stored already, 1 new, then 3 more: 2 fit
    more = [sample(variants.q8.digest) for _ in range(3)]
    over = post(api, device_id, credential, *more)
    other = post(api, other_id, other_credential, *[sample(variants.q8.digest) for _ in range(5)])
    clock.advance(86400)
    tomorrow = post(api, device_id, credential, *more)

    assert len(second.json()["accepted_ids"]) == 4 and second.json()["rejected"] == {}
    assert len(over.json()["accepted_ids"]) == 1
    assert all("limit of 5" in why for why in over.json()["rejected"].values()) and len(over.json()["rejected"]) == 2
    assert len(other.json()["accepted_ids"]) == 5
    assert len(tomorrow.json()["accepted_ids"]) == 3


def test_listing_filters_and_pages(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
    clock: Clock,
) -> None:
    apply(api, admin)
    device_id, credential = enroll(new_device())
    post(api, device_id, credential, sample(variants.q8.digest, rating="down"))
    clock.advance(10)
    post(api, device_id, credential, sample(variants.q8.digest), sample(variants.q8.digest, correction="Paris."))

    pages, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 1} | ({"after": after} if after else {})
        page = api.get("/api/v1/feedback", params=params, headers=admin).json()
        pages.append(page["samples"])
        after = page["next"]
        if after is None:
            break
    downs = api.get("/api/v1/feedback", params={"rating": "down"}, headers=admin).json()["samples"]
    corrected = api.get("/api/v1/feedback", params={"rating": "correction"}, headers=admin).json()["samples"]
    late = api.get("/api/v1/feedback", params={"since": "2025-06-01T12:00:05Z"}, headers=admin).json()["samples"]
    by_name = api.get("/api/v1/feedback", params={"version": "tiny@v2"}, headers=admin).json()["samples"]
    bad_after = api.get("/api/v1/feedback", params={"after": "nonsense"}, headers=admin)
    past_all = api.get("/api/v1/feedback", params={"after": "2099-01-01T00:00:00Z/" + "f" * 64}, headers=admin)

    assert [len(p) for p in pages] == [1, 1, 1]
    assert len({p[0]["id"] for p in pages}) == 3
    assert len(downs) == 1 and len(corrected) == 1 and len(late) == 2 and len(by_name) == 3
    assert bad_after.status_code == 422 and past_all.json() == {"samples": [], "next": None}


def test_curate_registers_a_dataset_version_with_lineage_and_no_device_ids(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
    plane: ControlPlane,
) -> None:
    apply(api, admin, feedback="  feedback: {mode: opt_in, max_samples_per_day: 100}")
    device_id, credential = enroll(new_device())
    questions = [f"question number {i}?" for i in range(5)]
    post(
        api,
        device_id,
        credential,
        *[sample(variants.q8.digest, messages=[{"role": "user", "content": q}]) for q in questions],
        sample(variants.q8.digest, rating="down"),
        sample(variants.q8.digest, rating="down", correction="Paris, of course."),
    )

    made = api.post("/api/v1/datasets", json={"name": "support", "params": {"heldout_fraction": 0.3}}, headers=admin)
    again = api.post("/api/v1/datasets", json={"name": "support", "params": {"heldout_fraction": 0.3}}, headers=admin)
    shown = api.get("/api/v1/datasets/support/versions/latest", headers=admin)
    bad = api.post("/api/v1/datasets", json={"name": "Bad Name"}, headers=admin)

    assert made.status_code == 200, made.text
    manifest = made.json()["dataset"]["manifest"]
    assert made.json()["created"] is True and again.json()["created"] is False
    assert again.json()["dataset"]["digest"] == made.json()["dataset"]["digest"] == shown.json()["digest"]
    assert manifest["version"] == "v1"
    assert manifest["counts"]["train"] + manifest["counts"]["heldout"] == 6
    assert manifest["counts"]["excluded_down"] == 1 and manifest["counts"]["correction"] == 1
    assert manifest["lineage"]["versions"] == [variants.q8.digest]
    assert manifest["lineage"]["models"] == {variants.q8.digest: "tiny@v2"}
    assert bad.status_code == 422
    datasets = DatasetRegistry.of(plane.registry)
    train = datasets.read("support@v1", "train.jsonl") + datasets.read("support@v1", "heldout.jsonl")
    assert device_id.encode() not in train and b"Paris, of course." in train
    blob = api.get(f"/api/v1/blobs/{manifest['files'][1]['digest']}", headers=admin)
    assert blob.status_code == 200 and blob.content == datasets.read("support@v1", manifest["files"][1]["path"])


def test_a_sample_records_the_release_whose_cohort_held_the_device_with_that_version(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[..., tuple[str, dict[str, str]]],
    new_device: Callable[..., Device],
    variants: Variants,
    plane: ControlPlane,
) -> None:
    from slmops.control.db import ReleaseMemberRow, ReleaseRow

    apply(api, admin)
    device_id, credential = enroll(new_device())
    api.post(
        f"/api/v1/devices/{device_id}/status",
        json={"phase": "serving", "health": "ok", "active_digest": variants.base.digest},
        headers=credential,
    )
    with Session(plane.engine) as session:
        session.add(
            ReleaseRow(
                id="rel-1",
                blueprint="all",
                state="completed",
                from_digest=variants.base.digest,
                from_label="tiny@v1",
                from_digests=[variants.base.digest],
                to_name="tiny",
                to_digest=variants.base.digest,
                to_label="tiny@v3",
                to_digests=[variants.q8.digest],
                policy={},
                stage_index=0,
                stage_started_at=0.0,
                started_at=0.0,
                updated_at=0.0,
                finished_at=1.0,
                created_by="test",
                reason="",
                revision=1,
                evaluation=None,
                evaluated_at=None,
            )
        )
        session.flush()
        session.add(
            ReleaseMemberRow(release_id="rel-1", device_id=device_id, device_class="c", stage_index=0, joined_at=0.0)
        )
        session.commit()

    post(api, device_id, credential, sample(variants.q8.digest), sample(variants.base.digest, rating="down"))
    samples = api.get("/api/v1/feedback", headers=admin).json()["samples"]

    assert sorted((s["version_digest"], s["release_id"]) for s in samples) == sorted(
        [(variants.q8.digest, "rel-1"), (variants.base.digest, "rel-1")]
    )
