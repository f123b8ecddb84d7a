"""Alerts through the rollout controller's tick and through the API."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from slmops.control.alerting import list_alerts
from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.lease import acquire_lease
from slmops.control.plane import ControlPlane
from slmops.control.rollouts import RolloutController
from slmops.control.rollouts.controller import CONTROLLER_LEASE
from slmops.errors import ConfigError
from tests.control.alerting_support import SECRET, Receiver, enroll, heartbeat, serve_receiver
from tests.control.conftest import Clock

RULES = """
rules:
  - {name: offline, kind: device_offline, ttl_s: 60, severity: critical}
webhooks:
  - {name: ops, url: "URL", secret_env: SLMOPS_TEST_HOOK_SECRET, backoff_base_s: 1, backoff_max_s: 4}
"""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from serve_receiver(Receiver(fail_first=2))


def with_rules(plane: ControlPlane, path: Path, text: str) -> None:
    path.write_text(text)
    plane.settings = plane.settings.model_copy(update={"alert_rules_file": path, "rollout_controller": False})


def test_the_controller_tick_evaluates_and_delivers_with_retries_across_ticks(
    plane: ControlPlane, clock: Clock, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLMOPS_TEST_HOOK_SECRET", SECRET)
    with_rules(plane, tmp_path / "alerts.yaml", RULES.replace("URL", receiver.url))
    enroll(plane, 8)
    controller = RolloutController(plane)
    try:
        controller.tick()  # fires; the first attempt gets a 500
        [alert] = list_alerts(plane)
        assert alert.status == "firing"
        assert [(d.status, d.attempts) for d in alert.deliveries] == [("pending", 1)]
        for _ in range(2):  # each tick makes one attempt once the backoff has passed
            clock.advance(5)
            controller.tick()
    finally:
        controller.stop()

    [alert] = list_alerts(plane)
    assert [(d.status, d.attempts, d.last_error) for d in alert.deliveries] == [("delivered", 3, None)]
    assert [r["key"] for r in receiver.requests] == [alert.deliveries[0].transition_id] * 3
    assert list(receiver.accepted) == [alert.deliveries[0].transition_id]


def test_only_the_replica_holding_the_lease_evaluates_alerts(plane: ControlPlane, clock: Clock, tmp_path: Path) -> None:
    with_rules(plane, tmp_path / "alerts.yaml", "rules: [{name: offline, kind: device_offline, ttl_s: 60}]\n")
    enroll(plane, 8)
    assert acquire_lease(plane.engine, CONTROLLER_LEASE, "other-replica", 30, plane.now_epoch())

    RolloutController(plane, holder="me").tick()

    assert list_alerts(plane) == []


def test_a_bad_rules_file_fails_at_startup_and_never_breaks_a_tick(
    plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with_rules(plane, tmp_path / "alerts.yaml", "rules: [{name: offline, kind: device_offlin, ttl_s: 60}]\n")
    controller = RolloutController(plane)

    with pytest.raises(ConfigError, match=r"alerts\.yaml"):
        controller.start()
    with caplog.at_level(logging.ERROR, logger="slmops.control.rollouts.controller"):
        assert controller.tick() == []  # the rollouts go on (none here), the error is logged
    assert controller.holds_lease
    assert "alerting failed" in caplog.text


def test_a_missing_webhook_secret_fails_at_startup(plane: ControlPlane, tmp_path: Path) -> None:
    with_rules(plane, tmp_path / "alerts.yaml", RULES.replace("URL", "http://127.0.0.1:9/"))

    with pytest.raises(ConfigError, match="SLMOPS_TEST_HOOK_SECRET"):
        RolloutController(plane).start()


def test_get_alerts_lists_them_for_viewers_filtered_by_status(
    plane: ControlPlane, clock: Clock, tmp_path: Path
) -> None:
    with_rules(
        plane,
        tmp_path / "alerts.yaml",
        "rules: [{name: offline, kind: device_offline, ttl_s: 60, group_by: device}]\n",
    )
    first, _ = enroll(plane, 8)
    second, _ = enroll(plane, 8)
    controller = RolloutController(plane)
    controller.tick()
    clock.advance(10)
    heartbeat(plane, first)
    controller.tick()
    viewer = {"Authorization": f"Bearer {create_api_token(plane, 'v', 'viewer', 'test').token}"}

    with TestClient(create_app(plane.settings, plane), base_url="http://control") as api:
        every = api.get("/api/v1/alerts", headers=viewer)
        firing = api.get("/api/v1/alerts", params={"status": "firing"}, headers=viewer)
        bad = api.get("/api/v1/alerts", params={"status": "burning"}, headers=viewer)
        anonymous = api.get("/api/v1/alerts")

    assert every.status_code == 200, every.text
    assert [(a["labels"]["device"], a["status"]) for a in every.json()] == [(second, "firing"), (first, "resolved")]
    assert [a["labels"]["device"] for a in firing.json()] == [second]
    shown = firing.json()[0]
    assert set(shown) == {
        "fingerprint", "rule", "labels", "severity", "status", "active_since", "fired_at", "resolved_at", "value",
        "summary", "updated_at", "deliveries",
    }  # fmt: skip
    assert shown["deliveries"] == [] and shown["fired_at"] == "2025-06-01T12:00:00Z"
    assert (bad.status_code, anonymous.status_code) == (422, 401)
