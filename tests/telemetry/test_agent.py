"""A real agent (llama.cpp on a tiny GGUF) against the simulator: windows after local requests, buffered offline,
delivered once, and never any prompt text."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from slmops.agent import Agent, AgentConfig
from tests.agent.conftest import Models
from tests.agent.simulator import RunningSim, free_port

SECRET = "the patient in room 12 has a rare allergy to penicillin"


def _chat(port: int) -> None:
    reply = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": SECRET}], "max_tokens": 4},
        timeout=30,
    )
    assert reply.status_code == 200


def test_windows_reach_the_server_once_even_after_an_outage_and_a_lost_ack(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    with Agent(agent_config(request_timeout_s=1.0, telemetry_window_s=0.0)) as agent:
        agent.run(once=True)  # enrolls, installs and serves v1
        _chat(port)
        _chat(port)
        agent.reconcile_once()
        online = [w for w in sim.sim.telemetry if w.requests]
        assert len(online) == 1 and online[0].version_digest == models.v1.digest and online[0].requests == 2
        assert sum(online[0].latency_ms.counts) == 2 and sum(online[0].ttft_ms.counts) == 2
        assert online[0].completion_tokens >= 2 and online[0].prompt_tokens > 0
        assert online[0].memory_rss_bytes

        sim.server.stop()
        _chat(port)
        agent.reconcile_once()
        agent.reconcile_once()
        buffered = agent.telemetry.pending()
        assert sum(w.requests for w in buffered) == 1 and len(buffered) >= 2
        sim.sim.lose_telemetry_acks = 1  # the server stores the first batch but the ack is lost
        sim.server.start()  # same port
        agent.reconcile_once()
        assert {w.id for w in buffered} <= {w.id for w in agent.telemetry.pending()}  # kept: never acknowledged
        agent.reconcile_once()
        assert agent.telemetry.pending() == []

    received: dict[str, int] = {}
    for window in sim.sim.telemetry:
        received[window.id] = window.requests  # a resend carries the same id and the same numbers
    assert {w.id for w in buffered} <= set(received)
    assert sum(received.values()) == 3  # counted by id, every request exactly once
    resent = [w.id for w in sim.sim.telemetry]
    assert len(resent) > len(set(resent))  # the lost ack did cause a resend, under the same ids
    assert all(w.version_digest == models.v1.digest for w in sim.sim.telemetry)
    for request in sim.sim.requests:  # privacy: no prompt text ever leaves the device
        assert SECRET.encode() not in request.body
        assert b"penicillin" not in request.body


def test_a_restart_is_counted_and_the_last_window_survives_a_clean_stop(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    config = agent_config(telemetry_window_s=3600.0)
    with Agent(config) as agent:
        agent.run(once=True)
        _chat(port)
        agent.reconcile_once()
        assert sim.sim.telemetry == []  # the window is not over yet
    with Agent(config) as agent:  # the window closed at the stop is on disk and goes out now
        assert sum(w.requests for w in agent.telemetry.pending()) == 1
        agent.run(once=True)
        assert agent.telemetry.pending() == []
        restarted = agent.close_window(force=True)
    assert sum(w.requests for w in sim.sim.telemetry) == 1
    assert [(w.version_digest, w.restarts, w.crashes) for w in restarted] == [(models.v1.digest, 1, 0)]
