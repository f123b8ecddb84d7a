"""`slmops alerts list` against a control plane served by a real uvicorn server on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from slmops.cli import run
from slmops.cli._common import console as cli_console
from slmops.control.alerting import evaluate_alerts
from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from slmops.registry.db import make_engine, migrate
from slmops.telemetry.alert_rules import load_alert_config
from tests.cli.test_rollout_cli import _serve
from tests.control.alerting_support import enroll, heartbeat
from tests.control.conftest import Clock, make_plane


@dataclass
class Control:
    plane: ControlPlane
    clock: Clock
    tmp_path: Path


def serve_control(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str | None = None
) -> Iterator[Control]:
    """A plane (viewer token in $SLMOPS_TOKEN) served on loopback ($SLMOPS_SERVER_URL), on ``database_url`` (the
    shared fixture's) or a SQLite file."""
    from slmops.control.app import create_app

    clock = Clock()
    engine = make_engine(database_url or f"sqlite:///{tmp_path / 'control.db'}")
    migrate(engine)
    plane = make_plane(engine, tmp_path / "home", clock)
    plane.settings = plane.settings.model_copy(update={"rollout_controller": False})
    monkeypatch.setenv("SLMOPS_TOKEN", create_api_token(plane, "watcher", "viewer", "test").token)
    monkeypatch.setattr(cli_console, "_width", 400)  # no wrapping in the captured output
    try:
        for url in _serve(create_app(plane.settings, plane=plane)):
            monkeypatch.setenv("SLMOPS_SERVER_URL", url)
            yield Control(plane, clock, tmp_path)
    finally:
        engine.dispose()


@pytest.fixture
def control(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Control]:
    yield from serve_control(tmp_path, monkeypatch, database_url)


def _out(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> str:
    capsys.readouterr()
    got = run(argv)
    captured = capsys.readouterr()
    assert got == code, captured.out + captured.err
    return captured.out + captured.err


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    return json.loads(_out(capsys, [*argv, "--json"]))


def test_alerts_list_shows_firing_and_resolved_alerts(control: Control, capsys: pytest.CaptureFixture[str]) -> None:
    rules = load_alert_config(
        "rules:\n"
        "  - {name: offline, kind: device_offline, ttl_s: 60, group_by: device, severity: critical}\n"
        "  - {name: unhealthy, kind: class_unhealthy, ttl_s: 60}\n"
        "webhooks: [{name: ops, url: 'http://127.0.0.1:9/', secret_env: S}]\n"
    )
    first, device_class = enroll(control.plane, 8)
    second, _ = enroll(control.plane, 8)
    evaluate_alerts(control.plane, rules, control.clock())
    control.clock.advance(5)
    heartbeat(control.plane, first)
    evaluate_alerts(control.plane, rules, control.clock())

    shown = _out(capsys, ["alerts", "list"])
    every = _json(capsys, ["alerts", "list"])
    firing = _json(capsys, ["alerts", "list", "--status", "firing"])
    resolved = _json(capsys, ["alerts", "list", "--status", "resolved"])
    bad = _out(capsys, ["alerts", "list", "--status", "burning"], code=2)

    assert [(a["rule"], a["status"]) for a in every] == [
        ("offline", "firing"),
        ("offline", "resolved"),  # critical before warning
        ("unhealthy", "resolved"),  # the class has a healthy device again
    ]
    assert [a["labels"]["device"] for a in firing] == [second]
    assert [a["labels"].get("device") for a in resolved] == [first, None]
    assert resolved[0]["deliveries"][0]["kind"] == "firing" and resolved[0]["deliveries"][1]["kind"] == "resolved"
    assert f"device {second} ({device_class}) not seen for more than 60s" in shown
    assert "ops firing: pending (0 attempts)" in shown and "critical" in shown
    assert "--status must be one of pending, firing, resolved" in bad


def test_alerts_list_says_when_there_are_none(control: Control, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no alerts" in _out(capsys, ["alerts", "list"])
    assert _json(capsys, ["alerts", "list"]) == []
