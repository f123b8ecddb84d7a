from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from slmops.errors import RuntimeBackendError
from slmops.runtime import LlamaCppBackend, LocalServer, ModelHost, ModelInfo, ServerMetrics, TextStream, create_app

Load = Callable[..., tuple[LlamaCppBackend, ModelInfo]]
SECRET = "purple-elephant-7731"
GEN_AI = (
    "gen_ai_server_request_duration_seconds",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
    "gen_ai_client_token_usage",
)


@pytest.fixture
def server() -> Iterator[tuple[ModelHost, ServerMetrics, httpx.Client]]:
    host = ModelHost()
    metrics = ServerMetrics()
    served = LocalServer(create_app(host, max_tokens_limit=64, metrics=metrics)).start()
    try:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            yield host, metrics, client
    finally:
        served.stop()
        host.deactivate()


def scrape(client: httpx.Client) -> tuple[str, dict[str, list[Sample]]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text, {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def sample(samples: list[Sample], suffix: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name.endswith(suffix) and labels.items() <= s.labels.items()]
    assert len(found) == 1, (suffix, labels, samples)
    return found[0]


def scrape_when(client: httpx.Client, ready: Callable[[dict[str, list[Sample]]], bool]) -> dict[str, list[Sample]]:
    """Scrape until ``ready``: a request's metrics are recorded by its worker just after the answer is sent."""
    deadline = time.monotonic() + 10
    while True:
        _, families = scrape(client)
        if ready(families) or time.monotonic() > deadline:
            return families
        time.sleep(0.02)


def durations(families: dict[str, list[Sample]]) -> float:
    return sum(s.value for s in families["gen_ai_server_request_duration_seconds"] if s.name.endswith("_count"))


def test_metrics_follow_the_gen_ai_conventions_for_a_chat_and_a_streamed_completion(
    server: tuple[ModelHost, ServerMetrics, httpx.Client], tiny_model: Path, load: Load
) -> None:
    host, _metrics, client = server
    _, before = scrape(client)
    assert set(GEN_AI) <= set(before) and all(not before[name] for name in GEN_AI)
    host.activate(*load(tiny_model, "tiny@v1"))

    chat = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 4, "temperature": 0}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    with client.stream("POST", "/v1/completions", json={"prompt": SECRET, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()

    families = scrape_when(client, lambda f: durations(f) == 2)
    text, _ = scrape(client)
    assert SECRET not in text
    for operation, output in (("chat", 4), ("text_completion", 3)):
        labels = {"gen_ai_operation_name": operation, "gen_ai_request_model": "tiny@v1"}
        duration = families["gen_ai_server_request_duration_seconds"]
        assert sample(duration, "_count", **labels) == 1
        assert all(s.labels.get("error_type", "") == "" for s in duration)
        ttft = sample(families["gen_ai_server_time_to_first_token_seconds"], "_sum", **labels)
        assert 0 < ttft <= sample(duration, "_sum", **labels)
        assert sample(families["gen_ai_server_time_per_output_token_seconds"], "_count", **labels) == 1
        tokens = families["gen_ai_client_token_usage"]
        assert sample(tokens, "_sum", **labels, gen_ai_token_type="output") == output
        assert sample(tokens, "_sum", **labels, gen_ai_token_type="input") > len(SECRET)  # byte-level tokens
        assert sample(tokens, "_count", **labels, gen_ai_token_type="input") == 1
        assert sample(tokens, "_bucket", **labels, gen_ai_token_type="output", le="4.0") == 1
        assert sample(tokens, "_bucket", **labels, gen_ai_token_type="output", le="1.0") == 0


class FailingBackend:
    """A real backend whose streams fail after counting the prompt."""

    def __init__(self, inner: LlamaCppBackend) -> None:
        self.inner = inner
        self.model_id = inner.model_id

    def complete(self, prompt: str, **options: Any) -> Any:
        raise AssertionError("the server streams")

    def stream(self, prompt: str, **options: Any) -> TextStream:
        raise RuntimeBackendError("llama.cpp failed to decode")

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def close(self) -> None:
        self.inner.close()


def test_a_failed_request_counts_its_duration_with_its_error_type_and_no_tokens(
    server: tuple[ModelHost, ServerMetrics, httpx.Client], tiny_model: Path, load: Load
) -> None:
    host, _metrics, client = server
    backend, info = load(tiny_model, "tiny@v1")
    host.activate(FailingBackend(backend), info)

    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 500
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 9999}).status_code == 400  # not counted

    families = scrape_when(client, lambda f: durations(f) == 1)
    labels = {"gen_ai_operation_name": "text_completion", "error_type": "runtime_backend"}
    assert sample(families["gen_ai_server_request_duration_seconds"], "_count", **labels) == 1
    assert durations(families) == 1
    assert not families["gen_ai_client_token_usage"] and not families["gen_ai_server_time_to_first_token_seconds"]


def test_each_app_has_its_own_registry_and_extra_collectors_are_scraped(
    server: tuple[ModelHost, ServerMetrics, httpx.Client],
) -> None:
    _host, metrics, client = server
    other = ServerMetrics()
    other.observe("chat", "m@v1", duration_s=0.5, input_tokens=3, output_tokens=2, time_to_first_token_s=0.1)
    slot = 0

    def gauges() -> Iterable[Metric]:
        yield GaugeMetricFamily("slmops_agent_test_slot", "a test gauge", value=slot)

    metrics.add_collector(gauges)
    slot = 2

    _, families = scrape(client)
    assert not families["gen_ai_server_request_duration_seconds"]
    assert [s.value for s in families["slmops_agent_test_slot"]] == [2]
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]
