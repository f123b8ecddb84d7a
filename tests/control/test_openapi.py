"""The OpenAPI document says what the server does: documented errors, 405 with `Allow`, a clear 400 for bodies
that are not JSON, strict JSON types, and request schemas that accept what the server accepts."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.testclient import TestClient

from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.openapi import PUBLIC_KEY_PATTERN
from slmops.control.plane import ControlPlane
from slmops.registry.signing import format_public_key
from tests.control.conftest import Device

ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}


def _client(plane: ControlPlane) -> Iterator[TestClient]:
    token = create_api_token(plane, "root", "admin", "test").token
    app = create_app(plane.settings, plane)
    with TestClient(app, base_url="http://control", headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


@pytest.fixture
def api(file_plane: ControlPlane) -> Iterator[TestClient]:
    """The document and the request validation do not depend on the database: SQLite only."""
    yield from _client(file_plane)


@pytest.fixture
def db_api(plane: ControlPlane) -> Iterator[TestClient]:
    """On every database backend, for what the database's limits decide."""
    yield from _client(plane)


@pytest.fixture
def document(api: TestClient) -> dict[str, Any]:
    answer: dict[str, Any] = api.get("/openapi.json").json()
    return answer


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


def error_schema(operation: dict[str, Any], status: int) -> Any:
    return operation["responses"][str(status)]["content"]["application/json"]["schema"]


# ---------------------------------------------------------------- 405


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/api/v1/blueprints", "GET, POST"),  # two routes share the path
        ("PUT", "/api/v1/devices/dev-1", "GET"),
        ("OPTIONS", "/api/v1/rollouts", "GET, POST"),
        ("PATCH", "/api/v1/health", "GET"),
        ("DELETE", "/api/v1/blobs/sha256:" + "0" * 64, "GET"),
    ],
)
def test_a_405_names_every_method_the_path_allows(api: TestClient, method: str, path: str, allow: str) -> None:
    answer = api.request(method, path)

    assert answer.status_code == 405
    assert answer.headers["allow"] == allow
    assert answer.json() == {"code": "http", "message": "Method Not Allowed"}


# ---------------------------------------------------------------- bodies that are not JSON


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "Expecting property name enclosed in double quotes at character 1"),
        (b'{"name": "x",', "at character 13"),
        (b'{"name": "\xff"}', "it is not UTF-8 text"),
    ],
)
def test_a_body_that_is_not_json_is_a_clear_400(api: TestClient, body: bytes, reason: str) -> None:
    answer = api.post("/api/v1/tokens", content=body, headers={"Content-Type": "application/json"})

    assert answer.status_code == 400
    error = answer.json()
    assert error["code"] == "invalid_json"
    assert error["message"].startswith("the request body is not valid JSON (")
    assert reason in error["message"]
    assert "body.1" not in error["message"]  # the character offset is no field name


def test_json_of_the_wrong_shape_is_still_a_422(api: TestClient) -> None:
    answer = api.post("/api/v1/tokens", json=["not", "an", "object"])

    assert answer.status_code == 422
    assert answer.json()["code"] == "invalid_request"


def test_every_operation_with_a_body_documents_the_400(document: dict[str, Any]) -> None:
    with_body = [(method, path, op) for method, path, op in operations(document) if "requestBody" in op]

    assert len(with_body) >= 10
    for method, path, operation in with_body:
        assert error_schema(operation, 400) == ERROR_BODY, f"{method} {path}"


# ---------------------------------------------------------------- documented errors


