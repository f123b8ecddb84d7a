"""Staged rollouts with 1,000 simulated devices against a real `slmops server` process.

One fleet (three classes; the small class goes offline now and then and has a flaky network) lives through:

1. a healthy release that goes through every stage (1% -> 10% -> 50% -> 100%) to completion, while the server is
   SIGKILLed and restarted mid-rollout (the controller resumes from the database);
2. a release that is bad on the small class only: it halts in stage 1, the devices that ever ran it are all in
   the stage-1 cohort, every device returns to the previous version, and the halt event names the class and gate.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.cli import run
from slmops.config import Settings
from slmops.registry import Registry
from slmops.sim import BackgroundFleet, FleetRun, parse_fleet
from tests.servers import free_port, running_server
from tests.sim.test_sim_e2e import _register
from tests.tiny_gguf import write_tiny_gguf

GiB = 1 << 30
DEVICES = int(os.environ.get("SLMOPS_SIM_ROLLOUT_DEVICES", "1000"))
POLL_S = 6.0
WINDOW_S = 10.0
POLICY: dict[str, Any] = {
    "stages": [0.01, 0.1, 0.5, 1.0],
    "soak_s": 12,
    "min_reporting_devices": 3,
    "gates": [
        {"name": "crashes", "metric": "crashes", "min_samples": 5, "critical": True},
        {"name": "rollbacks", "metric": "rollbacks", "min_samples": 1, "max_rate": 0.2, "critical": True},
        {"name": "errors", "metric": "errors", "min_samples": 150, "max_increase": 0.02, "critical": True},
        {"name": "p95-latency", "metric": "latency", "min_samples": 100, "max_ratio": 1.3},
    ],
}
BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: sim}
spec:
  selector: {labels: {site: sim}}
  model: {name: tiny, ref: v1}
  variant:
    policy: {objective: best_quality, max_memory_fraction: 0.5}
"""


def _fleet(bad_digest: str) -> str:
    small, medium = DEVICES * 3 // 10, DEVICES * 4 // 10
    return f"""\
seed: 5
profiles:
  small: {{memory_bytes: {2 * GiB}, flaky_network_probability: 0.03, offline_every_s: 90, offline_duration_s: 20}}
  medium: {{memory_bytes: {8 * GiB}, flaky_network_probability: 0.01, speed_factor: 0.7}}
  large: {{memory_bytes: {16 * GiB}, cpu_cores: 8, speed_factor: 0.4}}
devices:
  - {{profile: small, count: {small}, labels: {{site: sim}}}}
  - {{profile: medium, count: {medium}, labels: {{site: sim}}}}
  - {{profile: large, count: {DEVICES - small - medium}, labels: {{site: sim}}}}
runtime:
  requests_per_window: 40
  telemetry_window_s: {WINDOW_S}
  overrides:
    - {{profile: small, version: "{bad_digest}", error_rate: 0.15, latency_factor: 1.6}}
"""


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    capsys.readouterr()
    code = run(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _wait(what: str, check: Callable[[], bool], timeout_s: float, diagnose: Callable[[], str]) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{diagnose()}")
        time.sleep(1.0)
    return time.monotonic() - started


@pytest.fixture
def server_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "SLMOPS_ROLLOUT_TICK_S": "1",
        "SLMOPS_ROLLOUT_LEASE_S": "3",
        "SLMOPS_DESIRED_CACHE_TTL_S": "1",
        "SLMOPS_DEVICE_OFFLINE_AFTER_S": "15",
        "SLMOPS_DEVICE_OFFLINE_GRACE_S": "5",
    }.items():
        monkeypatch.setenv(name, value)
    yield


