"""`slmops rollout …` against an in-process control plane served by a real uvicorn server on loopback.

The plane has a controllable clock and no controller loop: the tests move releases with `RolloutController.tick()`
after the devices of a :class:`~tests.control.test_rollouts.Fleet` report, or with the operator commands.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from slmops.cli import rollout as rollout_cli
from slmops.cli import run
from slmops.cli._common import console as cli_console
from slmops.control.blueprints import apply_blueprint
from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from slmops.control.rollouts import RolloutController, abort_release, promote_release, release
from slmops.control.schemas import ClassProgress, ReleasePublic
from slmops.control.settings import ServerSettings
from slmops.registry.db import make_engine, migrate
from tests.control.conftest import Clock, Device, GiB, make_plane, register_variants
from tests.control.test_rollouts import BLUEPRINT, POLICY, Fleet


@dataclass
class Control:
    plane: ControlPlane
    clock: Clock
    fleet: Fleet
    url: str


def _serve(app: Any) -> Iterator[str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="critical", access_log=False, lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def control(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Control]:
    from slmops.control.app import create_app

    clock = Clock()
    engine = make_engine(database_url)
    migrate(engine)
    plane = make_plane(engine, tmp_path / "home", clock)
    plane.settings = ServerSettings(
        home=tmp_path / "home",
        device_offline_after_s=60,
        device_offline_grace_s=30,
        desired_cache_ttl_s=0,
        rollout_lease_s=30,
        rollout_controller=False,
    )
    register_variants(plane.registry, tmp_path, "tiny")  # tiny@v1..v3
    (tmp_path / "new").mkdir()
    register_variants(plane.registry, tmp_path / "new", "tiny")  # tiny@v4..v6
    apply_blueprint(plane, BLUEPRINT, "test")
    fleet = Fleet(plane, clock, lambda gib=8: Device(Ed25519PrivateKey.generate(), int(gib * GiB)), n=8)
    fleet.sync()
    token = create_api_token(plane, "root", "admin", "test").token
    monkeypatch.setenv("SLMOPS_TOKEN", token)
    monkeypatch.setattr(cli_console, "_width", 240)  # no wrapping in the captured output
    try:
        for url in _serve(create_app(plane.settings, plane=plane)):
            monkeypatch.setenv("SLMOPS_SERVER_URL", url)
            yield Control(plane, clock, fleet, url)
    finally:
        engine.dispose()


def _out(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> str:
    capsys.readouterr()
    got = run(argv)
    captured = capsys.readouterr()
    assert got == code, captured.out + captured.err
    return captured.out


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    return json.loads(_out(capsys, [*argv, "--json"]))


def test_start_with_a_policy_file_and_flags_then_status_shows_classes_and_gates(
    control: Control, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY.model_dump(mode="json")))

    out = _out(capsys, ["rollout", "start", "shops", "--to", "tiny@v4", "--policy", str(policy), "--stages", "20,100"])
    release_id = out.split("started release ", 1)[1].split(":", 1)[0]
    started = release(control.plane, release_id)
    assert "tiny@v1" in out and "-> tiny@v4" in out and "stages 20% -> 100%" in out and "soak 60 s" in out
    assert started.stages == [0.2, 1.0] and started.soak_s == 60  # the flag overrode the file, the rest is the file
    assert [g["name"] for g in started.policy["gates"]] == [g.name for g in POLICY.gates]

    controller = RolloutController(control.plane, holder="test")
    for _ in range(2):
        control.fleet.sync()
        control.fleet.telemetry()
        control.clock.advance(30)
        controller.tick()
    shown = _json(capsys, ["rollout", "status", release_id])
    assert shown["state"] == "running" and len(shown["classes"]) == 2

    out = _out(capsys, ["rollout", "status", release_id])
    assert f"release {release_id}" in out and "stage 1/2" in out and "[20%] -> 100%" in out
    for progress in shown["classes"]:
        assert progress["device_class"] in out
        assert progress["members"] >= 1 and progress["switched"] == progress["members"]
        assert f"{progress['switched']}/{progress['members']}" in out
        assert f"{progress['members']}/{progress['devices']}" in out
    gates = {g["gate"]: g for c in shown["classes"] for g in c["gates"]}
    assert set(gates) == {"crashes", "rollbacks", "errors", "latency"}
    assert f"latency {gates['latency']['verdict']}" in out and "crashes " in out


def test_start_flags_list_events_and_operator_actions(control: Control, capsys: pytest.CaptureFixture[str]) -> None:
    started = _json(
        capsys, ["rollout", "start", "shops", "--to", "tiny@v4", "--stages", "1,10,50,100", "--soak", "10m"]
    )
    release_id = started["id"]
    assert started["stages"] == [0.01, 0.1, 0.5, 1.0] and started["soak_s"] == 600 and started["state"] == "running"
    assert started["from_version"].startswith("tiny@v1") and started["to_version"].startswith("tiny@v4")

    listed = _json(capsys, ["rollout", "list", "--state", "running"])
    assert [r["id"] for r in listed] == [release_id]
    assert _json(capsys, ["rollout", "list", "--state", "completed"]) == []
    out = _out(capsys, ["rollout", "list"])
    assert release_id in out and "running" in out and "1/4 (1%)" in out

    assert "paused (paused by root)" not in out
    out = _out(capsys, ["rollout", "pause", release_id])
    assert f"{release_id}: paused at stage 1/4 (1%); paused by root" in out
    capsys.readouterr()
    assert run(["rollout", "pause", release_id]) == 4  # a ConflictError: one line, its exit code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only a running release can be paused" in err
    assert "running at stage 1/4" in _out(capsys, ["rollout", "resume", release_id])
    assert "running at stage 2/4 (10%); stage 2 (10%): promoted by root" in _out(
        capsys, ["rollout", "promote", release_id]
    )
    out = _out(capsys, ["rollout", "abort", release_id])
    assert "aborted at stage 2/4" in out and "every device returns to tiny@v1" in out

    out = _out(capsys, ["rollout", "events", release_id])
    lines = out.splitlines()
    assert [line.split()[3] for line in lines] == ["started", "paused", "resumed", "promoted", "aborted"]
    assert lines[0].split()[1:3] == ["stage", "1"] and lines[-1].split()[1:3] == ["stage", "2"]
    assert all(line.split()[4] == "root" for line in lines[1:]) and "by root" in lines[1]
    events = [json.loads(line) for line in _out(capsys, ["rollout", "events", release_id, "--json"]).splitlines()]
    assert [e["kind"] for e in events][-1] == "aborted" and all(e["release_id"] == release_id for e in events)
    followed = _out(capsys, ["rollout", "events", release_id, "--follow", "--interval", "0.05"])  # finished: returns
    assert followed == out

    out = _out(capsys, ["rollout", "status", release_id, "--watch", "--interval", "0.05"], code=1)
    assert f"{release_id}: aborted" in out


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "live"])
def test_watch_follows_a_running_release_until_it_completes(
    terminal: bool, control: Control, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_console, "_force_terminal", terminal)  # a terminal re-renders with rich.live
    started = _json(capsys, ["rollout", "start", "shops", "--to", "tiny@v4", "--stages", "50,100"])
    polls: list[str] = []

    def promote_instead_of_sleeping(_seconds: float) -> None:  # the operator promotes while the CLI watches
        polls.append(promote_release(control.plane, started["id"], "ops").state)

    monkeypatch.setattr(rollout_cli, "_sleep", promote_instead_of_sleeping)

    out = _out(capsys, ["rollout", "status", started["id"], "--watch", "--interval", "0.05"], code=0)
    assert polls == ["running", "completed"]
    assert f"{started['id']}: " in out and "completed" in out and "stage 2/2" in out
    assert ("\x1b[" in out) is terminal


def test_events_follow_prints_new_events_until_the_release_finishes(
    control: Control, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    release_id = _json(capsys, ["rollout", "start", "shops", "--to", "tiny@v4"])["id"]
    monkeypatch.setattr(rollout_cli, "_sleep", lambda _s: abort_release(control.plane, release_id, "ops"))

    lines = _out(capsys, ["rollout", "events", release_id, "--follow", "--json"]).splitlines()

    assert [json.loads(line)["kind"] for line in lines] == ["started", "aborted"]
    assert json.loads(lines[1])["actor"] == "ops"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--stages", "10,5,100", "--stages must grow strictly"),
        ("--stages", "1,ten,100", "--stages takes comma-separated percentages"),
        ("--stages", "1,50", "--stages must end at 100"),
        ("--stages", "0,100", "percentage in (0, 100]"),
        ("--soak", "ten minutes", "--soak takes a duration"),
    ],
)
def test_a_bad_flag_is_one_clear_line(flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["rollout", "start", "shops", "--to", "tiny@v4", flag, value, "--server", "http://127.0.0.1:9"])

    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_an_unknown_release_and_a_bad_policy_file_are_one_line(
    control: Control, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(["rollout", "status", "rel-nope"]) == 3
    assert "no release 'rel-nope'" in capsys.readouterr().err
    policy = tmp_path / "policy.yaml"
    policy.write_text("stages: [0.5, 0.2]\nsoak_s: 10\n")
    assert run(["rollout", "start", "shops", "--to", "tiny@v4", "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid rollout policy: stages:" in err and "grow strictly" in err


def test_parsers() -> None:
    assert rollout_cli.parse_stages("1, 10%,50,100") == (0.01, 0.1, 0.5, 1.0)
    assert rollout_cli.parse_stages("100") == (1.0,)
    assert [rollout_cli.parse_duration(t) for t in ("600", "90s", "10m", "1.5h", "1d")] == [600, 90, 600, 5400, 86400]
    assert rollout_cli.build_policy(None, None, None, None) is None
    built = rollout_cli.build_policy({"soak_s": 5, "min_per_class": 2}, (0.5, 1.0), None, 4)
    assert built is not None and (built.stages, built.soak_s, built.min_reporting_devices, built.min_per_class) == (
        (0.5, 1.0),
        5,
        4,
        2,
    )


def _release(**changes: Any) -> ReleasePublic:
    gates = [
        {"gate": "crashes", "verdict": "pass", "reason": "", "numbers": {"canary_count": 0.0, "canary_exposure": 9.0}},
        {
            "gate": "latency",
            "verdict": "fail",
            "reason": "p95 1.6x the baseline",
            "numbers": {"p_value": 0.00123, "ratio": 1.6, "canary_n": 120.0, "baseline_n": 900.0},
        },
        {
            "gate": "errors",
            "verdict": "wait",
            "reason": "",
            "numbers": {"canary_rate": 0.004, "baseline_rate": 0.002, "p_value": 0.5, "ratio": 2.0},
        },
        {"gate": "rollbacks", "verdict": "pass", "reason": "", "numbers": {"rate": 0.0, "max_rate": 0.05}},
    ]
    value: dict[str, Any] = {
        "id": "rel-0123456789",
        "blueprint": "tills",
        "state": "running",
        "from_version": "tiny@v1",
        "from_digest": "sha256:aa",
        "to_version": "tiny@v2",
        "to_digest": "sha256:bb",
        "stage": 2,
        "stages": [0.01, 0.1, 0.5, 1.0],
        "stage_started_at": "2025-06-01T12:00:00Z",
        "soak_s": 600.0,
        "started_at": "2025-06-01T11:00:00Z",
        "finished_at": None,
        "created_by": "alice",
        "reason": "stage 2 (10%) soaking: 120 of 600 s",
        "evaluated_at": "2025-06-01T12:02:00Z",
        "classes": [
            ClassProgress(
                device_class="arm64-4gb",
                devices=40,
                members=4,
                online_members=4,
                switched=3,
                reporting=2,
                rolled_back=1,
                status="fail",
                reason="latency: p95 1.6x the baseline",
                gates=gates,
            ),
            ClassProgress(
                device_class="x86_64-8gb",
                devices=10,
                members=1,
                online_members=0,
                switched=0,
                reporting=0,
                rolled_back=0,
                status="not judged",
                reason="not judged: all 1 canaries are offline and none reported",
            ),
        ],
        "policy": {},
    }
    value.update(changes)
    return ReleasePublic.model_validate(value)


def _text(renderable: Any) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_render_release_shows_stage_soak_classes_and_gate_numbers() -> None:
    text = _text(rollout_cli.render_release(_release(), datetime(2025, 6, 1, 12, 2, tzinfo=UTC)))

    assert "release rel-0123456789  tills: tiny@v1 -> tiny@v2  running" in text
    assert "stage 2/4  1% -> [10%] -> 50% -> 100%  soak 2 min of 10 min" in text
    assert "reason: stage 2 (10%) soaking" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert "3/4" in rows["arm64-4gb"] and "4/40" in rows["arm64-4gb"] and "fail" in rows["arm64-4gb"]
    assert "0/1" in rows["x86_64-8gb"] and "1/10" in rows["x86_64-8gb"] and "not judged" in rows["x86_64-8gb"]
    assert "latency fail p=0.00123, ratio 1.6" in text
    assert "errors wait p=0.5, ratio 2, rate 0.4% vs 0.2%" in text
    assert "rollbacks pass rate 0% (max 5%)" in text and "crashes pass count 0" in text
    assert "x86_64-8gb: not judged: all 1 canaries are offline" in text


def test_render_release_of_a_finished_release_without_evaluation() -> None:
    finished = _release(
        state="halted", finished_at="2025-06-01T12:20:00Z", classes=[], evaluated_at=None, reason="halted: bad"
    )

    text = _text(rollout_cli.render_release(finished, datetime(2026, 1, 1, tzinfo=UTC)))

    assert "halted" in text and "soak 20 min of 10 min (soaked)" in text and "not evaluated yet" in text
    assert "no per-class progress yet" in text
    assert rollout_cli.watch_exit_code(finished) == 1
    assert rollout_cli.watch_exit_code(_release(state="completed")) == 0


def test_ctrl_c_while_watching_stops_watching_but_not_the_release(
    control: Control, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    release_id = _json(capsys, ["rollout", "start", "shops", "--to", "tiny@v4"])["id"]

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rollout_cli, "_sleep", interrupt)

    assert run(["rollout", "status", release_id, "--watch"]) == 130
    err = capsys.readouterr().err
    assert f"stopped watching; release {release_id} goes on" in err and "Traceback" not in err
    assert release(control.plane, release_id).state == "running"