def test_operations_document_the_errors_they_answer(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        where = f"{method} {path}"
        assert error_schema(operation, 422) == ERROR_BODY, where
        if operation.get("security"):
            assert error_schema(operation, 401) == ERROR_BODY, where
            assert error_schema(operation, 403) == ERROR_BODY, where
        if "{" in path:
            assert error_schema(operation, 404) == ERROR_BODY, where


# the only operations that change state without ever answering 409
NEVER_CONFLICT = {("POST", "/api/v1/enrollment-tokens"), ("POST", "/api/v1/blueprints/plan")}


def test_every_operation_that_can_conflict_documents_the_409(document: dict[str, Any]) -> None:
    writes = [(m, p, op) for m, p, op in operations(document) if m == "POST" and (m, p) not in NEVER_CONFLICT]

    assert ("POST", "/api/v1/tokens/{name}/revoke") in {(m, p) for m, p, _ in writes}  # the last admin token: 409
    assert len(writes) >= 15
    for method, path, operation in writes:
        assert error_schema(operation, 409) == ERROR_BODY, f"{method} {path}"


def test_a_repeated_query_parameter_is_refused(api: TestClient) -> None:
    answer = api.get("/api/v1/devices?state=pending&state=approved")

    assert answer.status_code == 422
    assert "query.state: given more than once" in answer.json()["message"]


@pytest.mark.parametrize(
    "path", ["/api/v1/blueprints/all?revision=99999999999999999999", "/api/v1/rollouts/r1/events?after=" + "9" * 20]
)
def test_an_integer_too_large_for_the_database_is_a_422(db_api: TestClient, path: str) -> None:
    answer = db_api.get(path)

    assert answer.status_code == 422
    assert answer.json()["code"] == "invalid_request"


# ---------------------------------------------------------------- JSON types as documented


@pytest.mark.parametrize(
    "body", [{"auto_approve": 0}, {"max_uses": "3"}, {"expires_in_s": "60"}, {"labels": {"Bad Key": "x"}}]
)
def test_request_bodies_take_json_types_as_documented(api: TestClient, body: dict[str, Any]) -> None:
    answer = api.post("/api/v1/enrollment-tokens", json=body)

    assert answer.status_code == 422, answer.text


def test_wire_bodies_take_json_types_as_documented(api: TestClient, new_device: Callable[..., Device]) -> None:
    request = new_device().enroll_request("slmops_enr_unknown").model_dump(mode="json")
    request["capabilities"]["memory_bytes"] = "8589934592"

    answer = api.post("/api/v1/enroll", json=request)

    assert answer.status_code == 422
    assert "capabilities.memory_bytes" in answer.json()["message"]


# ---------------------------------------------------------------- schemas accept what the server accepts


def test_label_maps_admit_only_label_keys(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for labels in (
        schemas["EnrollmentTokenCreate"]["properties"]["labels"],
        schemas["DeviceLabelsUpdate"]["properties"]["set"],
        schemas["EnrollRequest"]["properties"]["labels"],  # the wire model says dict[str, str]; the route checks more
    ):
        assert labels["additionalProperties"] is False
        assert list(labels["patternProperties"]) == [r"^[a-z0-9][a-z0-9._/-]{0,62}$"]


def test_the_public_key_pattern_is_the_format_devices_send(document: dict[str, Any]) -> None:
    pattern = document["components"]["schemas"]["EnrollRequest"]["properties"]["public_key"]["pattern"]
    key = format_public_key(Ed25519PrivateKey.generate().public_key())

    assert pattern == PUBLIC_KEY_PATTERN
    assert re.search(pattern, key) and re.search(pattern, key.strip())
    for wrong in ("ed25519 AAAA", "rsa " + key.split()[1], key.strip() + " extra", ""):
        assert not re.search(pattern, wrong), wrong


def test_the_enrollment_route_refuses_what_the_pattern_refuses(
    api: TestClient, new_device: Callable[..., Device]
) -> None:
    request = new_device().enroll_request("slmops_enr_unknown").model_dump(mode="json")
    request["public_key"] = "ed25519 AAAA"

    answer = api.post("/api/v1/enroll", json=request)

    assert answer.status_code == 422
    assert "public_key" in answer.json()["message"]


def test_rollout_stages_say_what_the_policy_checks(document: dict[str, Any]) -> None:
    stages = document["components"]["schemas"]["RolloutPolicy"]["properties"]["stages"]

    assert stages["minItems"] == 1
    assert stages["items"] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert "strictly growing, the last 1.0" in stages["description"]


def test_rollup_times_are_date_times_or_empty(document: dict[str, Any]) -> None:
    parameters = {p["name"]: p for p in document["paths"]["/api/v1/telemetry/rollup"]["get"]["parameters"]}

    for name in ("since", "until"):
        choices = parameters[name]["schema"]["anyOf"]
        assert {"type": "string", "format": "date-time"} in choices
        assert {"type": "string", "maxLength": 0} in choices


def test_the_document_is_built_once(api: TestClient) -> None:
    first = api.get("/openapi.json").json()

    assert api.get("/openapi.json").json() == first
    assert api.app.openapi() is api.app.openapi()  # type: ignore[attr-defined]
