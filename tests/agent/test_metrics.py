from __future__ import annotations

from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from slmops.agent import Agent, AgentConfig
from slmops.agent.outbox import new_event
from tests.agent.conftest import Models
from tests.agent.simulator import RunningSim, free_port


def _gauges(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert reply.status_code == 200
    return {
        family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        for family in text_string_to_metric_families(reply.text)
    }


def test_the_local_api_serves_the_agents_gauges_next_to_the_gen_ai_metrics(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)

    with Agent(agent_config()) as agent:
        agent.run(once=True)
        partial = agent.data.download_dir / "abc.partial"
        partial.write_bytes(b"x" * 123)
        agent.outbox.add(new_event("test_event", None, {}))
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30
        )
        assert reply.status_code == 200
        gauges = _gauges(port)
        events, _ = agent.outbox.size()

    assert gauges["slmops_agent_active_version"] == {(("digest", models.v1.digest),): 1.0}
    phases = gauges["slmops_agent_phase"]
    assert sum(phases.values()) == 1 and phases[(("phase", agent.state.phase),)] == 1
    assert len(phases) > 3
    assert gauges["slmops_agent_staged_slots"] == {(): 1.0}
    assert gauges["slmops_agent_download_partial_bytes"] == {(): 123.0}
    assert gauges["slmops_agent_outbox_events"] == {(): float(events)} and events == 1
    assert "slmops_agent_outbox_telemetry_bytes" in gauges
    assert "gen_ai_server_request_duration_seconds" in gauges
