"""The whole API against its own OpenAPI document, the way `schemathesis run` tests it: every phase (examples,
coverage, fuzzing, stateful) and every check schemathesis has, with an admin token, and with real identifiers
(devices, a blueprint, a release, a blob, a device's own credential) so that operations reach past 404."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.engine import Status, events, from_schema  # noqa: E402

from slmops.control.app import create_app  # noqa: E402
from slmops.control.credentials import create_api_token  # noqa: E402
from slmops.control.plane import ControlPlane  # noqa: E402
from slmops.core.wire import TelemetryBatch, TelemetryWindow  # noqa: E402
from slmops.telemetry.drift import RequestSummary, summarize  # noqa: E402
from tests.control.conftest import Device, register_variants  # noqa: E402
from tests.tuf.seed import seed_tuf  # noqa: E402

BLUEPRINT = "apiVersion: slmops/v1\nkind: Blueprint\nmetadata: {name: all}\nspec: {model: {name: tiny, ref: v1}}\n"
PHASES = ("examples", "coverage", "fuzzing", "stateful")
MAX_EXAMPLES = 50  # per operation and phase: about a minute on two cores


@dataclass
class Fleet:
    """What the API holds before the run: ids for the path parameters and the credentials to call with."""

    admin: str
    device: str  # approved; its credential is `credential`
    credential: str
    pending: str  # waiting for approval
    revoked: str  # approved; revoked during the run
    decommissioned: str  # approved; decommissioned during the run
    enrollment_token: str  # auto-approves, many uses
    release: str
    blob: str
    device_class: str  # the device's class; it has sent telemetry windows with drift summaries of tiny@v1
    tuf_target: str  # "<hex>.json": the TUF target of variants.base


def _fleet(plane: ControlPlane, tmp_path: Path, new_device: Callable[..., Device]) -> Fleet:
    variants = register_variants(plane.registry, tmp_path)
    admin = create_api_token(plane, "fuzz", "admin", "test").token
    api = TestClient(create_app(plane.settings, plane), headers={"Authorization": f"Bearer {admin}"})

    def post(path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        response = api.post(f"/api/v1{path}", json=body)
        assert response.status_code == status, response.text
        answer: dict[str, Any] = response.json()
        return answer

    post("/blueprints", {"source": BLUEPRINT})
    post("/tokens", {"name": "spare", "role": "viewer"}, 201)
    auto = post("/enrollment-tokens", {"max_uses": 1_000_000, "auto_approve": True}, 201)["token"]
    manual = post("/enrollment-tokens", {"max_uses": 1}, 201)["token"]
    device = post("/enroll", new_device().enroll_request(auto).model_dump(mode="json"))
    revoked = post("/enroll", new_device().enroll_request(auto).model_dump(mode="json"))
    decommissioned = post("/enroll", new_device().enroll_request(auto).model_dump(mode="json"))
    pending = post("/enroll", new_device().enroll_request(manual).model_dump(mode="json"), 202)
    release = post("/rollouts", {"blueprint": "all", "to": "tiny@v2"}, 201)
    summary = summarize([RequestSummary(100, 50, prompt_nll=2.5)] * 10)
    window = TelemetryWindow(
        id="d1", version_digest=variants.base.digest, window_start="2025-06-01T11:00:00Z", window_s=60, drift=summary
    )
    as_device = {"Authorization": f"Bearer {device['credential']}"}
    posted = api.post(
        f"/api/v1/devices/{device['device_id']}/telemetry",
        json=TelemetryBatch(windows=[window]).model_dump(mode="json"),
        headers=as_device,
    )
    assert posted.status_code == 200, posted.text
    device_class = api.get(f"/api/v1/devices/{device['device_id']}").json()["device_class"]
    day = {"start": "2025-06-01T00:00:00Z", "end": "2025-06-02T00:00:00Z"}
    pin = {"version": "tiny@v1", "device_class": device_class, **day}
    assert api.put("/api/v1/drift/reference", json=pin).status_code == 200  # so DELETE has one to remove
    assert api.post("/api/v1/datasets", json={"name": "fb"}).status_code in (200, 201)  # for the dataset paths
    tuf = seed_tuf(plane, tmp_path / "tuf-offline", [variants.base], device_class)  # TUF on: its paths answer 200
    return Fleet(
        admin=admin,
        device=device["device_id"],
        credential=device["credential"],
        pending=pending["device_id"],
        revoked=revoked["device_id"],
        decommissioned=decommissioned["device_id"],
        enrollment_token=auto,
        release=release["id"],
        blob=variants.base.manifest.files[0].digest,
        device_class=device_class,
        tuf_target=tuf.target_name,
    )


def _config(fleet: Fleet) -> SchemathesisConfig:
    def operation(path: str, method: str | None = None, **settings: Any) -> dict[str, Any]:
        return {"include-path": f"/api/v1{path}", **({"include-method": method} if method else {}), **settings}

    as_device = {"headers": {"Authorization": f"Bearer {fleet.credential}"}, "parameters": {"device_id": fleet.device}}
    # A blueprint's YAML must parse into a valid blueprint, and rollout stages must grow and end at 1.0: JSON
    # Schema cannot say either, so schema-valid bodies of these operations may be refused with 422 (and are
    # told why); everything else about them is checked as for every other operation.
    semantic = {"checks": {"positive_data_acceptance": {"expected-statuses": ["2XX", 401, 403, 404, 409, 422]}}}
    # Whether a well-formed Range is satisfiable depends on the blob's size, which no schema knows.
    # 416 is how a malformed Range is refused, too.
    ranges = {
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2XX", 304, 401, 403, 404, 416]},
            "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 416, 422]},
        }
    }
    # GET /blueprints/plan is GET /blueprints/{name} of a blueprint named "plan", so `Allow: GET, POST` is true
    # there although the document lists only POST under that path.
    shadowed = {"checks": {"allow_header_conformance": {"enabled": False}}}
    return SchemathesisConfig.from_dict(
        {
            "seed": 9,
            "headers": {"Authorization": f"Bearer {fleet.admin}"},
            "checks": {"enabled": True},
            # FastAPI, like most frameworks, reads the last of repeated scalar query parameters.
            "phases": {"examples": {"fill-missing": True}, "coverage": {"generate-duplicate-query-parameters": False}},
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "dictionaries": {"enrollment-tokens": {"values": [fleet.enrollment_token]}},
            "parameters": {
                "device_id": fleet.device,
                "release_id": fleet.release,
                "digest": fleet.blob,
                "version": "tiny@v1",
                "device_class": fleet.device_class,
                "body.version": "tiny@v1",
                "body.device_class": fleet.device_class,
                "body.token": {"dictionary": "enrollment-tokens", "probability": 0.5},
            },
            "operations": [
                operation("/devices/{device_id}/status", **as_device),
                operation("/devices/{device_id}/telemetry", **as_device),
                operation("/devices/{device_id}/feedback", **as_device),
                operation("/datasets/{name}/versions", parameters={"name": "fb"}),
                operation("/datasets/{name}/versions/{selector}", parameters={"name": "fb", "selector": "latest"}),
                operation("/devices/{device_id}/approve", parameters={"device_id": fleet.pending}),
                operation("/devices/{device_id}/revoke", parameters={"device_id": fleet.revoked}),
                operation("/devices/{device_id}/decommission", parameters={"device_id": fleet.decommissioned}),
                operation("/tokens/{name}/revoke", parameters={"name": "spare"}),
                operation("/blueprints/{name}", parameters={"name": "all"}),
                operation("/blueprints", method="POST", **semantic),
                operation("/blueprints/plan", checks={**semantic["checks"], **shadowed["checks"]}),
                operation("/blobs/{digest}", **ranges),
                operation("/rollouts", method="POST", **semantic),
                # a pinned range must hold windows and have start < end: no schema says either
                operation("/drift/reference", method="PUT", **semantic),
                # TUF metadata is signed JSON no schema can produce: uploads of schema-valid bodies are refused (422)
                operation("/tuf/root", method="PUT", **semantic),
                operation("/tuf/targets", method="PUT", **semantic),
                operation("/tuf/{name}.json", parameters={"name": "timestamp"}),
                operation("/tuf/targets/manifests/{name}", parameters={"name": fleet.tuf_target}),
            ],
        }
    )


@dataclass
class Run:
    failures: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    phases: dict[str, Status] = field(default_factory=dict)
    transitions: int = 0  # links between operations the stateful phase followed
    errors: list[str] = field(default_factory=list)


def _run(schema: Any) -> Run:
    run = Run()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            recorder = event.recorder
            for checks in recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        run.failures[(check.name, recorder.label)].append(
                            f"{failure.title}: {failure.message}\n{check.failure_info.code_sample}"
                        )
            for case_id, interaction in recorder.interactions.items():
                if interaction.response is not None:
                    operation = recorder.cases[case_id].value.operation.label
                    run.statuses[operation].append(interaction.response.status_code)
        elif isinstance(event, events.PhaseStarted) and event.payload is not None:
            run.transitions = event.payload.transitions_selected
        elif isinstance(event, events.PhaseFinished):
            run.phases[event.phase.name.value] = event.status
        elif isinstance(event, events.NonFatalError):  # e.g. an exception the app raised instead of answering
            run.errors.append(f"{event.label}: {event.info.title}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            run.errors.append(repr(event.exception))
        elif isinstance(event, events.EngineFinished):
            run.errors.extend(f"{failure.title}: {failure.message}" for failure in event.failures)
    return run


def test_the_api_keeps_its_openapi_promises(
    plane: ControlPlane, tmp_path: Path, new_device: Callable[..., Device]
) -> None:
    fleet = _fleet(plane, tmp_path, new_device)

    app = create_app(plane.settings, plane)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=_config(fleet))

    run = _run(schema)

    assert not run.errors, sorted(set(run.errors))
    assert not run.failures, "\n\n".join(
        f"{name} on {where}:\n{found[0]}" for (name, where), found in run.failures.items()
    )
    assert {phase: run.phases.get(phase) for phase in PHASES} == dict.fromkeys(PHASES, Status.SUCCESS)
    assert run.transitions > 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 33
    unreached = [op.label for op in operations if all(s in (401, 403, 404) for s in run.statuses[op.label])]
    assert unreached == []
    failed = [op.label for op in operations if not any(200 <= s < 300 for s in run.statuses[op.label])]
    # a claim needs the device key's signature; only one release of a blueprint runs at a time, and the fleet's
    # is aborted during the run (then pause, resume and promote answer 409)
    assert set(failed) <= {
        "POST /api/v1/enroll/claim",
        "POST /api/v1/rollouts",
        "POST /api/v1/rollouts/{release_id}/pause",
        "POST /api/v1/rollouts/{release_id}/resume",
        "POST /api/v1/rollouts/{release_id}/promote",
        "POST /api/v1/rollouts/{release_id}/abort",
        "PUT /api/v1/tuf/root",  # only a root signed offline, by the next version's keys, is accepted
        "PUT /api/v1/tuf/targets",  # only targets signed offline by the targets keys are accepted
    }, failed
