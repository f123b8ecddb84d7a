"""The agents' hot path (desired-state poll, heartbeat): the credential is checked against the database on every
request, a device acts only for itself, and a heartbeat is committed before its 200."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from slmops.control.auth import hash_secret
from slmops.control.credentials import authenticate_device
from slmops.control.db import DeviceRow
from slmops.control.devices import record_heartbeat
from slmops.control.plane import ControlPlane
from slmops.core.wire import StatusReport
from slmops.errors import AuthenticationError, PermissionDeniedError
from tests.control.conftest import Device, bearer

HEARTBEAT = {"phase": "serving", "health": "ok", "agent_version": "0.1.0"}


@pytest.fixture
def enroll(api: TestClient, admin: dict[str, str]) -> Callable[[Device], tuple[str, str]]:
    """Enroll an auto-approved device; returns its id and credential."""

    def go(device: Device) -> tuple[str, str]:
        token = api.post("/api/v1/enrollment-tokens", json={"auto_approve": True}, headers=admin).json()["token"]
        answer = api.post("/api/v1/enroll", json=device.enroll_request(token, None).model_dump(mode="json"))
        assert answer.status_code == 200, answer.text
        return answer.json()["device_id"], answer.json()["credential"]

    return go


def _row(plane: ControlPlane, device_id: str) -> DeviceRow:
    with Session(plane.engine) as session:
        row = session.get(DeviceRow, device_id)
        assert row is not None
        session.expunge(row)
        return row


def test_a_heartbeat_is_committed_before_its_200_and_a_poll_answers_304(
    api: TestClient, plane: ControlPlane, enroll: Callable[[Device], tuple[str, str]], new_device: Callable[..., Device]
) -> None:
    # Prepare
    device_id, credential = enroll(new_device())
    first = api.get(f"/api/v1/devices/{device_id}/desired", headers=bearer(credential))

    # Execute
    ack = api.post(f"/api/v1/devices/{device_id}/status", json=HEARTBEAT, headers=bearer(credential))
    etag = first.headers["etag"]
    again = api.get(f"/api/v1/devices/{device_id}/desired", headers={**bearer(credential), "If-None-Match": etag})

    # Assert: the row is visible to a new session as soon as the 200 arrived
    assert ack.status_code == 200 and ack.json()["accepted_event_ids"] == []
    stored = _row(plane, device_id)
    assert (stored.phase, stored.health, stored.agent_version) == ("serving", "ok", "0.1.0")
    assert stored.last_seen == ack.json()["server_time"]
    assert first.status_code == 200 and again.status_code == 304 and again.headers["etag"] == etag


def test_a_device_cannot_poll_or_report_for_another_device_and_writes_nothing(
    api: TestClient, plane: ControlPlane, enroll: Callable[[Device], tuple[str, str]], new_device: Callable[..., Device]
) -> None:
    # Prepare
    mine, credential = enroll(new_device())
    other, _ = enroll(new_device())

    # Execute
    polls = [api.get(f"/api/v1/devices/{d}/desired", headers=bearer(credential)) for d in (other, "dev-nobody")]
    beats = [
        api.post(f"/api/v1/devices/{d}/status", json=HEARTBEAT, headers=bearer(credential))
        for d in (other, "dev-nobody")
    ]

    # Assert: 403 whether or not the id exists, and the other device's row is untouched
    assert [r.status_code for r in polls + beats] == [403, 403, 403, 403]
    assert all(r.json()["code"] == "forbidden" for r in polls + beats)
    assert _row(plane, other).last_seen is None and _row(plane, mine).last_seen is None


def test_a_revocation_made_anywhere_is_refused_on_the_very_next_request(
    api: TestClient,
    plane: ControlPlane,
    admin: dict[str, str],
    enroll: Callable[[Device], tuple[str, str]],
    new_device: Callable[..., Device],
) -> None:
    # Prepare: two devices that have both polled and reported (anything cacheable has been seen)
    (one, one_credential), (two, two_credential) = enroll(new_device()), enroll(new_device())
    for device_id, credential in ((one, one_credential), (two, two_credential)):
        assert api.get(f"/api/v1/devices/{device_id}/desired", headers=bearer(credential)).status_code == 200
        assert api.post(f"/api/v1/devices/{device_id}/status", json=HEARTBEAT, headers=bearer(credential)).is_success

    # Execute: revoke one through the API, the other in the database directly (as another replica would)
    api.post(f"/api/v1/devices/{one}/revoke", headers=admin)
    with Session(plane.engine) as session:
        session.execute(update(DeviceRow).where(DeviceRow.id == two).values(state="revoked"))
        session.commit()
    before = _row(plane, two).last_seen

    # Assert: refused at once on both endpoints: 401 for a dropped credential, 403 for a revoked device
    for device_id, credential, status in ((one, one_credential, 401), (two, two_credential, 403)):
        poll = api.get(f"/api/v1/devices/{device_id}/desired", headers=bearer(credential))
        beat = api.post(f"/api/v1/devices/{device_id}/status", json=HEARTBEAT, headers=bearer(credential))
        assert (poll.status_code, beat.status_code) == (status, status), (poll.text, beat.text)
    assert _row(plane, two).last_seen == before


def test_an_operator_token_may_read_desired_state_but_not_report_for_a_device(
    api: TestClient,
    admin: dict[str, str],
    enroll: Callable[[Device], tuple[str, str]],
    new_device: Callable[..., Device],
) -> None:
    device_id, _ = enroll(new_device())

    read = api.get(f"/api/v1/devices/{device_id}/desired", headers=admin)
    report = api.post(f"/api/v1/devices/{device_id}/status", json=HEARTBEAT, headers=admin)
    missing = api.post(f"/api/v1/devices/{device_id}/status", json=HEARTBEAT)

    assert read.status_code == 200 and "etag" in read.headers
    assert report.status_code == 403 and missing.status_code == 401


def test_authenticate_device_checks_the_database_every_time(
    plane: ControlPlane, enroll: Callable[[Device], tuple[str, str]], new_device: Callable[..., Device]
) -> None:
    device_id, credential = enroll(new_device())
    assert authenticate_device(plane, credential, device_id).id == device_id

    with pytest.raises(PermissionDeniedError):
        authenticate_device(plane, credential, "dev-someone-else")
    with Session(plane.engine) as session:
        session.execute(update(DeviceRow).where(DeviceRow.id == device_id).values(credential_hash=None))
        session.commit()
    with pytest.raises(AuthenticationError):
        authenticate_device(plane, credential, device_id)


def test_a_heartbeat_on_the_event_loop_gives_up_on_a_held_sqlite_lock_and_the_request_still_succeeds(
    api: TestClient, plane: ControlPlane, enroll: Callable[[Device], tuple[str, str]], new_device: Callable[..., Device]
) -> None:
    if plane.engine.dialect.name != "sqlite":
        pytest.skip("the bounded lock wait is for SQLite; other databases run the heartbeat in a worker thread")
    device_id, credential = enroll(new_device())
    report = StatusReport.model_validate(HEARTBEAT)
    held, release = threading.Event(), threading.Event()

    def writer() -> None:  # another writer holding SQLite's write lock for a while
        with plane.engine.connect() as connection:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            held.set()
            release.wait(5)
            connection.exec_driver_sql("ROLLBACK")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert held.wait(5)
        started = time.monotonic()
        gave_up = record_heartbeat(plane, hash_secret(credential), device_id, report, lock_wait_ms=20)
        waited_s = time.monotonic() - started
        threading.Timer(0.3, release.set).start()
        answer = api.post(f"/api/v1/devices/{device_id}/status", json=HEARTBEAT, headers=bearer(credential))
    finally:
        release.set()
        thread.join()

    assert gave_up is None and waited_s < 2
    assert answer.status_code == 200  # the worker thread waited for the lock with the engine's usual timeout
    with plane.engine.connect() as connection:
        phase = connection.execute(select(DeviceRow.phase).where(DeviceRow.id == device_id)).scalar()
        timeout = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
    assert phase == "serving" and timeout == 30000  # the connection's usual lock wait was restored
