"""Site adaptations in the local API: the system prompt, sampling defaults and bounds (real server, tiny model)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmops.core.adaptation import LocalAdaptation, Sampling, SamplingBounds
from slmops.core.feedback import FeedbackPolicy
from slmops.runtime import LlamaCppBackend, LocalServer, ModelHost, ModelInfo, create_app
from slmops.runtime._openai import ChatRequest
from slmops.runtime.policy import CLAMPED_HEADER, LocalPolicy, adapt_request, with_system_prompt
from tests.runtime.test_server import assert_error, chat, sse

Load = Callable[..., tuple[LlamaCppBackend, ModelInfo]]

# A template that refuses any conversation whose first message is not a system message with the expected text, so
# a 200 proves what the model was given.
EXPECT = (
    "{% if messages[0].role != 'system' or messages[0].content != expected %}"
    "{{ raise_exception('got ' + messages[0].role + ': ' + messages[0].content) }}{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
)


def _expecting(text: str) -> str:
    return "{% set expected = " + repr(text) + " %}" + EXPECT


class Served:
    def __init__(self, host: ModelHost, policy: LocalPolicy, client: httpx.Client) -> None:
        self.host, self.policy, self.client = host, policy, client

    def adapt(self, local: LocalAdaptation) -> None:
        self.policy.update(local, FeedbackPolicy())


@pytest.fixture
def served() -> Iterator[Served]:
    host, policy = ModelHost(), LocalPolicy()
    server = LocalServer(create_app(host, max_tokens_limit=16, policy=policy)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield Served(host, policy, client)
    finally:
        server.stop()
        host.deactivate()


def test_the_site_system_prompt_comes_first_and_is_merged_with_the_clients(
    served: Served, tiny_model: Path, load: Load
) -> None:
    served.adapt(LocalAdaptation(system_prompt="You serve shop 42."))
    served.host.activate(*load(tiny_model, chat_template=_expecting("You serve shop 42.")))
    assert served.client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200

    served.host.activate(*load(tiny_model, chat_template=_expecting("You serve shop 42.\n\nBe brief.")))
    own = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    answer = served.client.post("/v1/chat/completions", json={**own, "max_tokens": 2})
    assert answer.status_code == 200, answer.text


def test_a_new_adaptation_applies_to_the_next_request_without_a_reload(
    served: Served, tiny_model: Path, load: Load
) -> None:
    served.host.activate(*load(tiny_model, chat_template=_expecting("second")))
    served.adapt(LocalAdaptation(system_prompt="first"))
    assert_error(served.client.post("/v1/chat/completions", json=chat(max_tokens=2)), 400, "invalid_messages")

    served.adapt(LocalAdaptation(system_prompt="second"))

    assert served.client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200


def test_sampling_defaults_fill_unset_fields_and_bounds_clamp_with_a_header(
    served: Served, tiny_model: Path, load: Load
) -> None:
    served.host.activate(*load(tiny_model))
    served.adapt(
        LocalAdaptation(
            sampling=Sampling(max_tokens=2, temperature=0.0),
            bounds=SamplingBounds(temperature=(0.0, 0.5), max_tokens=(1, 3)),
        )
    )

    default = served.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert default.status_code == 200 and CLAMPED_HEADER not in default.headers
    assert default.json()["usage"]["completion_tokens"] <= 2
    clamped = served.client.post("/v1/chat/completions", json=chat(max_tokens=12, temperature=1.5))
    assert clamped.status_code == 200 and clamped.headers[CLAMPED_HEADER] == "temperature,max_tokens"
    assert clamped.json()["usage"]["completion_tokens"] <= 3
    with served.client.stream(
        "POST", "/v1/completions", json={"prompt": "a", "max_tokens": 9, "stream": True}
    ) as streamed:
        assert streamed.headers[CLAMPED_HEADER] == "max_tokens"
        assert sse(streamed)[-1] == "[DONE]"


def test_with_system_prompt_inserts_or_merges() -> None:
    user: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    assert with_system_prompt(user, None) is user
    assert with_system_prompt(user, "S") == [{"role": "system", "content": "S"}, *user]
    developer: list[dict[str, Any]] = [{"role": "developer", "content": [{"type": "text", "text": "D"}]}, *user]
    assert with_system_prompt(developer, "S") == [{"role": "system", "content": "S\n\nD"}, *user]


bounds = st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 2.0)).map(lambda p: (min(p), max(p)))
top_p_bounds = st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(lambda p: (min(p), max(p)))
token_bounds = st.tuples(st.integers(1, 64), st.integers(1, 64)).map(lambda p: (min(p), max(p)))


@given(
    temperature=st.none() | st.floats(0.0, 2.0),
    top_p=st.none() | st.floats(0.01, 1.0),
    max_tokens=st.none() | st.integers(1, 100),
    default_tokens=st.none() | st.integers(1, 100),
    t_bound=st.none() | bounds,
    p_bound=st.none() | top_p_bounds,
    m_bound=st.none() | token_bounds,
)
def test_adapted_values_always_lie_within_the_bounds_and_the_server_limit(
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    default_tokens: int | None,
    t_bound: tuple[float, float] | None,
    p_bound: tuple[float, float] | None,
    m_bound: tuple[int, int] | None,
) -> None:
    sent = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    body = ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], **{k: v for k, v in sent.items() if v is not None}}
    )
    local = LocalAdaptation(
        sampling=Sampling(max_tokens=default_tokens),
        bounds=SamplingBounds(temperature=t_bound, top_p=p_bound, max_tokens=m_bound),
    )

    adapted, clamped = adapt_request(body, local, max_tokens_limit=50)

    if t_bound:
        assert t_bound[0] <= adapted.temperature <= t_bound[1]
    if p_bound:
        assert p_bound[0] <= adapted.top_p <= p_bound[1]
    effective = adapted.max_tokens or 50
    if m_bound:
        assert min(m_bound[0], 50) <= effective <= m_bound[1]
        assert effective <= 50
    for name in clamped:  # only what the client sent is reported, and only when it changed
        assert sent[name] is not None and getattr(adapted, name) != sent[name]
    if not (t_bound or p_bound or m_bound):
        assert clamped == []
        assert adapted.temperature == (temperature if temperature is not None else 1.0)
