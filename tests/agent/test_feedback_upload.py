"""The agent's feedback path: a rating on the local API → sampled, capped, redacted, queued → uploaded in batches.

An agent in this process with the real llama.cpp runtime on a tiny model, against the test control plane of
``tests/agent/simulator.py`` with a feedback route added here (the real control plane's route is exercised end to
end in ``test_egress.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse

from slmops.agent import Agent, AgentConfig
from slmops.agent.feedback import FeedbackCollector
from slmops.core.adaptation import LocalAdaptation
from slmops.core.feedback import FeedbackAck, FeedbackBatch, FeedbackPolicy
from slmops.core.wire import API_PREFIX
from slmops.feedback.store import FeedbackStore, RatedCompletion
from slmops.runtime.policy import LocalPolicy
from tests.agent.conftest import Models
from tests.agent.simulator import RunningSim, SimServer, Simulator, free_port

EMAIL = "anna.schmidt@example.org"
TOKEN = "xq7-vorpal-glimmer-3318"


@dataclass
class FeedbackRoute:
    batches: list[FeedbackBatch] = field(default_factory=list)
    fail_next: int = 0  # answer this many posts with 503
    reject: set[str] = field(default_factory=set)  # sample ids to reject


@pytest.fixture
def route() -> FeedbackRoute:
    return FeedbackRoute()


@pytest.fixture
def sim(models: Models, route: FeedbackRoute) -> Iterator[RunningSim]:
    simulator = Simulator(models.registry)
    app = simulator.app()

    @app.post(f"{API_PREFIX}/devices/{{device_id}}/feedback")
    async def feedback(device_id: str, request: Request) -> Any:
        if route.fail_next > 0:
            route.fail_next -= 1
            return JSONResponse({"detail": "down"}, status_code=503)
        batch = FeedbackBatch.model_validate_json(await request.body())
        route.batches.append(batch)
        ids = [s.id for s in batch.samples]
        ack = FeedbackAck(
            accepted_ids=[i for i in ids if i not in route.reject],
            rejected={i: "refused by the test" for i in ids if i in route.reject},
        )
        return JSONResponse(ack.model_dump(mode="json"))

    server = SimServer(app).start()
    yield RunningSim(simulator, server)
    server.stop()


def _desire(sim: RunningSim, models: Models, port: int, feedback: FeedbackPolicy, system_prompt: str | None) -> None:
    sim.sim.set_desired(models.v1, port)
    assert sim.sim.desired is not None
    sim.sim.desired = sim.sim.desired.model_copy(
        update={"feedback": feedback, "local": LocalAdaptation(system_prompt=system_prompt)}
    )


def _chat_and_rate(port: int, text: str, correction: str | None = None) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    answer = httpx.post(
        f"{base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "max_tokens": 3, "temperature": 0},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    body = {"completion_id": answer.json()["id"], "rating": "up", "correction": correction}
    rated = httpx.post(f"{base}/v1/feedback", json={k: v for k, v in body.items() if v is not None}, timeout=30)
    assert rated.status_code == 201, rated.text
    result: dict[str, Any] = rated.json()
    return result


def test_an_opted_in_agent_uploads_redacted_samples_retries_and_drops_acknowledged_ids(
    sim: RunningSim, models: Models, route: FeedbackRoute, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    _desire(sim, models, port, FeedbackPolicy(mode="opt_in"), "You are the till assistant.")
    route.fail_next = 1
    with Agent(agent_config(feedback_opt_in=True)) as agent:
        agent.run(once=True)
        assert agent.policy.current().local.system_prompt == "You are the till assistant."
        agent.feedback.backoff_base_s = 0.0

        rated = _chat_and_rate(port, f"mail {EMAIL} about {TOKEN}", correction=f"write to {EMAIL}")
        assert rated["queued_for_upload"] is True, rated
        assert agent.feedback_store.queued() == 1
        assert agent.flush_feedback() == 0 and agent.feedback_store.queued() == 1  # 503: kept for the next try
        assert agent.flush_feedback() == 1 and agent.feedback_store.queued() == 0

    [batch] = route.batches
    [sample] = batch.samples
    wire = batch.model_dump_json()
    assert EMAIL not in wire and TOKEN in wire
    assert sample.messages[0].content == f"mail <EMAIL> about {TOKEN}"  # the site's system prompt is not in it
    assert sample.correction == "write to <EMAIL>" and sample.redactions["EMAIL"] == 2
    assert sample.version_digest == models.v1.digest and sample.rating == "up"
    assert "chatcmpl-" in sample.completion_id


def test_without_the_sites_opt_in_nothing_is_queued_or_sent(
    sim: RunningSim, models: Models, route: FeedbackRoute, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    _desire(sim, models, port, FeedbackPolicy(mode="opt_in"), None)
    with Agent(agent_config()) as agent:
        agent.run(once=True)
        rated = _chat_and_rate(port, f"mail {EMAIL} about {TOKEN}")
        agent.reconcile_once()

        assert rated["queued_for_upload"] is False and rated["text_kept"] is False
        assert agent.feedback_store.queued() == 0
    assert route.batches == []
    for db in (agent.data.root).glob("feedback.db*"):
        assert TOKEN.encode() not in db.read_bytes()


def _rated(n: int) -> RatedCompletion:
    return RatedCompletion(
        completion_id=f"chatcmpl-{n}",
        version_digest="sha256:" + "1" * 64,
        created=1.0,
        rated=2.0,
        rating="down",
        score=None,
        correction=None,
        messages=[{"role": "user", "content": f"call +49 30 1234567, {TOKEN}"}],
        answer="ok",
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    with FeedbackStore(tmp_path / "feedback.db") as opened:
        yield opened


def test_sampling_and_the_daily_cap_limit_what_is_queued(store: FeedbackStore) -> None:
    policy = LocalPolicy(site_opt_in=True, feedback=FeedbackPolicy(mode="opt_in", max_samples_per_day=2))
    collector = FeedbackCollector(store, policy, rng=random.Random(1))

    decisions = [collector.rated(_rated(n), policy.current()) for n in range(3)]

    assert [d.queued for d in decisions] == [True, True, False] and "cap of 2" in decisions[2].reason
    [first, _] = store.pending(10)
    assert first.messages[0].content == f"call <PHONE>, {TOKEN}" and first.redactions == {"PHONE": 1}
    policy.update(LocalAdaptation(), FeedbackPolicy(mode="opt_in", sample_rate=0.0))
    assert "not sampled" in collector.rated(_rated(9), policy.current()).reason


def test_a_withdrawn_consent_empties_the_queue_before_anything_is_sent(store: FeedbackStore) -> None:
    policy = LocalPolicy(site_opt_in=True, feedback=FeedbackPolicy(mode="opt_in"))
    collector = FeedbackCollector(store, policy)
    assert collector.rated(_rated(1), policy.current()).queued
    posted: list[Any] = []

    class Client:
        def post_feedback(self, device_id: str, batch: FeedbackBatch) -> FeedbackAck:
            posted.append(batch)
            return FeedbackAck(accepted_ids=[s.id for s in batch.samples])

    policy.update(LocalAdaptation(), FeedbackPolicy(mode="off"))

    assert collector.upload(Client(), "dev-1") == 0  # type: ignore[arg-type]
    assert posted == [] and store.queued() == 0


def test_rejected_samples_leave_the_queue_too(store: FeedbackStore) -> None:
    policy = LocalPolicy(site_opt_in=True, feedback=FeedbackPolicy(mode="opt_in"))
    collector = FeedbackCollector(store, policy)
    for n in range(3):
        collector.rated(_rated(n), policy.current())
    ids = [s.id for s in store.pending(10)]

    class Client:
        def post_feedback(self, device_id: str, batch: FeedbackBatch) -> FeedbackAck:
            return FeedbackAck(accepted_ids=ids[:2], rejected={ids[2]: "over the server's cap"})

    assert collector.upload(Client(), "dev-1") == 3  # type: ignore[arg-type]
    assert store.queued() == 0
