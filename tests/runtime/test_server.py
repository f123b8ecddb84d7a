from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.runtime import (
    Completion,
    LlamaCppBackend,
    LocalServer,
    ModelHost,
    ModelInfo,
    RequestStats,
    TextStream,
    create_app,
)

Load = Callable[..., tuple[LlamaCppBackend, ModelInfo]]
SECRET = "purple-elephant-7731"


class Served:
    def __init__(self, host: ModelHost, client: httpx.Client, stats: RequestStats) -> None:
        self.host = host
        self.client = client
        self.stats = stats


@pytest.fixture
def served() -> Iterator[Served]:
    host = ModelHost()
    stats = RequestStats()
    server = LocalServer(create_app(host, max_prompt_chars=500, max_tokens_limit=64, stats=stats)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield Served(host, client, stats)
    finally:
        server.stop()
        host.deactivate()


def chat(text: str = "hi", **extra: Any) -> dict[str, Any]:
    """A chat request without a ``model`` field: the active model answers."""
    return {"messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


def sse(response: httpx.Response) -> list[Any]:
    events: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return events


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code
    return error


def test_without_a_model_inference_is_503_and_no_models_are_listed(served: Served) -> None:
    assert_error(served.client.post("/v1/chat/completions", json=chat()), 503, "model_not_loaded")
    assert_error(served.client.post("/v1/completions", json={"prompt": "x"}), 503, "model_not_loaded")
    assert served.client.get("/health").status_code == 503
    assert served.client.get("/v1/models").json() == {"object": "list", "data": []}


def test_models_and_health_name_the_active_model(served: Served, tiny_model: Path, load: Load) -> None:
    served.host.activate(*load(tiny_model, "tiny@v1"))

    assert [m["id"] for m in served.client.get("/v1/models").json()["data"]] == ["tiny@v1"]
    assert served.client.get("/health").json()["model"] == "tiny@v1"


def test_chat_completion_non_streaming_and_streaming_agree(served: Served, tiny_model: Path, load: Load) -> None:
    served.host.activate(*load(tiny_model))

    full = served.client.post("/v1/chat/completions", json=chat(max_tokens=10)).json()
    with served.client.stream(
        "POST", "/v1/chat/completions", json=chat(max_tokens=10, stream=True, stream_options={"include_usage": True})
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)

    assert full["object"] == "chat.completion" and full["model"] == "tiny@v1"
    assert full["choices"][0]["finish_reason"] == "length"
    assert full["usage"]["completion_tokens"] == 10
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_text_completion_non_streaming_and_streaming(served: Served, tiny_model: Path, load: Load) -> None:
    served.host.activate(*load(tiny_model))
    body = {"prompt": "hello", "max_tokens": 6, "temperature": 0}

    full = served.client.post("/v1/completions", json=body).json()
    with served.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = sse(response)

    assert full["object"] == "text_completion" and full["usage"]["completion_tokens"] == 6
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == full["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_a_request_for_a_model_this_device_does_not_serve_is_404_model_not_found(
    served: Served, tiny_model: Path, load: Load
) -> None:
    backend, info = load(tiny_model, "tiny@v1")
    served.host.activate(backend, ModelInfo(**{**info.__dict__, "aliases": ("assistant",)}))
    post = served.client.post

    for name in ("tiny@v2", "gpt-4o", "any"):
        error = assert_error(post("/v1/chat/completions", json=chat(model=name, max_tokens=2)), 404, "model_not_found")
        assert error["type"] == "invalid_request_error" and error["param"] == "model"
        assert name in error["message"] and "'tiny@v1'" in error["message"]
    assert_error(post("/v1/completions", json={"model": "x", "prompt": "hi", "stream": True}), 404, "model_not_found")
    assert_error(served.client.get("/v1/models/gpt-4o"), 404, "model_not_found")
    assert served.stats.snapshot().rejected == 4

    for name in ("tiny@v1", "tiny", "assistant", None):
        body = chat(max_tokens=2) if name is None else chat(model=name, max_tokens=2)
        answer = post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, (name, answer.text)
        assert answer.json()["model"] == "tiny@v1"
    assert post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert served.client.get("/v1/models/tiny@v1").json()["id"] == "tiny@v1"


def test_without_a_model_a_named_model_is_503_not_404(served: Served) -> None:
    assert_error(served.client.post("/v1/chat/completions", json=chat(model="tiny")), 503, "model_not_loaded")
    assert_error(served.client.get("/v1/models/tiny"), 404, "model_not_found")


def test_the_models_stop_tokens_are_always_applied(served: Served, tiny_model: Path, load: Load) -> None:
    backend, info = load(tiny_model)
    served.host.activate(backend, info)
    body = {"prompt": "hello", "max_tokens": 12, "temperature": 0}
    text = served.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    cut = next(i for i in range(1, len(text)) if text[i] not in text[:i])
    served.host.activate(backend, ModelInfo(**{**info.__dict__, "stop_tokens": [text[cut]]}))

    stopped = served.client.post("/v1/completions", json=body).json()["choices"][0]

    assert (stopped["text"], stopped["finish_reason"]) == (text[:cut], "stop")


def test_the_models_chat_template_is_used(served: Served, tiny_model: Path, load: Load) -> None:
    refusing = "{{ raise_exception('only system messages, please') }}"
    served.host.activate(*load(tiny_model, chat_template=refusing))

    error = assert_error(served.client.post("/v1/chat/completions", json=chat()), 400, "invalid_messages")
    assert "only system messages" in error["message"]


def test_an_unsafe_chat_template_is_a_server_error(served: Served, tiny_model: Path, load: Load) -> None:
    served.host.activate(*load(tiny_model, chat_template="{{ ''.__class__.__mro__ }}"))
    assert_error(served.client.post("/v1/chat/completions", json=chat()), 500, "invalid_chat_template")


def test_bad_requests_are_400_in_openai_shape_without_echoing_input(
    served: Served, tiny_model: Path, load: Load
) -> None:
    served.host.activate(*load(tiny_model))
    post = served.client.post

    error = assert_error(post("/v1/chat/completions", json={"messages": SECRET}), 400, "invalid_request")
    assert SECRET not in json.dumps(error)
    assert_error(post("/v1/chat/completions", json=chat(max_tokens=65)), 400, "max_tokens")
    assert_error(post("/v1/chat/completions", json=chat("x" * 501)), 400, "prompt_too_long")
    assert_error(post("/v1/completions", json={"prompt": "x" * 501}), 400, "prompt_too_long")
    assert_error(post("/v1/chat/completions", json=chat(n=2)), 400, "invalid_request")
    assert_error(post("/v1/chat/completions", json=chat(temperature=3)), 400, "invalid_request")
    assert_error(post("/v1/chat/completions", json=chat(stop=["a", "b", "c", "d", "e"])), 400, "invalid_request")
    assert_error(post("/v1/chat/completions", json=chat(messages=[])), 400, "invalid_request")
    assert_error(post("/v1/completions", json={"prompt": "x " * 240}), 400, "context_length_exceeded")
    assert_error(post("/v1/completions", json={"prompt": "x " * 240, "stream": True}), 400, "context_length_exceeded")
    assert_error(served.client.get("/v1/nothing"), 404, "not_found")
    assert served.stats.snapshot().rejected == 10


def test_stats_count_requests_and_tokens_and_never_hold_or_log_text(
    served: Served, tiny_model: Path, load: Load, caplog: pytest.LogCaptureFixture
) -> None:
    served.host.activate(*load(tiny_model))
    caplog.set_level(logging.DEBUG)

    served.client.post("/v1/chat/completions", json=chat(SECRET, max_tokens=4))
    with served.client.stream("POST", "/v1/completions", json={"prompt": SECRET, "max_tokens": 3, "stream": True}) as r:
        sse(r)

    # a stream's request is counted when the server's generator ends, which may be just after the client read [DONE]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counted = served.stats.snapshot().models.get("tiny@v1")
        if counted is not None and counted.requests >= 2:
            break
        time.sleep(0.02)
    snapshot = served.stats.take()
    model = snapshot.models["tiny@v1"]
    assert (model.requests, model.errors, model.completion_tokens) == (2, 0, 7)
    assert model.prompt_tokens > 2 * len(SECRET)  # byte-level tokens
    assert len(model.latency_s) == 2 and len(model.time_to_first_token_s) == 2
    assert all(t <= total for t, total in zip(model.time_to_first_token_s, model.latency_s, strict=True))
    assert SECRET not in repr(snapshot) and SECRET not in caplog.text
    assert served.stats.snapshot().models == {}


class GatedBackend:
    """A real llama.cpp backend whose streams pause after their first piece until ``gate`` is set."""

    def __init__(self, inner: LlamaCppBackend) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.gate = threading.Event()
        self.closed = threading.Event()

    def complete(self, prompt: str, **options: Any) -> Completion:
        return self.inner.complete(prompt, **options)

    def stream(self, prompt: str, **options: Any) -> TextStream:
        inner = self.inner.stream(prompt, **options)

        def pieces() -> Iterator[str]:
            for index, piece in enumerate(inner):
                if index == 1:
                    assert self.gate.wait(30)
                yield piece

        stream = TextStream(pieces(), prompt_tokens=inner.prompt_tokens)
        stream.call_on_close(inner.close)
        stream.call_on_close(lambda: setattr(stream, "completion_tokens", inner.completion_tokens))
        stream.call_on_close(lambda: setattr(stream, "finish_reason", inner.finish_reason))
        return stream

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def close(self) -> None:
        self.inner.close()
        self.closed.set()


def test_a_stream_in_flight_during_a_swap_finishes_on_the_old_model(
    served: Served, tiny_model: Path, load: Load
) -> None:
    old_backend, old_info = load(tiny_model, "tiny@v1")
    old = GatedBackend(old_backend)
    served.host.activate(old, old_info)
    with served.client.stream(
        "POST", "/v1/chat/completions", json=chat(max_tokens=20, stream=True, stream_options={"include_usage": True})
    ) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line).removeprefix("data: "))

        served.host.activate(*load(tiny_model, "tiny@v2"))
        after = served.client.post("/v1/chat/completions", json=chat(max_tokens=2)).json()
        assert not old.closed.is_set()
        old.gate.set()
        rest = [line.removeprefix("data: ") for line in lines if line]

    assert after["model"] == "tiny@v2"
    assert rest[-1] == "[DONE]"
    chunks = [first, *(json.loads(item) for item in rest[:-1])]
    assert {c["model"] for c in chunks} == {"tiny@v1"}
    assert chunks[-1]["usage"]["completion_tokens"] == 20
    assert old.closed.wait(10)


def test_a_client_that_disconnects_mid_stream_releases_the_model(served: Served, tiny_model: Path, load: Load) -> None:
    backend, info = load(tiny_model, "tiny@v1")
    gated = GatedBackend(backend)
    served.host.activate(gated, info)
    with served.client.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stream": True}) as r:
        next(line for line in r.iter_lines() if line)
    served.host.deactivate()
    gated.gate.set()

    # the lease is released and the old backend closed; whether the generation was cancelled before it finished
    # depends on when the server notices the disconnect, so the stats are not asserted here
    assert gated.closed.wait(10)
