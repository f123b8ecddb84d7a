"""Debian's real `prometheus` scrapes a real control plane (uvicorn on loopback, bearer token from a file) and a real
agent's local API (llama.cpp on a tiny GGUF), evaluates the shipped alerting rules, and answers queries."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.agent import Agent, AgentConfig
from slmops.control.app import create_app
from slmops.control.credentials import create_api_token
from slmops.control.plane import ControlPlane
from slmops.core.wire import StatusReport
from slmops.registry.db import make_engine, migrate
from tests.agent.conftest import Models
from tests.agent.simulator import RunningSim, SimServer, free_port
from tests.control.conftest import Device, GiB, make_plane

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prometheus"
SCRAPE = "scrape-token-for-prometheus"

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)")


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[tuple[str, ControlPlane]]:
    """A control plane with a scrape token on a real loopback server, three enrolled devices that sent heartbeats."""
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    migrate(engine)
    plane = make_plane(engine, tmp_path / "home", lambda: datetime.now(UTC))  # type: ignore[arg-type]
    plane.settings = plane.settings.model_copy(update={"metrics_token": SCRAPE, "metrics_cache_s": 0.0})
    server = SimServer(create_app(plane.settings, plane)).start()
    admin = {"Authorization": f"Bearer {create_api_token(plane, 'root', 'admin', 'test').token}"}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        token = client.post("/api/v1/enrollment-tokens", json={"auto_approve": True, "max_uses": 10}, headers=admin)
        for _ in range(3):
            device = Device(Ed25519PrivateKey.generate(), 8 * GiB)
            body = device.enroll_request(token.json()["token"]).model_dump(mode="json")
            answer = client.post("/api/v1/enroll", json=body).json()
            credential = {"Authorization": f"Bearer {answer['credential']}"}
            report = StatusReport(phase="serving", health="ok").model_dump(mode="json")
            status = client.post(f"/api/v1/devices/{answer['device_id']}/status", json=report, headers=credential)
            assert status.status_code == 200, status.text
    try:
        yield server.url, plane
    finally:
        server.stop()
        engine.dispose()


def start_prometheus(tmp_path: Path, control_url: str, agent_port: int) -> tuple[subprocess.Popen[bytes], str]:
    tmp_path.mkdir()
    token_file = tmp_path / "scrape-token"
    token_file.write_text(SCRAPE)
    token_file.chmod(0o400)
    shutil.copy(EXAMPLE / "alerts.yml", tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "slmops-control-plane",
                "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                "static_configs": [{"targets": [control_url.removeprefix("http://")]}],
            },
            {"job_name": "slmops-agents", "static_configs": [{"targets": [f"127.0.0.1:{agent_port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    assert PROMETHEUS is not None
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return process, f"http://127.0.0.1:{port}"


def wait_for(what: str, check: Callable[[], Any], log: Path, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout_s} s; log:\n{log.read_text()[-3000:]}"
        time.sleep(0.25)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_the_control_plane_and_an_agent_and_answers_queries(
    tmp_path: Path,
    control_plane: tuple[str, ControlPlane],
    sim: RunningSim,
    models: Models,
    agent_config: Callable[..., AgentConfig],
) -> None:
    control_url, _ = control_plane
    agent_port = free_port()
    sim.sim.set_desired(models.v1, agent_port)
    with Agent(agent_config()) as agent:
        agent.run(once=True)  # enrolls with the simulator, installs v1 and serves it on agent_port
        for _ in range(2):
            chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
            reply = httpx.post(f"http://127.0.0.1:{agent_port}/v1/chat/completions", json=chat, timeout=30)
            assert reply.status_code == 200, reply.text
        process, prometheus = start_prometheus(tmp_path / "prom", control_url, agent_port)
        log = tmp_path / "prom" / "prometheus.log"
        try:
            wait_for("prometheus ready", lambda: httpx.get(f"{prometheus}/-/ready", timeout=2).status_code == 200, log)

            def targets_up() -> bool:
                active = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
                return len(active) == 2 and all(t["health"] == "up" for t in active)

            wait_for("both targets up", targets_up, log)

            # The control plane's fleet gauge and its request counter per route template.
            devices = wait_for("slmops_devices", lambda: query(prometheus, "sum(slmops_devices)"), log)
            assert float(devices[0]["value"][1]) == 3
            online = query(prometheus, 'sum(slmops_devices_online{job="slmops-control-plane"})')
            assert float(online[0]["value"][1]) == 3
            status = query(
                prometheus, 'sum(slmops_http_requests_total{route="/api/v1/devices/{device_id}/status", status="2xx"})'
            )
            assert float(status[0]["value"][1]) == 3
            # The agent's GenAI histograms and gauges.
            count = query(prometheus, 'sum(gen_ai_server_request_duration_seconds_count{gen_ai_operation_name="chat"})')
            assert float(count[0]["value"][1]) == 2
            phase = query(prometheus, 'slmops_agent_phase{job="slmops-agents"} == 1')
            assert [r["metric"]["phase"] for r in phase] == [agent.state.phase]

            # The shipped rules load and evaluate against real series without errors.
            def rules_evaluated() -> list[dict[str, Any]] | None:
                groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
                rules = [r for g in groups for r in g["rules"]]
                return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

            rules = wait_for("rules evaluated", rules_evaluated, log)
            assert {r["health"] for r in rules} == {"ok"}, [r for r in rules if r["health"] != "ok"]
            assert len(rules) == len(
                [r for g in yaml.safe_load((EXAMPLE / "alerts.yml").read_text())["groups"] for r in g["rules"]]
            )
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
