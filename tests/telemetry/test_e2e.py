"""End to end in one process: a real agent (llama.cpp, tiny GGUF) and the real control-plane app on loopback; local
requests become windows, the server stores them, and `slmops telemetry rollup` shows them per device class."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from slmops.agent import Agent, AgentConfig
from slmops.cli import run
from slmops.control.app import create_app
from slmops.control.blueprints import apply_blueprint
from slmops.control.credentials import create_api_token
from slmops.control.enrollment import create_enrollment_token
from slmops.registry.db import make_engine, migrate
from tests.agent.simulator import SimServer, free_port
from tests.control.conftest import Clock, make_plane
from tests.tiny_gguf import write_tiny_gguf

BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: all}
spec:
  model: {name: tiny, ref: v1}
  runtime: {port: PORT, context_tokens: 256, threads: 1}
"""


def test_agent_windows_reach_the_rollup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    migrate(engine)
    clock = Clock()
    clock.now = datetime.now(UTC)
    plane = make_plane(engine, tmp_path / "home", clock)
    envelope = plane.registry.import_model(write_tiny_gguf(tmp_path / "m" / "tiny.gguf", seed=1), "tiny").envelope
    port = free_port()
    apply_blueprint(plane, BLUEPRINT.replace("PORT", str(port)), "test")
    enroll = create_enrollment_token(
        plane, max_uses=1, expires_in_s=600, auto_approve=True, labels={}, created_by="test"
    ).token
    viewer = create_api_token(plane, "viewer", "viewer", "test").token
    server = SimServer(create_app(plane.settings, plane)).start()
    try:
        config = AgentConfig(
            data_dir=tmp_path / "agent",
            server_url=server.url,
            enroll_token=enroll,
            poll_interval_s=0.1,
            probation_s=0.0,
            health_interval_s=3600.0,
            heartbeat_interval_s=0.0,
            request_timeout_s=10.0,
            telemetry_window_s=0.0,
        )
        with Agent(config) as agent:
            agent.run(once=True)
            assert agent.slots.current() == envelope.digest, agent.state.last_error
            for _ in range(3):
                reply = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
                    timeout=30,
                )
                assert reply.status_code == 200
            agent.reconcile_once()
            assert agent.telemetry.pending() == []
        clock.advance(60)  # the server's clock (frozen in this test) passes the windows' start
        argv = ["telemetry", "rollup", "tiny@v1", "--server", server.url, "--token", viewer, "--json"]
        assert run(argv) == 0
        shown = json.loads(capsys.readouterr().out)
    finally:
        server.stop()
        plane.close()
        engine.dispose()
    assert shown["version_digest"] == envelope.digest
    [cls] = shown["classes"]
    assert cls["devices"] == 1 and cls["requests"] == 3 and cls["errors"] == 0
    assert sum(cls["latency_ms"]["counts"]) == 3 and sum(cls["per_token_ms"]["counts"]) == 3
