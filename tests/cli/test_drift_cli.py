"""`slmops drift show|pin|unpin` against a real control-plane server on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import typer
from benchmarks.drift_detection import DIGEST, enroll_fleet, post_hour

from slmops.cli import drift as drift_cli
from slmops.cli import run
from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.drift_schemas import DriftEntryPublic
from slmops.control.plane import ControlPlane
from slmops.registry.db import make_engine, migrate
from tests.agent.simulator import SimServer
from tests.control.conftest import Clock, make_plane
from tests.telemetry.synthetic import STEP_S, T0, Shift, series

HOURS = 54


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[tuple[str, ControlPlane, list[str]]]:
    """A server whose 2 GiB class's inputs got 0.5 nats more surprising at hour 50; its URL, plane, classes."""
    engine = make_engine(database_url)
    migrate(engine)
    clock = Clock()
    clock.now = T0
    plane = make_plane(engine, tmp_path / "home", clock)
    devices = enroll_fleet(plane, 1)
    classes = sorted(devices)
    for i, cls in enumerate(classes):
        shift = Shift(50, nll_shift=0.5) if i == 0 else None
        for hour, point in enumerate(series(HOURS, seed=20 + i, shift=shift)):
            post_hour(plane, devices[cls][0], hour, point)
    clock.now = T0 + timedelta(seconds=HOURS * STEP_S)
    running = SimServer(create_app(plane.settings, plane)).start()
    try:
        yield running.url, plane, classes
    finally:
        running.stop()
        engine.dispose()


def test_show_lists_each_version_and_class_as_a_table_or_json(
    server: tuple[str, ControlPlane, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, plane, classes = server
    token = create_api_token(plane, "cli", "viewer", "test").token
    argv = ["drift", "show", "--server", url, "--token", token]

    assert run([*argv, "--json"]) == 0
    shown = [DriftEntryPublic.model_validate(e) for e in json.loads(capsys.readouterr().out)]
    assert run([*argv, DIGEST, classes[0]]) == 0
    detail = capsys.readouterr().out

    assert [e.device_class for e in shown] == classes
    levels = {e.device_class: {s.signal: s.level for s in e.signals} for e in shown}
    assert levels[classes[0]]["prompt_nll"] == "alert" and set(levels[classes[1]].values()) == {"ok"}
    assert shown[0].shift_began is not None
    assert classes[0] in detail and "alert" in detail and "prompt_nll: PSI" in detail
    assert shown[0].shift_began.replace("T", " ")[:16] in detail


def test_pin_and_unpin_a_reference(
    server: tuple[str, ControlPlane, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, plane, classes = server
    operator = create_api_token(plane, "ops", "operator", "test").token
    viewer = create_api_token(plane, "eyes", "viewer", "test").token
    where = ["--server", url, "--token", operator]
    times = ["--start", "2026-01-01T00:00:00Z", "--end", "2026-01-02T00:00:00Z"]

    assert run(["drift", "pin", DIGEST, classes[0], *times, *where, "--json"]) == 0
    pinned = json.loads(capsys.readouterr().out)
    assert run(["drift", "show", DIGEST, classes[0], "--json", *where]) == 0
    [shown] = json.loads(capsys.readouterr().out)
    refused = run(["drift", "pin", DIGEST, classes[0], *times, "--server", url, "--token", viewer])
    refused_err = capsys.readouterr().err
    bad_time = run(["drift", "pin", DIGEST, classes[0], "--start", "monday", "--end", "tuesday", *where])
    bad_time_err = capsys.readouterr().err
    assert run(["drift", "unpin", DIGEST, classes[0], *where]) == 0
    unpinned = capsys.readouterr().out
    again = run(["drift", "unpin", DIGEST, classes[0], *where])
    again_err = capsys.readouterr().err

    assert pinned["kind"] == "pinned" and pinned["pinned_by"] == "ops" and pinned["until"] == "2026-01-02T00:00:00Z"
    assert shown["reference"] == pinned and shown["reference_steps"] == 24
    assert refused != 0 and "error" in refused_err
    assert bad_time != 0 and "RFC 3339" in bad_time_err
    assert "unpinned" in unpinned and "2026-01-01T00:00:00Z" in unpinned
    assert again != 0 and "no pinned drift reference" in again_err


def test_every_drift_command_help_ends_with_an_example() -> None:
    command = typer.main.get_command(drift_cli.app)
    assert isinstance(command, typer.core.TyperGroup)
    for name, sub in command.commands.items():
        assert sub.help is not None and sub.help.strip().splitlines()[-1].startswith("Example: slmops drift "), name
