"""One suite for the control plane's storage, run against SQLite in memory, a SQLite file and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from slmops.control.blueprints import apply_blueprint, get_blueprint, list_blueprints
from slmops.control.db import ApiTokenRow, BlueprintRow, DeviceRow, EnrollmentTokenRow
from slmops.control.devices import approve_device, device_events, get_device, list_devices, report_status, revoke_device
from slmops.control.enrollment import create_enrollment_token, enroll_device, list_enrollment_tokens
from slmops.control.plane import ControlPlane
from slmops.control.repository import ControlRepository, iso, parse_iso
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
    token = create_enrollment_token(
        plane, max_uses=3, expires_in_s=600, auto_approve=False, labels={}, created_by="t"
    ).token
    devices = [new_device() for _ in range(8)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def enroll(device: Device) -> None:
        try:
            enroll_device(plane, device.enroll_request(token))
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
    assert list_enrollment_tokens(plane)[0].uses == 3
    assert len(list_devices(plane)) == 3


def test_status_events_are_stored_once_whatever_the_retries(
    plane: ControlPlane, new_device: Callable[..., Device], clock: Clock
) -> None:
    token = create_enrollment_token(plane, max_uses=1, expires_in_s=60, auto_approve=True, labels={}, created_by="t")
    device_id = enroll_device(plane, new_device().enroll_request(token.token)).device_id
    event = DeviceEvent(id="e1", time="2025-06-01T12:00:00Z", kind="activated", detail={"n": 1})
    second = DeviceEvent(id="e2", time="2025-06-01T12:00:01Z", kind="probe_failed")

    first_ack = report_status(plane, device_id, StatusReport(phase="serving", events=[event]))
    again_ack = report_status(plane, device_id, StatusReport(phase="serving", events=[event, second, second]))

    assert first_ack.accepted_event_ids == ["e1"]
    assert again_ack.accepted_event_ids == ["e1", "e2"]
    assert [e.id for e in device_events(plane, device_id)] == ["e2", "e1"]
    assert get_device(plane, device_id).online is True
    clock.advance(60 + 30 + 1)
    assert get_device(plane, device_id).online is False


def test_blueprint_apply_is_idempotent_and_versioned(plane: ControlPlane) -> None:
    text = "apiVersion: slmops/v1\nkind: Blueprint\nmetadata: {name: b}\nspec:\n  model: {name: tiny}\n"

    first = apply_blueprint(plane, text, "t")
    same = apply_blueprint(plane, text + "\n# a comment changes nothing\n", "t")
    changed = apply_blueprint(plane, text.replace("{name: tiny}", "{name: tiny, ref: v2}"), "t")

    assert (first.revision, first.created) == (1, True)
    assert (same.revision, same.created) == (1, False)
    assert (changed.revision, changed.created) == (2, True)
    assert [b.revision for b in list_blueprints(plane)] == [2]
    assert get_blueprint(plane, "b", 1).model == "tiny@latest"
    assert first.warnings and "does not resolve" in first.warnings[0]


def test_revoked_devices_stay_revoked(plane: ControlPlane, new_device: Callable[..., Device]) -> None:
    token = create_enrollment_token(plane, max_uses=5, expires_in_s=60, auto_approve=False, labels={}, created_by="t")
    device = new_device()
    device_id = enroll_device(plane, device.enroll_request(token.token)).device_id
    revoke_device(plane, device_id)

    with pytest.raises(ConflictError):
        approve_device(plane, device_id)
    with pytest.raises(PermissionDeniedError):
        enroll_device(plane, device.enroll_request(token.token))


def _device_row(device_id: str, state: str = "approved") -> DeviceRow:
    return DeviceRow(
        id=device_id,
        public_key=f"ed25519 {device_id}",
        state=state,
        credential_hash=None,
        hostname="h",
        labels={},
        capabilities={},
        device_class="x86_64-8gb",
        enrolled_at="t",
        updated_at="t",
    )


def test_a_claim_is_recorded_once_and_only_when_newer(engine: Engine) -> None:
    with Session(engine) as session:
        repo = ControlRepository(session)
        repo.add_device(_device_row("dev-1"))
        repo.add_device(_device_row("dev-2", state="pending"))
        session.commit()

    with Session(engine) as session:
        repo = ControlRepository(session)
        first = repo.record_claim("dev-1", 1000, "a" * 64, "t1")
        replay = repo.record_claim("dev-1", 1000, "b" * 64, "t2")
        older = repo.record_claim("dev-1", 999, "c" * 64, "t3")
        newer = repo.record_claim("dev-1", 1001, "d" * 64, "t4")
        pending = repo.record_claim("dev-2", 1000, "e" * 64, "t5")
        session.commit()
        row = repo.device("dev-1")

        assert (first, replay, older, newer, pending) == (True, False, False, True, False)
        assert row is not None and (row.credential_hash, row.last_claim_timestamp, row.updated_at) == (
            "d" * 64,
            1001,
            "t4",
        )


def test_a_pending_claim_is_recorded_so_approval_needs_a_newer_one(engine: Engine) -> None:
    with Session(engine) as session:
        repo = ControlRepository(session)
        repo.add_device(_device_row("dev-1", state="pending"))
        repo.add_device(_device_row("dev-2"))
        session.commit()

    with Session(engine) as session:
        repo = ControlRepository(session)
        first = repo.record_pending_claim("dev-1", 1000)
        repeated = repo.record_pending_claim("dev-1", 1000)
        older = repo.record_pending_claim("dev-1", 999)
        approved_device = repo.record_pending_claim("dev-2", 1000)
        session.commit()
        row = repo.device("dev-1")
        assert row is not None
        row.state = "approved"
        session.commit()
        replayed = repo.record_claim("dev-1", 1000, "a" * 64, "t1")
        newer = repo.record_claim("dev-1", 1001, "b" * 64, "t2")
        session.commit()
        session.refresh(row)

        assert (first, repeated, older, approved_device, replayed, newer) == (True, True, False, False, False, True)
        assert (row.credential_hash, row.last_claim_timestamp) == ("b" * 64, 1001)
        other = repo.device("dev-2")
        assert other is not None and other.last_claim_timestamp is None


def test_the_last_active_admin_token_is_never_revoked(engine: Engine) -> None:
    with Session(engine) as session:
        repo = ControlRepository(session)
        for name, role, revoked in [
            ("a", "admin", False),
            ("b", "admin", False),
            ("c", "admin", True),
            ("v", "viewer", False),
        ]:
            repo.add_api_token(
                ApiTokenRow(name=name, role=role, token_hash=name * 64, created_at="t", created_by="t", revoked=revoked)
            )
        session.commit()

    with Session(engine) as session:
        repo = ControlRepository(session)
        results = [repo.revoke_api_token(name) for name in ("a", "b", "v")]
        session.commit()
        states = {t.name: t.revoked for t in repo.api_tokens()}

    assert results == [True, False, True]
    assert states == {"a": True, "b": False, "c": True, "v": True}


@given(st.datetimes(min_value=datetime(1, 1, 2), timezones=st.just(UTC)))
def test_a_moment_as_text_reads_back_and_sorts_as_the_moments_do(moment: datetime) -> None:
    # Found by the schemathesis run: glibc's strftime wrote the year 181 as "181", which neither parsed back nor
    # sorted before "2026", so a drift reference pinned at such a date failed with a 500.
    text = iso(moment)
    assert parse_iso(text) == moment.replace(microsecond=0)
    assert len(text) == 20
    pivot = datetime(2026, 1, 1, tzinfo=UTC)
    assert (text < iso(pivot)) == (moment.replace(microsecond=0) < pivot)
