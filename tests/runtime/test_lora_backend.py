"""llama.cpp loads a GGUF LoRA adapter over a tiny model: it changes what the model generates, scale 0 is the base,
and an adapter file llama.cpp refuses is a RuntimeBackendError that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.errors import RuntimeBackendError
from slmops.runtime.backend import BackendConfig, LlamaCppBackend
from tests.tiny_gguf import write_tiny_gguf
from tests.tiny_lora import write_tiny_lora

GREEDY = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "stop": []}


def _generate(model: Path, config: BackendConfig) -> str:
    backend = LlamaCppBackend.load(model, "tiny", config)
    try:
        return backend.complete("hello there", **GREEDY).text  # type: ignore[arg-type]
    finally:
        backend.close()


def test_an_adapter_changes_the_output_and_scale_zero_is_the_base(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf", seed=1)
    lora = write_tiny_lora(tmp_path / "lora.gguf", seed=3)
    config = BackendConfig(context_tokens=64, prompt_nll_sample_rate=0.0)

    base = _generate(model, config)
    adapted = _generate(model, BackendConfig(context_tokens=64, prompt_nll_sample_rate=0.0, lora_path=lora))
    zero = _generate(
        model, BackendConfig(context_tokens=64, prompt_nll_sample_rate=0.0, lora_path=lora, lora_scale=0.0)
    )

    assert adapted != base
    assert zero == base
    assert _generate(model, BackendConfig(context_tokens=64, prompt_nll_sample_rate=0.0, lora_path=lora)) == adapted


@pytest.mark.parametrize("kind", ["missing", "not-gguf", "wrong-shape", "a-model-not-an-adapter"])
def test_an_adapter_llama_cpp_refuses_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf", seed=1)
    bad = tmp_path / "bad.gguf"
    if kind == "not-gguf":
        bad.write_bytes(b"GGUF" + bytes(200))
    elif kind == "wrong-shape":
        write_tiny_lora(bad, n_embd=128)
    elif kind == "a-model-not-an-adapter":
        write_tiny_gguf(bad, seed=2)

    with pytest.raises(RuntimeBackendError) as raised:
        LlamaCppBackend.load(model, "tiny", BackendConfig(context_tokens=64, lora_path=bad))

    message = str(raised.value)
    assert str(bad) in message
    assert ("found none" if kind == "missing" else "expected a GGUF LoRA adapter") in message
