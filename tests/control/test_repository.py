"""One suite for the control plane's storage, run against SQLite in memory, a SQLite file and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from slmops.control.db import ApiTokenRow, BlueprintRow, DeviceRow, EnrollmentTokenRow
from slmops.control.repository import ControlRepository
from slmops.control.service import ControlPlane
from slmops.core.wire import DeviceEvent, StatusReport
from slmops.errors import ConflictError, PermissionDeniedError
from slmops.registry.db import Base
from tests.control.conftest import Clock, Device


def test_the_migrations_create_exactly_the_declared_tables(engine: Engine) -> None:
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)

    assert diff == []


def _token(token_hash: str, *, max_uses: int, expires_at: str) -> EnrollmentTokenRow:
    return EnrollmentTokenRow(
        id=token_hash[:8],
        token_hash=token_hash,
        created_at="2025-06-01T00:00:00Z",
        created_by="t",
        expires_at=expires_at,
        max_uses=max_uses,
        uses=0,
        auto_approve=False,
        labels={"site": "a"},
        revoked=False,
    )


def test_an_enrollment_token_is_consumed_at_most_max_uses_times_and_never_after_expiry(engine: Engine) -> None:
    with Session(engine) as session:
        repo = ControlRepository(session)
        repo.add_enrollment_token(_token("h1", max_uses=2, expires_at="2025-06-02T00:00:00Z"))
        session.commit()

    with Session(engine) as session:
        repo = ControlRepository(session)
        results = [repo.consume_enrollment_token("h1", "2025-06-01T00:00:00Z") for _ in range(3)]
        expired = repo.consume_enrollment_token("h1", "2025-06-03T00:00:00Z")
        unknown = repo.consume_enrollment_token("nope", "2025-06-01T00:00:00Z")
        session.commit()
        row = repo.enrollment_token_by_hash("h1")

        assert results == [True, True, False]
        assert (expired, unknown) == (False, False)
        assert row is not None and row.uses == 2 and row.labels == {"site": "a"}


def test_tokens_devices_and_blueprints_round_trip(engine: Engine) -> None:
    with Session(engine) as session:
        repo = ControlRepository(session)
        repo.add_api_token(
            ApiTokenRow(name="a", role="admin", token_hash="x" * 64, created_at="t", created_by="c", revoked=False)
        )
        repo.add_device(
            DeviceRow(
                id="dev-1",
                public_key="ed25519 k",
                state="pending",
                credential_hash=None,
                hostname="h",
                labels={"ring": "canary"},
                capabilities={"memory_bytes": 1},
                device_class="x86_64-8gb",
                enrolled_at="t",
                updated_at="t",
            )
        )
        for revision in (1, 2):
            repo.add_blueprint_revision(
                BlueprintRow(
                    name="b", revision=revision, spec="{}", source="", digest="d", created_by="c", created_at="t"
                )
            )
        session.commit()

    with Session(engine) as session:
        repo = ControlRepository(session)
        token = repo.api_token_by_hash("x" * 64)
        device = repo.device_by_public_key("ed25519 k")
        current = repo.current_blueprint("b")

        assert token is not None and token.role == "admin"
        assert device is not None and device.labels == {"ring": "canary"} and device.credential_hash is None
        assert current is not None and current.revision == 2
        assert [r.current for r in repo.blueprint_revisions("b")] == [False, True]
        assert repo.latest_blueprint_revision("b") == 2 and repo.latest_blueprint_revision("none") == 0


def test_concurrent_enrollments_never_exceed_max_uses(
    plane: ControlPlane, new_device: Callable[..., Device], engine: Engine
) -> None:
    if engine.url.database in (None, "", ":memory:"):
        pytest.skip("one shared in-memory connection cannot run transactions concurrently")
    token = plane.create_enrollment_token(
        max_uses=3, expires_in_s=600, auto_approve=False, labels={}, created_by="t"
    ).token
    devices = [new_device() for _ in range(8)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def enroll(device: Device) -> None:
        try:
            plane.enroll(device.enroll_request(token))
            result = "ok"
        except PermissionDeniedError:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=enroll, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(outcomes) == ["ok"] * 3 + ["refused"] * 5
    assert plane.enrollment_tokens()[0].uses == 3
    assert len(plane.devices()) == 3


def test_status_events_are_stored_once_whatever_the_retries(
    plane: ControlPlane, new_device: Callable[..., Device], clock: Clock
) -> None:
    token = plane.create_enrollment_token(max_uses=1, expires_in_s=60, auto_approve=True, labels={}, created_by="t")
    device_id = plane.enroll(new_device().enroll_request(token.token)).device_id
    event = DeviceEvent(id="e1", time="2025-06-01T12:00:00Z", kind="activated", detail={"n": 1})
    second = DeviceEvent(id="e2", time="2025-06-01T12:00:01Z", kind="probe_failed")

    first_ack = plane.report_status(device_id, StatusReport(phase="serving", events=[event]))
    again_ack = plane.report_status(device_id, StatusReport(phase="serving", events=[event, second, second]))

    assert first_ack.accepted_event_ids == ["e1"]
    assert again_ack.accepted_event_ids == ["e1", "e2"]
    assert [e.id for e in plane.device_events(device_id)] == ["e2", "e1"]
    assert plane.device(device_id).online is True
    clock.advance(60 + 30 + 1)
    assert plane.device(device_id).online is False


def test_blueprint_apply_is_idempotent_and_versioned(plane: ControlPlane) -> None:
    text = "apiVersion: slmops/v1\nkind: Blueprint\nmetadata: {name: b}\nspec:\n  model: {name: tiny}\n"

    first = plane.apply(text, "t")
    same = plane.apply(text + "\n# a comment changes nothing\n", "t")
    changed = plane.apply(text.replace("{name: tiny}", "{name: tiny, ref: v2}"), "t")

    assert (first.revision, first.created) == (1, True)
    assert (same.revision, same.created) == (1, False)
    assert (changed.revision, changed.created) == (2, True)
    assert [b.revision for b in plane.blueprints()] == [2]
    assert plane.blueprint("b", 1).model == "tiny@latest"
    assert first.warnings and "does not resolve" in first.warnings[0]


def test_revoked_devices_stay_revoked(plane: ControlPlane, new_device: Callable[..., Device]) -> None:
    token = plane.create_enrollment_token(max_uses=5, expires_in_s=60, auto_approve=False, labels={}, created_by="t")
    device = new_device()
    device_id = plane.enroll(device.enroll_request(token.token)).device_id
    plane.revoke(device_id)

    with pytest.raises(ConflictError):
        plane.approve(device_id)
    with pytest.raises(PermissionDeniedError):
        plane.enroll(device.enroll_request(token.token))