def test_rollouts_on_a_simulated_fleet_promote_halt_roll_back_and_survive_a_restart(
    server_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry.open(Settings())
    _register(registry, tmp_path)
    good = registry.import_model(write_tiny_gguf(tmp_path / "models" / "good.gguf", seed=7), "tiny").envelope
    bad = registry.import_model(write_tiny_gguf(tmp_path / "models" / "bad.gguf", seed=8), "tiny").envelope
    base = registry.resolve("tiny@v1")
    v1 = {base.digest} | {e.digest for e in registry.children(base.digest)}
    registry.close()
    port = free_port()
    log = tmp_path / "server.log"
    timings: dict[str, float] = {}
    server = ExitStack()
    url = server.enter_context(running_server(log, port=port))
    admin = _json(capsys, ["token", "create", "--role", "admin", "--name", "root", "--json"])["token"]
    monkeypatch.setenv("SLMOPS_SERVER_URL", url)
    monkeypatch.setenv("SLMOPS_TOKEN", admin)
    enroll = _json(capsys, ["enroll-token", "create", "--uses", str(DEVICES), "--auto-approve", "--json"])["token"]
    (tmp_path / "bp.yaml").write_text(BLUEPRINT)
    assert run(["apply", "-f", str(tmp_path / "bp.yaml")]) == 0
    fleet = BackgroundFleet(
        FleetRun(parse_fleet(_fleet(bad.digest)), url, enroll, max_connections=32, poll_interval_s=POLL_S)
    )
    operator = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60)

    def get(path: str) -> Any:
        answer = operator.get(f"/api/v1{path}")
        answer.raise_for_status()
        return answer.json()

    def active() -> dict[str, str | None]:
        return {d["id"]: d["active_digest"] for d in get("/devices")}

    def diagnose() -> str:
        releases = get("/rollouts")
        return f"releases: {json.dumps(releases, indent=1)[:6000]}\nsim: {fleet.summary().to_json()}"

    def start(version: str) -> str:
        body = {"blueprint": "sim", "to": f"tiny@{version}", "policy": POLICY}
        answer = operator.post("/api/v1/rollouts", json=body)
        assert answer.status_code == 201, answer.text
        release_id: str = answer.json()["id"]
        return release_id

    fleet.start()
    try:
        timings["enroll"] = _wait(
            "every device enrolled and on v1",
            lambda: len(devices := active()) == DEVICES and all(d in v1 for d in devices.values()),
            300,
            diagnose,
        )

        # 1. A healthy release; the server is SIGKILLed at stage 2 and restarted on the same database.
        t0 = time.monotonic()
        healthy = start(good.manifest.version)
        _wait("stage 2", lambda: get(f"/rollouts/{healthy}")["stage"] >= 2, 240, diagnose)
        before = get(f"/rollouts/{healthy}")
        server.close()
        time.sleep(2)
        server = ExitStack()
        server.enter_context(running_server(log, port=port))
        after = get(f"/rollouts/{healthy}")
        assert (after["stage"], after["state"]) >= (before["stage"], "running")
        _wait("the healthy release to finish", lambda: get(f"/rollouts/{healthy}")["state"] != "running", 400, diagnose)
        timings["healthy"] = time.monotonic() - t0
        done = get(f"/rollouts/{healthy}")
        assert done["state"] == "completed", done["reason"]
        events = get(f"/rollouts/{healthy}/events")
        assert [e["kind"] for e in events if e["kind"] != "hold"] == [
            "started",
            "promoted",
            "promoted",
            "promoted",
            "completed",
        ]
        _wait("every device on the good version", lambda: set(active().values()) == {good.digest}, 120, diagnose)

        # 2. A release bad on the small class only: halted in stage 1 and rolled back everywhere.
        t1 = time.monotonic()
        broken = start(bad.manifest.version)
        cohort = {d["device_id"] for d in get(f"/rollouts/{broken}/members")}
        _wait("the bad release to halt", lambda: get(f"/rollouts/{broken}")["state"] != "running", 240, diagnose)
        timings["halt"] = time.monotonic() - t1
        halted = get(f"/rollouts/{broken}")
        assert halted["state"] == "halted" and halted["stage"] == 1, halted["reason"]
        halt = next(e for e in get(f"/rollouts/{broken}/events") if e["kind"] == "halted")
        failed = [c for c in halt["numbers"]["classes"] if c["status"] == "fail"]
        assert len(failed) == 1 and failed[0]["device_class"].endswith("2gb"), halt["message"]
        assert any(g["gate"] == "errors" and g["verdict"] == "fail" for g in failed[0]["gates"])
        _wait("every device back on the good version", lambda: set(active().values()) == {good.digest}, 120, diagnose)
        timings["back"] = time.monotonic() - t1
        summary = fleet.stop()
    finally:
        fleet.stop()
        operator.close()
        server.close()

    ran_bad = {a.device_id for a in fleet.fleet.agents if bad.digest in a.ever_ran}
    assert ran_bad and ran_bad <= cohort  # nobody outside the stage-1 cohort ever ran the bad version
    assert len(cohort) <= 3 * 4  # 1% of each class, at least one per class
    assert summary.requests["telemetry"] > 0
    print(
        f"\nsim rollout: {DEVICES} devices; enrolled in {timings['enroll']:.0f} s; healthy release to 100% "
        f"(with a server restart) in {timings['healthy']:.0f} s; bad release halted after {timings['halt']:.0f} s, "
        f"all back after {timings['back']:.0f} s; {len(ran_bad)} devices ever ran it (cohort {len(cohort)}); "
        f"{summary.requests_per_s:.0f} requests/s"
    )
