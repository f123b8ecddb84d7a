"""The periodic health check takes real traffic as its evidence first: answered requests since the last check
spare the device a probe generation; no traffic, or a failed request, and the probe prompt judges."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from slmops.agent import Agent, AgentConfig
from slmops.agent.runtime import LlamaRuntime
from tests.agent.conftest import Models
from tests.agent.simulator import RunningSim, free_port


def _complete(port: int, **body: object) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"prompt": "hello there", "max_tokens": 8, "temperature": 0.0, **body},
        timeout=30,
    )


def test_answered_requests_count_as_health_and_silence_or_a_failure_calls_the_probe(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    with Agent(agent_config()) as agent:
        agent.run(once=True)
        runtime = agent.runtime
        assert isinstance(runtime, LlamaRuntime)

        probed = runtime.check()  # nothing served yet: the probe generates
        assert probed.ok and probed.decode_tokens_per_s is not None

        for _ in range(2):
            reply = _complete(port)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
        passive = runtime.check()
        assert passive.ok and passive.decode_tokens_per_s is None
        assert passive.reason == "2 requests answered since the last check, none failed"

        quiet = runtime.check()  # no traffic since: the probe again
        assert quiet.ok and quiet.decode_tokens_per_s is not None

        assert _complete(port).status_code == 200
        stats = runtime.stats
        assert stats is not None
        model_id = next(iter(stats.snapshot().models))
        stats.record(model_id, ok=False)  # one request the local API saw fail, beside one answered
        after_failure = runtime.check()  # not evidence of health: the probe judges
        assert after_failure.ok and after_failure.decode_tokens_per_s is not None

        stats.record(model_id, ok=True, completion_tokens=0)  # an empty answer does not count as health either
        assert runtime.check().decode_tokens_per_s is not None
