"""Property-based checks of the whole API against its own OpenAPI document: no 5xx, no undocumented status,
content type, header or body, for random valid and invalid requests with an admin token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from slmops.control.app import create_app  # noqa: E402
from slmops.control.service import ControlPlane  # noqa: E402
from tests.control.conftest import Device, register_variants  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_the_api_keeps_its_openapi_promises(
    file_plane: ControlPlane, tmp_path: Path, new_device: Callable[..., Device]
) -> None:
    register_variants(file_plane.registry, tmp_path)
    token = file_plane.create_api_token("fuzz", "admin", "test").token
    file_plane.apply(
        "apiVersion: slmops/v1\nkind: Blueprint\nmetadata: {name: all}\nspec: {model: {name: tiny, ref: v1}}\n", "t"
    )
    enrollment = file_plane.create_enrollment_token(
        max_uses=10, expires_in_s=3600, auto_approve=False, labels={}, created_by="t"
    )
    file_plane.enroll(new_device().enroll_request(enrollment.token))
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(file_plane.settings, file_plane))
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: list[int] = []

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case: schemathesis.Case) -> None:
            statuses.append(case.call_and_validate(headers=headers, checks=CHECKS).status_code)

        check()

    assert len(operations) >= 19
    assert len(statuses) >= 3 * len(operations) and any(200 <= s < 300 for s in statuses)
