from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from prometheus_client.metrics_core import Metric
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


GEN_AI = {  # family -> (type, label names without ``le``), after the OpenTelemetry GenAI semantic conventions
    "gen_ai_server_request_duration_seconds": (
        "histogram",
        {"gen_ai_operation_name", "gen_ai_request_model", "error_type"},
    ),
    "gen_ai_server_time_to_first_token_seconds": ("histogram", {"gen_ai_operation_name", "gen_ai_request_model"}),
    "gen_ai_server_time_per_output_token_seconds": ("histogram", {"gen_ai_operation_name", "gen_ai_request_model"}),
    "gen_ai_client_token_usage": (
        "histogram",
        {"gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"},
    ),
}


def _families(port: int) -> dict[str, Metric]:
    reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(reply.text)}


def _value(family: Metric, suffix: str, **labels: str) -> float:
    return sum(s.value for s in family.samples if s.name == family.name + suffix and labels.items() <= s.labels.items())


def test_the_gen_ai_histograms_count_the_local_requests_and_their_tokens(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    secret = "my account number is 99-1234"

    with Agent(agent_config()) as agent:
        agent.run(once=True)
        base = f"http://127.0.0.1:{port}"
        model = httpx.get(f"{base}/health", timeout=10).json()["model"]
        usages: dict[str, list[dict[str, int]]] = {"chat": [], "text_completion": []}
        for _ in range(3):
            chat = {"messages": [{"role": "user", "content": secret}], "max_tokens": 4}
            reply = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=30)
            assert reply.status_code == 200, reply.text
            usages["chat"].append(reply.json()["usage"])
        for _ in range(2):
            reply = httpx.post(f"{base}/v1/completions", json={"prompt": secret, "max_tokens": 3}, timeout=30)
            assert reply.status_code == 200, reply.text
            usages["text_completion"].append(reply.json()["usage"])
        # The observation is made as the generation thread finishes, just after the answer: wait for it.
        deadline = time.monotonic() + 10
        while True:
            found = _families(port)
            duration = found["gen_ai_server_request_duration_seconds"]
            if _value(duration, "_count") == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        text = httpx.get(f"{base}/metrics", timeout=10).text

    # Every GenAI family with its type and exactly its labels; the model label is the served model id.
    for name, (kind, label_names) in GEN_AI.items():
        assert found[name].type == kind, name
        assert found[name].samples, name
        for sample in found[name].samples:
            assert set(sample.labels) - {"le"} == label_names, sample
            assert sample.labels["gen_ai_request_model"] == model
    assert secret not in text and "99-1234" not in text  # never prompt text
    tokens = found["gen_ai_client_token_usage"]
    ttft = found["gen_ai_server_time_to_first_token_seconds"]
    tpot = found["gen_ai_server_time_per_output_token_seconds"]
    for operation, usage in usages.items():
        assert _value(duration, "_count", gen_ai_operation_name=operation, error_type="") == len(usage)
        assert _value(duration, "_sum", gen_ai_operation_name=operation) > 0
        assert _value(ttft, "_count", gen_ai_operation_name=operation) == len(usage)
        per_token = sum(1 for u in usage if u["completion_tokens"] > 1)
        assert _value(tpot, "_count", gen_ai_operation_name=operation) == per_token
        for kind, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
            labels = {"gen_ai_operation_name": operation, "gen_ai_token_type": kind}
            assert _value(tokens, "_count", **labels) == len(usage)
            assert _value(tokens, "_sum", **labels) == sum(u[field] for u in usage)
    assert _value(duration, "_bucket", le="+Inf") == 5
