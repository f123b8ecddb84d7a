"""Prompt NLL on the device: the backend scores the first prompt tokens with llama.cpp, bounded, without changing
what it generates; the local API records it with the request's finish reason and empty-output flag."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from slmops.runtime import LocalServer, ModelHost, ModelInfo, RequestStats, create_app
from slmops.runtime.backend import BackendConfig, LlamaCppBackend, _import_llama_cpp
from tests.runtime._models import silent_model

TINY_VOCAB = 260  # tests/tiny_gguf.py's default vocabulary size
PROMPT = "the quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun by the river"

Open = Callable[..., LlamaCppBackend]


@pytest.fixture
def open_backend() -> Iterator[Open]:
    opened: list[LlamaCppBackend] = []

    def factory(path: Path, *, rate: float = 1.0, max_tokens: int = 32, context: int = 256) -> LlamaCppBackend:
        config = BackendConfig(
            context_tokens=context, threads=1, prompt_nll_sample_rate=rate, prompt_nll_max_tokens=max_tokens
        )
        backend = LlamaCppBackend.load(path, "tiny@v1", config)
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        backend.close()


def _reference_nll(path: Path, tokens: list[int], max_tokens: int) -> float:
    """The same quantity the slow way: every logit of the prompt (``logits_all=True``), log-softmax in Python."""
    llama_cpp = _import_llama_cpp()
    llama = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    try:
        llama.eval(tokens)
        n = min(len(tokens), max_tokens + 1)
        total = 0.0
        for position in range(n - 1):
            row = [float(v) for v in llama.scores[position]]
            peak = max(row)
            log_z = peak + math.log(sum(math.exp(v - peak) for v in row))
            total += log_z - row[tokens[position + 1]]
        return total / (n - 1)
    finally:
        llama.close()


def _greedy(backend: LlamaCppBackend, prompt: str) -> tuple[str, float | None]:
    with backend.stream(prompt, max_tokens=12, temperature=0.0, top_p=1.0, stop=[]) as pieces:
        text = "".join(pieces)
        return text, pieces.prompt_nll


@pytest.mark.parametrize("max_tokens", [1, 7, 8, 9, 32, 200])
def test_the_prompt_nll_equals_the_full_logits_result(tiny_model: Path, open_backend: Open, max_tokens: int) -> None:
    backend = open_backend(tiny_model, max_tokens=max_tokens)
    tokens = backend._tokens(PROMPT)
    assert len(tokens) > 33  # long enough that max_tokens truncates

    _, nll = _greedy(backend, PROMPT)

    assert nll is not None and math.isfinite(nll) and nll > 0
    assert nll == pytest.approx(_reference_nll(tiny_model, tokens, max_tokens), rel=1e-4)


def test_a_model_that_cannot_tell_tokens_apart_scores_exactly_log_vocab(tmp_path: Path, open_backend: Open) -> None:
    backend = open_backend(silent_model(tmp_path / "silent.gguf"))  # all output weights zero: uniform next token

    _, nll = _greedy(backend, PROMPT)

    assert nll == pytest.approx(math.log(TINY_VOCAB), rel=1e-5)


@pytest.mark.parametrize("prompt", ["hi", "hello there, friend", PROMPT, PROMPT * 3])
def test_scoring_does_not_change_what_is_generated(tiny_model: Path, open_backend: Open, prompt: str) -> None:
    scored, plain = open_backend(tiny_model, rate=1.0, context=512), open_backend(tiny_model, rate=0.0, context=512)

    first, second = _greedy(scored, prompt), _greedy(plain, prompt)
    again = _greedy(scored, prompt)  # the cached prefix of the previous request is reused or replaced correctly

    assert first[0] == second[0] == again[0] and first[1] == again[1]
    assert second[1] is None


def test_a_sample_rate_scores_about_that_fraction_deterministically(tiny_model: Path, open_backend: Open) -> None:
    def scored(backend: LlamaCppBackend) -> list[bool]:
        return [_greedy(backend, "hello there")[1] is not None for _ in range(200)]

    first = scored(open_backend(tiny_model, rate=0.25))
    second = scored(open_backend(tiny_model, rate=0.25))

    assert first == second  # seeded by BackendConfig.seed
    assert 25 <= sum(first) <= 75  # binomial(200, 0.25): mean 50, sd 6.1


def test_a_one_token_prompt_has_nothing_to_score(tiny_model: Path, open_backend: Open) -> None:
    backend = open_backend(tiny_model)
    assert _greedy(backend, "")[1] is None  # only the BOS token


@pytest.mark.parametrize(("rate", "max_tokens"), [(-0.1, 32), (1.5, 32), (0.5, 0)])
def test_bad_scoring_settings_are_refused(rate: float, max_tokens: int) -> None:
    with pytest.raises(ValueError, match="prompt_nll"):
        BackendConfig(prompt_nll_sample_rate=rate, prompt_nll_max_tokens=max_tokens)


def test_the_local_api_records_nll_finish_reason_and_empty_output_per_request(
    tiny_model: Path, tmp_path: Path, open_backend: Open
) -> None:
    host, stats = ModelHost(), RequestStats()
    backend = open_backend(tiny_model)
    host.activate(backend, ModelInfo.from_gguf(tiny_model, context_tokens=256, model_id="tiny@v1"))
    server = LocalServer(create_app(host, max_prompt_chars=2000, max_tokens_limit=64, stats=stats)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for max_tokens in (3, 5):
                body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
                assert client.post("/v1/chat/completions", json={**body, "temperature": 0}).status_code == 200
    finally:
        server.stop()
        host.deactivate()

    summaries = stats.take().models["tiny@v1"].summaries

    assert [s.completion_tokens for s in summaries] == [3, 5]
    assert [s.finish_reason for s in summaries] == ["length", "length"]
    assert all(s.prompt_tokens > 20 and s.empty is not None for s in summaries)
    nlls = [s.prompt_nll for s in summaries]
    assert all(v is not None and 0 < v < 3 * math.log(TINY_VOCAB) for v in nlls) and nlls[0] == nlls[1]


def test_the_local_api_counts_an_answer_without_text_as_empty(tmp_path: Path, open_backend: Open) -> None:
    path = silent_model(tmp_path / "silent.gguf")  # greedy picks <unk> forever, which renders as ''
    host, stats = ModelHost(), RequestStats()
    host.activate(open_backend(path), ModelInfo.from_gguf(path, context_tokens=256, model_id="tiny@v1"))
    server = LocalServer(create_app(host, max_prompt_chars=2000, max_tokens_limit=64, stats=stats)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        server.stop()
        host.deactivate()

    [summary] = stats.take().models["tiny@v1"].summaries

    assert summary.empty is True and summary.completion_tokens == 4
    assert summary.prompt_nll == pytest.approx(math.log(TINY_VOCAB), rel=1e-5)
