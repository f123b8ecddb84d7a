"""The real default model behind the local API, driven by the official `openai` client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import slmops
from slmops.runtime import BackendConfig, LlamaCppBackend, LocalServer, ModelHost, ModelInfo, create_app, probe_backend

pytestmark = pytest.mark.integration

GEMMA_TEMPLATE = (Path(slmops.__file__).parent / "registry" / "templates" / "gemma3.jinja").read_text(encoding="utf-8")
# what a turn marker looks like in an answer: Gemma's control tokens as text, or the role line that follows
# <start_of_turn> when that token itself renders as nothing
TURN_MARKER = re.compile(r"<start_of_turn>|<end_of_turn>|<bos>|<eos>|^\s*(user|model)\s*$", re.MULTILINE)
PROMPTS = [
    "What is 2+2?",
    "What is the capital of France? Answer in one word.",
    "Name three primary colors.",
    "Translate 'good morning' into German.",
    "Hello!",
]


@pytest.fixture(scope="module")
def gemma(gemma_gguf: Path) -> Iterator[tuple[LlamaCppBackend, ModelInfo]]:
    found = ModelInfo.from_gguf(gemma_gguf, context_tokens=1024, model_id="gemma3-270m@v1")
    info = ModelInfo(**{**found.__dict__, "chat_template": GEMMA_TEMPLATE})
    backend = LlamaCppBackend.load(gemma_gguf, info.model_id, BackendConfig(context_tokens=1024, threads=2))
    yield backend, info
    backend.close()


def test_gemma_passes_the_probe(gemma: tuple[LlamaCppBackend, ModelInfo]) -> None:
    result = probe_backend(*gemma)
    assert result.ok, result.reason


def test_openai_client_chats_with_gemma(gemma: tuple[LlamaCppBackend, ModelInfo]) -> None:
    openai = pytest.importorskip("openai")
    host = ModelHost()
    host.activate(*gemma)
    server = LocalServer(create_app(host)).start()
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="local") as client:
            assert [m.id for m in client.models.list()] == ["gemma3-270m@v1"]
            messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

            reply = client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=24, seed=1)
            chunks = list(
                client.chat.completions.create(
                    model="gemma3-270m", messages=messages, max_tokens=24, stream=True, temperature=0
                )
            )
    finally:
        server.stop()

    assert reply.model == "gemma3-270m@v1" and reply.choices[0].message.role == "assistant"
    assert (reply.choices[0].message.content or "").strip()
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24
    assert reply.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "<end_of_turn>" not in streamed


@pytest.fixture(scope="module")
def gemma_url(gemma: tuple[LlamaCppBackend, ModelInfo]) -> Iterator[str]:
    host = ModelHost()
    host.activate(*gemma)
    server = LocalServer(create_app(host)).start()
    try:
        yield server.url
    finally:
        server.stop()
        host.deactivate()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_no_turn_marker_appears_in_an_answer_streamed_or_not(gemma_url: str, prompt: str) -> None:
    openai = pytest.importorskip("openai")
    messages = [{"role": "user", "content": prompt}]
    with openai.OpenAI(base_url=gemma_url + "/v1", api_key="local") as client:
        reply = client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=32, temperature=0)
        chunks = list(
            client.chat.completions.create(
                model="gemma3-270m", messages=messages, max_tokens=32, temperature=0, stream=True
            )
        )

    full = reply.choices[0].message.content or ""
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.strip() and not TURN_MARKER.search(full), full
    assert streamed == full


def test_an_unknown_model_name_is_a_404_for_the_openai_client(gemma_url: str) -> None:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=gemma_url + "/v1", api_key="local", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert client.models.retrieve("gemma3-270m@v1").id == "gemma3-270m@v1"

    assert caught.value.code == "model_not_found"
