"""A real agent (llama.cpp on a tiny GGUF) sends, with each telemetry window, a drift summary of exactly what its
local API served: token-count histograms, finish reasons, empty outputs. Numbers only: no prompt text leaves."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from slmops.agent import Agent, AgentConfig
from slmops.telemetry.drift import RequestSummary, summarize
from tests.agent.conftest import Models
from tests.agent.simulator import RunningSim, free_port

SECRET = "the invoice for flat 4b is overdue because mr alvarez lost his job"


def _chat(port: int, content: str, max_tokens: int) -> RequestSummary:
    reply = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0},
        timeout=30,
    )
    assert reply.status_code == 200
    body = reply.json()
    choice = body["choices"][0]
    return RequestSummary(
        prompt_tokens=body["usage"]["prompt_tokens"],
        completion_tokens=body["usage"]["completion_tokens"],
        finish_reason=choice["finish_reason"],
        empty=choice["message"]["content"] == "",
    )


def test_the_window_carries_a_drift_summary_of_what_was_served_and_no_text(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    with Agent(agent_config(request_timeout_s=1.0, telemetry_window_s=0.0)) as agent:
        agent.run(once=True)  # enrolls, installs and serves v1
        served = [_chat(port, SECRET, 2), _chat(port, SECRET[:24], 9), _chat(port, "hi", 5)]
        agent.reconcile_once()

    [window] = [w for w in sim.sim.telemetry if w.requests]
    drift = window.drift
    expected = summarize(served)
    assert drift is not None and window.version_digest == models.v1.digest
    assert drift.requests == window.requests == 3
    assert drift.prompt_tokens == expected.prompt_tokens and drift.prompt_tokens.sum == window.prompt_tokens
    assert drift.completion_tokens == expected.completion_tokens
    assert drift.finish_reasons == expected.finish_reasons and drift.empty_outputs == expected.empty_outputs
    assert sum(drift.prompt_nll.counts) <= drift.requests  # scored on a sample of requests only
    for request in sim.sim.requests:  # privacy: no prompt text ever leaves the device
        assert SECRET.encode() not in request.body
        assert b"alvarez" not in request.body
